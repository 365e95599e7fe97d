"""Datasets on disk -> uint8 images in memory: ``load_images`` reads CIFAR-10, Tiny-ImageNet,
any image folder or scikit-learn's digits into an ``ImageSet`` (every dataset of the SAGAN recipe
fits in memory as uint8: CIFAR-10 150 MB, Tiny-ImageNet 1.2 GB); ``find_image_files`` lists the
files of the file-based datasets for ``LoaderBatchSource``, the DataLoader path for folders too
big for memory. One module per source does the reading."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from eagan.data.cifar10 import load_cifar10
from eagan.data.digits import load_digits_split
from eagan.data.folders import find_folder
from eagan.data.image_set import ImageFiles, ImageSet
from eagan.data.images import decode_all
from eagan.data.tiny_imagenet import find_tiny_imagenet
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
        loaded = load_cifar10(root, split, download)
    elif dataset == "digits":
        loaded = load_digits_split(split)
    else:
        files = find_image_files(dataset, root, split)
        return ImageSet(decode_all(files.paths, image_size, files.source, resize),
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
        return find_folder(root)
    if dataset == "tiny_imagenet":
        return find_tiny_imagenet(root, split)
    raise UserError(f"dataset {dataset!r} is stored as arrays, not image files; "
                    "use load_images for it")


def _check_split(dataset: str, split: str) -> None:
    if dataset not in SPLITS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {', '.join(SPLITS)}")
    if split not in SPLITS[dataset]:
        raise UserError(f"unknown split {split!r} for dataset {dataset!r}; "
                        f"expected one of {', '.join(SPLITS[dataset])}")




def _resize(images: Tensor, size: int) -> Tensor:
    """Resize uint8 (N, 3, h, w) to (N, 3, size, size); antialiased bilinear, in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
              for chunk in images.split(1024)]
    return torch.cat(chunks)  # (N, 3, size, size)
