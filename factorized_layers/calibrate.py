"""Activation statistics for data-aware ``from_dense``: input Gram matrices via hooks.

:func:`calibrate` runs the model on user-supplied batches and accumulates, for every
targeted ``nn.Linear``, the input second-moment matrix ``G = sum_t x_t x_t^T`` (float64,
``in x in``: no activation is stored). Whitened truncated SVD
(:func:`factorized_layers.decompose.whitened_low_rank_factors`) then minimises the
layer's output error on that data instead of its weight error, and whitened Tucker
(:func:`factorized_layers.decompose.whitened_tucker`) approximately so. For every
targeted convolution (``nn.Conv1d/2d/3d``) it accumulates the Gram matrix of the input
*channels* over every batch element and spatial position (float64,
``in_channels x in_channels``, so memory does not grow with the kernel size or the
image size), which
:func:`factorized_layers.decompose.whitened_cp_factors` uses to weigh the input-channel
mode of a CP kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, List

import torch
import torch.nn as nn

from .decompose._common import all_finite
from .sources import source_for

__all__ = ["InputStats", "calibrate", "run_batch", "probe_loss", "first_tensor"]

_CHUNK_ENTRIES = 2**22


@dataclasses.dataclass
class InputStats:
    """Second-moment statistics of one layer's inputs (and, optionally, its sensitivity).

    Attributes:
        gram: ``(in_features, in_features)`` float64 ``sum_t x_t x_t^T`` over all rows;
            for a convolution ``(in_channels, in_channels)``, the rows being the
            channel vectors at every batch element and spatial position.
        rows: Number of input rows (tokens, or positions for a convolution) accumulated.
        grad_sq: ``sum ||dL/dy||^2`` of the probe loss over the layer's outputs ``y``
            (``calibrate(..., sensitivity=True)``; 0 otherwise).
        output_numel: Number of output elements ``grad_sq`` was summed over.
        output_energy: ``sum ||y - bias||^2``: the energy of the layer's weight term.
    """

    gram: torch.Tensor
    rows: int = 0
    grad_sq: float = 0.0
    output_numel: int = 0
    output_energy: float = 0.0

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of inputs of shape ``(*, in_features)``.

        The float64 copy is made in chunks of at most ``2**22`` entries (32 MiB), so a
        large batch (e.g. every position of a convolution's input) needs no float64
        copy of its own size.
        """
        # Out of place: after calibrate(), layers with equal inputs share one tensor.
        self.gram = self.gram + gram_of(inputs)
        self.rows += inputs.numel() // inputs.shape[-1]

    @property
    def sensitivity(self) -> float | None:
        """Estimated loss increase per unit of *relative* squared output error.

        Second order around the dense model: a change ``dy`` of this layer's outputs
        raises the probe loss by about ``1/2 sum_t dy_t^T H_t dy_t``; with the
        Gauss--Newton ``H ~ E[g g^T]`` replaced by its mean diagonal
        ``h = grad_sq / output_numel``, a relative output error ``e`` costs
        ``1/2 h e^2 output_energy``. Returns ``h * output_energy`` (``None`` when no
        sensitivity was measured).
        """
        if self.output_numel == 0:
            return None
        return self.grad_sq / self.output_numel * self.output_energy


def gram_of(inputs: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for ``X = inputs.reshape(-1, features)``, in 32 MiB chunks."""
    flat = inputs.detach().reshape(-1, inputs.shape[-1])
    gram = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for chunk in flat.split(max(1, _CHUNK_ENTRIES // flat.shape[1])):
        wide = chunk.to(torch.float64)
        gram.addmm_(wide.mT, wide)
    return gram


def run_batch(model: nn.Module, batch: Any, index: int) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` by the batch's type.

    Raises:
        TypeError: A batch of another type (``index`` names it).
    """
    check_batch(batch, index)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch)


def check_batch(batch: Any, index: int) -> None:
    """Raise ``TypeError`` unless ``batch`` is a Tensor, a tuple/list or a dict."""
    if not isinstance(batch, (torch.Tensor, dict, tuple, list)):
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a Tensor, "
            "a tuple/list of positional arguments or a dict of keyword arguments"
        )


