"""Process-group set-up for data-parallel training launched by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them we run as
a single process. NCCL on GPUs, gloo on CPU, so the same code path is tested on a laptop.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from eagan.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device of every mode (train, eval, sample), from train.device or --device: 'auto'
    picks CUDA when present; 'cuda' without a GPU is a user error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device (or --device): 'cuda' was asked for but no CUDA device "
                        "is available")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(rank=0, world_size=1, device=resolve_device(device_preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, device=device)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device_preference: str) -> Iterator[DistContext]:
    """One process group for a whole command: joined on entry, left on exit. The runs of
    ``--seeds`` share it; leaving and re-joining between them races the ranks against each
    other (one rank may re-create the rendezvous while another still leaves the last)."""
    context = init_distributed(device_preference)
    try:
        yield context
    finally:
        shutdown(context)


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast_flag(context: DistContext, flag: bool) -> bool:
    """Rank 0's boolean, on every rank (a stop request, a failed check)."""
    if not context.enabled:
        return flag
    # gloo reduces CPU tensors, NCCL CUDA ones.
    value = torch.tensor([int(flag)], device=context.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def broadcast_object(context: DistContext, obj: Any) -> Any:
    """Rank 0's picklable ``obj``, on every rank."""
    if not context.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(context: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0, as a list indexed by rank; other ranks get []."""
    if not context.enabled:
        return [obj]
    gathered = [None] * context.world_size if context.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered if context.is_main else []
