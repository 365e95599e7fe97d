"""Checkpoint files: atomic writes, safe loading, 'keep the last N' pruning, the best by FID.

A checkpoint is one file holding everything a run needs to continue exactly (networks,
optimizers, step, every RNG state, the data order, the fixed sampling noise, the resolved config).
It holds only tensors and plain Python values, so it loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eagan.errors import UserError
from eagan.files import atomic_output

FORMAT = "eagan-checkpoint-v1"
STEP_FILE = re.compile(r"^ckpt-(\d+)\.pt$")
BEST_NAME = "best.pt"
REQUIRED_KEYS = ("format", "step", "config", "num_classes", "generator")


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:07d}.pt"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write atomically: a crash or a full disk keeps the previous file under ``path``."""
    try:
        with atomic_output(path) as tmp_path:
            torch.save(payload, tmp_path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports ENOSPC as Runtime
        reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}); the previous "
                        f"checkpoints are kept") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and sanity-check one of our checkpoints; anything else is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError,
            ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise UserError(f"{path}: not a readable checkpoint (truncated or not a PyTorch file: "
                        f"{first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an EAGAN checkpoint (expected format {FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run folder's periodic checkpoints, oldest first."""
    found = []
    for entry in Path(run_dir).glob("ckpt-*.pt"):
        match = STEP_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint_arg(path: str | Path) -> Path:
    """A --ckpt argument: a file, or a run folder (its best.pt, else its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        best = path / BEST_NAME
        chosen = best if best.is_file() else latest_checkpoint(path)
        if chosen is None:
            raise UserError(f"{path}: run folder holds no checkpoint (ckpt-*.pt or best.pt)")
        return chosen
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` periodic checkpoints (best.pt is never touched)."""
    for _, old in step_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path,
                 what: str) -> None:
    """``module.load_state_dict(state)``, a mismatch being a UserError that lists it (a
    checkpoint written by another version of the networks)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise UserError(f"{path}: the {what} weights do not fit the network: {details}") \
            from None
    if missing or unexpected:
        listed = [f"missing {', '.join(missing)}"] if missing else []
        listed += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise UserError(f"{path}: the {what} weights do not fit the network: "
                        + "; ".join(listed))
