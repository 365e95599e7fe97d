"""One training process per run folder.

``hold_run_dir`` takes an exclusive ``flock`` on RUN/.train.lock for as long as a training
command uses the folder, and writes the holder's pid and host into it; a second command is
refused with a line naming them, before it reads or writes anything there. The kernel drops a
flock when its process ends, however it ends (SIGKILL, a crash), so a dead holder never leaves
its folder locked; the file itself is removed on release. ``--eval`` and ``--sample`` take no
lock: they read only checkpoints, which appear under their names by an atomic rename.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eagan.errors import UserError
from eagan.train.distributed import DistContext, broadcast_object

LOCK_NAME = ".train.lock"
# Folders this process holds, with the lock's descriptor on rank 0 (None on the other ranks and
# where the file system has no locks): --seeds holds a seed's folder around train(), which asks
# again.
_held: dict[Path, int | None] = {}


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) shares our lock; it must not keep the folder
    locked once we are gone, whatever it does then."""
    for descriptor in _held.values():
        if descriptor is not None:
            os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


@contextmanager
def hold_run_dir(run_dir: Path, context: DistContext) -> Iterator[None]:
    """Hold ``run_dir`` for the block, or raise UserError naming the process that holds it.
    Under torchrun rank 0 holds it for the whole job and tells the other ranks whether it got
    it, so that a refusal stops every rank. Called on every rank."""
    key = Path(run_dir).absolute()
    if key in _held:
        yield
        return
    descriptor, refusal = None, None
    if context.is_main:
        try:
            descriptor = _lock(Path(run_dir))
        except UserError as error:
            refusal = error
    refusal = broadcast_object(context, refusal)
    if refusal is not None:
        raise refusal
    _held[key] = descriptor
    try:
        yield
    finally:
        del _held[key]
        if descriptor is not None:
            # Removed while still locked: a process that opened the old file meanwhile finds
            # it gone once it gets the lock, and takes a new one (see _lock).
            (Path(run_dir) / LOCK_NAME).unlink(missing_ok=True)
            os.close(descriptor)


def _lock(run_dir: Path) -> int | None:
    """Lock RUN/.train.lock and write our pid and host into it; its descriptor, or None where
    the file system cannot lock (with a warning)."""
    path = run_dir / LOCK_NAME
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise UserError(f"{run_dir}: the run folder is not writable "
                            f"({error.strerror or error})") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _holder(descriptor) if error.errno == errno.EWOULDBLOCK else None
            os.close(descriptor)
            if holder is None:
                print(f"warning: {path}: cannot lock ({error.strerror or error}); nothing "
                      f"stops a second training process from using {run_dir}",
                      file=sys.stderr)
                return None
            raise UserError(f"{run_dir}: another training process uses this run folder "
                            f"({holder}); wait for it to end or stop it, or choose another "
                            f"run_dir") from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # released and removed between our open and our lock
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return descriptor


def _holder(descriptor: int) -> str:
    """What the holder wrote ("pid 123 on host"); it writes just after locking, so give it a
    moment."""
    for _ in range(50):
        text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "its pid and host are not recorded yet"


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False
