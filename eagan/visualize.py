"""Attention maps over generated images (the paper's Figure 4, adapted to a generator).

For external attention, each chosen memory unit's share of every pixel; for self-attention,
where chosen query pixels look; for efficient attention, the global maps of chosen key channels.
Each row of a figure is one sample: the image, then one heat map per unit or query.
``attention_figure`` is the bare grid (TensorBoard shows it at the generator's size);
``attention_caption`` says what its rows and columns are, for the figure ``--sample`` writes.
"""
from __future__ import annotations

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import make_grid

from eagan.nets.attention import ExternalAttention2d, GatedAttention2d, SelfAttention2d
from eagan.nets.bn_mode import bn_mode

MAPS_PER_IMAGE = 6


@torch.no_grad()
def generator_attention(generator: nn.Module, z: Tensor, labels: Tensor | None,
                        bn: str = "batch") -> tuple[Tensor, Tensor, list[str]] | None:
    """Images (B, 3, H, W) in [-1, 1], the attention block's maps (B, K, h, w) and a name per
    map, or None when the generator has no attention block."""
    block = getattr(generator, "attention", None)
    if not isinstance(block, GatedAttention2d):
        return None
    captured: list[Tensor] = []
    handle = block.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    try:
        with bn_mode(generator, bn):
            images = generator(z, labels)
            maps = block.attention_map(captured[0]).float()
    finally:
        handle.remove()
    index = select_maps(block, maps)
    return images.float(), maps[:, index.to(maps.device)], map_names(block, index, captured[0])


def select_maps(block: GatedAttention2d, maps: Tensor, count: int = MAPS_PER_IMAGE) -> Tensor:
    """Indices of the ``count`` most informative maps: for self-attention, evenly spaced query
    pixels; for memory units and key channels, those whose maps vary most over the image."""
    if isinstance(block, SelfAttention2d):
        return torch.linspace(0, maps.shape[1] - 1, min(count, maps.shape[1])).round().long()
    spread = maps.flatten(2).std(dim=-1).mean(dim=0)  # (K,)
    return spread.sort(descending=True, stable=True).indices[:count].cpu()


def map_names(block: GatedAttention2d, index: Tensor, block_input: Tensor) -> list[str]:
    """What each selected map shows: a query pixel (row, column of the attended map), a memory
    unit or a key channel."""
    if isinstance(block, SelfAttention2d):
        width = block_input.shape[-1]
        return [f"query ({i // width}, {i % width})" for i in index.tolist()]
    kind = "unit" if isinstance(block, ExternalAttention2d) else "key channel"
    return [f"{kind} {i}" for i in index.tolist()]


def heat_colours(maps: Tensor, size: int) -> Tensor:
    """(B, K, h, w) maps to (B, K, 3, size, size) viridis images, each map scaled to [0, 1]."""
    batch, count = maps.shape[:2]
    flat = maps.flatten(2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    scaled = ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)
    scaled = F.interpolate(scaled, size=(size, size), mode="nearest")
    palette = torch.tensor(matplotlib.colormaps["viridis"](torch.linspace(0, 1, 256).numpy()),
                           dtype=torch.float32)[:, :3]  # (256, 3)
    coloured = palette[(scaled * 255).round().long().cpu()]  # (B, K, S, S, 3)
    return coloured.permute(0, 1, 4, 2, 3).reshape(batch, count, 3, size, size)


def attention_figure(generator: nn.Module, z: Tensor, labels: Tensor | None) -> Tensor | None:
    """One (3, H', W') [0, 1] figure: per sample, the image then its attention maps."""
    result = generator_attention(generator, z, labels)
    if result is None:
        return None
    images, maps, _ = result
    size = images.shape[-1]
    tiles = torch.cat([((images.cpu() + 1) / 2).clamp(0, 1).unsqueeze(1),
                       heat_colours(maps, size)], dim=1)  # (B, 1 + K, 3, S, S)
    return make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2)


ATTENDED = {"SelfAttention2d": "where each chosen query pixel of the block's map looks",
            "ExternalAttention2d": "each chosen memory unit's share of every pixel (mean over "
                                   "heads)",
            "EfficientAttention2d": "the global map of each chosen key channel"}


def attention_caption(generator: nn.Module, z: Tensor, labels: Tensor | None
                      ) -> tuple[str, list[str]] | None:
    """The title of attention_figure's figure for the same inputs and its column headings (the
    image, then each map), or None without an attention block."""
    result = generator_attention(generator, z, labels)
    if result is None:
        return None
    kind = type(generator.attention).__name__
    title = (f"One row per generated sample: the image, then {ATTENDED.get(kind, kind)} "
             f"({kind}; bright: large)")
    return title, ["image", *result[2]]
