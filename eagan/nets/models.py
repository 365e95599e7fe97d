"""SAGAN's generator and discriminator in the ResNet topology of PyTorch-StudioGAN.

SAGAN (Zhang et al., 2019, "Self-Attention Generative Adversarial Networks") as configured by
StudioGAN (Kang & Park; its "resnet" models, early 2021): residual blocks (Miyato et al., 2018),
class-conditional batch norm in G (de Vries et al., 2017), a projection discriminator (Miyato &
Koyama, 2018), spectral norm on every weight layer, orthogonal init, and one gated attention
block in each network. EAGAN swaps that block for external attention; nothing else changes.

Widths are multiples of ``base_channels`` (StudioGAN's g_conv_dim / d_conv_dim = 64). With
self-attention at the default width the parameter counts are those StudioGAN reports: 32 px,
10 classes: G 4,386,308 / D 1,075,586; 64 px, 200 classes: G 13,387,396 / D 19,752,642.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagan.nets.attention import build_attention
from eagan.nets.layers import init_orthogonal_, sn_conv2d, sn_embedding, sn_linear

# StudioGAN's batch-norm settings for G (utils/model_ops.batchnorm_2d).
BN_EPS = 1e-4
BN_MOMENTUM = 0.1

# G starts from a 4x4 feature map at every image size.
BOTTOM = 4


@dataclass(frozen=True)
class Topology:
    """Block widths (in units of base_channels) and attention placement for one image size.

    Blocks are numbered from 1; attention goes after block ``*_attention_after``. The defaults
    are StudioGAN's SAGAN configs: CIFAR-10 attn_g_loc [2] / attn_d_loc [1] (16x16 in both),
    Tiny-ImageNet [3] / [1] (32x32), ImageNet 128 px (configs/ImageNet/SAGAN-256.yaml) [4] / [1]
    (64x64 in both, where SAGAN's and BigGAN's 128 px models put it). 16 px is not a StudioGAN
    size: the 32 px networks one G block shorter, for data as small as the 8x8 digits of the CPU
    demo, with attention at half the image size as there (8x8).
    """

    g_in: tuple[int, ...]
    g_out: tuple[int, ...]
    d_out: tuple[int, ...]
    d_downsample: tuple[bool, ...]
    g_attention_after: int
    d_attention_after: int


TOPOLOGIES: dict[int, Topology] = {
    16: Topology(g_in=(4, 4), g_out=(4, 4), d_out=(2, 2, 2, 2),
                 d_downsample=(True, True, False, False),
                 g_attention_after=1, d_attention_after=1),
    32: Topology(g_in=(4, 4, 4), g_out=(4, 4, 4), d_out=(2, 2, 2, 2),
                 d_downsample=(True, True, False, False),
                 g_attention_after=2, d_attention_after=1),
    64: Topology(g_in=(16, 8, 4, 2), g_out=(8, 4, 2, 1), d_out=(1, 2, 4, 8, 16),
                 d_downsample=(True, True, True, True, False),
                 g_attention_after=3, d_attention_after=1),
    128: Topology(g_in=(16, 16, 8, 4, 2), g_out=(16, 8, 4, 2, 1), d_out=(1, 2, 4, 8, 16, 16),
                  d_downsample=(True, True, True, True, True, False),
                  g_attention_after=4, d_attention_after=1),
}


def _topology(image_size: int) -> Topology:
    if image_size not in TOPOLOGIES:
        sizes = ", ".join(str(size) for size in TOPOLOGIES)
        raise ValueError(f"image_size must be one of {sizes}, got {image_size}")
    return TOPOLOGIES[image_size]


def _check_args(image_size: int, num_classes: int, base_channels: int, attention_after: int,
                num_blocks: int) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
    if base_channels < 1:
        raise ValueError(f"base_channels must be >= 1, got {base_channels}")
    if not 1 <= attention_after <= num_blocks:
        raise ValueError(f"attention_after must be a block number from 1 to {num_blocks} at "
                         f"{image_size} px, got {attention_after}")


def _labels_or_none(labels: Tensor | None, num_classes: int) -> Tensor | None:
    """Labels for a conditional network; an unconditional one ignores whatever it is given."""
    if num_classes == 0:
        return None
    if labels is None:
        raise ValueError(f"this network is conditioned on {num_classes} classes: pass labels")
    return labels


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional batch norm (de Vries et al., 2017), StudioGAN's form: BatchNorm without
    affine, then ``gain = 1 + embed_gain(y)`` and ``bias = embed_bias(y)`` from spectral-normed
    embeddings. With ``num_classes == 0`` it is a plain affine BatchNorm that ignores labels."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM,
                                 affine=num_classes == 0)
        self.embed_gain = sn_embedding(num_classes, num_features) if num_classes else None
        self.embed_bias = sn_embedding(num_classes, num_features) if num_classes else None

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        out = self.bn(x)  # (B, C, H, W)
        if self.embed_gain is None:
            return out
        gain = 1.0 + self.embed_gain(labels)[:, :, None, None]  # (B, C, 1, 1)
        bias = self.embed_bias(labels)[:, :, None, None]  # (B, C, 1, 1)
        return out * gain + bias


class GeneratorBlock(nn.Module):
    """cBN -> ReLU -> upsample -> conv3x3 -> cBN -> ReLU -> conv3x3, plus upsample -> conv1x1."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, num_classes)
        self.conv1 = sn_conv2d(in_channels, out_channels, 3, padding=1)
        self.bn2 = ConditionalBatchNorm2d(out_channels, num_classes)
        self.conv2 = sn_conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = sn_conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, labels: Tensor | None) -> Tensor:
        h = self.conv1(_upsample(F.relu(self.bn1(x, labels))))  # (B, C_out, 2H, 2W)
        h = self.conv2(F.relu(self.bn2(h, labels)))  # (B, C_out, 2H, 2W)
        return h + self.shortcut(_upsample(x))


