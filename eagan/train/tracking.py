"""Training statistics: scalars under hierarchical names (Loss/D/real, Timing/steps_per_sec)
written to TensorBoard and to a jsonl file (one JSON object per logged step), and images to
TensorBoard.

Every write happens on the caller's thread and is flushed at once, so that a full disk is a
UserError naming the file at the step it happens (torch's SummaryWriter writes from a thread of
its own, where the error ends in a traceback on stderr and surfaces steps later). A resumed run
drops what the stopped one logged after its checkpoint, and any line cut short by a failed
write, so that each step appears once.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard.summary import image, scalar

from eagan.errors import UserError
from eagan.files import atomic_output

_event_files = itertools.count()  # tells apart the event files one process opens in a second


class Tracker:
    """Writes to ``<run_dir>/tensorboard`` and ``<run_dir>/stats.jsonl``; only rank 0 makes one.
    As a context manager it closes both on exit."""

    def __init__(self, run_dir: Path, truncate_after: int = 0) -> None:
        """``truncate_after``: the step a resumed run restarts from; what the interrupted
        process logged after it is dropped."""
        self.jsonl_path = Path(run_dir) / "stats.jsonl"
        if self.jsonl_path.exists():
            kept = _kept_lines(self.jsonl_path, truncate_after)
            with atomic_output(self.jsonl_path, "the training log") as tmp_path:
                tmp_path.write_text("".join(kept), encoding="utf-8")
        # TensorBoard drops the events of earlier files from the purge step on: those logged
        # after the checkpoint this run resumes from (from step 0 on, when it starts afresh).
        self.writer = EventFile(Path(run_dir) / "tensorboard",
                                purge_step=truncate_after + 1 if truncate_after else 0)
        with _writing(self.jsonl_path, "the training log"):
            self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, float],
                labels: dict[str, Any] | None = None) -> None:
        """``labels``: what the values mean (an evaluation's protocol, weights), jsonl only."""
        self.writer.add([scalar(name, value) for name, value in values.items()], step)
        with _writing(self.jsonl_path, "the training log"):
            self.jsonl.write(json.dumps({"step": step, **values, **(labels or {})}) + "\n")
            self.jsonl.flush()

    def image(self, name: str, step: int, grid: torch.Tensor) -> None:
        """``grid`` is a (3, H, W) float image in [0, 1]."""
        self.writer.add([image(name, grid, dataformats="CHW")], step)

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            with _writing(self.jsonl_path, "the training log"):
                self.jsonl.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.close()
        except UserError:
            if exc_type is None:
                raise
            # The run is already stopping on an earlier error: that one is to be reported.


class EventFile:
    """A TensorBoard event file, written as SummaryWriter writes one, on the caller's thread."""

    def __init__(self, folder: Path, purge_step: int) -> None:
        self.log_dir = str(folder)  # as SummaryWriter names it
        self.path = folder / (f"events.out.tfevents.{int(time.time()):010d}."
                              f"{socket.gethostname()}.{os.getpid()}.{next(_event_files)}")
        with _writing(self.path, "the TensorBoard events"):
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
        self._write([Event(wall_time=time.time(), file_version="brain.Event:2"),
                     Event(wall_time=time.time(), step=purge_step,
                           session_log=SessionLog(status=SessionLog.START))])

    def add(self, summaries: list[Summary], step: int) -> None:
        self._write([Event(wall_time=time.time(), step=step, summary=summary)
                     for summary in summaries])

    def _write(self, events: list[Event]) -> None:
        with _writing(self.path, "the TensorBoard events"):
            for event in events:
                self._file.write(tfrecord(event.SerializeToString()))
            self._file.flush()

    def close(self) -> None:
        with _writing(self.path, "the TensorBoard events"):
            self._file.close()


def tfrecord(data: bytes) -> bytes:
    """``data`` framed as TensorBoard's RecordWriter frames it: its length, the length's masked
    CRC-32C, the data, the data's masked CRC-32C. RecordWriter computes the CRC byte by byte in
    Python: 0.12 s per MB on a 2-core EPYC, 9% of the CPU time of the test suite's short
    training runs (profiled); google-crc32c computes it natively, 0.14 ms per MB."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + \
        struct.pack("<I", _masked_crc32c(data))


def _masked_crc32c(data: bytes) -> int:
    """The CRC-32C, rotated right by 15 bits plus a constant: the TFRecord checksum."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@contextlib.contextmanager
def _writing(path: Path, what: str) -> Iterator[None]:
    """An OSError (a full disk, a folder gone) as a UserError naming ``path``."""
    try:
        yield
    except OSError as error:
        raise UserError(f"{path}: cannot write {what} ({error.strerror or error}); the last "
                        f"checkpoint is kept: free space, then run the same command with "
                        f"--resume") from None


def _kept_lines(path: Path, truncate_after: int) -> list[str]:
    """The lines of ``path`` logged up to step ``truncate_after``; a line that is not a whole
    JSON object (cut short by a write that failed or a killed process) is dropped with a
    warning."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise UserError(f"{path}: cannot read the training log ({error.strerror or error})") \
            from None
    kept = []
    for number, line in enumerate(text.splitlines(), start=1):
        step = _logged_step(line)
        if step is None:
            print(f"warning: {path}: line {number} is not a whole log line (cut short when the "
                  f"run stopped); dropped", file=sys.stderr)
        elif step <= truncate_after:
            kept.append(line + "\n")
    return kept


def _logged_step(line: str) -> float | None:
    """The step of a jsonl line, or None for a line that is not one of ours."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, (int, float)) else None
