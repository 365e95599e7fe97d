"""Small fake datasets written in the real on-disk formats, for tests (no network needed).

Every image carries class-dependent structure - a class colour, a bright square in a
class-dependent corner, plus noise - so a GAN trained on it has something to learn.

    write_cifar10(root)          root/cifar-10-batches-py, the pickles of cifar-10-python.tar.gz
    write_tiny_imagenet(root)    root/tiny-imagenet-200, the layout of tiny-imagenet-200.zip
    write_image_folder(root)     PNG files, in class sub-folders or not
    make_image_set(n)            an in-memory eagan.data.ImageSet, no files
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from eagan.data import ImageSet

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                     [210, 245, 60], [250, 190, 190]], dtype=np.float64)


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label`: dim class colour, a bright square of
    that colour in corner label % 4, Gaussian noise (std 12)."""
    colour = _PALETTE[label % len(_PALETTE)]
    image = np.tile(0.35 * colour, (size, size, 1))  # (S, S, 3)
    half = size // 2
    top, left = (label % 4 // 2) * half, (label % 2) * half
    image[top:top + half, left:left + half] = colour
    image += rng.normal(0.0, 12.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_image_set(n: int, num_classes: int = 10, size: int = 32, seed: int = 0) -> ImageSet:
    """An in-memory ImageSet of n class images; image i has label i % num_classes (all 0 and
    num_classes 0 when num_classes is 0, i.e. unconditional)."""
    rng = np.random.default_rng(seed)
    labels = [i % num_classes if num_classes else 0 for i in range(n)]
    images = np.stack([class_image(label, size, rng) for label in labels])  # (N, S, S, 3)
    return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                    torch.tensor(labels, dtype=torch.int64), num_classes,
                    CIFAR10_CLASSES[:num_classes] if num_classes <= 10 else
                    [f"class{c}" for c in range(num_classes)], "make_image_set")


class _Python2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle (protocol 2) did for the official CIFAR-10 files:
    every string as a byte string (STRING opcodes, which Python 3 reads as str with
    encoding="latin1" and as bytes with encoding="bytes") and numpy's _reconstruct under its
    numpy 1 name numpy.core.multiarray. Only the pure-Python pickler lets us override this."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_byte_string(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    def _save_builtin(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
        else:
            self.save_global(obj, name)

    dispatch[bytes] = _save_byte_string
    dispatch[str] = _save_byte_string
    dispatch[type(len)] = _save_builtin


def _dump_python2(obj: Any, file: BinaryIO) -> None:
    _Python2Pickler(file, protocol=2).dump(obj)


def write_cifar10(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py in the official format and return that folder.

    data_batch_1..5 (n_train images split as evenly as np.array_split does), test_batch and
    batches.meta are pickled dicts with the official keys: b"data" (uint8 (N, 3072), each row
    1024 red, 1024 green, 1024 blue bytes, each 32x32 row-major), b"labels" (list of int),
    b"batch_label", b"filenames"; batches.meta has b"label_names", b"num_cases_per_batch",
    b"num_vis". Image i of a split has label i % 10 (training images counted across batches).
    torchvision's CIFAR10 reads these files once its md5 check is bypassed.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def write_batch(name: str, batch_label: str, ids: np.ndarray) -> None:
        labels = [int(i) % 10 for i in ids]
        data = np.stack([class_image(label, 32, rng).transpose(2, 0, 1).reshape(-1)
                         for label in labels]) if len(ids) else np.zeros((0, 3072), np.uint8)
        entry = {b"batch_label": batch_label.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"fake_{name}_{i:05d}.png".encode() for i in ids]}
        with open(folder / name, "wb") as f:
            _dump_python2(entry, f)

    for number, ids in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        write_batch(f"data_batch_{number}", f"training batch {number} of 5", ids)
    write_batch("test_batch", "testing batch 1 of 1", np.arange(n_test))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR10_CLASSES],
            b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        _dump_python2(meta, f)
    return folder


def tiny_imagenet_wnids(n_classes: int) -> list[str]:
    """The fake wnids in wnids.txt order: descending, so that class ids taken from sorting
    instead of from the file's order would be wrong."""
    return [f"n{99999999 - 1000 * k:08d}" for k in range(n_classes)]


def write_tiny_imagenet(root: Path, n_classes: int = 3, n_train_per_class: int = 4,
                        n_val: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write root/tiny-imagenet-200 in the layout of tiny-imagenet-200.zip; return that folder.

    wnids.txt (see tiny_imagenet_wnids), words.txt (wnid<TAB>name), train/<wnid>/images/
    <wnid>_<i>.JPEG with train/<wnid>/<wnid>_boxes.txt, val/images/val_<j>.JPEG with
    val/val_annotations.txt (file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1), where val image j
    belongs to class j % n_classes. Like the real set, one image is greyscale: the first
    training image of the first class.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    wnids = tiny_imagenet_wnids(n_classes)
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tfake class {k}\n" for k, w in enumerate(wnids)))
    box = f"{size // 8}\t{size // 8}\t{size - size // 8}\t{size - size // 8}"
    for label, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(n_train_per_class):
            image = Image.fromarray(class_image(label, size, rng))
            if label == 0 and i == 0:
                image = image.convert("L")
            image.save(images / f"{wnid}_{i}.JPEG", quality=90)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t{box}\n" for i in range(n_train_per_class)))
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for j in range(n_val):
        Image.fromarray(class_image(j % n_classes, size, rng)).save(
            base / "val" / "images" / f"val_{j}.JPEG", quality=90)
        lines.append(f"val_{j}.JPEG\t{wnids[j % n_classes]}\t{box}\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def write_image_folder(root: Path, classes: list[str] | None, n_per_class: int, size: int,
                       seed: int = 0) -> Path:
    """Write PNG images and return root: n_per_class in root/<class>/img_<i>.png for each class
    (class k drawn as class_image label k), or, with classes None, n_per_class images of label 0
    directly in root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label, folder in enumerate([root / c for c in classes] if classes else [root]):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(class_image(label, size, rng)).save(folder / f"img_{i:05d}.png")
    return root

