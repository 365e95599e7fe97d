"""Datasets on disk -> uint8 images in memory -> endless batches of float images in [-1, 1].

Loaders: `load_images` reads CIFAR-10, Tiny-ImageNet, any image folder or scikit-learn's
digits into an `ImageSet` (every dataset of the SAGAN recipe fits in memory as uint8: CIFAR-10
150 MB, Tiny-ImageNet 1.2 GB). `find_image_files` lists the files of the file-based datasets for
`LoaderBatchSource`, the DataLoader path for folders too big for memory.

Batch sources: the only augmentation of the SAGAN recipe is a random horizontal flip. Both
sources draw their order and flips from one `_IndexStream`, so for one seed they give the same
batches, resume exactly from `state_dict()`, and split a global batch across ranks:

- order: the stream is the concatenation of random permutations of the dataset, one per epoch;
  every step takes the next `batch_size * world_size` indices, so a batch that reaches the end
  of a permutation is completed from the start of the next one (every image is used exactly
  once per epoch and no image is dropped).
- flips: after its indices, every step draws one flip decision per image of the global batch.
- distributed training: every rank uses the same seed and draws the same global batch; rank r
  keeps items [r * batch_size, (r + 1) * batch_size). Ranks never overlap, and together they
  see exactly the images and flips one rank with batch_size * world_size would see.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_url
from tqdm import tqdm

from eagan.errors import UserError

# The first split of each dataset is the training split.
SPLITS: dict[str, tuple[str, ...]] = {
    "cifar10": ("train", "test"),
    "tiny_imagenet": ("train", "val"),
    "folder": ("train",),
    "digits": ("train", "test"),
}
# The held-out split of the datasets whose splits are fixed (the reference of held-out
# evaluation protocols); other datasets use "test" when they have one.
HELD_OUT_SPLITS = {"cifar10": "test", "tiny_imagenet": "val"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_URL = CIFAR10.url
CIFAR10_ARCHIVE = CIFAR10.filename  # cifar-10-python.tar.gz
CIFAR10_FOLDER = CIFAR10.base_folder  # cifar-10-batches-py
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0
PROGRESS_MIN_FILES = 2000  # decoding fewer files is quick enough to need no progress bar


@dataclass
class ImageSet:
    """A whole dataset in memory.

    images: uint8 (N, 3, H, W); labels: int64 (N,), all 0 when unconditional; num_classes: 0 for
    an unconditional dataset; class_names: one per class; source: where it came from.
    """

    images: Tensor
    labels: Tensor
    num_classes: int
    class_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")


@dataclass
class ImageFiles:
    """The image files of a file-based dataset ("folder", "tiny_imagenet"), not yet decoded."""

    paths: list[Path]
    labels: list[int]
    num_classes: int
    class_names: list[str]
    source: str


def load_images(dataset: str, root: str | Path, split: str, image_size: int,
                download: bool = True, resize: bool = True) -> ImageSet:
    """Read a dataset split into memory as uint8 images of image_size x image_size.

    dataset:
      "cifar10": root holds cifar-10-batches-py (or is it), or cifar-10-python.tar.gz, which is
        extracted; otherwise, when download is true, the archive is downloaded (md5-checked by
        torchvision). Splits "train" (50k), "test" (10k).
      "tiny_imagenet": the official tiny-imagenet-200 layout in root/tiny-imagenet-200 or root.
        Class ids follow the order of wnids.txt; val labels come from val/val_annotations.txt.
        Splits "train" (100k), "val" (10k). Never downloaded.
      "folder": class sub-folders (classes sorted by name, files found recursively, as
        torchvision's ImageFolder) make a conditional dataset; a folder holding only images makes
        an unconditional one (num_classes 0). Split "train" only.
      "digits": scikit-learn's 1797 bundled 8x8 handwritten digits (no network), grey copied to 3
        channels; root is ignored. "train" and "test" are a fixed 80/20 split (1437 / 360 images;
        a permutation seeded with 0).
    Resizing happens only when the size differs: files (folder, Tiny-ImageNet) are center-cropped
    to a square and resized with Lanczos in PIL; arrays (CIFAR-10, digits) are resized with
    antialiased bilinear interpolation. With resize false, an image of another size is a
    UserError naming it (for data that must be used pixel for pixel).
    """
    _check_split(dataset, split)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")
    root = Path(root).expanduser()
    if dataset == "cifar10":
        loaded = _load_cifar10(root, split, download)
    elif dataset == "digits":
        loaded = _load_digits(split)
    else:
        files = find_image_files(dataset, root, split)
        return ImageSet(_decode_all(files.paths, image_size, files.source, resize),
                        torch.tensor(files.labels, dtype=torch.int64), files.num_classes,
                        files.class_names, files.source)
    native = loaded.images.shape[-1]
    if not resize and native != image_size:
        raise UserError(f"{loaded.source}: images are {native}x{native} but data.image_size is "
                        f"{image_size} and data.resize is false")
    return replace(loaded, images=_resize(loaded.images, image_size))


def find_image_files(dataset: str, root: str | Path, split: str) -> ImageFiles:
    """List the image files and labels of a "folder" or "tiny_imagenet" split (see load_images)."""
    _check_split(dataset, split)
    root = Path(root).expanduser()
    if dataset == "folder":
        return _find_folder(root)
    if dataset == "tiny_imagenet":
        return _find_tiny_imagenet(root, split)
    raise UserError(f"dataset {dataset!r} is stored as arrays, not image files; "
                    "use load_images for it")


def _check_split(dataset: str, split: str) -> None:
    if dataset not in SPLITS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {', '.join(SPLITS)}")
    if split not in SPLITS[dataset]:
        raise UserError(f"unknown split {split!r} for dataset {dataset!r}; "
                        f"expected one of {', '.join(SPLITS[dataset])}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10
#
# torchvision's CIFAR10 class verifies the md5 of every batch file before it reads one, so it
# refuses any file but the official ones (a subset, a re-export, the small fakes our tests write
# in the same format). We therefore read the pickles ourselves, exactly as torchvision does
# (latin1 decoding, data_batch_1..5 in order, rows of 3072 bytes in CHW order), and use
# torchvision only for the download, which stays md5-checked. Unpickling is restricted to the
# numpy array classes those files hold, so a file from elsewhere cannot run code.

def _load_cifar10(root: Path, split: str, download: bool) -> ImageSet:
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


# ---------------------------------------------------------------------------------------------
# scikit-learn digits

def _load_digits(split: str) -> ImageSet:
    from sklearn.datasets import load_digits  # imported here: only this dataset needs sklearn

    digits = load_digits()
    grey = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8)  # (1797, 8, 8)
    order = torch.randperm(len(grey), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(DIGITS_TRAIN_FRACTION * len(grey))
    chosen = (order[:n_train] if split == "train" else order[n_train:]).sort().values
    images = grey[chosen, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    labels = torch.from_numpy(digits.target)[chosen].to(torch.int64)
    return ImageSet(images, labels, 10, [str(d) for d in range(10)], "sklearn digits")


def _resize(images: Tensor, size: int) -> Tensor:
    """Resize uint8 (N, 3, h, w) to (N, 3, size, size); antialiased bilinear, in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
              for chunk in images.split(1024)]
    return torch.cat(chunks)  # (N, 3, size, size)


