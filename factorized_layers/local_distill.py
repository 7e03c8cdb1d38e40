"""Block-wise (local) distillation: each student block learns its teacher block's output.

Used by :func:`factorized_layers.distill.distill_` with ``mode="local"``. The inputs of
the first repeated block are captured once for the student and the teacher; then, block
after block, the student block is trained on the student's own cached inputs to
reproduce the teacher block's output on the teacher's inputs (relative MSE plus
cosine), and both caches move one block on. A step costs one block's forward and
backward, so many more steps fit in a time budget than with whole-model distillation.
"""

from __future__ import annotations

import sys
import time
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn as nn

from .blocks import _block_inputs, find_blocks

__all__ = ["distill_blocks"]


def distill_blocks(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Any],
    params: List[nn.Parameter],
    steps: int | None,
    time_budget: float | None,
    rate: Tuple[float, str],
    seed: int,
    blocks: str | None,
    progress: bool,
    curve: Any,
) -> Tuple[List[float], int, float]:
    """Train the student's blocks one after another; returns (losses, steps, seconds).

    ``curve`` (a ``distill._Curve``) evaluates the whole student at the start, after
    the first block ending ``eval_every`` seconds after the previous evaluation, and at
    the end; its time is kept off the budget.
    """
    from .distill import (
        _attention_mask,
        _device_of,
        _freeze_others,
        _hidden_loss,
        _set_learning_rate,
        _Stopper,
    )

    chosen = {id(p) for p in params}
    trainable_names = [
        name for name, module in student.named_modules()
        if any(id(p) in chosen for p in module.parameters(recurse=False))
    ]  # fmt: skip
    names = find_blocks(student, trainable_names, blocks)
    if not names:
        raise ValueError(
            "mode='local' needs repeated blocks (an nn.ModuleList holding the factorized "
            "layers); use mode='global'"
        )
    student_modules, teacher_modules = dict(student.named_modules()), dict(teacher.named_modules())
    missing = [n for n in names if n not in teacher_modules]
    if missing:
        raise ValueError(
            f"the teacher has no blocks {missing[:3]}: give the dense model the student was "
            "converted from (copy.deepcopy before factorize_)"
        )
    start = time.perf_counter()
    student_device = _device_of(student)
    student_calls, student_hidden = _block_inputs(
        student, student_modules[names[0]], batches, student_device
    )
    teacher_calls, teacher_hidden = _block_inputs(
        teacher, teacher_modules[names[0]], batches, _device_of(teacher)
    )
    frozen = _freeze_others(student, params)
    generator = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    taken = 0
    clock = _Stopper(None, None)
    clock.start = start
    try:
        curve.record(clock, force=True)
        for position, name in enumerate(names):
            block, reference = student_modules[name], teacher_modules[name]
            with torch.no_grad():
                targets = [
                    teacher_calls[i](reference, teacher_hidden[i]) for i in range(len(batches))
                ]
            own = [p for p in block.parameters() if id(p) in chosen]
            if own:
                remaining = None
                if time_budget is not None:
                    remaining = max(time_budget - clock.elapsed(), 0.0) / (len(names) - position)
                stopper = _Stopper(steps, remaining)
                optimizer = torch.optim.Adam(own, lr=rate[0])
                while not stopper.done():
                    i = int(torch.randint(len(batches), (1,), generator=generator))
                    output = student_calls[i](block, student_hidden[i])
                    target = targets[i].to(device=output.device, dtype=output.dtype)
                    if output.shape != target.shape:
                        raise ValueError(
                            f"block {name}: student output {tuple(output.shape)} and teacher "
                            f"output {tuple(target.shape)} differ in shape"
                        )
                    value = _hidden_loss(output, target, _attention_mask(batches[i]), pooled=False)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    _set_learning_rate(optimizer, rate, stopper)
                    optimizer.step()
                    losses.append(float(value.detach()))
                    stopper.taken += 1
                taken += stopper.taken
                clock.taken = taken
                if progress:
                    print(
                        f"distill_ (local): {name}: {stopper.taken} steps, loss "
                        f"{losses[-1] if stopper.taken else float('nan'):.4g}",
                        file=sys.stderr,
                        flush=True,
                    )
            if position + 1 < len(names):  # the next block's inputs
                with torch.no_grad():
                    for i in range(len(batches)):
                        student_hidden[i] = student_calls[i](block, student_hidden[i]).detach()
                teacher_hidden = targets
            if own:
                curve.record(clock)
        curve.record(clock, force=not curve.points or curve.points[-1][1] != taken)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses, taken, clock.elapsed()
