"""Training statistics: scalars under hierarchical names (Loss/D/real, Timing/steps_per_sec)
written to TensorBoard and to a jsonl file (one JSON object per logged step), and images to
TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter


class Tracker:
    """Writes to ``<run_dir>/tensorboard`` and ``<run_dir>/stats.jsonl``; only rank 0 makes one."""

    def __init__(self, run_dir: Path, truncate_after: int = 0) -> None:
        """``truncate_after``: the step a resumed run restarts from; jsonl lines logged after it
        by the interrupted process are dropped, so each step appears once."""
        path = Path(run_dir) / "stats.jsonl"
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _logged_step(line) <= truncate_after]
            path.write_text("".join(kept), encoding="utf-8")
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=truncate_after)
        self.jsonl = open(path, "a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, float],
                labels: dict[str, Any] | None = None) -> None:
        """``labels``: what the values mean (an evaluation's protocol, weights), jsonl only."""
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **values, **(labels or {})}) + "\n")
        self.jsonl.flush()

    def image(self, name: str, step: int, grid: torch.Tensor) -> None:
        """``grid`` is a (3, H, W) float image in [0, 1]."""
        self.writer.add_image(name, grid, step)

    def flush(self) -> None:
        self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def _logged_step(line: str) -> float:
    """The step of a jsonl line; a line cut short by a killed process counts as never logged."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
