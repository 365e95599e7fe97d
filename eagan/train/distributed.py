"""Process-group set-up for data-parallel training launched by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them we run as
a single process. NCCL on GPUs, gloo on CPU, so the same code path is tested on a laptop.

A failure on one rank ends the job: every collective gives up after train.collective_timeout_s,
and the first rank to fail leaves a line in torchrun's key-value store, so that the others,
whose collectives then fail, say which rank failed and why instead of waiting or reporting a
broken connection.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from eagan.errors import UserError, first_line

# Where the first failing rank leaves its line in the job's store, per torchrun attempt (a
# restarted job keeps its store).
FAILURE_KEY = f"eagan/first_failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    # None where unknown: a single process, or a context made for one call (evaluation's).
    collective_timeout_s: float | None = None
    # The job's key-value store (torchrun's), where a failing rank leaves its line; None in a
    # single process or where it cannot be reached.
    store: dist.Store | None = field(default=None, compare=False, repr=False)

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


def init_distributed(device_preference: str, collective_timeout_s: float) -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single process. A
    collective that waits longer than ``collective_timeout_s`` for another rank fails."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(rank=0, world_size=1, device=resolve_device(device_preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # NCCL enforces the timeout from a watchdog thread, which ends a process whose
        # collective outlives it, only with asynchronous error handling on: the default since
        # PyTorch 2.2, set here for older versions (a value the user set is kept).
        if "NCCL_ASYNC_ERROR_HANDLING" not in os.environ:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
    return DistContext(rank=rank, world_size=world_size, device=device,
                       collective_timeout_s=collective_timeout_s, store=_job_store())


def _job_store() -> dist.Store | None:
    """A client of the store at MASTER_ADDR:MASTER_PORT (under torchrun its agent's, which
    outlives the workers), or None where there is none to reach."""
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=10))
    except (KeyError, ValueError, RuntimeError):
        return None


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device_preference: str, collective_timeout_s: float
                  ) -> Iterator[DistContext]:
    """One process group for a whole command: joined on entry, left on exit. The runs of
    ``--seeds`` share it; leaving and re-joining between them races the ranks against each
    other (one rank may re-create the rendezvous while another still leaves the last).

    An error that ends the command on one rank is recorded for the others; a rank whose own
    error is only the consequence of another's (its collective lost its peer, or torchrun's
    SIGTERM interrupted it) raises PeerFailed, naming the rank that failed first and why."""
    context = init_distributed(device_preference, collective_timeout_s)
    try:
        yield context
    except (Exception, KeyboardInterrupt) as error:
        first = _first_failure(context, error)
        if first is not None and _is_consequence(error):
            raise PeerFailed(first) from None
        raise
    finally:
        shutdown(context)


class CollectiveFailed(UserError):
    """A collective gave up: another rank ended, or did not answer within the timeout."""

    def __init__(self, context: DistContext, error: BaseException) -> None:
        timeout = context.collective_timeout_s
        within = f" = {timeout:g} s" if timeout else ""  # unknown to a context made elsewhere
        super().__init__(f"another process of the job ended or did not answer within "
                         f"train.collective_timeout_s{within} ({first_line(error)}); the last "
                         f"checkpoint is kept: run the same command with --resume")


class PeerFailed(UserError):
    """This rank stopped because another one failed first."""

    def __init__(self, first: str) -> None:
        super().__init__(f"the job stopped because {first}")


def _is_consequence(error: BaseException) -> bool:
    """Whether ``error`` may be the effect of another rank's failure rather than a cause: a
    lost collective, an interrupt (torchrun stops the other ranks with SIGTERM), or an error
    that is not a UserError (a lost peer in DDP's gradient exchange raises RuntimeError)."""
    return isinstance(error, (CollectiveFailed, KeyboardInterrupt)) or \
        not isinstance(error, UserError)


def _first_failure(context: DistContext, error: BaseException) -> str | None:
    """Record this rank's failure unless another rank's came first; return that other one's
    line, or None (ours was first, a single process, or no store to ask)."""
    if context.store is None:
        return None
    what = first_line(error) if isinstance(error, UserError) else \
        f"{type(error).__name__}: {first_line(error)}"
    ours = f"rank {context.rank} failed: {what}"
    try:
        if isinstance(error, KeyboardInterrupt):  # an interrupt is no failure to report
            first = context.store.get(FAILURE_KEY).decode() \
                if context.store.check([FAILURE_KEY]) else ours
        else:
            first = context.store.compare_set(FAILURE_KEY, "", ours).decode()
    except Exception:  # noqa: BLE001 - the store went with the process that hosted it
        return None
    return None if first == ours else first


@contextmanager
def _collective(context: DistContext) -> Iterator[None]:
    """Turn a collective's failure into CollectiveFailed (gloo and NCCL report a lost or silent
    peer as RuntimeError); running out of memory stays what it is."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as error:
        raise CollectiveFailed(context, error) from None


def barrier(context: DistContext) -> None:
    if context.enabled:
        with _collective(context):
            dist.barrier()


def broadcast_flag(context: DistContext, flag: bool) -> bool:
    """Rank 0's boolean, on every rank (a stop request, a failed check)."""
    if not context.enabled:
        return flag
    # gloo reduces CPU tensors, NCCL CUDA ones.
    value = torch.tensor([int(flag)], device=context.device)
    with _collective(context):
        dist.broadcast(value, src=0)
        return bool(value.item())


def broadcast_object(context: DistContext, obj: Any) -> Any:
    """Rank 0's picklable ``obj``, on every rank."""
    if not context.enabled:
        return obj
    box = [obj]
    with _collective(context):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(context: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0, as a list indexed by rank; other ranks get []."""
    if not context.enabled:
        return [obj]
    gathered = [None] * context.world_size if context.is_main else None
    with _collective(context):
        dist.gather_object(obj, gathered, dst=0)
    return gathered if context.is_main else []
