"""Fine-tuning a converted model on two gloo processes (DDP or FSDP2), for test_training.py.

Run as a script by the tests: ``python tests/distributed_worker.py --mode ddp
--checkpoint C --out O --port P``. Both processes rebuild the dense model, load the
factorized checkpoint ``C`` (so they start from identical factors), train ``--steps``
SGD steps on their half of every global batch, and rank 0 saves the final
parameters to ``O``. :func:`train_single` is the single-process reference on the
whole global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD_SIZE = 2
GLOBAL_BATCH = 16
LEARNING_RATE = 0.05


def build_dense_model() -> nn.Module:
    """A small CNN (two convolutions and a linear head) with deterministic weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def global_batch(step: int) -> tuple:
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)
    return images, labels


def train_single(model: nn.Module, steps: int) -> Dict[str, torch.Tensor]:
    """SGD on the whole global batch; returns the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    for step in range(steps):
        images, labels = global_batch(step)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, mode: str, checkpoint: str, out: str, steps: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from factorized_layers import load_factorized

        model = load_factorized(build_dense_model(), checkpoint)
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for child in model.children():
                if any(True for _ in child.parameters(recurse=False)):
                    fully_shard(child)
            wrapped = fully_shard(model)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=LEARNING_RATE, momentum=0.9)
        share = GLOBAL_BATCH // WORLD_SIZE
        for step in range(steps):
            images, labels = global_batch(step)
            mine = slice(rank * share, (rank + 1) * share)
            loss = F.cross_entropy(wrapped(images[mine]), labels[mine])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final = {}
        for name, p in model.named_parameters():
            value = p.detach()
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            final[name] = value.clone()
        if rank == 0:
            torch.save(final, out)
        # Leave together: a rank tearing down gloo while the other is still in a
        # collective aborts it ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    mp.spawn(
        _worker,
        args=(args.mode, args.checkpoint, args.out, args.steps, args.port),
        nprocs=WORLD_SIZE,
    )


if __name__ == "__main__":
    sys.exit(main())
