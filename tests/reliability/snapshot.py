"""The oracle of the reliability tests: everything about a model a failed call must keep.

Module types per name, every ``training`` flag and hook, every parameter and buffer
(bitwise) with its ``requires_grad``.
"""

import torch.nn as nn


def snapshot(model: nn.Module):
    modules = []
    for name, module in model.named_modules():
        hooks = tuple(
            (attr, tuple(getattr(module, attr).values()))
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
        )
        modules.append((name, type(module), module.training, hooks))
    tensors = [
        (name, t.detach().clone(), t.requires_grad)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
    ]
    return modules, tensors


def unchanged(model: nn.Module, before) -> bool:
    modules, tensors = snapshot(model)
    return (
        modules == before[0]
        and [(n, g) for n, _, g in tensors] == [(n, g) for n, _, g in before[1]]
        and all(
            a.dtype == b.dtype and a.shape == b.shape and a.equal(b)
            for (_, a, _), (_, b, _) in zip(tensors, before[1])
        )
    )
