"""What a dataset reader returns: images in memory, or a list of files to decode."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


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
