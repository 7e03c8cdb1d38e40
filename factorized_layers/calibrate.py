"""Activation statistics for data-aware ``from_dense``: input Gram matrices via hooks.

:func:`calibrate` runs the model on user-supplied batches and accumulates, for every
targeted ``nn.Linear``, the input second-moment matrix ``G = sum_t x_t x_t^T`` (float64,
``in x in``: no activation is stored). Whitened truncated SVD
(:func:`factorized_layers.decompose.whitened_low_rank_factors`) then minimises the
layer's output error on that data instead of its weight error, and whitened Tucker
(:func:`factorized_layers.decompose.whitened_tucker`) approximately so. For every
targeted ``nn.Conv2d`` it accumulates the Gram matrix of the input *channels* over every
batch element and spatial position (float64, ``in_channels x in_channels``, so memory
does not grow with the kernel size or the image size), which
:func:`factorized_layers.decompose.whitened_cp_factors` uses to weigh the input-channel
mode of a CP kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable

import torch
import torch.nn as nn

__all__ = ["InputStats", "calibrate"]

_CHUNK_ENTRIES = 2**22


@dataclasses.dataclass
class InputStats:
    """Second-moment statistics of one layer's inputs.

    Attributes:
        gram: ``(in_features, in_features)`` float64 ``sum_t x_t x_t^T`` over all rows;
            for a convolution ``(in_channels, in_channels)``, the rows being the
            channel vectors at every batch element and spatial position.
        rows: Number of input rows (tokens, or positions for a convolution) accumulated.
    """

    gram: torch.Tensor
    rows: int = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of inputs of shape ``(*, in_features)``.

        The float64 copy is made in chunks of at most ``2**22`` entries (32 MiB), so a
        large batch (e.g. every position of a convolution's input) needs no float64
        copy of its own size.
        """
        flat = inputs.detach().reshape(-1, inputs.shape[-1])
        for chunk in flat.split(max(1, _CHUNK_ENTRIES // flat.shape[1])):
            wide = chunk.to(torch.float64)
            self.gram.addmm_(wide.mT, wide)
        self.rows += flat.shape[0]


def _runner(batch: Any, index: int) -> Callable[[nn.Module], Any]:
    if isinstance(batch, torch.Tensor):
        return lambda model: model(batch)
    if isinstance(batch, dict):
        return lambda model: model(**batch)
    if isinstance(batch, (tuple, list)):
        return lambda model: model(*batch)
    raise TypeError(
        f"calibration batch {index} is a {type(batch).__name__}; expected a Tensor, "
        "a tuple/list of positional arguments or a dict of keyword arguments"
    )


def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    max_batches: int | None = None,
) -> Dict[str, InputStats]:
    """Input Gram matrices of the model's ``nn.Linear`` and ``nn.Conv2d`` layers on data.

    The model runs under ``torch.no_grad()`` in its current mode; forward pre-hooks
    collect the statistics and are always removed, also when the model raises.

    Args:
        model: Any ``nn.Module``.
        data: Iterable of batches: a Tensor (``model(batch)``), a tuple/list
            (``model(*batch)``) or a dict (``model(**batch)``).
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects the layers to watch
            (default: every ``nn.Linear`` and ``nn.Conv2d``).
        max_batches: Stop after this many batches.

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
    handles = []

    def watch(name: str, layer: nn.Module) -> None:
        convolution = isinstance(layer, nn.Conv2d)
        features = layer.in_channels if convolution else layer.in_features

        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if name not in stats:
                stats[name] = InputStats(
                    torch.zeros(features, features, dtype=torch.float64, device=args[0].device)
                )
            # Channels last, for (N, C, H, W) and unbatched (C, H, W) inputs alike.
            stats[name].add(args[0].movedim(-3, -1) if convolution else args[0])

        handles.append(layer.register_forward_pre_hook(hook))

    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in seen:
            seen.add(id(module))
            if filter_fn is None or filter_fn(module, name):
                watch(name, module)
    batches = 0
    try:
        with torch.no_grad():
            for batches, batch in enumerate(data, 1):
                run = _runner(batch, batches - 1)
                try:
                    run(model)
                except Exception as exc:
                    raise ValueError(
                        f"calibration batch {batches - 1} failed in the model: {exc}"
                    ) from exc
                if max_batches is not None and batches >= max_batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if batches == 0:
        raise ValueError("calibration data is empty: give at least one batch")
    return stats
