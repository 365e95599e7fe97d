"""Writing outputs so that nothing half-written ever sits under a final name."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eagan.errors import UserError


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str = "the file") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash or a full disk at any moment leaves either the old file or the new one; on failure
    the temporary file is removed, also on SIGTERM (see _sigterm_as_interrupt). An OSError
    (full disk, unwritable folder) becomes a UserError naming ``path`` and ``what`` was being
    written.
    """
    path = Path(path)
    with _sigterm_as_interrupt():
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.",
                                            suffix=f"{path.suffix}.tmp", dir=path.parent)
        except OSError as error:
            raise _write_error(path, what, error) from None
        os.close(fd)
        tmp_path = Path(tmp_name)
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            # mkstemp makes the file private (0600): give it a plain open()'s permissions.
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, path)
        except OSError as error:
            tmp_path.unlink(missing_ok=True)
            raise _write_error(path, what, error) from None
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the block, where its default action would end the
    process on the spot and leave a temporary file behind. Handlers someone installed (the
    training loop's) are left alone, as are threads other than the main one, which cannot set
    handlers."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _write_error(path: Path, what: str, error: OSError) -> UserError:
    return UserError(f"{path}: cannot write {what} ({error.strerror or error}); the previous "
                     f"files are kept")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files a killed process left behind (never picked up as outputs)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def ensure_writable_dir(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and check we can write in it; UserError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{folder}: {what} is not writable ({error.strerror or error})") from None
    return folder
