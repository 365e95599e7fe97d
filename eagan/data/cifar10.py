"""CIFAR-10 from torchvision's archive or its extracted pickles."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_url

from eagan.data.image_set import ImageSet
from eagan.errors import UserError

CIFAR10_URL = CIFAR10.url
CIFAR10_ARCHIVE = CIFAR10.filename  # cifar-10-python.tar.gz
CIFAR10_FOLDER = CIFAR10.base_folder  # cifar-10-batches-py


#
# torchvision's CIFAR10 class verifies the md5 of every batch file before it reads one, so it
# refuses any file but the official ones (a subset, a re-export, the small fakes our tests write
# in the same format). We therefore read the pickles ourselves, exactly as torchvision does
# (latin1 decoding, data_batch_1..5 in order, rows of 3072 bytes in CHW order), and use
# torchvision only for the download, which stays md5-checked. Unpickling is restricted to the
# numpy array classes those files hold, so a file from elsewhere cannot run code.

def load_cifar10(root: Path, split: str, download: bool) -> ImageSet:
    folder = root if (root / "batches.meta").is_file() else root / CIFAR10_FOLDER
    if not folder.is_dir():
        archive = root / CIFAR10_ARCHIVE
        if not archive.is_file():
            if not download:
                raise UserError(f"CIFAR-10 is not in {root}: put {CIFAR10_ARCHIVE} (from "
                                f"{CIFAR10_URL}) or its extracted {CIFAR10_FOLDER} folder there, "
                                "or allow the download")
            _download_cifar10(root)
        _extract_cifar10(archive, root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in [*names, "batches.meta"] if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; replace it with the "
                        f"{CIFAR10_FOLDER} folder of {CIFAR10_ARCHIVE} ({CIFAR10_URL})")
    class_names = _cifar_class_names(folder / "batches.meta")
    arrays, labels = [], []
    for name in names:
        data, batch_labels = _read_cifar_batch(folder / name, len(class_names))
        arrays.append(data)
        labels.extend(batch_labels)
    images = torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))  # (N, 3, 32, 32)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), len(class_names),
                    class_names, str(folder))


def _download_cifar10(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_url(CIFAR10_URL, str(root), CIFAR10_ARCHIVE, CIFAR10.tgz_md5)
    except (URLError, OSError, RuntimeError) as error:  # offline, refused, md5 mismatch
        reason = str(error).replace("\n", " ")
        raise UserError(f"CIFAR-10 is not in {root} and downloading it failed ({reason}); put "
                        f"{CIFAR10_ARCHIVE} (from {CIFAR10_URL}) or its extracted "
                        f"{CIFAR10_FOLDER} folder in {root}") from None


def _extract_cifar10(archive: Path, root: Path) -> None:
    """Extract into a temporary folder and rename it into place, so that a damaged archive
    leaves nothing behind."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=root))
    except OSError as error:
        raise UserError(f"{root}: cannot extract {archive.name} here ({error.strerror})") \
            from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out and devices; Pythons older
            # than 3.10.12 / 3.11.4 lack filters and extract as before.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(scratch, **safe)
        if not (scratch / CIFAR10_FOLDER).is_dir():
            raise UserError(f"{archive} holds no {CIFAR10_FOLDER} folder; delete it and download "
                            f"it again from {CIFAR10_URL}")
        os.replace(scratch / CIFAR10_FOLDER, root / CIFAR10_FOLDER)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - tarfile, gzip and zlib each fail their own way
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{archive} is not a readable tar.gz ({reason}); delete it and download "
                        f"it again from {CIFAR10_URL}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and nothing that runs code."""

    ALLOWED = {(f"numpy{core}.{module}", name) for core in (".core", "._core")
               for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as error:  # a damaged pickle can fail in many ways; all mean "not CIFAR"
        raise UserError(f"{path} is not a CIFAR-10 pickle ({type(error).__name__}: {error})") \
            from None
    if not isinstance(entry, dict):
        raise UserError(f"{path} is not a CIFAR-10 pickle (holds a {type(entry).__name__})")
    # Python 2 wrote the keys as byte strings; latin1 decoding gives str, other readers bytes.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_class_names(path: Path) -> list[str]:
    names = _read_cifar_pickle(path).get("label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{path} has no list 'label_names'")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    entry = _read_cifar_pickle(path)
    data, labels = entry.get("data"), entry.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise UserError(f"{path}: 'labels' must be a list of {len(data)} class ids")
    if any(not 0 <= label < num_classes for label in labels):
        raise UserError(f"{path}: 'labels' must lie in [0, {num_classes})")
    return data, labels
