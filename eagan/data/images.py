"""Image files: finding them below a folder, reading text beside them, decoding them (in
threads) to uint8 arrays of one size."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from eagan.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PROGRESS_MIN_FILES = 2000  # decoding fewer files is quick enough to need no progress bar


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def images_under(folder: Path) -> list[Path]:
    """Image files anywhere below folder, sorted, hidden folders skipped (like ImageFolder)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for name in sorted(filenames) if is_image(p := Path(dirpath) / name))
    return found



def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror
        raise UserError(f"{path}: cannot read ({reason})") from None


def decode_image(path: Path, size: int, resize: bool = True) -> np.ndarray:
    """Decode one file to uint8 (size, size, 3): RGB, center-cropped and resized if needed
    (without ``resize``, a file of another size is a UserError)."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise a dozen types on bad bytes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read image {path} ({reason})") from None
    width, height = image.size
    if (width, height) != (size, size) and not resize:
        raise UserError(f"{path}: image is {width}x{height}, expected {size}x{size} "
                        f"(data.resize is false)")
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != size:
            image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays


def decode_all(paths: list[Path], size: int, source: str, resize: bool = True) -> Tensor:
    """Decode files in threads (PIL releases the GIL while decoding) into uint8 (N, 3, S, S)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        decoded = pool.map(partial(decode_image, size=size, resize=resize), paths)
        for i, array in enumerate(tqdm(decoded, total=len(paths), desc=f"decoding {source}",
                                       leave=False, disable=len(paths) <= PROGRESS_MIN_FILES)):
            out[i] = torch.from_numpy(array).permute(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, do not decode the rest
    return out
