"""StudioGAN's checkpoint files: finding the G, D and G_ema files among paths, and reading one
safely (CRC-32 of every record, then torch.load(weights_only=True))."""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eagan.errors import UserError

try:  # numpy 2 renamed numpy.core to numpy._core; files written under numpy 1 use the old name
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar

FILE_NAME = re.compile(r"^model=(?P<kind>G|D|G_ema)-(?P<when>best|current)-weights-step="
                       r"(?P<step>\d+)\.pth$")
KINDS = {"G": "generator", "D": "discriminator", "G_ema": "EMA generator"}
# StudioGAN's FID is a numpy float64, stored as such in the D file's best_fid: these let
# torch.load(weights_only=True) rebuild that one number, under numpy 1's name and numpy 2's.
_NUMPY_FLOAT = [(_numpy_scalar, "numpy.core.multiarray.scalar"),
                (_numpy_scalar, "numpy._core.multiarray.scalar"), np.dtype,
                type(np.dtype(np.float64))]


@dataclass
class StudioGANFile:
    """One StudioGAN checkpoint file: which network it holds, its step and its tensors."""

    path: Path
    kind: str  # "G", "D" or "G_ema"
    step: int
    state: dict[str, Tensor]
    best_fid: float | None


def find_files(paths: list[Path]) -> dict[str, Path]:
    """The G, D and (if given) G_ema files among ``paths``, files or folders of them."""
    found: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            named = sorted(entry for entry in path.iterdir() if FILE_NAME.match(entry.name))
            if not named:
                raise UserError(f"{path}: holds no StudioGAN checkpoint "
                                f"(model=G-best-weights-step=N.pth and the like)")
            best = [entry for entry in named if FILE_NAME.match(entry.name)["when"] == "best"]
            candidates = best or named
        elif path.is_file():
            candidates = [path]
        else:
            raise UserError(f"{path}: no such file or folder")
        for candidate in candidates:
            match = FILE_NAME.match(candidate.name)
            if match is None:
                raise UserError(f"{candidate}: not named as StudioGAN names its checkpoints "
                                f"(model=G|D|G_ema-best|current-weights-step=N.pth)")
            kind = match["kind"]
            if kind in found:
                raise UserError(f"{candidate}: a second {kind} checkpoint besides "
                                f"{found[kind]}; pass one G, one D and at most one G_ema")
            found[kind] = candidate
    missing = [kind for kind in ("G", "D") if kind not in found]
    if missing:
        raise UserError(f"the import needs StudioGAN's G and D checkpoints; no "
                        f"model={' or model='.join(missing)}-...-weights-step=N.pth was given")
    return found


def read_studiogan_file(path: Path, kind: str) -> StudioGANFile:
    """Load one checkpoint with torch.load(weights_only=True) after checking the CRC-32 of every
    record of its zip archive (torch.load checks none); any failure names the file."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    with handle:
        try:
            if zipfile.is_zipfile(handle):
                with zipfile.ZipFile(handle) as archive:
                    damaged = archive.testzip()
                if damaged is not None:
                    raise UserError(f"{path}: damaged checkpoint: its record {damaged} does "
                                    f"not match the CRC-32 stored with it")
            handle.seek(0)
            with torch.serialization.safe_globals(_NUMPY_FLOAT):
                payload = torch.load(handle, map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - damaged bytes fail a dozen ways, all meaning this
            raise UserError(f"{path}: not a readable StudioGAN checkpoint (damaged, cut short, "
                            f"or not written by torch.save)") from None
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not (isinstance(state, dict) and state and all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items())):
        raise UserError(f"{path}: not a StudioGAN checkpoint: expected a dict whose "
                        f"'state_dict' maps names to tensors")
    name_step = int(FILE_NAME.match(path.name)["step"])
    # StudioGAN writes the step into the G and D files and into every name; G_ema's file holds
    # its state_dict alone.
    if kind != "G_ema" and payload.get("step") != name_step:
        raise UserError(f"{path}: holds step {payload.get('step')!r}, its name says {name_step}")
    best_fid = payload.get("best_fid")
    return StudioGANFile(path, kind, name_step, state,
                         float(best_fid) if isinstance(best_fid, (int, float)) else None)


def common_step(files: dict[str, StudioGANFile]) -> int:
    steps = {file.step for file in files.values()}
    if len(steps) > 1:
        listed = ", ".join(f"{file.path.name}" for file in files.values())
        raise UserError(f"the files come from different saves ({listed}): pass the G, D and "
                        f"G_ema of one step")
    return steps.pop()
