"""Training commands in processes forked from the test process.

A forked process runs ``eagan.cli.main`` exactly as ``python run.py`` does, and with torchrun's
environment (RANK, WORLD_SIZE, MASTER_PORT, ...) exactly as a torchrun rank does, but it starts
with torch already imported: on the 2-core test machine that saves about 3 s of CPU per process,
most of a tiny run's cost. Tests of what the launcher itself does (importing, torchrun's agent)
keep starting real commands.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

FORK = multiprocessing.get_context("fork")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_main(argv: list[str], out: Path, err: Path, env: dict[str, str],
              prepare: Callable[[], None] | None) -> int:
    """The forked child: a fresh interpreter's signal handlers, output to two files, then main."""
    os.environ.update(env)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the subprocesses the tests compare with
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdout = open(out, "w", buffering=1)
    sys.stderr = open(err, "w", buffering=1)
    os.dup2(sys.stdout.fileno(), 1)  # what C code and worker processes write goes there too
    os.dup2(sys.stderr.fileno(), 2)
    if prepare is not None:
        prepare()
    from eagan.cli import main
    return main(argv)


class ForkedMain:
    """``main(argv)`` in a forked process, with the part of subprocess.Popen's interface the tests
    use: pid, poll, send_signal, kill, wait, communicate and returncode (-N when signal N ended
    it). Waiting is on the pid alone: processes the child forked may outlive it."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 prepare: Callable[[], None] | None = None) -> None:
        folder = Path(tempfile.mkdtemp(prefix="forked-main-"))
        self._out, self._err = folder / "stdout", folder / "stderr"
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                code = _run_main(argv, self._out, self._err, env or {}, prepare)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # never back into the test process's code

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(f"main in pid {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.wait(timeout)
        output = self._out.read_text(), self._err.read_text()
        shutil.rmtree(self._out.parent)
        return output


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so a
    process group does not reach them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name in field 2 may hold spaces: split after its ')'.
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def fork_ranks(argv: list[str], world_size: int = 2, env: dict[str, str] | None = None,
               timeout: float = 300, prepare: Callable[[], None] | None = None
               ) -> subprocess.CompletedProcess:
    """``main(argv)`` on ``world_size`` ranks in one gloo process group, each forked with the
    environment torchrun gives its workers; stdout and stderr are the ranks' in rank order and
    the return code is the first non-zero one, as torchrun reports a failed job."""
    shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
    ranks = [ForkedMain(argv, {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}, prepare)
             for rank in range(world_size)]
    try:
        outputs = [rank.communicate(timeout) for rank in ranks]
    finally:  # a rank left waiting for one that timed out
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    codes = [rank.returncode for rank in ranks]
    return subprocess.CompletedProcess(argv, next((code for code in codes if code), 0),
                                       "".join(out for out, _ in outputs),
                                       "".join(err for _, err in outputs))
