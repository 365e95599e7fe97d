"""Checkpoint files: the schema, atomic writes, safe loading, 'keep the last N' pruning, the
best by FID.

A checkpoint is one file holding everything a run needs to continue exactly (networks,
optimizers, step, every RNG state, the data order, the fixed sampling noise, the resolved config).
It holds only tensors and plain Python values, so it loads with torch.load(weights_only=True).
``save_training_state`` writes it and ``restore_training_state`` reads it back; ``load_generator``
(sampling.py) needs only REQUIRED_KEYS.

torch.save writes a zip archive and records the CRC-32 of every record in it (the pickle, each
tensor's bytes) as it writes. After the archive comes our footer: DIGEST_MAGIC and the sha256 of
every byte that is not record data (headers, names, sizes, offsets, those CRC-32s). Checking
both before loading (torch.load checks neither) refuses a flipped bit anywhere - a weight, a
config value, the archive's bookkeeping - rather than training or sampling from it. Hashing
only the bookkeeping keeps the digest's cost to a few milliseconds (the CRC-32s come with
torch.save; benchmarks/checkpoint_digest.py). torch.load ignores bytes after the archive.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.serialization import config as serialization_config

from eagan.errors import UserError
from eagan.files import atomic_output
from eagan.train.distributed import DistContext, gather_to_main

FORMAT = "eagan-checkpoint-v2"
# Written before checkpoints carried a digest: loaded with a warning, since nothing can tell a
# damaged one from an intact one.
UNVERIFIED_FORMAT = "eagan-checkpoint-v1"
DIGEST_MAGIC = b"\nEAGAN-SHA256:\n"
FOOTER_SIZE = len(DIGEST_MAGIC) + hashlib.sha256().digest_size
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
    plain ``values`` (step, config, num_classes, class_names, fixed_z, best_score, best_metric)
    to ``path``.
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


def best_score(payload: dict[str, Any], metric: str) -> float | None:
    """The lowest ``metric`` (the protocol's primary distance) a run has seen, or None when the
    checkpoint holds another metric's best (the protocol changed) or none. Checkpoints written
    before the digits protocol existed hold it as best_fid."""
    if "best_score" in payload:
        return payload["best_score"] if payload.get("best_metric") == metric else None
    return payload.get("best_fid") if metric == "fid" else None


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
    """Write atomically, with the digest footer: a crash or a full disk keeps the previous file
    under ``path``."""
    try:
        with atomic_output(path, "the checkpoint") as tmp_path:
            # The CRC-32s are half of the digest: never let a global setting switch them off.
            with serialization_config.patch({"save.compute_crc32": True}):
                torch.save(payload, tmp_path)
            with open(tmp_path, "rb+") as handle:
                digest = _structure_digest(handle, handle.seek(0, 2))
                handle.seek(0, 2)
                handle.write(DIGEST_MAGIC + digest)
    except RuntimeError as error:  # torch's zip writer can report a full disk as RuntimeError
        reason = (str(error).strip().splitlines() or ["write failed"])[0]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}); the previous files "
                        f"are kept") from None


def _record_spans(handle: BinaryIO, archive_size: int) -> list[tuple[int, int, int]]:
    """(start, end, CRC-32) of every record's data in the zip archive held by the first
    ``archive_size`` bytes; BadZipFile or struct.error when the archive is damaged."""
    spans = []
    with zipfile.ZipFile(_Prefix(handle, archive_size)) as archive:
        for info in archive.infolist():
            handle.seek(info.header_offset)
            name_length, extra_length = struct.unpack("<HH", handle.read(30)[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            spans.append((start, start + info.compress_size, info.CRC))
    return sorted(spans)


def _structure_digest(handle: BinaryIO, archive_size: int) -> bytes:
    """sha256 of every byte of the archive outside record data."""
    sha256, position = hashlib.sha256(), 0
    for start, end, _ in _record_spans(handle, archive_size) + [(archive_size,) * 3]:
        if start < position or end > archive_size:
            raise zipfile.BadZipFile("records overlap or run past the archive")
        handle.seek(position)
        sha256.update(handle.read(start - position))
        position = end
    return sha256.digest()


def _records_intact(handle: BinaryIO, archive_size: int) -> bool:
    """Every record's data has the CRC-32 recorded for it."""
    for start, end, crc in _record_spans(handle, archive_size):
        handle.seek(start)
        value, remaining = 0, end - start
        while remaining:
            chunk = handle.read(min(remaining, 1 << 24))
            if not chunk:
                return False
            value = zlib.crc32(chunk, value)
            remaining -= len(chunk)
        if value != crc:
            return False
    return True


class _Prefix:
    """The first ``size`` bytes of a file, as a read-only file for zipfile (which looks for the
    archive's end record at the end of what it is given, before our footer)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle, self.size, self.position = handle, size, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.position, self.size)[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.position if n < 0 else min(n, self.size - self.position)
        self.handle.seek(self.position)
        data = self.handle.read(max(n, 0))
        self.position += len(data)
        return data

    def seekable(self) -> bool:
        return True


def _digest_matches(path: Path) -> bool | None:
    """True when the footer's digest and every record's CRC-32 match, False when not, None
    when the file has no footer."""
    size = path.stat().st_size
    if size < FOOTER_SIZE:
        return None
    with open(path, "rb") as handle:
        handle.seek(size - FOOTER_SIZE)
        footer = handle.read(FOOTER_SIZE)
        if not footer.startswith(DIGEST_MAGIC):
            return None
        archive_size = size - FOOTER_SIZE
        try:
            return footer[len(DIGEST_MAGIC):] == _structure_digest(handle, archive_size) \
                and _records_intact(handle, archive_size)
        except Exception:  # noqa: BLE001 - zipfile fails a dozen ways on damaged bytes
            return False


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check one of our checkpoints; anything else, whatever its bytes, is a
    UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        verified = _digest_matches(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read the checkpoint ({error.strerror or error})") \
            from None
    if verified is False:
        raise UserError(f"{path}: damaged checkpoint: its bytes do not match the digest saved "
                        f"with it")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file fails in a dozen ways, all meaning this
        # torch's own messages are about its internals, and one advises weights_only=False,
        # which is the wrong advice for a file nobody can vouch for.
        raise UserError(f"{path}: not a readable checkpoint (damaged, cut short, or not "
                        f"written by torch.save)") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (FORMAT, UNVERIFIED_FORMAT):
        raise UserError(f"{path}: not an EAGAN checkpoint (expected format {FORMAT!r})")
    if fmt == FORMAT and not verified:
        raise UserError(f"{path}: damaged checkpoint: the digest at its end is missing (the "
                        f"file was cut short or changed)")
    if fmt == UNVERIFIED_FORMAT:
        print(f"warning: {path}: written before checkpoints carried a digest; its contents "
              f"cannot be verified", file=sys.stderr)
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_types(payload, path)
    return payload


def _check_types(payload: dict[str, Any], path: Path) -> None:
    """The fields every reader uses have the types it expects (for checkpoints without a digest,
    whose contents nothing else vouches for)."""
    networks = [payload["generator"], payload.get("discriminator", {}),
                payload.get("generator_ema") or {}]
    wrong = [name for name, ok in (
        ("step", isinstance(payload["step"], int) and payload["step"] >= 0),
        ("num_classes", isinstance(payload["num_classes"], int) and payload["num_classes"] >= 0),
        ("config", isinstance(payload["config"], dict)),
        ("weights", all(isinstance(state, dict) and all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in state.items()) for state in networks)),
    ) if not ok]
    if wrong:
        raise UserError(f"{path}: damaged checkpoint: unexpected {', '.join(wrong)}")


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
