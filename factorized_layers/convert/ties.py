"""Weight-tied layers: converting them together, or not at all.

Language models often tie the output head's weight to the embedding table (the same
``nn.Parameter`` in two modules). Converting each on its own would untie them and
store the table twice. A group of modules that share a weight converts when every
module of the group is a target and one of them (the *owner*) has a layer class with
a ``tie(module)`` method (e.g. :class:`~factorized_layers.layers.SVDEmbedding`): the
owner is factorized as usual and every other member (a *follower*) becomes
``owner_layer.tie(member)``, a layer that shares the owner's factors. Otherwise the
group's targets stay dense, with the reason in the report.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn

__all__ = ["tied_groups"]


def _weight_users(model: nn.Module) -> Dict[int, List[Tuple[str, nn.Module]]]:
    """id(weight parameter) -> every distinct module (with its first name) holding it."""
    users: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for fqn, module in model.named_modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append((fqn, module))
    return users


def tied_groups(
    model: nn.Module, targets: List[Tuple[str, nn.Module, type]]
) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The tied targets of a conversion.

    Args:
        model: The model being converted.
        targets: ``(fqn, module, layer class)`` of every target.

    Returns:
        ``(followers, untied)``: ``{follower fqn: owner fqn}`` for groups that convert
        together, and ``{fqn: reason}`` for tied targets that must stay dense.
    """
    users = _weight_users(model)
    by_name = {fqn: layer_cls for fqn, _, layer_cls in targets}
    followers: Dict[str, str] = {}
    untied: Dict[str, str] = {}
    for fqn, module, _ in targets:
        weight = module._parameters.get("weight")
        group = users.get(id(weight), []) if isinstance(weight, nn.Parameter) else []
        if len(group) < 2 or fqn in followers or fqn in untied:
            continue
        names = [name for name, _ in group]
        outside = [name for name in names if name not in by_name]
        owners = [name for name in names if callable(getattr(by_name.get(name), "tie", None))]
        if outside or not owners:
            why = (
                f"its weight is tied to {outside}, which {'is' if len(outside) == 1 else 'are'} "
                "not converted"
                if outside
                else f"its weight is tied to {[n for n in names if n != fqn]} and no target "
                "class of the group can share its factors (no tie() method)"
            )
            untied.update({name: why for name in names if name in by_name})
            continue
        owner = owners[0]
        followers.update({name: owner for name in names if name != owner})
    return followers, untied


def factor_ties(modules: List[Tuple[str, nn.Module]]) -> Dict[str, str]:
    """``{follower fqn: owner fqn}`` among factorized layers that share parameters.

    The owner of a group is its member with a ``tie`` method (the one that was
    factorized; the followers were built by ``owner.tie``). Groups without one are not
    ties of this kind and are left out.
    """
    owner_of_parameter: Dict[int, str] = {}
    owners = {fqn: module for fqn, module in modules if callable(getattr(module, "tie", None))}
    for fqn, module in owners.items():
        for parameter in module.parameters():
            owner_of_parameter[id(parameter)] = fqn
    followers: Dict[str, str] = {}
    for fqn, module in modules:
        if fqn in owners:
            continue
        shared = {owner_of_parameter.get(id(p)) for p in module.parameters()} - {None}
        if shared:
            followers[fqn] = min(shared)
    return followers
