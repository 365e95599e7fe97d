"""Checkpoint files: the schema, atomic writes, safe loading, 'keep the last N' pruning, the
best by FID.

A checkpoint is one file holding everything a run needs to continue exactly (networks,
optimizers, step, every RNG state, the data order, the fixed sampling noise, the resolved config).
It holds only tensors and plain Python values, so it loads with torch.load(weights_only=True).
``save_training_state`` writes it and ``restore_training_state`` reads it back; ``load_generator``
(sampling.py) needs only REQUIRED_KEYS.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from eagan.distributed import DistContext, gather_to_main
from eagan.errors import UserError
from eagan.files import atomic_output

FORMAT = "eagan-checkpoint-v1"
STEP_FILE = re.compile(r"^ckpt-(\d+)\.pt$")
BEST_NAME = "best.pt"
REQUIRED_KEYS = ("format", "step", "config", "num_classes", "generator")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainingState:
    """What a checkpoint saves and restores; each field is stored under its own name.
    ``data_order`` is per rank (every rank's batch source is saved); the RNGs are too."""

    generator: nn.Module
    discriminator: nn.Module
    generator_ema: nn.Module | None
    optimizer_g: Stateful
    optimizer_d: Stateful
    scaler_g: Stateful
    scaler_d: Stateful
    latents: Stateful
    data_order: Stateful


_NETWORK_NAMES = {"generator": "generator", "discriminator": "discriminator",
                  "generator_ema": "EMA generator"}


def save_training_state(path: Path, state: TrainingState, context: DistContext,
                        **values: Any) -> None:
    """Gather every rank's data order and RNG states to rank 0, which writes ``state`` and the
    plain ``values`` (step, config, num_classes, class_names, fixed_z, best_fid) to ``path``.
    Called on every rank."""
    rng_states = gather_to_main(context, capture_rng())
    data_orders = gather_to_main(context, state.data_order.state_dict())
    if not context.is_main:
        return
    payload = {"format": FORMAT, **values, "data_order": data_orders, "rng": rng_states}
    for field in dataclasses.fields(state):
        if field.name != "data_order":
            component = getattr(state, field.name)
            payload[field.name] = None if component is None else component.state_dict()
    save_checkpoint(payload, path)


def restore_training_state(payload: dict[str, Any], path: Path, state: TrainingState,
                           context: DistContext) -> None:
    """Load a checkpoint written by save_training_state into ``state`` and restore this
    rank's RNGs, so that training continues bit for bit."""
    for field in dataclasses.fields(state):
        component = getattr(state, field.name)
        if field.name == "data_order":
            component.load_state_dict(payload["data_order"][context.rank])
        elif field.name in _NETWORK_NAMES:
            if component is not None:
                load_weights(component, payload[field.name], path, _NETWORK_NAMES[field.name])
        else:
            component.load_state_dict(payload[field.name])
    restore_rng(payload["rng"][context.rank])


def capture_rng() -> dict[str, Any]:
    """Every global RNG, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