class DiscriminatorInputBlock(nn.Module):
    """D's first block, on RGB: no leading ReLU, and the shortcut pools before its 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = sn_conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = sn_conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = sn_conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)  # (B, C_out, H/2, W/2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class DiscriminatorBlock(nn.Module):
    """ReLU -> conv3x3 -> ReLU -> conv3x3 -> [avgpool]; the shortcut is a 1x1 conv -> [avgpool]
    only when the block downsamples or changes the width, the identity otherwise.

    Both paths start from ReLU(x), as in StudioGAN's DiscBlock (src/models/resnet.py, commit
    8a03c51): its in-place ReLU rewrote the storage its shortcut had kept a reference to.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = sn_conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = sn_conv2d(out_channels, out_channels, 3, padding=1)
        projects = downsample or in_channels != out_channels
        self.shortcut = sn_conv2d(in_channels, out_channels, 1) if projects else nn.Identity()
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        h = self.pool(self.conv2(F.relu(self.conv1(x))))  # (B, C_out, H', W')
        return h + self.pool(self.shortcut(x))


class Generator(nn.Module):
    """z (B, z_dim) and labels (B,) -> images (B, 3, image_size, image_size) in [-1, 1].

    SN-linear to a 4x4 map, one upsampling block per doubling, the attention block after block
    ``attention_after``, then BN -> ReLU -> conv3x3 -> tanh. ``num_classes == 0`` builds an
    unconditional generator (plain BN, labels ignored).
    """

    def __init__(self, image_size: int, num_classes: int, z_dim: int = 128,
                 base_channels: int = 64, attention: str = "self",
                 attention_after: int | None = None, memory_size: int = 64,
                 heads: int = 1) -> None:
        super().__init__()
        topology = _topology(image_size)
        if attention_after is None:
            attention_after = topology.g_attention_after
        _check_args(image_size, num_classes, base_channels, attention_after, len(topology.g_in))
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        in_widths = [base_channels * m for m in topology.g_in]
        out_widths = [base_channels * m for m in topology.g_out]

        self.image_size = image_size
        self.num_classes = num_classes
        self.z_dim = z_dim
        self.attention_after = attention_after
        self.linear = sn_linear(z_dim, in_widths[0] * BOTTOM * BOTTOM)
        self.blocks = nn.ModuleList(
            GeneratorBlock(c_in, c_out, num_classes) for c_in, c_out in zip(in_widths, out_widths))
        self.attention = build_attention(attention, out_widths[attention_after - 1],
                                         memory_size=memory_size, heads=heads)
        self.bn_out = nn.BatchNorm2d(out_widths[-1], eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv_out = sn_conv2d(out_widths[-1], 3, 3, padding=1)
        init_orthogonal_(self)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = _labels_or_none(labels, self.num_classes)
        h = self.linear(z).view(z.shape[0], -1, BOTTOM, BOTTOM)  # (B, C0, 4, 4)
        for number, block in enumerate(self.blocks, start=1):
            h = block(h, labels)  # (B, C_i, 4 * 2^i, 4 * 2^i)
            if number == self.attention_after:
                h = self.attention(h)
        h = self.conv_out(F.relu(self.bn_out(h)))  # (B, 3, H, W)
        return torch.tanh(h)


class Discriminator(nn.Module):
    """images (B, 3, H, W) and labels (B,) -> logits (B,).

    Residual blocks, the attention block after block ``attention_after``, ReLU, global sum
    pooling, then SN-linear(C -> 1) plus the projection term sum(embed(y) * h) (Miyato & Koyama,
    2018). ``num_classes == 0`` drops the projection (labels ignored).

    ``aux_classifier`` adds an SN-linear(C -> num_classes) head on the same pooled features, the
    auxiliary classifier of AC-GAN (Odena et al., 2017); ``forward(..., classify=True)`` then
    also returns its class logits (B, num_classes). Not part of the SAGAN recipe: it gives G a
    direct class signal, which the projection term alone only builds up over many steps.
    """

    def __init__(self, image_size: int, num_classes: int, base_channels: int = 64,
                 attention: str = "self", attention_after: int | None = None,
                 memory_size: int = 64, heads: int = 1, aux_classifier: bool = False) -> None:
        super().__init__()
        topology = _topology(image_size)
        if attention_after is None:
            attention_after = topology.d_attention_after
        _check_args(image_size, num_classes, base_channels, attention_after, len(topology.d_out))
        if aux_classifier and num_classes == 0:
            raise ValueError("aux_classifier needs classes (num_classes > 0); this dataset "
                             "has none")
        out_widths = [base_channels * m for m in topology.d_out]
        in_widths = [3] + out_widths[:-1]

        self.image_size = image_size
        self.num_classes = num_classes
        self.attention_after = attention_after
        blocks: list[nn.Module] = [DiscriminatorInputBlock(in_widths[0], out_widths[0])]
        blocks += [DiscriminatorBlock(c_in, c_out, downsample)
                   for c_in, c_out, downsample
                   in zip(in_widths[1:], out_widths[1:], topology.d_downsample[1:])]
        self.blocks = nn.ModuleList(blocks)
        self.attention = build_attention(attention, out_widths[attention_after - 1],
                                         memory_size=memory_size, heads=heads)
        self.linear = sn_linear(out_widths[-1], 1)
        self.embedding = sn_embedding(num_classes, out_widths[-1]) if num_classes else None
        self.classifier = sn_linear(out_widths[-1], num_classes) if aux_classifier else None
        init_orthogonal_(self)

    def forward(self, images: Tensor, labels: Tensor | None = None, classify: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B,); with ``classify``, (logits, class logits (B, num_classes))."""
        if classify and self.classifier is None:
            raise ValueError("classify=True needs a discriminator built with aux_classifier")
        labels = _labels_or_none(labels, self.num_classes)
        h = images
        for number, block in enumerate(self.blocks, start=1):
            h = block(h)  # (B, C_i, H_i, W_i)
            if number == self.attention_after:
                h = self.attention(h)
        h = F.relu(h).sum(dim=(2, 3))  # (B, C)
        logits = self.linear(h).squeeze(1)  # (B,)
        if self.embedding is not None:
            logits = logits + (self.embedding(labels) * h).sum(dim=1)
        return (logits, self.classifier(h)) if classify else logits


def attention_gammas(module: nn.Module) -> dict[str, float]:
    """The gate ``gamma`` of every attention block under ``module``, by module name.

    For logging: a gamma that stays near 0 means the network is not using its attention.
    """
    return {name: float(sub.gamma.detach()) for name, sub in module.named_modules()
            if isinstance(getattr(sub, "gamma", None), nn.Parameter)}


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements; spectral norm's u and v are buffers and do not count."""
    return sum(p.numel() for p in module.parameters())
