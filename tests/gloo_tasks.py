"""Calibration and distillation on two gloo processes, for the distributed tests.

Run as a script by :func:`run_on_two_processes`: ``python tests/gloo_tasks.py --task T
--out O --port P``. Each process runs task ``T`` on its own share of the data and
rank ``r`` saves the result to ``O.r``; the tests compare the ranks with each other
and with one process on all the data (the same function called with ``rank=None``).

- ``calibrate``: statistics with sensitivities, then sequential conversion of an MLP.
- ``distill``: ``distill_`` of a converted MLP against its dense original.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2
ROOT = Path(__file__).resolve().parents[1]
SEQUENTIAL = dict(holdout=0.5, compensation=(0.0, 1.0), ridges=(1e-3,), blocks=False)
DISTILL_STEPS = 6


def calibration_batches(rank: int | None = None) -> list:
    """All eight batches (``rank=None``) or one rank's four: ranks interleave in pairs.

    With ``holdout=0.5`` the odd batches are held out, on one process and on each
    rank alike.
    """
    generator = torch.Generator().manual_seed(7)
    every = [torch.randn(16, 12, generator=generator, dtype=torch.float64) for _ in range(8)]
    if rank is None:
        return every
    return [b for i, b in enumerate(every) if (i // 2) % WORLD_SIZE == rank]


def calibrate_task(rank: int | None = None) -> Dict[str, torch.Tensor]:
    """Gram statistics, sensitivities and sequentially converted parameters of an MLP."""
    from factorized_layers import factorize_
    from factorized_layers.calibrate import calibrate
    from factorized_layers.sequential import Sequential

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 6)
    ).double()
    data = calibration_batches(rank)
    stats = calibrate(model, data, sensitivity=True)
    factorize_(model, 4, calibration=data, sequential=Sequential(**SEQUENTIAL))
    result = {f"gram.{name}": entry.gram for name, entry in stats.items()}
    result.update({f"sensitivity.{n}": torch.tensor(e.sensitivity) for n, e in stats.items()})
    result.update({f"param.{n}": p.detach().clone() for n, p in model.named_parameters()})
    return result


def distill_pair() -> tuple:
    """(student, teacher): a converted MLP and its dense original, deterministic."""
    from factorized_layers import factorize_

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    student = copy.deepcopy(teacher)
    factorize_(student, 4)
    return student, teacher


def distill_batches(rank: int | None = None) -> List[torch.Tensor]:
    """Four batches of 16 rows; a rank gets its half of the rows of every batch."""
    generator = torch.Generator().manual_seed(3)
    every = [torch.randn(16, 12, generator=generator, dtype=torch.float64) for _ in range(4)]
    if rank is None:
        return every
    half = 16 // WORLD_SIZE
    return [b[rank * half : (rank + 1) * half] for b in every]


def mean_squared_error(student_output, teacher_output):
    return (student_output - teacher_output).square().mean()


def distill_task(rank: int | None = None) -> Dict[str, torch.Tensor]:
    """The student's parameters after ``DISTILL_STEPS`` steps of ``distill_``."""
    from factorized_layers import distill_

    student, teacher = distill_pair()
    distill_(
        student, teacher, distill_batches(rank), steps=DISTILL_STEPS, lr=1e-2,
        loss=mean_squared_error,
    )  # fmt: skip
    return {name: p.detach().clone() for name, p in student.named_parameters()}


TASKS = {"calibrate": calibrate_task, "distill": distill_task}


def run_on_two_processes(task: str, out: Path) -> List[Dict[str, torch.Tensor]]:
    """Run ``task`` on two gloo processes; returns each rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pythonpath = os.environ.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, __file__, "--task", task, "--out", str(out), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        # The workers must import the package under test, not whatever is installed.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), pythonpath]))},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD_SIZE)]


def _worker(rank: int, task: str, out: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(TASKS[task](rank), f"{out}.{rank}")
        # Leave together: a rank tearing down gloo while the other is still in a
        # collective aborts it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    mp.spawn(_worker, args=(args.task, args.out, args.port), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    sys.exit(main())
