"""The report of a conversion: one row per targeted layer, printable as a table."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Tuple

__all__ = ["LayerReport", "FactorizationReport"]


@dataclasses.dataclass
class LayerReport:
    """One targeted layer in a :class:`FactorizationReport`.

    FLOPs are multiply-accumulates per output position: per token (input row) for
    linear layers, per output pixel for convolutions. Parameters include the bias.
    """

    name: str
    source_type: str
    target_type: str
    shape: Tuple[int, ...]
    rank: Any
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    weight_error: float | None
    skipped: str | None = None
    output_error: float | None = None
    """Relative output error on the calibration data (``None`` without calibration).

    With sequential calibration: on the held-out calibration batches, against the
    dense model's outputs of this layer, with the inputs of the compressed model; for
    a convolution a proxy from channel statistics that treats kernel positions as
    independent."""
    output_error_before: float | None = None
    """Sequential calibration: the held-out output error without error compensation."""
    note: str | None = None
    speedup: float | None = None
    """Dense time / factorized time at the example input given to ``factorize_``
    (``None`` when not measured)."""


@dataclasses.dataclass
class FactorizationReport:
    """What :func:`factorize_` did: one :class:`LayerReport` per targeted layer.

    ``str(report)`` is a readable table with totals.
    """

    layers: List[LayerReport]
    model_output_error: float | None = None
    """Sequential calibration: relative error of the last block's output (or of the
    model's output without blocks) on the held-out calibration batches."""

    @property
    def replaced(self) -> List[LayerReport]:
        """Rows of the layers that were converted."""
        return [row for row in self.layers if row.skipped is None]

    @property
    def skipped(self) -> List[LayerReport]:
        """Rows of the layers left dense, with the reason."""
        return [row for row in self.layers if row.skipped is not None]

    @property
    def params_before(self) -> int:
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        return sum(row.params_after for row in self.layers)

    @property
    def flops_before(self) -> int:
        return sum(row.flops_before for row in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(row.flops_after for row in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __str__(self) -> str:
        calibrated = any(row.output_error is not None for row in self.layers)
        compensated = any(row.output_error_before is not None for row in self.layers)
        header = ("layer", "type", "shape", "rank", "params", "FLOPs/pos", "weight err")
        header += ("output err",) if calibrated else ()
        header += ("uncompensated",) if compensated else ()
        timed = any(row.speedup is not None for row in self.layers)
        header += ("speed vs dense",) if timed else ()
        header += ("note",)
        rows = [header]
        for row in self.layers:
            change = (
                f"{row.source_type} -> {row.target_type}"
                if row.skipped is None
                else row.source_type
            )
            cells = (
                row.name,
                change,
                "x".join(str(d) for d in row.shape),
                "-" if row.rank is None else str(row.rank),
                f"{row.params_before:,} -> {row.params_after:,}",
                f"{row.flops_before:,} -> {row.flops_after:,}",
                _fmt(row.weight_error),
            )
            if calibrated:
                cells += (_fmt(row.output_error),)
            if compensated:
                cells += (_fmt(row.output_error_before),)
            if timed:
                cells += ("-" if row.speedup is None else f"{row.speedup:.2f}x",)
            rows.append(cells + (row.skipped or row.note or "",))
        ratio = self.params_before / max(self.params_after, 1)
        totals = (
            f"total ({len(self.replaced)} replaced, {len(self.skipped)} skipped)",
            "",
            "",
            "",
            f"{self.params_before:,} -> {self.params_after:,} ({ratio:.2f}x fewer)",
            f"{self.flops_before:,} -> {self.flops_after:,}",
        )
        rows.append(totals + ("",) * (len(header) - len(totals)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        if self.model_output_error is not None:
            lines.append(
                f"model output error on held-out calibration batches: {self.model_output_error:.4f}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
