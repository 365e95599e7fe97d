"""SIGINT (Ctrl-C) and SIGTERM (pre-emption, torchrun stopping a job) during training.

While training steps run, a signal is a request: the loop finishes the step and whatever is due
after it, saves a checkpoint of that step and returns. Where nothing needs saving (start-up) or
the work in progress can be dropped (an evaluation in a single process), the signal raises
Interrupted at once instead, so that a long computation does not outlast the grace period a
scheduler gives; the writes it cuts short remove their temporary files (atomic_output).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A signal ended the work in progress. A KeyboardInterrupt, so that ``except Exception``
    clauses let it through and the command line reports it as an interrupt (exit 130)."""


class StopRequest:
    """Catches SIGINT and SIGTERM while entered (the previous handlers come back on exit).
    ``requested`` tells whether one came; whether it also raises Interrupted depends on the
    stage: yes until ``defer()``, and inside ``interruptible()``."""

    def __init__(self) -> None:
        self.requested = False
        self._raising = True
        self._previous: dict[int, Any] = {}

    def defer(self) -> None:
        """From now on a signal only sets ``requested``: training steps have begun."""
        self._raising = False

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that a signal ends at once, as does one that came before it."""
        if self.requested:
            raise Interrupted("stop requested")
        raising, self._raising = self._raising, True
        try:
            yield
        finally:
            self._raising = raising

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        if self._raising:
            self._raising = False  # once: the clean-up that follows is not cut short again
            raise Interrupted(signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
