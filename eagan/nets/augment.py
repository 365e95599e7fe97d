"""DiffAugment (Zhao et al., 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"): random colour, translation and cutout applied to every image D sees, real and fake,
in the D and the G steps alike. Each op is differentiable in the images, so G learns through
it; D never sees an unaugmented image, so it cannot memorise a small training set pixel for
pixel, and since fakes go through the same ops G is not taught to draw augmented images.

Every image gets its own draw: augmenting the concatenated real and fake batch of a D step once
gives real and fake independent draws, as the reference's two separate calls do. Draws come
from ``generator`` (a torch.Generator) or, by default, torch's global RNG, which the training
checkpoints save, so a resumed run augments exactly as an uninterrupted one.

Images are in [-1, 1]; padding and cut-out areas are 0, as in the reference.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

TRANSLATION_RATIO = 1 / 8  # largest shift, as a fraction of the side (the reference's)
CUTOUT_RATIO = 1 / 2  # side of the cut-out square, as a fraction of the image side


def _uniform(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """One U[0, 1) draw per image, shaped to broadcast over (C, H, W)."""
    return torch.rand(len(images), 1, 1, 1, dtype=images.dtype, device=images.device,
                      generator=generator)


def color(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per image: brightness shift in [-0.5, 0.5), saturation factor in [0, 2), contrast
    factor in [0.5, 1.5)."""
    images = images + (_uniform(images, generator) - 0.5)
    grey = images.mean(dim=1, keepdim=True)
    images = (images - grey) * (2 * _uniform(images, generator)) + grey
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_uniform(images, generator) + 0.5) + mean


def translation(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per image: shift by whole pixels, up to TRANSLATION_RATIO of the side in each direction
    independently; uncovered pixels become 0."""
    n, _, height, width = images.shape
    reach_y, reach_x = round(height * TRANSLATION_RATIO), round(width * TRANSLATION_RATIO)
    shift_y = torch.randint(-reach_y, reach_y + 1, (n, 1, 1), device=images.device,
                            generator=generator)
    shift_x = torch.randint(-reach_x, reach_x + 1, (n, 1, 1), device=images.device,
                            generator=generator)
    # Output pixel (y, x) reads input pixel (y - shift_y, x - shift_x) of the image padded by
    # `reach` zeros on every side; reads beyond the padding are clamped into it (still 0).
    padded = torch.nn.functional.pad(images, (reach_x, reach_x, reach_y, reach_y))
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    source_y = (rows - shift_y + reach_y).clamp(0, height + 2 * reach_y - 1)  # (n, H, 1)
    source_x = (cols - shift_x + reach_x).clamp(0, width + 2 * reach_x - 1)  # (n, 1, W)
    batch = torch.arange(n, device=images.device).view(-1, 1, 1)
    # Advanced indexing on dims 0, 2, 3 puts the indexed dims first: (n, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, source_y, source_x].permute(0, 3, 1, 2)


def cutout(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per image: zero one square of side CUTOUT_RATIO of the image side, its centre anywhere
    in the image (the square is clipped at the borders)."""
    n, _, height, width = images.shape
    size_y, size_x = round(height * CUTOUT_RATIO), round(width * CUTOUT_RATIO)
    centre_y = torch.randint(height, (n, 1, 1), device=images.device, generator=generator)
    centre_x = torch.randint(width, (n, 1, 1), device=images.device, generator=generator)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    top, left = centre_y - size_y // 2, centre_x - size_x // 2
    inside = ((rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x))
    return images * (~inside).unsqueeze(1).to(images.dtype)


OPS: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "color": color, "translation": translation, "cutout": cutout}


def parse_policy(policy: str) -> tuple[str, ...]:
    """'color,translation,cutout' -> its op names, in order; '' -> (). Raises ValueError
    naming an unknown op."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; expected a comma-separated "
                         f"list of {', '.join(OPS)}")
    return names


class DiffAugment:
    """The ops of a policy string, applied in order; the empty policy returns its input."""

    def __init__(self, policy: str) -> None:
        self.ops = [OPS[name] for name in parse_policy(policy)]

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        for op in self.ops:
            images = op(images, generator)
        return images
