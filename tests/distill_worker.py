"""distill_ on two gloo processes, for test_distill.py.

Run as a script by the tests: ``python tests/distill_worker.py --out O --port P``. Each
process converts the same MLP and distills it on its own half of every batch of
:func:`batches`; rank ``r`` saves the student's parameters to ``O.r``. The test
compares them with one process on the whole batches.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD_SIZE = 2
STEPS = 6


def build_pair() -> tuple:
    """(student, teacher): a converted MLP and its dense original, deterministic."""
    from factorized_layers import factorize_

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 6)).double()
    student = copy.deepcopy(teacher)
    factorize_(student, 4)
    return student, teacher


def batches(rank: int | None = None) -> list:
    """Four batches of 16 rows; a rank gets its half of the rows of every batch."""
    generator = torch.Generator().manual_seed(3)
    every = [torch.randn(16, 12, generator=generator, dtype=torch.float64) for _ in range(4)]
    if rank is None:
        return every
    half = 16 // WORLD_SIZE
    return [b[rank * half : (rank + 1) * half] for b in every]


def mean_squared_error(student_output, teacher_output):
    return (student_output - teacher_output).square().mean()


def distill(rank: int | None = None) -> dict:
    from factorized_layers import distill_

    student, teacher = build_pair()
    distill_(student, teacher, batches(rank), steps=STEPS, lr=1e-2, loss=mean_squared_error)
    return {name: p.detach().clone() for name, p in student.named_parameters()}


def _worker(rank: int, out: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(distill(rank), f"{out}.{rank}")
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