# ---------------------------------------------------------------------------------------------
# Image files: folders and Tiny-ImageNet

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below folder, sorted, hidden folders skipped (like ImageFolder)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for name in sorted(filenames) if _is_image(p := Path(dirpath) / name))
    return found


def _find_folder(root: Path) -> ImageFiles:
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    if not class_dirs:
        if not loose:
            raise UserError(f"image folder {root} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) and no class sub-folders")
        return ImageFiles(loose, [0] * len(loose), 0, [], str(root))
    if loose:
        raise UserError(f"image folder {root} mixes class sub-folders with loose images such as "
                        f"{loose[0].name}; move the images into class folders or remove them")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = _images_under(class_dir)
        if not found:
            raise UserError(f"class folder {class_dir} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(found)
        labels.extend([label] * len(found))
    return ImageFiles(paths, labels, len(class_dirs), [p.name for p in class_dirs], str(root))


def _find_tiny_imagenet(root: Path, split: str) -> ImageFiles:
    base = next((c for c in (root / TINY_IMAGENET_FOLDER, root) if (c / "wnids.txt").is_file()),
                None)
    if base is None:
        raise UserError(f"Tiny-ImageNet is not in {root} (no {TINY_IMAGENET_FOLDER}/wnids.txt): "
                        f"download {TINY_IMAGENET_URL} and unzip it in {root}")
    wnids = _read_text(base / "wnids.txt").split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{base / 'wnids.txt'} must list distinct class ids (wnids), one a line")
    class_of = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for wnid, label in class_of.items():
            found = sorted(p for p in (base / "train" / wnid / "images").glob("*")
                           if _is_image(p))
            if not found:
                raise UserError(f"Tiny-ImageNet class folder {base / 'train' / wnid / 'images'} "
                                f"(class {wnid!r} of {base / 'wnids.txt'}) holds no images")
            paths.extend(found)
            labels.extend([label] * len(found))
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise UserError(f"{annotations} is missing; unzip {TINY_IMAGENET_URL} again")
        for number, line in enumerate(_read_text(annotations).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in class_of:
                raise UserError(f"{annotations} line {number}: expected 'file<TAB>wnid<TAB>box' "
                                f"with a wnid from {base / 'wnids.txt'}, got {line[:80]!r}")
            paths.append(base / "val" / "images" / fields[0])
            labels.append(class_of[fields[1]])
        if not paths:
            raise UserError(f"{annotations} lists no images")
    return ImageFiles(paths, labels, len(wnids), wnids, str(base))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else error.strerror
        raise UserError(f"{path}: cannot read ({reason})") from None


def _decode_image(path: Path, size: int, resize: bool = True) -> np.ndarray:
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


def _decode_all(paths: list[Path], size: int, source: str, resize: bool = True) -> Tensor:
    """Decode files in threads (PIL releases the GIL while decoding) into uint8 (N, 3, S, S)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        decoded = pool.map(partial(_decode_image, size=size, resize=resize), paths)
        for i, array in enumerate(tqdm(decoded, total=len(paths), desc=f"decoding {source}",
                                       leave=False, disable=len(paths) <= PROGRESS_MIN_FILES)):
            out[i] = torch.from_numpy(array).permute(2, 0, 1)
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, do not decode the rest
    return out


# ---------------------------------------------------------------------------------------------
# Batch sources

class _IndexStream:
    """Global batches of indices from epoch-wise random permutations, and their flips.

    One CPU generator drives everything, so the stream is the same on every device and rank.
    """

    def __init__(self, num_images: int, global_batch: int, seed: int, hflip: bool) -> None:
        self.num_images, self.global_batch, self.hflip = num_images, global_batch, hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self.permutation = torch.randperm(num_images, generator=self.generator)

    def step(self) -> tuple[Tensor, Tensor | None]:
        """The next global batch: indices (G,) int64 and flips (G,) bool (None without hflip)."""
        parts, needed = [], self.global_batch
        while needed > 0:
            if self.position == self.num_images:  # start the next epoch's permutation
                self.permutation = torch.randperm(self.num_images, generator=self.generator)
                self.epoch, self.position = self.epoch + 1, 0
            taken = min(needed, self.num_images - self.position)
            parts.append(self.permutation[self.position:self.position + taken])
            self.position, needed = self.position + taken, needed - taken
        flips = (torch.rand(self.global_batch, generator=self.generator) < 0.5
                 if self.hflip else None)
        return torch.cat(parts), flips

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "position": self.position, "permutation": self.permutation.clone(),
                "num_images": self.num_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_images"] != self.num_images:
            raise UserError(f"the saved data order covers {state['num_images']} images but the "
                            f"dataset has {self.num_images}; resume with the same dataset")
        self.generator.set_state(state["generator"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.permutation = state["permutation"].clone()


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size "
                         f"{batch_size}, rank {rank}, world_size {world_size}")


def _to_float(images: Tensor, flips: Tensor | None) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], images with flips[i] mirrored left-right."""
    x = images.float().div_(127.5).sub_(1.0)  # (B, 3, H, W)
    if flips is not None:
        mask = flips.to(x.device, non_blocking=True)[:, None, None, None]  # (B, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


class DeviceBatchSource:
    """Endless batches from a dataset held whole on `device` (see the module docstring).

    batch_size is per rank. state_dict() holds the generator state, epoch, position and current
    permutation (tensors and ints only, loadable with torch.load(weights_only=True)); after
    load_state_dict the batches continue exactly, on any rank count.
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int,
                 device: torch.device | str, hflip: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_batching(batch_size, rank, world_size)
        self.device = torch.device(device)
        self.images = images.images.to(self.device)  # (N, 3, H, W) uint8
        self.labels = images.labels.to(self.device)  # (N,)
        self._stream = _IndexStream(len(self.images), batch_size * world_size, seed, hflip)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)

    @property
    def epoch(self) -> int:
        """0-based index of the permutation the last batch ended in."""
        return self._stream.epoch

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch: images (B, 3, H, W) float32 in [-1, 1] and labels (B,) int64."""
        indices, flips = self._stream.step()
        mine = indices[self._mine].to(self.device)  # (B,)
        return (_to_float(self.images[mine], None if flips is None else flips[self._mine]),
                self.labels[mine])

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stream.load_state_dict(state)


def make_batch_source(images: ImageSet, batch_size: int, seed: int, device: torch.device | str,
                      hflip: bool = True, rank: int = 0, world_size: int = 1) -> DeviceBatchSource:
    """The batch source for an in-memory dataset."""
    return DeviceBatchSource(images, batch_size, seed, device, hflip, rank, world_size)


class _FileDataset(Dataset):
    def __init__(self, files: ImageFiles, image_size: int, resize: bool) -> None:
        self.paths, self.labels, self.image_size = files.paths, files.labels, image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = torch.from_numpy(_decode_image(self.paths[index], self.image_size, self.resize))
        return image.permute(2, 0, 1), self.labels[index], index  # (3, S, S) uint8


class _StreamSampler(Sampler[list[int]]):
    """Replays a copy of the index stream, from the state `start`, for the DataLoader to read
    ahead; yields this rank's indices of every global batch."""

    def __init__(self, stream: _IndexStream, mine: slice) -> None:
        self.stream, self.mine = stream, mine
        self.start = stream.state_dict()

    def __iter__(self) -> Iterator[list[int]]:
        replay = _IndexStream(self.stream.num_images, self.stream.global_batch, 0,
                              self.stream.hflip)
        replay.load_state_dict(self.start)
        while True:
            yield replay.step()[0][self.mine].tolist()


class LoaderBatchSource:
    """Endless batches decoded from files by DataLoader workers, for datasets too big for memory.

    Same interface, order, flips and state as DeviceBatchSource (for the same files, seed and
    image size both give identical batches). The DataLoader's sampler replays a copy of the index
    stream ahead of use, while the main process advances the real stream one step per batch, draws
    the flips and saves its state; so prefetching never leaks into state_dict().
    """

    def __init__(self, files: ImageFiles, image_size: int, batch_size: int, seed: int,
                 device: torch.device | str, hflip: bool = True, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, resize: bool = True) -> None:
        _check_batching(batch_size, rank, world_size)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._dataset = _FileDataset(files, image_size, resize)
        self._stream = _IndexStream(len(files.paths), batch_size * world_size, seed, hflip)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self._loader: DataLoader | None = None
        self._iterator: Iterator[tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def epoch(self) -> int:
        """0-based index of the permutation the last batch ended in."""
        return self._stream.epoch

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch: images (B, 3, H, W) float32 in [-1, 1] and labels (B,) int64."""
        if self._iterator is None:
            self._iterator = self._start()
        indices, flips = self._stream.step()
        try:
            images, labels, loaded = next(self._iterator)
        except UserError as error:  # from a worker it carries the worker's traceback: keep the line
            raise UserError(str(error).strip().splitlines()[-1]
                            .removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")) \
                from None
        if not torch.equal(loaded, indices[self._mine]):
            raise RuntimeError("DataLoader batches fell out of step with the index stream")
        images = images.to(self.device, non_blocking=True)  # (B, 3, H, W) uint8
        return (_to_float(images, None if flips is None else flips[self._mine]),
                labels.to(self.device, non_blocking=True))

    def _start(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """A DataLoader iterator whose first batch is the stream's next one."""
        if self._loader is None:
            self._sampler = _StreamSampler(self._stream, self._mine)
            self._loader = DataLoader(self._dataset, batch_sampler=self._sampler,
                                      num_workers=self.num_workers,
                                      pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.num_workers > 0)
        else:
            self._sampler.start = self._stream.state_dict()
        return iter(self._loader)  # persistent workers are reused, their read-ahead dropped

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stream.load_state_dict(state)
        self._iterator = None  # the read-ahead belongs to the old position

    def close(self) -> None:
        """Stop the workers; a later next() starts new ones where the stream stands."""
        self._iterator = self._loader = None
