"""Walking a model: selecting target layers by type, name and filter, and swapping them.

Swaps move the hook dictionaries of the old module to the new one and replace the
module under every parent that holds it (shared modules stay shared).
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from ..registry import registered_layers
from ..sources import _run_prelude, attach_prelude, source_for

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


_READ_BY_PARENT = {
    nn.MultiheadAttention: (("out_proj",), "whose forward reads its weight directly"),
    nn.TransformerEncoderLayer: (
        ("linear1", "linear2"),
        "whose eval fast path reads their weights directly",
    ),
}
"""Layers whose parent module uses their ``.weight`` tensor instead of calling them."""


def _read_by_parent(model: nn.Module) -> Dict[int, str]:
    """id(layer) -> why ``model`` cannot convert it: its parent reads its ``.weight`` directly."""
    return {
        id(getattr(parent, name)): f"{name} of nn.{type(parent).__name__}, {why}"
        for parent in model.modules()
        for owner, (names, why) in _READ_BY_PARENT.items()
        if isinstance(parent, owner)
        for name in names
    }


def _matches(fqn: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fqn == pattern or fqn.endswith("." + pattern)


def _check_patterns(name: str, patterns: Sequence[str] | None) -> Tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} patterns must be strings, got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(
                    f"{name} pattern {pattern!r} is not a valid regex: {exc}"
                ) from None
    return patterns


def _target_class(module: nn.Module, mapping: Mapping[type, type]) -> type | None:
    exact = mapping.get(type(module))
    if exact is not None:
        return exact
    for source, target in mapping.items():
        if isinstance(module, source):
            return target
    return None


def _meta_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose parameters live on meta (for free shape checks)."""
    twin = copy.copy(module)
    twin._parameters = {
        name: None
        if p is None
        else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, p in module._parameters.items()
    }
    return twin


def _progress(items: Sequence[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(items)
    return tqdm(items, desc="factorize_", unit="layer")


def _plain_progress(items: Sequence[Any]) -> Iterator[Any]:
    for i, item in enumerate(items, 1):
        print(f"factorize_ [{i}/{len(items)}] {item[0]}", file=sys.stderr, flush=True)
        yield item


def _parents(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) that holds it (shared modules have several)."""
    parents: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, attr))
    return parents


def _swap(old: nn.Module, new: nn.Module, parents: List[Tuple[nn.Module, str]]) -> None:
    # A prelude (see sources.attach_prelude) is re-attached after the hooks move, so
    # that the moved hook dicts carry it; a layer built from a config (a checkpoint)
    # learns it from the dense subclass here.
    prelude = new._modules.pop("input_prelude", None)
    if prelude is None:
        adapter = source_for(old)
        prelude = old._modules.get("input_prelude")
        if prelude is None and adapter is not None:
            prelude = adapter.prelude(old)
    # Move (not copy) the hook dicts, so that handles returned by register_*_hook on the
    # old module still remove the hooks from the new one.
    for attr in _HOOK_DICTS:
        if attr in old.__dict__:
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = old._is_full_backward_hook
    attach_prelude(new, prelude)
    for parent, attr in parents:
        setattr(parent, attr, new)


def _unswap(old: nn.Module, new: nn.Module, parents: List[Tuple[nn.Module, str]]) -> None:
    """Undo ``_swap(old, new, parents)``: ``old`` back in every parent, with the hooks.

    The hook dicts were moved, not copied, so hooks registered since are kept; the
    prelude hook a swap may have added is dropped again where ``old`` has no prelude
    of its own (a subclass that pads inside its ``forward`` must not pad twice).
    """
    for attr in _HOOK_DICTS:
        if attr in new.__dict__:
            setattr(old, attr, getattr(new, attr))
    old._is_full_backward_hook = new._is_full_backward_hook
    if "input_prelude" not in old._modules:
        hooks = old._forward_pre_hooks
        for key in [key for key, hook in hooks.items() if hook is _run_prelude]:
            del hooks[key]
    for parent, attr in parents:
        setattr(parent, attr, old)


@contextlib.contextmanager
def _swapping(
    parents: Mapping[int, List[Tuple[nn.Module, str]]],
) -> Iterator[Callable[[nn.Module, nn.Module], None]]:
    """All or nothing: yields ``swap(old, new)``; on any exception in the block
    (``KeyboardInterrupt`` included) every swap made through it is undone, last first,
    before the exception propagates, so the model is as it was."""
    done: List[Tuple[nn.Module, nn.Module, List[Tuple[nn.Module, str]]]] = []

    def swap(old: nn.Module, new: nn.Module) -> None:
        where = parents.get(id(old), [])
        _swap(old, new, where)
        done.append((old, new, where))

    try:
        yield swap
    except BaseException:
        for old, new, where in reversed(done):
            _unswap(old, new, where)
        raise


def _swap_all(
    pairs: Sequence[Tuple[nn.Module, nn.Module]], parents: Mapping[int, List[Tuple[nn.Module, str]]]
) -> None:
    """``_swap`` every ``(old, new)`` pair, all or nothing (see :func:`_swapping`)."""
    with _swapping(parents) as swap:
        for old, new in pairs:
            swap(old, new)


def _collect_targets(
    model: nn.Module,
    mapping: Mapping[type, type],
    filter_fn: Callable[[nn.Module, str], bool] | None,
    include: Tuple[str, ...] | None,
    exclude: Tuple[str, ...] | None,
) -> List[Tuple[str, nn.Module, type]]:
    candidates = [
        (fqn, module, target)
        for fqn, module in model.named_modules()
        if fqn and (target := _target_class(module, mapping)) is not None
    ]
    # Already-factorized layers count as matches, so that a second call with the same
    # patterns is a no-op rather than an error.
    factorized = tuple(registered_layers())
    known = [fqn for fqn, _, _ in candidates] + [
        fqn for fqn, module in model.named_modules() if isinstance(module, factorized)
    ]
    for name, patterns in (("include", include), ("exclude", exclude)):
        if patterns:
            unmatched = [p for p in patterns if not any(_matches(fqn, p) for fqn in known)]
            if unmatched:
                raise ValueError(
                    f"{name} pattern(s) {unmatched} match no layer of a converted type; "
                    f"candidates are {[fqn for fqn, _, _ in candidates][:20]}"
                )
    selected = []
    for fqn, module, target in candidates:
        if include is not None and not any(_matches(fqn, p) for p in include):
            continue
        if exclude is not None and any(_matches(fqn, p) for p in exclude):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        selected.append((fqn, module, target))
    return selected
