"""Attention modules: external attention (Guo et al., 2021), SAGAN self-attention and efficient
attention, as token modules and as gated 2-D blocks for the generator and discriminator.

External attention ("Beyond Self-attention: External Attention using Two Linear Layers for Visual
Tasks", arXiv 2105.02358) replaces the N x N affinity of self-attention with two small learnable
memories M_k (S x C) and M_v (S x C) shared by all samples: attention = double_norm(F M_k^T),
out = attention M_v. Its cost is linear in the number of pixels N.

Every 2-D block is gated, ``out = x + gamma * f(x)`` with a learnable scalar gamma that starts at
0 (SAGAN), so a network starts as if the block were absent.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagan.nets.layers import sn, sn_conv2d

ATTENTION_KINDS = ("none", "self", "external", "efficient")

# 1e-9 (the official EANet value) is 0 in fp16; the normalisation also runs in float32, so a
# sum over S that underflows cannot turn into 0/0 = NaN.
NORM_EPS = 1e-6


def double_normalise(logits: Tensor, token_dim: int, memory_dim: int = -1) -> Tensor:
    """The double normalisation of external attention (paper equations 10-11).

    A softmax over the tokens (each memory unit's weights over the pixels sum to 1), then an L1
    normalisation over the memory units (each pixel's weights over S sum to 1). Computed in
    float32 even under autocast, and returned in the dtype of ``logits``.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        weights = logits.float().softmax(dim=token_dim)
        weights = weights / (NORM_EPS + weights.sum(dim=memory_dim, keepdim=True))
    return weights.to(logits.dtype)


def _layout(x: Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _FoldedExternalAttention(torch.autograd.Function):
    """[x +] values @ double_normalise(keys @ x) + bias on pixels: x (B, C, N), keys (heads*S, C),
    values (C, heads*S), bias (C,), the matrix products in ``dtype``, the normalisation in
    float32.

    One function with its own backward so that only the normalised weights (B, heads*S, N) and
    their per-pixel sums are kept, and the residual is added inside the same matrix product in
    both directions: at 16x16 the C-wide maps, not the attention, are most of the block's memory,
    and autograd's version holds three of them (the product, the sum, x's summed gradient).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, keys: Tensor, values: Tensor, bias: Tensor, heads: int,
                residual: bool, dtype: torch.dtype) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            batch, _, num_pixels = x.shape
            # The normalisation in float32 at least (float64 stays float64).
            precise = torch.promote_types(dtype, torch.float32)
            # bmm on expanded weights: matmul would copy x into a (B*N, C) matrix first.
            logits = torch.bmm(keys.to(dtype).expand(batch, -1, -1), x.to(dtype))
            logits = logits.to(precise)  # (B, heads*S, N)
            normalised = logits.view(batch, heads, -1, num_pixels).softmax(dim=3)
            sums = NORM_EPS + normalised.sum(dim=2, keepdim=True)  # (B, heads, 1, N)
            normalised = normalised.div_(sums).view_as(logits)  # (B, heads*S, N), precise
            values_batch = values.to(dtype).expand(batch, -1, -1)
            if residual and x.dtype == dtype:
                out = torch.baddbmm(x, values_batch, normalised.to(dtype))
            else:
                out = torch.bmm(values_batch, normalised.to(dtype))
                out = x + out if residual else out
            out += bias.to(out.dtype)[:, None]
        ctx.save_for_backward(x, keys, values, normalised, sums)
        ctx.heads, ctx.residual, ctx.dtype, ctx.bias_dtype = heads, residual, dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, keys, values, normalised, sums = ctx.saved_tensors
        batch, _, num_pixels = x.shape
        dtype = ctx.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad = grad_out.to(dtype)  # (B, C, N)
            grad_values = torch.matmul(grad, normalised.to(dtype).transpose(1, 2)).sum(0)
            grad_bias = grad_out.sum(dim=(0, 2))
            # Back through w = p / sum_S p, then through p = softmax over the pixels, in place:
            # at most three (B, heads*S, N) maps are alive at once.
            grad = torch.bmm(values.to(dtype).t().expand(batch, -1, -1), grad)
            grad = grad.to(normalised.dtype)
            grad = grad.view(batch, ctx.heads, -1, num_pixels)  # now d/dw, (B, heads, S, N)
            w = normalised.view_as(grad)
            grad.sub_((grad * w).sum(dim=2, keepdim=True)).div_(sums)  # d/dp
            probabilities = w * sums
            grad.sub_((grad * probabilities).sum(dim=3, keepdim=True))
            grad_logits = probabilities.mul_(grad).view(batch, -1, num_pixels).to(dtype)
            del grad, probabilities
            grad_keys = torch.matmul(grad_logits, x.to(dtype).transpose(1, 2)).sum(0)
            keys_t = keys.to(dtype).t().expand(batch, -1, -1)
            if ctx.residual and grad_out.dtype == dtype:
                grad_x = torch.baddbmm(grad_out, keys_t, grad_logits)
            else:
                grad_x = torch.bmm(keys_t, grad_logits).to(x.dtype)
                grad_x = grad_out.to(x.dtype) + grad_x if ctx.residual else grad_x
        return (grad_x.to(x.dtype), grad_keys.to(keys.dtype), grad_values.to(values.dtype),
                grad_bias.to(ctx.bias_dtype), None, None, None)


class ExternalAttention(nn.Module):
    """External attention on tokens (paper Algorithm 1), with the call shape of the widely used
    External-Attention-pytorch module: ``ExternalAttention(d_model=512, S=8)(x)`` for x of
    shape (B, N, d_model).
    """

    def __init__(self, d_model: int, S: int = 64) -> None:
        super().__init__()
        self.mk = nn.Linear(d_model, S, bias=False)
        self.mv = nn.Linear(S, d_model, bias=False)
        # The reference module's init: small memories keep the first softmax near uniform.
        nn.init.normal_(self.mk.weight, std=0.001)
        nn.init.normal_(self.mv.weight, std=0.001)

    def forward(self, queries: Tensor) -> Tensor:
        attn = double_normalise(self.mk(queries), token_dim=1)  # (B, N, S)
        return self.mv(attn)  # (B, N, d_model)


class MultiHeadExternalAttention(nn.Module):
    """Multi-head external attention (paper Algorithm 2): a query projection, H heads of
    d_model / H channels sharing one pair of memories, and an output projection W_o."""

    def __init__(self, d_model: int, heads: int, S: int = 64) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads = heads
        head_dim = d_model // heads
        # No bias: a per-channel constant before the softmax over tokens cancels out.
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.mk = nn.Linear(head_dim, S, bias=False)
        self.mv = nn.Linear(S, head_dim, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, num_tokens, channels = tokens.shape
        queries = self.query(tokens).view(batch, num_tokens, self.heads, -1).transpose(1, 2)
        attn = double_normalise(self.mk(queries), token_dim=2)  # (B, H, N, S)
        heads_out = self.mv(attn).transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.out(heads_out)  # (B, N, C)


class GatedAttention2d(nn.Module):
    """Base of the 2-D blocks: ``x + gamma * attend(x)`` with gamma a scalar starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(()))

    def attend(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def attention_map(self, x: Tensor) -> Tensor:
        """Attention weights laid out over the image, (B, K, H', W'); see each subclass."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.attend(x)


class SelfAttention2d(GatedAttention2d):
    """SAGAN self-attention (Zhang et al., 2019) as in the original code rather than the paper:
    C/8 query and key, C/2 value, keys and values max-pooled 2x2 (N/4 of them), no biases."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 8:
            raise ValueError(f"self-attention needs channels divisible by 8, got {channels}")
        self.theta = sn_conv2d(channels, channels // 8, 1, bias=False)
        self.phi = sn_conv2d(channels, channels // 8, 1, bias=False)
        self.g = sn_conv2d(channels, channels // 2, 1, bias=False)
        self.o = sn_conv2d(channels // 2, channels, 1, bias=False)

    def _weights(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"self-attention needs even height and width, got {tuple(x.shape)}")
        theta = self.theta(x).flatten(2)  # (B, C/8, N)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (B, C/8, N/4)
        return torch.bmm(theta.transpose(1, 2), phi).softmax(dim=-1)  # (B, N, N/4)

    def attend(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        attn = self._weights(x)  # (B, N, N/4)
        values = F.max_pool2d(self.g(x), 2).flatten(2)  # (B, C/2, N/4)
        out = torch.bmm(values, attn.transpose(1, 2))  # (B, C/2, N)
        return self.o(out.view(batch, -1, height, width))

    def attention_map(self, x: Tensor) -> Tensor:
        """Each query pixel's weights over the pooled keys: (B, H*W, H/2, W/2), summing to 1."""
        height, width = x.shape[-2:]
        return self._weights(x).unflatten(-1, (height // 2, width // 2))


class ExternalAttention2d(GatedAttention2d):
    """External attention for feature maps: 1x1 query conv, memories M_k and M_v shared by the
    heads, double normalisation, 1x1 output conv, all spectral-normed like every other layer of
    SAGAN. M_k and M_v are two independent parameters (the official code ties them through a
    transposed view, which `.to()` or a deepcopy silently unties).

    Nothing nonlinear sits between the query conv and M_k, nor between M_v and the output conv,
    so the block can run re-associated: M_k W_q (S x C per head) and W_o M_v (C x S per head) are
    multiplied once per forward from the normalised weights and applied to the pixels, costing
    2 N C S heads multiply-accumulates per sample instead of 2 N (C^2 + C S). The parameters,
    their spectral norms (each weight is read once per forward, so one power iteration each, as
    before) and the state_dict are the same either way; ``fold_projections`` records which order
    this block uses, chosen from its shape.
    """

    def __init__(self, channels: int, memory_size: int = 64, heads: int = 1) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.memory_size = memory_size
        head_dim = channels // heads
        # No bias: a per-channel constant before the softmax over pixels cancels out (and the
        # folded order below relies on there being none).
        self.query = sn_conv2d(channels, channels, 1, bias=False)
        self.memory_key = sn(nn.Linear(head_dim, memory_size, bias=False))  # M_k
        self.memory_value = sn(nn.Linear(memory_size, head_dim, bias=False))  # M_v
        self.out = sn_conv2d(channels, channels, 1)
        # Per pixel and per half of the block: heads*S*C folded against C^2 + S*C unfolded. The
        # weight products themselves (S*C^2, once per forward) are left out: they do not grow
        # with batch or pixels.
        self.fold_projections = heads * memory_size * channels < channels * (channels + memory_size)

    def _folded_weights(self, first: Tensor, second: Tensor) -> Tensor:
        """A product of two weights in their own dtype: under autocast a bf16 product would
        round the combined matrix once more than the unfolded order rounds its activations."""
        with torch.autocast(device_type=first.device.type, enabled=False):
            return first @ second

    def _weights(self, x: Tensor) -> Tensor:
        """The double-normalised attention weights, (B, heads, S, N)."""
        batch, channels = x.shape[:2]
        if self.fold_projections:
            query = self.query.weight.view(self.heads, channels // self.heads, channels)
            keys = self._folded_weights(self.memory_key.weight, query)  # (heads, S, C)
            logits = F.conv2d(x, keys.view(-1, channels, 1, 1)).flatten(2)  # (B, heads*S, N)
            logits = logits.view(batch, self.heads, self.memory_size, -1)
            return double_normalise(logits, token_dim=3, memory_dim=2)
        queries = self.query(x).flatten(2)  # (B, C, N)
        queries = queries.view(batch, self.heads, channels // self.heads, -1)
        logits = self.memory_key(queries.transpose(2, 3))  # (B, heads, N, S)
        return double_normalise(logits, token_dim=2).transpose(2, 3)

    def _folded(self, x: Tensor, residual: bool, gate: Tensor | None = None) -> Tensor:
        """[x +] (W_o M_v) double_normalise((M_k W_q) x) + b_o, the products scaled by
        ``gate`` when given; the pixels go through _FoldedExternalAttention."""
        channels = x.shape[1]
        query = self.query.weight.view(self.heads, channels // self.heads, channels)
        keys = self._folded_weights(self.memory_key.weight, query)  # (heads, S, C)
        out_weight = self.out.weight.view(channels, self.heads, -1)  # (C, heads, C/heads)
        values = self._folded_weights(out_weight.transpose(0, 1),
                                      self.memory_value.weight)  # (heads, C, S)
        values = values.transpose(0, 1).reshape(channels, -1)  # (C, heads*S)
        bias = self.out.bias
        if gate is not None:
            values, bias = gate * values, gate * bias
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
            else x.dtype
        out = _FoldedExternalAttention.apply(x.flatten(2), keys.reshape(-1, channels), values,
                                             bias, self.heads, residual, dtype)
        # Back to the input's layout (channels_last stays channels_last).
        return out.view(x.shape).contiguous(memory_format=_layout(x))

    def attend(self, x: Tensor) -> Tensor:
        if self.fold_projections:
            return self._folded(x, residual=False)
        out = self.memory_value(self._weights(x).transpose(2, 3))  # (B, heads, N, C/heads)
        out = out.transpose(2, 3).reshape(x.shape)  # (B, C, H, W)
        return self.out(out)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fold_projections:
            return super().forward(x)
        # gamma scales the folded C x S matrix rather than a C-wide map.
        return self._folded(x, residual=True, gate=self.gamma)

    def attention_map(self, x: Tensor) -> Tensor:
        """Each memory unit's share of every pixel, averaged over heads: (B, S, H, W) in [0, 1]."""
        return self._weights(x).mean(dim=1).unflatten(-1, x.shape[-2:])


class EfficientAttention2d(GatedAttention2d):
    """Efficient attention (Shen et al., WACV 2021): keys softmax over positions, queries softmax
    over the channels of each head, context K V^T per head, reprojection. Key width C/8 and value
    width C/2 as in SAGAN's block, so the two compare like for like.

    The value conv and the reprojection are linear, so where it is cheaper (``folds_values``) the
    pixels are summed against x rather than against the values: context = (K x^T) W_v^T +
    (K 1) b_v^T, and the reprojection meets the small (C/2 x C/8) context instead of every pixel.
    Same parameters, same function.
    """

    def __init__(self, channels: int, heads: int = 1) -> None:
        super().__init__()
        # A head with one query channel is degenerate: its softmax over channels is always 1.
        if channels % 8 or (channels // 8) % heads or channels // 8 // heads < 2:
            raise ValueError(
                f"efficient attention needs channels divisible by 8 and at least 2 query "
                f"channels (C/8) per head, got channels={channels}, heads={heads}")
        self.heads = heads
        self.keys = sn_conv2d(channels, channels // 8, 1, bias=False)  # softmax over pixels
        self.queries = sn_conv2d(channels, channels // 8, 1)
        self.values = sn_conv2d(channels, channels // 2, 1)
        self.reprojection = sn_conv2d(channels // 2, channels, 1)

    def folds_values(self, channels: int, num_pixels: int) -> bool:
        """Whether the folded order costs fewer multiply-accumulates per sample on N pixels."""
        keys, values = channels // 8, channels // 2
        unfolded = 2 * num_pixels * channels * values + 2 * num_pixels * keys * values // self.heads
        folded = 2 * num_pixels * channels * keys + 2 * channels * keys * values // self.heads
        return folded < unfolded

    def _split(self, features: Tensor) -> Tensor:
        batch, channels = features.shape[:2]
        return features.reshape(batch, self.heads, channels // self.heads, -1)  # (B, h, d, N)

    def attend(self, x: Tensor) -> Tensor:
        keys = self._split(self.keys(x)).softmax(dim=-1)  # (B, h, dk, N)
        queries = self._split(self.queries(x)).softmax(dim=2)  # (B, h, dk, N)
        batch, channels = x.shape[:2]
        if self.folds_values(channels, keys.shape[-1]):
            pooled = keys @ x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, h, dk, C)
            value_weight = self.values.weight.view(self.heads, -1, channels)  # (h, dv, C)
            reprojection = self.reprojection.weight.view(channels, self.heads, -1)  # (C, h, dv)
            # Small products, no pixels: in float32 even under autocast, as a bf16 rounding here
            # would be the same for every pixel and not average out over them.
            with torch.autocast(device_type=x.device.type, enabled=False):
                # Each key row sums to 1 only up to round-off, so its sum scales the bias.
                context = (pooled.to(value_weight.dtype) @ value_weight.transpose(1, 2)
                           + keys.sum(dim=-1, keepdim=True).to(value_weight.dtype)
                           * self.values.bias.view(self.heads, 1, -1))  # (B, h, dk, dv)
                mixed = reprojection.transpose(0, 1) @ context.transpose(2, 3)  # (B, h, C, dk)
            mixed = mixed.transpose(1, 2).reshape(batch, channels, -1)  # (B, C, h*dk)
            out = mixed @ queries.reshape(batch, -1, keys.shape[-1])  # (B, C, N)
            return (out + self.reprojection.bias[:, None]).view(x.shape)
        values = self._split(self.values(x))  # (B, h, dv, N)
        context = keys @ values.transpose(2, 3)  # (B, h, dk, dv)
        out = context.transpose(2, 3) @ queries  # (B, h, dv, N)
        out = out.reshape(batch, -1, *x.shape[-2:])  # (B, C/2, H, W)
        return self.reprojection(out)

    def attention_map(self, x: Tensor) -> Tensor:
        """Each key channel's global attention map over the pixels: (B, C/8, H, W), sums to 1."""
        return self.keys(x).flatten(2).softmax(dim=-1).unflatten(-1, x.shape[-2:])


def build_attention(kind: str, channels: int, memory_size: int = 64, heads: int = 1) -> nn.Module:
    """The attention block the networks insert: identity, self, external or efficient."""
    if kind == "none":
        return nn.Identity()
    if kind == "self":
        if heads != 1:
            raise ValueError("SAGAN self-attention has a single head")
        return SelfAttention2d(channels)
    if kind == "external":
        return ExternalAttention2d(channels, memory_size=memory_size, heads=heads)
    if kind == "efficient":
        return EfficientAttention2d(channels, heads=heads)
    raise ValueError(f"attention kind {kind!r} is not one of {', '.join(ATTENTION_KINDS)}")