def probe_loss(output: Any, generator: torch.Generator) -> torch.Tensor:
    """A random loss whose squared gradients estimate the model's output curvature.

    For outputs with ``logits`` (a ``.logits`` attribute or key): the negative
    log-likelihood of labels *sampled from the model's own prediction*, whose expected
    gradient outer product is the Fisher information, the Hessian of the KL divergence
    to the dense model. Otherwise, ``<r, y>`` with Gaussian ``r`` for the first output
    tensor ``y`` (Hutchinson), whose expected gradient outer product is ``J^T J``, the
    Hessian of half the squared output error.
    """
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        log_probs = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        # Inverse-CDF sampling: much faster than torch.multinomial over a large vocabulary.
        cdf = log_probs.detach().exp().cumsum(dim=-1)
        uniform = torch.rand(cdf.shape[0], 1, generator=generator).to(cdf.device)
        labels = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp_max(cdf.shape[1] - 1)
        return -log_probs.gather(1, labels).sum()
    tensor = first_tensor(output)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    return (tensor.float() * noise.to(tensor.device)).sum()


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, the first element, or a named field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for name in ("last_hidden_state", "logits"):
            if isinstance(output.get(name), torch.Tensor):
                return output[name]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for name in ("last_hidden_state", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find the output tensor of a {type(output).__name__}")


def distributed() -> bool:
    """Whether a default process group of more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_stats(stats: Dict[str, InputStats]) -> None:
    """Sum every rank's statistics in place (same names on every rank), sorted by name."""
    if not distributed():
        return
    import torch.distributed as dist

    for name in sorted(stats):
        entry = stats[name]
        counts = torch.tensor(
            [entry.rows, entry.grad_sq, entry.output_numel, entry.output_energy],
            dtype=torch.float64,
            device=entry.gram.device,
        )
        dist.all_reduce(entry.gram)
        dist.all_reduce(counts)
        entry.rows, entry.output_numel = int(counts[0]), int(counts[2])
        entry.grad_sq, entry.output_energy = float(counts[1]), float(counts[3])


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    max_batches: int | None = None,
    sensitivity: bool = False,
    seed: int = 0,
) -> Dict[str, InputStats]:
    """Input Gram matrices of the model's linear and convolution layers on data.

    The model runs in its current mode; forward hooks collect the statistics and are
    always removed, also when the model raises. Without ``sensitivity`` it runs
    under ``torch.no_grad()``. Under ``torch.distributed`` (an initialised default
    group of several ranks) every statistic is summed over the ranks, so every rank
    gets the statistics of all ranks' data.

    Args:
        model: Any ``nn.Module``.
        data: Iterable of batches: a Tensor (``model(batch)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects the layers to watch
            (default: every module with a source adapter, :mod:`factorized_layers.sources`:
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``; lookups such as ``nn.Embedding``,
            whose inputs are indices, are never watched).
        max_batches: Stop after this many batches.
        sensitivity: Also measure how much the model's output depends on each layer's
            output (:attr:`InputStats.sensitivity`): one backward pass per batch of
            :func:`probe_loss` (Fisher of the logits, or a random projection of the
            output). No parameter gradient is accumulated.
        seed: Seed of the probe's random labels / projections.

    Returns:
        ``{fully qualified name: InputStats}``: the input Gram of each linear layer, the
        input-channel Gram of each convolution; a module shared under several names is
        reported under its first name.

    Raises:
        ValueError: Empty data, or a batch the model cannot run (the model's own error
            is chained).
        TypeError: A batch of an unsupported type.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> stats = calibrate(model, [torch.randn(5, 4), torch.randn(2, 4)])
        >>> stats["0"].gram.shape, stats["2"].rows
        (torch.Size([4, 4]), 7)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate expects an nn.Module, got {type(model).__name__}")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer, got {max_batches!r}")
    stats: Dict[str, InputStats] = {}
    outputs: Dict[str, list] = {}
    last_input: list = []  # [tensor, its source adapter, its Gram, its row count]
    handles = []
    watched: Dict[str, nn.Module] = {}

    def watch(name: str, layer: nn.Module) -> None:
        adapter = source_for(layer)
        features = adapter.in_features(layer)
        stats[name] = InputStats(
            torch.zeros(features, features, dtype=torch.float64, device=layer.weight.device)
        )
        watched[name] = layer

        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            entry = stats[name]
            value = args[0]
            if entry.gram.device != value.device:
                entry.gram = entry.gram.to(value.device)
            # Consecutive layers that read the very same tensor (q/k/v projections, say)
            # share one product; only the last input is held, so memory stays at one
            # activation and its id cannot be reused while it is compared.
            if last_input and last_input[0] is value and last_input[1] is adapter:
                gram, count = last_input[2], last_input[3]
            else:
                rows = adapter.input_rows(value)
                gram, count = gram_of(rows), rows.numel() // rows.shape[-1]
                last_input[:] = [value, adapter, gram, count]
            entry.gram = entry.gram + gram
            entry.rows += count

        def output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            entry = stats[name]
            weight_term = output.detach()
            if layer.bias is not None:
                weight_term = weight_term - layer.bias.detach().view(adapter.bias_shape())
            entry.output_energy += _squared_norm(weight_term)
            entry.output_numel += output.numel()
            outputs.setdefault(name, []).append(output)
            # The model continues with a copy: an in-place op after the layer (e.g.
            # ReLU(inplace=True)) must not change the tensor the gradient is taken for.
            return output.clone()

        handles.append(layer.register_forward_pre_hook(hook))
        if sensitivity:
            handles.append(layer.register_forward_hook(output_hook))

    seen = set()
    for name, module in model.named_modules():
        adapter = source_for(module)
        if adapter is not None and adapter.input_statistics and id(module) not in seen:
            seen.add(id(module))
            if filter_fn is None or filter_fn(module, name):
                watch(name, module)
    generator = torch.Generator().manual_seed(seed)
    # Outputs must depend on something that requires grad; parameters' gradients are
    # never computed (autograd.grad on the outputs only).
    flags = {p: p.requires_grad for layer in watched.values() for p in layer.parameters()}
    batches = 0
    try:
        if sensitivity:
            for layer in watched.values():
                layer.weight.requires_grad_(True)
        for batches, batch in enumerate(data, 1):
            outputs.clear()
            check_batch(batch, batches - 1)
            with torch.set_grad_enabled(sensitivity):
                try:
                    output = run_batch(model, batch, batches - 1)
                except Exception as exc:
                    raise ValueError(
                        f"calibration batch {batches - 1} failed in the model: {exc}"
                    ) from exc
                if sensitivity:
                    _accumulate_sensitivity(stats, outputs, output, generator)
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        last_input.clear()
    if batches == 0:
        raise ValueError("calibration data is empty: give at least one batch")
    all_reduce_stats(stats)
    _check_finite(stats, watched, batches)
    _share_equal_grams(stats)
    return {name: entry for name, entry in stats.items() if entry.rows or distributed()}


def _check_finite(stats: Dict[str, InputStats], layers: Dict[str, nn.Module], batches: int) -> None:
    """NaN or Inf in a layer's inputs would become NaN factors: refuse, naming the layers.

    Checked once on the accumulated Gram matrices (any non-finite input makes its
    layer's Gram non-finite), so a clean run costs one sum per layer and no temporary
    of a Gram's size (a 4096-wide layer's float64 Gram is 128 MiB).
    """
    bad = [name for name, entry in stats.items() if not all_finite(entry.gram)]
    if bad:
        described = ", ".join(f"{name!r} ({type(layers[name]).__name__})" for name in bad[:10])
        raise ValueError(
            f"calibration inputs of {len(bad)} layer(s) contain NaN or Inf over {batches} "
            f"batch(es): {described}; clean the data, or exclude those layers with filter_fn"
        )


def _share_equal_grams(stats: Dict[str, InputStats]) -> None:
    """Let layers with bitwise equal Grams (same inputs) hold one tensor.

    Saves memory, and lets caches keyed by the tensor (the whitening ``eigh``) serve
    every layer that reads the same inputs.
    """
    kept: List[InputStats] = []
    for entry in stats.values():
        for other in kept:
            if (
                other.rows == entry.rows
                and other.gram.shape == entry.gram.shape
                and other.gram.device == entry.gram.device
                and torch.equal(other.gram, entry.gram)
            ):
                entry.gram = other.gram
                break
        else:
            kept.append(entry)


def _accumulate_sensitivity(
    stats: Dict[str, InputStats],
    outputs: Dict[str, list],
    output: Any,
    generator: torch.Generator,
) -> None:
    names = [name for name in outputs for _ in outputs[name]]
    tensors = [tensor for name in outputs for tensor in outputs[name]]
    if not tensors:
        return
    gradients = torch.autograd.grad(probe_loss(output, generator), tensors, allow_unused=True)
    for name, gradient in zip(names, gradients):
        if gradient is not None:
            stats[name].grad_sq += _squared_norm(gradient.detach())


def _squared_norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
