"""Drawing images from a generator: BN modes, class grids, .npz files, latent interpolation,
and ``load_generator``, which needs nothing but a checkpoint."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid

from eagan.config import Config, config_from_dict
from eagan.errors import UserError
from eagan.files import atomic_output, ensure_writable_dir
from eagan.nets.bn_mode import bn_mode
from eagan.nets.factory import build_generator
from eagan.train.checkpoint import load_checkpoint, load_weights
from eagan.visualize import attention_caption, attention_figure

GRID_MAX_CLASS_ROWS = 10  # Tiny-ImageNet's 200 classes would make a 200-row grid
# Written pictures are enlarged until each image is at least this wide (TensorBoard keeps the
# generator's size): a 16-pixel digit would otherwise be a few pixels in a README.
READABLE_WIDTH = 64


def class_grid_labels(num_classes: int, per_row: int, device: torch.device) -> Tensor | None:
    """Labels for a grid with one row per class (at most GRID_MAX_CLASS_ROWS classes, evenly
    spaced), or None for an unconditional generator."""
    if num_classes == 0:
        return None
    rows = min(num_classes, GRID_MAX_CLASS_ROWS)
    classes = torch.linspace(0, num_classes - 1, rows).round().long()
    return classes.repeat_interleave(per_row).to(device)  # (rows * per_row,)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats to uint8, rounding to nearest."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grid_image(images: Tensor, per_row: int) -> Tensor:
    """(B, 3, H, W) in [-1, 1] to one (3, H', W') float grid in [0, 1]."""
    return make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=per_row, padding=2)


def readable(grid: Tensor, image_size: int) -> Tensor:
    """A (3, H, W) grid of image_size-pixel images, enlarged by the smallest integer factor that
    makes each image at least READABLE_WIDTH pixels wide (nearest neighbour: every generated
    pixel stays one sharp square)."""
    scale = -(-READABLE_WIDTH // image_size)
    return grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def captioned(figure: Tensor, title: str, columns: list[str]) -> Tensor:
    """``figure`` (3, H, W) in [0, 1] with ``title`` above it and one heading per column of
    equal-width tiles, drawn at one figure pixel per image pixel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = figure.shape[-2:]
    dpi, header = 100, 60
    fig = plt.figure(figsize=(width / dpi, (height + header) / dpi), dpi=dpi)
    axes = fig.add_axes((0, 0, 1, height / (height + header)))
    axes.imshow(figure.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
    axes.set_axis_off()
    tile = width / len(columns)
    for index, name in enumerate(columns):
        fig.text((index + 0.5) * tile / width, height / (height + header) + 4 / (height + header),
                 name, ha="center", va="bottom", fontsize=7)
    fig.text(0.5, 1 - 4 / (height + header), textwrap.fill(title, width=max(40, width // 7)),
             ha="center", va="top", fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB")))
    return pixels.permute(2, 0, 1).float() / 255


def save_png(grid: Tensor, path: Path) -> None:
    """Write a (3, H, W) [0, 1] image atomically."""
    pixels = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_output(path) as tmp_path:
        Image.fromarray(pixels).save(tmp_path, format="PNG")


class SampledGenerator:
    """A generator restored from a checkpoint, ready to draw images."""

    def __init__(self, generator: nn.Module, config: Config, class_names: list[str],
                 step: int, is_ema: bool) -> None:
        self.generator = generator
        self.config = config  # the training run's resolved config
        self.class_names = class_names
        self.step = step
        self.is_ema = is_ema

    @property
    def num_classes(self) -> int:
        return self.generator.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, seed: int = 0,
               bn: str = "batch", batch_size: int = 100) -> tuple[Tensor, Tensor | None]:
        """Draw ``n`` images in [-1, 1], (n, 3, H, W), for the given labels or uniform random
        ones; the same seed gives the same images."""
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.generator.z_dim, generator=rng)
        if self.num_classes and labels is None:
            labels = torch.randint(self.num_classes, (n,), generator=rng)
        chunks = []
        with bn_mode(self.generator, bn):
            for start in range(0, n, batch_size):
                chunk_labels = None if labels is None else \
                    labels[start:start + batch_size].to(self.device)
                chunks.append(self.generator(z[start:start + batch_size].to(self.device),
                                             chunk_labels).float().cpu())
        return torch.cat(chunks), None if labels is None else labels.cpu()

    @torch.no_grad()
    def interpolate(self, rows: int, steps: int, seed: int = 0, bn: str = "batch") -> Tensor:
        """Spherical interpolation between pairs of latents, one class per row:
        (rows * steps, 3, H, W)."""
        rng = torch.Generator().manual_seed(seed)
        start, end = torch.randn(2, rows, self.generator.z_dim, generator=rng)
        weights = torch.linspace(0, 1, steps)
        z = torch.stack([slerp(start, end, w) for w in weights], dim=1).flatten(0, 1)
        labels = None
        if self.num_classes:
            labels = torch.randint(self.num_classes, (rows,), generator=rng)
            labels = labels.repeat_interleave(steps).to(self.device)
        with bn_mode(self.generator, bn):
            return self.generator(z.to(self.device), labels).float().cpu()


def slerp(a: Tensor, b: Tensor, weight: float) -> Tensor:
    """Spherical interpolation between rows of a and b (Gaussian latents keep their norm)."""
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1,
                                                                              keepdim=True))
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    return (torch.sin((1 - weight) * omega) * a + torch.sin(weight * omega) * b) / torch.sin(omega)


