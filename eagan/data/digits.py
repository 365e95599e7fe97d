"""scikit-learn's bundled 8x8 handwritten digits, split 80/20 with a fixed seed."""

from __future__ import annotations

DIGITS_TRAIN_FRACTION = 0.8
DIGITS_SPLIT_SEED = 0


import torch

from eagan.data.image_set import ImageSet


def load_digits_split(split: str) -> ImageSet:
    from sklearn.datasets import load_digits  # imported here: only this dataset needs sklearn

    digits = load_digits()
    grey = torch.from_numpy(digits.images).mul(255 / 16).round().to(torch.uint8)  # (1797, 8, 8)
    order = torch.randperm(len(grey), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(DIGITS_TRAIN_FRACTION * len(grey))
    chosen = (order[:n_train] if split == "train" else order[n_train:]).sort().values
    images = grey[chosen, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
    labels = torch.from_numpy(digits.target)[chosen].to(torch.int64)
    return ImageSet(images, labels, 10, [str(d) for d in range(10)], "sklearn digits")
