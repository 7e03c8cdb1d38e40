"""Heal a converted model without labels: ``distill_`` matches the dense teacher's outputs.

Every low-rank result that keeps accuracy fine-tunes after the conversion. Without
labels the natural target is the dense model the student was converted from:

>>> import copy
>>> teacher = copy.deepcopy(model)  # doctest: +SKIP
>>> factorize_(model, Budget(params=0.5), calibration=batches)  # doctest: +SKIP
>>> distill_(model, teacher, batches, time_budget=300)  # doctest: +SKIP

Two schedules:

- ``mode="global"``: the whole student against the whole teacher (logit KL with a
  temperature when the output has ``logits``, else relative MSE of the main output
  tensor plus the cosine of its mean over the sequence, padding left out when the batch
  has an ``attention_mask``; optionally plus the outputs of named modules).
- ``mode="local"``: block by block (the repeated blocks that sequential calibration
  finds, e.g. ``model.layers``): each student block learns to reproduce the teacher
  block's output from the student's *own* inputs, on cached block inputs. A step costs
  one block instead of the whole model; the time budget is split evenly over the blocks.

Only the parameters of factorized layers train by default (``trainable="all"`` for
every parameter that requires grad); the teacher never receives gradients and its
parameters, buffers and mode are left as they were.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calibrate import check_batch, distributed, first_tensor, run_batch
from .registry import registered_layers

__all__ = ["DistillReport", "distill_", "distillation_loss"]


@dataclasses.dataclass
class DistillReport:
    """What :func:`distill_` did.

    Attributes:
        losses: The training loss of every step (global) or every block step (local).
        steps: Optimizer steps taken.
        seconds: Wall-clock time of the training loop.
        held_out_before: Mean loss on the held-out batches before training (``None``
            without held-out batches).
        held_out_after: The same after training.
        mode: ``"global"`` or ``"local"``.
        curve: ``(training seconds, steps, evaluate(student))`` points when an
            ``evaluate`` function was given: at the start, every ``eval_every``
            seconds of training (local mode: at the end of the first block after
            that), and at the end.
    """

    losses: List[float]
    steps: int
    seconds: float
    held_out_before: float | None = None
    held_out_after: float | None = None
    mode: str = "global"
    curve: List[Tuple[float, int, float]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        text = f"distill_ ({self.mode}): {self.steps} steps in {self.seconds:.1f} s"
        if self.losses:
            text += f", loss {self.losses[0]:.4g} -> {self.losses[-1]:.4g}"
        if self.held_out_before is not None:
            text += f", held-out {self.held_out_before:.4g} -> {self.held_out_after:.4g}"
        return text


def _logits(output: Any) -> torch.Tensor | None:
    value = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    return value if isinstance(value, torch.Tensor) else None


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} differ in shape: student {tuple(student.shape)}, "
            f"teacher {tuple(teacher.shape)}"
        )


def _hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    pooled: bool = True,
) -> torch.Tensor:
    """Relative MSE plus ``1 - cosine`` of the features (last dimension).

    ``mask`` (the leading dimensions of the outputs, e.g. an attention mask) leaves
    padding positions out of both terms. With ``pooled`` a ``(batch, sequence,
    features)`` output is compared by the cosine of its masked mean over the sequence
    (the sentence embedding); otherwise, and for other shapes, position by position.
    """
    student, teacher = student.float(), teacher.float()
    weights = None
    if mask is not None and tuple(mask.shape) == tuple(student.shape[:-1]):
        weights = mask.to(device=student.device, dtype=student.dtype).unsqueeze(-1)
    if weights is None:
        mse = (student - teacher).square().mean() / teacher.square().mean().clamp_min(1e-12)
    else:
        mse = ((student - teacher).square() * weights).sum() / (
            (teacher.square() * weights).sum().clamp_min(1e-12)
        )
    if pooled and student.dim() == 3:
        if weights is None:
            student, teacher = student.mean(1), teacher.mean(1)
        else:
            count = weights.sum(1).clamp_min(1.0)
            student, teacher = (
                (student * weights).sum(1) / count,
                (teacher * weights).sum(1) / count,
            )
        weights = None
    cosine = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if weights is not None:
        cosine = (cosine * weights.squeeze(-1)).sum() / weights.sum().clamp_min(1.0)
    else:
        cosine = cosine.mean()
    return mse + (1 - cosine)


def _attention_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` of a dict batch (positions that count), else ``None``."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


def distillation_loss(
    student_output: Any,
    teacher_output: Any,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
):
    """The default loss: logit KL when both outputs have ``logits``, else hidden-state loss.

    KL divergence ``KL(softmax(t / T) || softmax(s / T)) * T^2`` averaged over every
    prediction (token or sample); otherwise relative MSE plus ``1 - cosine`` of the
    pooled main output tensors (``last_hidden_state``, the tensor itself, or the first
    one): a ``(batch, sequence, features)`` output is mean-pooled over the sequence,
    ``mask`` (an attention mask) leaving padding out of both terms.

    Raises:
        ValueError: The outputs differ in shape (both shapes are named).

    Examples:
        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> float(distillation_loss(t, t)) < 1e-6
        True
    """
    student_logits, teacher_logits = _logits(student_output), _logits(teacher_output)
    if student_logits is not None and teacher_logits is not None:
        _check_shapes(student_logits, teacher_logits, "logits")
        classes = student_logits.shape[-1]
        log_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, -1)
        log_teacher = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, -1)
        divergence = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
        return divergence * temperature**2
    student_tensor, teacher_tensor = first_tensor(student_output), first_tensor(teacher_output)
    _check_shapes(student_tensor, teacher_tensor, "outputs")
    return _hidden_loss(student_tensor, teacher_tensor, mask)


def _to(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` on ``device``, its floating tensors in ``dtype`` when given."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device, dtype) for v in batch)
    return batch


def _device_of(module: nn.Module) -> torch.device:
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _trainable(student: nn.Module, trainable: str) -> List[nn.Parameter]:
    if trainable == "all":
        return [p for p in student.parameters() if p.requires_grad]
    if trainable != "factorized":
        raise ValueError(f"trainable must be 'factorized' or 'all', got {trainable!r}")
    classes = tuple(registered_layers())
    seen, params = set(), []
    for module in student.modules():
        if isinstance(module, classes):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    if not params:
        raise ValueError(
            "the student has no trainable factorized layer (convert it with factorize_ "
            "first, or pass trainable='all')"
        )
    return params


class _Features:
    """Forward hooks recording the outputs of named modules (feature distillation)."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"features {missing} are not modules of the {role}")
        self.outputs: Dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.outputs[name] = first_tensor(output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cycle(data: Sequence[Any], generator: torch.Generator) -> Iterator[Any]:
    """Every batch once per epoch, in an order drawn from ``generator``."""
    while True:
        for index in torch.randperm(len(data), generator=generator).tolist():
            yield data[index]


def _progress(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr, flush=True)


def distill_(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    lr: float = 1e-4,
    schedule: str = "cosine",
    mode: str = "global",
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    temperature: float = 1.0,
    features: Sequence[str] = (),
    feature_weight: float = 1.0,
    trainable: str = "factorized",
    held_out: Sequence[Any] | None = None,
    seed: int = 0,
    blocks: str | None = None,
    progress: bool = False,
    evaluate: Callable[[nn.Module], float] | None = None,
    eval_every: float = 30.0,
) -> DistillReport:
    """Train ``student`` in place to reproduce ``teacher`` on unlabelled ``data``.

    Adam on the student's trainable parameters; batches are drawn in a seeded order,
    so the same seed and data give the same student. Training stops after ``steps``
    optimizer steps or when ``time_budget`` seconds have passed (checked before every
    step, so the budget is exceeded by at most one step), whichever comes first. The
    teacher may live on another device or dtype: each batch is moved to it and its
    outputs are brought back. Under ``torch.distributed`` (an initialised default
    group) the student is wrapped in ``DistributedDataParallel`` for the loop (global
    mode), so every rank trains on its own batches with averaged gradients.

    Args:
        student: The converted model (changed in place; its mode is kept).
        teacher: The reference model, typically ``copy.deepcopy(model)`` taken before
            ``factorize_``; never trained, its mode is restored afterwards.
        data: Batches as for :func:`factorized_layers.calibrate.calibrate` (Tensor,
            tuple of positional arguments, dict of keyword arguments).
        steps: Maximum optimizer steps (for ``mode="local"``: per block).
        time_budget: Maximum seconds of training.
        lr: Adam learning rate (the peak, with a schedule).
        schedule: ``"cosine"`` (decay from ``lr`` to 0 over the steps or the time
            budget, whichever ends first; per block in local mode) or ``"constant"``.
        mode: ``"global"`` (whole model, the default) or ``"local"`` (block by block).
            Which wins per second depends on the model (``benchmarks/bench_heal.py``,
            300 s on 2 CPU cores): on SmolLM2-135M at ``Budget(params=0.8)`` global
            took the perplexity from 1.72x to 1.48x dense (local 1.55x; 30 blocks,
            logit target); on all-MiniLM-L6-v2 at 0.5 local took the embedding
            cosine from 0.761 to 0.896 (global 0.886; 6 blocks, 7x cheaper steps).
        loss: ``loss(student_output, teacher_output) -> scalar`` replacing
            :func:`distillation_loss` (global mode).
        temperature: Softmax temperature of the logit KL.
        features: Names of modules (the same in both models) whose outputs are also
            matched, each with relative MSE plus cosine (global mode).
        feature_weight: Weight of each feature term.
        trainable: ``"factorized"`` (the factorized layers' parameters that require
            grad) or ``"all"`` (every parameter that requires grad).
        held_out: Batches on which the loss is reported before and after training.
        seed: Seed of the batch order.
        blocks: ``mode="local"``: the name of the ``nn.ModuleList`` of blocks (default:
            the one holding the most factorized layers).
        progress: Print a line per 10% of the budget (and per block) on stderr.
        evaluate: ``evaluate(student) -> float``, called under ``no_grad`` for the
            report's ``curve``; its time is not counted in ``time_budget``.
        eval_every: Seconds of training between evaluations (local mode: between
            the block ends at which it evaluates).

    Returns:
        A :class:`DistillReport`.

    Raises:
        ValueError: Neither ``steps`` nor ``time_budget``, bad values, no trainable
            parameter, or student and teacher outputs of different shapes.

    Examples:
        >>> import copy
        >>> from factorized_layers import factorize_
        >>> model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        >>> teacher = copy.deepcopy(model)
        >>> _ = factorize_(model, rank=4)
        >>> data = [torch.randn(32, 16) for _ in range(4)]
        >>> report = distill_(model, teacher, data, steps=20, lr=1e-2, held_out=data[:1])
        >>> report.held_out_after < report.held_out_before
        True
    """
    if steps is None and time_budget is None:
        raise ValueError("distill_ needs steps=, time_budget= or both")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if time_budget is not None and not (
        isinstance(time_budget, (int, float)) and time_budget > 0 and math.isfinite(time_budget)
    ):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if mode not in ("global", "local"):
        raise ValueError(f"mode must be 'global' or 'local', got {mode!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if student is teacher:
        raise ValueError("student and teacher are the same module: pass a copy as teacher")
    batches = list(data)
    if not batches:
        raise ValueError("distill_ needs at least one batch")
    for index, batch in enumerate(batches):
        check_batch(batch, index)
    params = _trainable(student, trainable)
    teacher_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            measure = _Measure(student, teacher, loss, temperature, features, feature_weight)
            before = measure.mean(held_out) if held_out else None
        curve = _Curve(student, evaluate, eval_every)
        if mode == "global":
            report = _global(
                student, batches, params, measure, steps, time_budget, (lr, schedule), seed,
                progress, curve,
            )  # fmt: skip
        else:
            from .local_distill import distill_blocks

            losses, taken, seconds = distill_blocks(
                student, teacher, batches, params, steps, time_budget, (lr, schedule), seed,
                blocks, progress, curve,
            )  # fmt: skip
            report = DistillReport(losses, taken, seconds, mode="local")
        report.curve = curve.points
        with torch.no_grad():
            report.held_out_before = before
            report.held_out_after = measure.mean(held_out) if held_out else None
        measure.remove()
    finally:
        teacher.train(teacher_training)
    return report


class _Measure:
    """Student and teacher forward passes and the loss between them."""

    def __init__(self, student, teacher, loss, temperature, features, weight) -> None:
        self.student, self.teacher = student, teacher
        self.loss = loss
        self.temperature = temperature
        self.weight = weight
        self.student_features = _Features(student, features, "student") if features else None
        self.teacher_features = _Features(teacher, features, "teacher") if features else None
        self.student_device = _device_of(student)
        self.teacher_device = _device_of(teacher)
        self.teacher_dtype = _dtype_of(teacher)

    def teacher_output(self, batch: Any) -> Any:
        with torch.no_grad():
            output = run_batch(self.teacher, _to(batch, self.teacher_device, self.teacher_dtype), 0)
        return output

    def __call__(self, batch: Any, student: nn.Module | None = None) -> torch.Tensor:
        target = self.teacher_output(batch)
        output = run_batch(student or self.student, _to(batch, self.student_device), 0)
        target = _match(target, output)
        if self.loss is not None:
            value = self.loss(output, target)
        else:
            value = distillation_loss(output, target, self.temperature, _attention_mask(batch))
        if self.student_features is not None:
            for name, feature in self.student_features.outputs.items():
                reference = self.teacher_features.outputs[name].to(feature)
                _check_shapes(feature, reference, f"features {name!r}")
                value = value + self.weight * _hidden_loss(feature, reference)
        return value

    def mean(self, batches: Sequence[Any]) -> float:
        return sum(float(self(batch)) for batch in batches) / len(batches)

    def remove(self) -> None:
        for hooks in (self.student_features, self.teacher_features):
            if hooks is not None:
                hooks.remove()


def _match(teacher_output: Any, student_output: Any) -> Any:
    """The teacher's output with its tensors on the student output's device and dtype."""
    reference = first_tensor(student_output)

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(device=reference.device, dtype=reference.dtype)
        return value

    if isinstance(teacher_output, torch.Tensor):
        return convert(teacher_output)
    if isinstance(teacher_output, dict):
        return type(teacher_output)({k: convert(v) for k, v in teacher_output.items()})
    if isinstance(teacher_output, (tuple, list)):
        return type(teacher_output)(convert(v) for v in teacher_output)
    for name in ("logits", "last_hidden_state"):
        value = getattr(teacher_output, name, None)
        if isinstance(value, torch.Tensor):
            setattr(teacher_output, name, convert(value))
    return teacher_output


class _Curve:
    """Evaluations of the student during training, their time kept off the clock."""

    def __init__(self, student: nn.Module, evaluate: Callable | None, every: float) -> None:
        if not (isinstance(every, (int, float)) and every > 0):
            raise ValueError(f"eval_every must be a positive number of seconds, got {every!r}")
        self.student, self.evaluate, self.every = student, evaluate, every
        self.points: List[Tuple[float, int, float]] = []
        self.next = 0.0

    def due(self, seconds: float) -> bool:
        return self.evaluate is not None and seconds >= self.next

    def record(self, stopper: _Stopper, force: bool = False) -> None:
        """Evaluate if due (or ``force``), excluding the evaluation from ``stopper``'s clock."""
        seconds = stopper.elapsed()
        if self.evaluate is None or not (force or seconds >= self.next):
            return
        start = time.perf_counter()
        with torch.no_grad():
            value = float(self.evaluate(self.student))
        self.points.append((seconds, stopper.taken, value))
        self.next = seconds + self.every
        stopper.paused += time.perf_counter() - start


class _Stopper:
    """Stop after ``steps`` or once ``time_budget`` seconds have passed."""

    def __init__(self, steps: int | None, time_budget: float | None) -> None:
        self.steps, self.time_budget = steps, time_budget
        self.start = time.perf_counter()
        self.taken = 0
        self.paused = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def done(self) -> bool:
        if self.steps is not None and self.taken >= self.steps:
            return True
        return self.time_budget is not None and self.elapsed() >= self.time_budget


def _global(student, batches, params, measure, steps, time_budget, rate, seed, progress, curve):
    frozen = _freeze_others(student, params)
    model = student
    if distributed():
        model = nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.Adam(params, lr=rate[0])
    generator = torch.Generator().manual_seed(seed)
    order = _cycle(batches, generator)
    losses: List[float] = []
    stopper = _Stopper(steps, time_budget)
    next_report = 0.1
    try:
        curve.record(stopper, force=True)
        while not stopper.done():
            value = measure(next(order), model)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            _set_learning_rate(optimizer, rate, stopper)
            optimizer.step()
            losses.append(float(value.detach()))
            stopper.taken += 1
            share = _share(stopper)
            if progress and share >= next_report:
                _progress(True, f"distill_: step {stopper.taken}, loss {losses[-1]:.4g}")
                next_report = share + 0.1
            curve.record(stopper)
        curve.record(stopper, force=not curve.points or curve.points[-1][1] != stopper.taken)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        optimizer.zero_grad(set_to_none=True)
    return DistillReport(losses, stopper.taken, stopper.elapsed(), mode="global")


def _set_learning_rate(optimizer: torch.optim.Optimizer, rate: Tuple[float, str], stopper) -> None:
    """Set the learning rate of the next step: ``(peak, schedule)`` at ``stopper``'s progress."""
    lr, schedule = rate
    if schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(_share(stopper), 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _share(stopper: _Stopper) -> float:
    shares = []
    if stopper.steps is not None:
        shares.append(stopper.taken / stopper.steps)
    if stopper.time_budget is not None:
        shares.append(stopper.elapsed() / stopper.time_budget)
    return max(shares)


def _freeze_others(student: nn.Module, params: List[nn.Parameter]) -> Dict[nn.Parameter, bool]:
    """Turn off ``requires_grad`` of every other parameter; returns the old flags."""
    chosen = {id(p) for p in params}
    frozen = {}
    for p in student.parameters():
        if id(p) not in chosen and p.requires_grad:
            frozen[p] = True
            p.requires_grad_(False)
    return frozen
