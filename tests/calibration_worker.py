"""Calibration on two gloo processes, for test_sequential.py.

Run as a script by the tests: ``python tests/calibration_worker.py --out O --port P``.
Each process calibrates (with sensitivities) and converts (sequentially) the same MLP
on its own half of the batches of :func:`batches`; rank ``r`` saves the Gram
statistics, sensitivities and converted parameters to ``O.r``. The test compares them
with one process on all batches, and the ranks with each other.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2
SEQUENTIAL = dict(holdout=0.5, compensation=(0.0, 1.0), ridges=(1e-3,), blocks=False)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6)
    ).double()


def batches(rank: int | None = None) -> list:
    """All eight batches (``rank=None``) or one rank's four: ranks interleave in pairs.

    With ``holdout=0.5`` the odd batches are held out, on one process and on each
    rank alike.
    """
    generator = torch.Generator().manual_seed(7)
    every = [torch.randn(16, 12, generator=generator, dtype=torch.float64) for _ in range(8)]
    if rank is None:
        return every
    return [b for i, b in enumerate(every) if (i // 2) % WORLD_SIZE == rank]


def convert(model: nn.Module, data: list) -> dict:
    from factorized_layers import factorize_
    from factorized_layers.calibrate import calibrate
    from factorized_layers.sequential import Sequential

    stats = calibrate(model, data, sensitivity=True)
    factorize_(
        model,
        4,
        calibration=data,
        sequential=Sequential(**SEQUENTIAL),
        allow_larger=True,
    )
    result = {f"gram.{name}": entry.gram for name, entry in stats.items()}
    result.update({f"sensitivity.{n}": torch.tensor(e.sensitivity) for n, e in stats.items()})
    result.update({f"param.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return result


def _worker(rank: int, out: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = convert(build_model(), batches(rank))
        torch.save(result, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    mp.spawn(_worker, args=(args.out, args.port), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    sys.exit(main())
