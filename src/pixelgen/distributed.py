"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from .errors import PixelgenError

        raise PixelgenError("train.device=cuda but no CUDA device is visible; use --set train.device=cpu")
    return torch.device("cuda", local_rank)


def init(requested_device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # NCCL between GPUs, gloo between CPU processes (tests, CPU clusters)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ok(d: Dist, ok: bool) -> bool:
    """True when every rank says ok: a refusal on one rank (rank 0's run dir lock) stops them all cleanly."""
    if d.world_size == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)