def load_generator(path: str | Path, ema: bool = True,
                   device: str | torch.device = "cpu") -> SampledGenerator:
    """The generator of a checkpoint (its EMA copy when there is one and ``ema``), rebuilt from
    the config stored inside it, in eval mode on ``device``."""
    return generator_from_checkpoint(load_checkpoint(path), path, ema, device)


def generator_from_checkpoint(payload: dict[str, Any], path: str | Path, ema: bool = True,
                              device: str | torch.device = "cpu") -> SampledGenerator:
    """load_generator on a checkpoint already read by load_checkpoint from ``path``."""
    config = config_from_dict(payload["config"], source=f"{path} (stored config)")
    generator = build_generator(config.model, config.data.image_size, payload["num_classes"])
    use_ema = ema and payload.get("generator_ema") is not None
    load_weights(generator, payload["generator_ema" if use_ema else "generator"], Path(path),
                 "EMA generator" if use_ema else "generator")
    generator.to(device).eval()
    return SampledGenerator(generator, config, payload.get("class_names", []), payload["step"],
                            use_ema)


def write_npz(images: Tensor, labels: Tensor | None, path: Path) -> None:
    """uint8 NHWC under arr_0 (the layout common GAN evaluators read) plus the labels."""
    arrays = {"arr_0": to_uint8(images).permute(0, 2, 3, 1).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    with atomic_output(path) as tmp_path:
        with open(tmp_path, "wb") as handle:
            np.savez(handle, **arrays)


def write_samples(sampler: SampledGenerator, path: Path, out_dir: str | Path, *,
                  num_samples: int = 1000, seed: int = 0, bn: str = "batch",
                  interpolate: bool = False, attention: bool = False,
                  per_row: int = 8) -> list[Path]:
    """What ``--sample`` writes for the generator of checkpoint ``path``: a class grid,
    ``num_samples`` images as .npz and, on request, a latent interpolation grid and the
    attention figure with its caption. Pictures are enlarged to be read (see ``readable``).
    Everything is drawn before the first file is written, so a generator without attention
    loses nothing."""
    device = sampler.device
    labels = class_grid_labels(sampler.num_classes, per_row, torch.device("cpu"))
    count = len(labels) if labels is not None else per_row * per_row
    outputs: dict[str, Tensor] = {}
    images, _ = sampler.sample(count, labels=labels, seed=seed, bn=bn)
    image_size = images.shape[-1]
    outputs["grid.png"] = readable(grid_image(images, per_row), image_size)
    if interpolate:
        outputs["interpolation.png"] = readable(grid_image(
            sampler.interpolate(rows=8, steps=per_row, seed=seed, bn=bn), per_row), image_size)
    if attention:
        rng = torch.Generator().manual_seed(seed)
        z = torch.randn(per_row, sampler.generator.z_dim, generator=rng).to(device)
        figure_labels = torch.randint(sampler.num_classes, (per_row,), generator=rng).to(
            device) if sampler.num_classes else None
        figure = attention_figure(sampler.generator, z, figure_labels)
        if figure is None:
            raise UserError(f"{path}: --attention: this generator has no attention block")
        title, columns = attention_caption(sampler.generator, z, figure_labels)
        outputs["attention.png"] = captioned(readable(figure, image_size), title, columns)
    images, labels = sampler.sample(num_samples, seed=seed, bn=bn)

    out_dir = ensure_writable_dir(out_dir, "the output folder")
    stem = f"{Path(path).parent.name}-step{sampler.step}" + ("-ema" if sampler.is_ema else "")
    written = [out_dir / f"{stem}-grid.png", out_dir / f"{stem}-samples.npz"]
    save_png(outputs.pop("grid.png"), written[0])
    write_npz(images, labels, written[1])
    for name, figure in outputs.items():
        written.append(out_dir / f"{stem}-{name}")
        save_png(figure, written[-1])
    return written
