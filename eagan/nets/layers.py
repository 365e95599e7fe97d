"""Spectral-normalised layers and the orthogonal initialisation of the SAGAN recipe.

Spectral norm (Miyato et al., 2018) divides a weight by its largest singular value, estimated by
one power iteration per forward pass in training mode. We use torch's parametrization, so the
raw weight lives at ``<layer>.parametrizations.weight.original`` and the power-iteration vectors
``_u``/``_v`` are buffers saved with the state dict.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

# StudioGAN's SAGAN recipe: eps 1e-6, one power iteration per step (src/utils/model_ops.py
# snconv2d/snlinear/sn_embedding, spectral_norm(..., eps=1e-6) with its default one iteration).
SN_EPS = 1e-6

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


class Float32SpectralNorm(_SpectralNorm):
    """torch's spectral-norm parametrization with the power iteration kept in float32.

    Under autocast the matrix-vector products of the power iteration would run in bf16 or fp16
    and feed rounding noise into the u and v buffers every step; the normalised weight is then
    cast by autocast where the layer uses it, as any float32 weight is.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return super().forward(weight.float()).to(weight.dtype)


def sn(module: nn.Module) -> nn.Module:
    """Wrap ``module.weight`` in spectral norm with the recipe's eps and one power iteration.

    The same registration as torch.nn.utils.parametrizations.spectral_norm (dim 1 for
    transposed convolutions does not arise here), with the float32 power iteration above.
    """
    parametrize.register_parametrization(
        module, "weight", Float32SpectralNorm(module.weight, n_power_iterations=1, eps=SN_EPS))
    return module


def sn_conv2d(in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
              bias: bool = True) -> nn.Conv2d:
    return sn(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias))


def sn_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    return sn(nn.Linear(in_features, out_features, bias=bias))


def sn_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    return sn(nn.Embedding(num_embeddings, embedding_dim))


def raw_weight(layer: nn.Module) -> nn.Parameter:
    """The trainable weight of a layer, under its spectral-norm parametrization if it has one."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def init_orthogonal_(network: nn.Module) -> None:
    """Orthogonal init of every conv, linear and embedding weight, biases at zero (recipe)."""
    for layer in network.modules():
        if isinstance(layer, WEIGHT_LAYERS):
            nn.init.orthogonal_(raw_weight(layer))
            if getattr(layer, "bias", None) is not None:
                nn.init.zeros_(layer.bias)
