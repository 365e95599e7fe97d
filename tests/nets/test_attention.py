"""eagan.nets.attention: shapes, the double normalisation of external attention (Guo et al.,
2021, equations 10-11), agreement with manual re-computations of each block, mixed precision,
untied memories, the gated identity at init, attention maps, the factory, and linear cost."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from eagan.nets import attention
from eagan.nets.attention import (ATTENTION_KINDS, EfficientAttention2d, ExternalAttention,
                                  ExternalAttention2d, MultiHeadExternalAttention, SelfAttention2d,
                                  _FoldedExternalAttention, build_attention, double_normalise)
from eagan.sampling import load_generator

# Divisible by 8 (self, efficient); C/8 = 4 leaves 2 query channels per head with 2 heads.
CHANNELS = 32
MEMORY = 8
# Non-square, even maps: a swapped H and W fails the shape checks, odd sizes stop self-attention.
HEIGHT, WIDTH = 4, 6

# (kind, heads): every gated block the networks can insert.
GATED_BLOCKS = [("self", 1), ("external", 1), ("external", 2), ("efficient", 1),
                ("efficient", 2)]

@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_block(kind: str, heads: int) -> nn.Module:
    return build_attention(kind, CHANNELS, memory_size=MEMORY, heads=heads)


def feature_map(batch: int = 2) -> Tensor:
    return torch.randn(batch, CHANNELS, HEIGHT, WIDTH)


def conv1x1(x: Tensor, layer: nn.Conv2d) -> Tensor:
    """A 1x1 conv with the layer's current (spectral-normalised) weight, written out by hand."""
    out = torch.einsum("oc,bchw->bohw", layer.weight[:, :, 0, 0], x)
    return out if layer.bias is None else out + layer.bias[:, None, None]


def manual_double_normalise(logits: Tensor, token_dim: int) -> Tensor:
    """Equations 10-11 written out: softmax over the tokens, then L1 over the memory units."""
    weights = logits.softmax(dim=token_dim)
    return weights / (attention.NORM_EPS + weights.sum(dim=-1, keepdim=True))


# --- token modules -------------------------------------------------------------------------------

def test_external_attention_keeps_the_reference_call_shape() -> None:
    out = ExternalAttention(d_model=512, S=8)(torch.randn(50, 49, 512))
    assert out.shape == (50, 49, 512)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_multi_head_external_attention_shape(heads: int) -> None:
    out = MultiHeadExternalAttention(d_model=32, heads=heads, S=MEMORY)(torch.randn(3, 10, 32))
    assert out.shape == (3, 10, 32)


def test_multi_head_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="heads=3"):
        MultiHeadExternalAttention(d_model=32, heads=3)


def test_softmax_runs_over_tokens_on_a_known_input() -> None:
    # Logits [[0, 0], [0, ln 3]] (tokens x units). Softmax over tokens: unit 0 -> (1/2, 1/2),
    # unit 1 -> (1/4, 3/4); L1 over units: token 0 -> (2/3, 1/3), token 1 -> (2/5, 3/5).
    # A softmax over the units instead would give (1/2, 1/2) and (1/4, 3/4).
    module = ExternalAttention(d_model=2, S=2)
    with torch.no_grad():
        module.mk.weight.copy_(torch.eye(2))
        module.mv.weight.copy_(torch.eye(2))
    tokens = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # (1, N=2, C=2)
    expected = torch.tensor([[[2 / 3, 1 / 3], [2 / 5, 3 / 5]]])
    torch.testing.assert_close(module(tokens), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("token_dim", [1, 2])
def test_double_normalise_invariants(token_dim: int) -> None:
    logits = torch.randn(3, 7, 5, MEMORY) * 3  # (B, ., ., S)
    stage_one = logits.softmax(dim=token_dim)
    weights = double_normalise(logits, token_dim=token_dim)
    # Stage 1: each memory unit's weights over the tokens sum to 1. Recovered from the output by
    # undoing the per-token L1 step, so a softmax over S inside double_normalise fails here.
    mass = stage_one.sum(dim=-1)  # (B, ., .): each token's total before the L1 step
    recovered = weights * (attention.NORM_EPS + mass).unsqueeze(-1)
    torch.testing.assert_close(recovered, stage_one)
    torch.testing.assert_close(recovered.sum(dim=token_dim),
                               torch.ones_like(recovered.sum(dim=token_dim)))
    # Stage 2: each token's weights over S sum to mass / (eps + mass), 1 up to eps / mass.
    sums = weights.sum(dim=-1)
    torch.testing.assert_close(sums, mass / (attention.NORM_EPS + mass))
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-4)


def test_token_module_equals_the_formula() -> None:
    module = ExternalAttention(d_model=12, S=MEMORY)
    nn.init.normal_(module.mk.weight)  # O(1) logits, so the softmax is far from uniform
    nn.init.normal_(module.mv.weight)
    tokens = torch.randn(3, 10, 12)
    logits = tokens @ module.mk.weight.T  # (B, N, S)
    expected = manual_double_normalise(logits, token_dim=1) @ module.mv.weight.T
    torch.testing.assert_close(module(tokens), expected)


def manual_multi_head(module: MultiHeadExternalAttention, tokens: Tensor) -> Tensor:
    """Algorithm 2 of the paper written out with einsum."""
    batch, num_tokens, channels = tokens.shape
    queries = tokens @ module.query.weight.T  # (B, N, C)
    queries = queries.reshape(batch, num_tokens, module.heads, -1)  # (B, N, h, C/h)
    logits = torch.einsum("bnhd,sd->bhns", queries, module.mk.weight)  # (B, h, N, S)
    weights = manual_double_normalise(logits, token_dim=2)
    heads_out = torch.einsum("bhns,ds->bnhd", weights, module.mv.weight)  # (B, N, h, C/h)
    return heads_out.reshape(batch, num_tokens, channels) @ module.out.weight.T + module.out.bias


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_multi_head_equals_algorithm_2(heads: int) -> None:
    module = MultiHeadExternalAttention(d_model=16, heads=heads, S=MEMORY)
    tokens = torch.randn(2, 9, 16)
    torch.testing.assert_close(module(tokens), manual_multi_head(module, tokens))


def test_one_head_with_identity_projections_is_the_single_head_module() -> None:
    single = ExternalAttention(d_model=16, S=MEMORY)
    nn.init.normal_(single.mk.weight)
    multi = MultiHeadExternalAttention(d_model=16, heads=1, S=MEMORY)
    with torch.no_grad():
        multi.query.weight.copy_(torch.eye(16))
        multi.out.weight.copy_(torch.eye(16))
        multi.out.bias.zero_()
        multi.mk.weight.copy_(single.mk.weight)
        multi.mv.weight.copy_(single.mv.weight)
    tokens = torch.randn(2, 9, 16)
    torch.testing.assert_close(multi(tokens), single(tokens))


# --- 2-D blocks against manual re-computations --------------------------------------------------
# Eval mode: spectral norm then reads sigma from its stored vectors instead of running a power
# iteration (which updates u and v) on every access of `.weight`, so the module and the manual
# computation below see the same normalised weights.

def manual_external(block: ExternalAttention2d, x: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    queries = conv1x1(x, block.query).reshape(batch, block.heads, -1, height * width)  # (B,h,d,N)
    logits = torch.einsum("bhdn,sd->bhns", queries, block.memory_key.weight)  # (B, h, N, S)
    weights = manual_double_normalise(logits, token_dim=2)
    out = torch.einsum("bhns,ds->bhdn", weights, block.memory_value.weight)  # (B, h, d, N)
    return conv1x1(out.reshape(batch, channels, height, width), block.out)


def manual_self(block: SelfAttention2d, x: Tensor) -> Tensor:
    batch, _, height, width = x.shape
    theta = conv1x1(x, block.theta).flatten(2)  # (B, C/8, N)
    phi = F.max_pool2d(conv1x1(x, block.phi), 2).flatten(2)  # (B, C/8, N/4)
    weights = torch.einsum("bcn,bcm->bnm", theta, phi).softmax(dim=-1)  # (B, N, N/4)
    values = F.max_pool2d(conv1x1(x, block.g), 2).flatten(2)  # (B, C/2, N/4)
    out = torch.einsum("bcm,bnm->bcn", values, weights)  # (B, C/2, N)
    return conv1x1(out.reshape(batch, -1, height, width), block.o)


def manual_efficient(block: EfficientAttention2d, x: Tensor) -> Tensor:
    batch, _, height, width = x.shape

    def split(t: Tensor) -> Tensor:
        return t.reshape(batch, block.heads, -1, height * width)  # (B, h, d, N)

    keys = split(conv1x1(x, block.keys)).softmax(dim=-1)
    queries = split(conv1x1(x, block.queries)).softmax(dim=2)
    values = split(conv1x1(x, block.values))
    context = torch.einsum("bhkn,bhvn->bhkv", keys, values)  # (B, h, dk, dv)
    out = torch.einsum("bhkv,bhkn->bhvn", context, queries)  # (B, h, dv, N)
    return conv1x1(out.reshape(batch, -1, height, width), block.reprojection)


MANUAL = {"self": manual_self, "external": manual_external, "efficient": manual_efficient}


@pytest.mark.parametrize("kind,heads", GATED_BLOCKS)
def test_attend_equals_manual_recomputation(kind: str, heads: int) -> None:
    block = make_block(kind, heads)
    block(feature_map())  # a training step moves u, v away from their init
    block.eval()
    x = feature_map()
    torch.testing.assert_close(block.attend(x), MANUAL[kind](block, x))


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("heads", [1, 2])
def test_external_2d_normalisation_stages(heads: int, fold: bool) -> None:
    block = ExternalAttention2d(CHANNELS, memory_size=MEMORY, heads=heads).eval()
    block.fold_projections = fold
    x = feature_map()
    weights = block._weights(x)  # (B, h, S, N)
    queries = conv1x1(x, block.query).reshape(2, heads, -1, HEIGHT * WIDTH)
    logits = torch.einsum("bhdn,sd->bhsn", queries, block.memory_key.weight)
    stage_one = logits.softmax(dim=3)
    recovered = weights * (attention.NORM_EPS + stage_one.sum(dim=2, keepdim=True))
    torch.testing.assert_close(recovered.sum(dim=3), torch.ones(2, heads, MEMORY))
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, heads, HEIGHT * WIDTH),
                               rtol=0, atol=1e-5)


# --- precision ---------------------------------------------------------------------------------

def large_logit_module() -> ExternalAttention:
    module = ExternalAttention(d_model=16, S=MEMORY)
    with torch.no_grad():
        nn.init.normal_(module.mk.weight)
        module.mk.weight.mul_(100)  # logits of order 100s: most exp() underflow
    return module


def test_bf16_autocast_with_large_logits_stays_finite() -> None:
    module = large_logit_module()
    tokens = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(tokens)
        logits = module.mk(tokens)  # bf16 under autocast
        weights = double_normalise(logits, token_dim=1)
        weights32 = double_normalise(logits.float(), token_dim=1)
    assert torch.isfinite(out).all()
    assert weights.dtype == torch.bfloat16 and torch.isfinite(weights).all()
    assert weights32.dtype == torch.float32
    # Each token's sum over S is mass / (eps + mass): 1 unless every unit underflowed for it.
    mass = logits.float().softmax(dim=1).sum(dim=-1)
    torch.testing.assert_close(weights32.sum(dim=-1), mass / (attention.NORM_EPS + mass))
    assert ((weights32 >= 0) & (weights32 <= 1)).all()


def test_bf16_autocast_on_moderate_logits_sums_to_one() -> None:
    logits = torch.randn(2, 30, MEMORY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = double_normalise(logits, token_dim=1)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 30), rtol=0, atol=1e-5)


def test_fp16_tokens_with_large_logits_stay_finite() -> None:
    module = large_logit_module().half()
    tokens = torch.randn(2, 30, 16).half()
    try:
        out = module(tokens)
    except RuntimeError as error:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 linear not supported on this CPU: {error}")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # Normalised in float32 and rounded once, not computed in fp16.
    logits = module.mk(tokens)  # (B, N, S) fp16
    assert torch.equal(double_normalise(logits, token_dim=1),
                       double_normalise(logits.float(), token_dim=1).half())


@pytest.mark.parametrize("heads", [1, 2])
def test_external_2d_bf16_autocast_on_large_inputs_stays_finite(heads: int) -> None:
    block = ExternalAttention2d(CHANNELS, memory_size=MEMORY, heads=heads)
    x = feature_map() * 100  # spectral norm bounds the weights, so scale the input instead
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block.attend(x)
        attention_map = block.attention_map(x)
    assert torch.isfinite(out).all() and torch.isfinite(attention_map).all()


def test_eps_is_not_zero_in_fp16() -> None:
    assert attention.NORM_EPS >= 1e-6
    assert torch.tensor(attention.NORM_EPS, dtype=torch.float16).item() > 0


# --- untied memories ---------------------------------------------------------------------------

def memory_names(module: nn.Module) -> tuple[str, str]:
    if isinstance(module, ExternalAttention2d):
        return ("memory_key.parametrizations.weight.original",
                "memory_value.parametrizations.weight.original")
    return "mk.weight", "mv.weight"


@pytest.mark.parametrize("factory", [
    lambda: ExternalAttention(16, MEMORY),
    lambda: MultiHeadExternalAttention(16, 2, MEMORY),
    lambda: ExternalAttention2d(CHANNELS, MEMORY, heads=2),
], ids=["token", "multi_head", "2d"])
def test_memories_stay_independent_after_to_and_deepcopy(factory: Callable[[], nn.Module]
                                                         ) -> None:
    original = factory().to(torch.float64)
    copied = copy.deepcopy(original)
    key_name, value_name = memory_names(original)
    for module in (original, copied):
        params = dict(module.named_parameters())
        key, value = params[key_name], params[value_name]
        assert key.dtype == value.dtype == torch.float64
        assert key.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
        value_before = value.detach().clone()
        with torch.no_grad():
            key.add_(1.0)
        torch.testing.assert_close(value.detach(), value_before, rtol=0, atol=0)
    # The copy (an EMA generator, say) shares no storage with the original.
    assert (dict(original.named_parameters())[key_name].data_ptr()
            != dict(copied.named_parameters())[key_name].data_ptr())


# --- gated blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,heads", GATED_BLOCKS)
def test_gated_block_is_identity_at_init(kind: str, heads: int) -> None:
    block = make_block(kind, heads)
    assert block.gamma.shape == () and block.gamma.item() == 0.0
    x = feature_map()
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("kind,heads", GATED_BLOCKS)
def test_every_parameter_gets_a_gradient_once_gamma_is_on(kind: str, heads: int) -> None:
    block = make_block(kind, heads)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    out = block(feature_map())
    (out * torch.randn_like(out)).sum().backward()  # a random projection: no symmetric cancelling
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 1e-3, name


# A bias feeding a softmax over the pixels would be inert (a per-channel constant cancels).
@pytest.mark.parametrize("kind,heads", [("external", 1), ("efficient", 1)])
def test_every_bias_changes_output(kind: str, heads: int) -> None:
    block = make_block(kind, heads).eval()
    x = feature_map()
    before = block.attend(x)
    for name, param in block.named_parameters():
        if name.endswith("bias"):
            # A random vector: a constant shift is cancelled by a softmax over channels.
            shift = torch.randn_like(param)
            with torch.no_grad():
                param.add_(shift)
            changed = not torch.allclose(block.attend(x), before, rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                param.sub_(shift)
            assert changed, f"{name} has no effect on the output"


# --- attention maps ----------------------------------------------------------------------------

@pytest.mark.parametrize("heads", [1, 2])
def test_external_attention_map(heads: int) -> None:
    maps = ExternalAttention2d(CHANNELS, memory_size=MEMORY, heads=heads).attention_map(
        feature_map())
    assert maps.shape == (2, MEMORY, HEIGHT, WIDTH)
    assert ((maps >= 0) & (maps <= 1)).all()
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, HEIGHT, WIDTH), rtol=0, atol=1e-5)


def manual_maps(block: nn.Module, x: Tensor) -> Tensor:
    """Each block's attention map built pixel by pixel from the manual weights."""
    batch, _, height, width = x.shape
    if isinstance(block, ExternalAttention2d):
        queries = conv1x1(x, block.query).reshape(batch, block.heads, -1, height * width)
        logits = torch.einsum("bhdn,sd->bhns", queries, block.memory_key.weight)
        weights = manual_double_normalise(logits, token_dim=2).mean(dim=1)  # (B, N, S)
        pixel_first = weights  # (B, N, K)
    elif isinstance(block, SelfAttention2d):
        theta = conv1x1(x, block.theta).flatten(2)
        phi = F.max_pool2d(conv1x1(x, block.phi), 2).flatten(2)
        weights = torch.einsum("bcn,bcm->bnm", theta, phi).softmax(dim=-1)  # (B, N, N/4)
        height, width = height // 2, width // 2  # a query's map lies over the pooled keys
        pixel_first = weights.transpose(1, 2)  # (B, N/4, N): key pixel first
    else:
        pixel_first = conv1x1(x, block.keys).flatten(2).softmax(dim=-1).transpose(1, 2)
    maps = torch.empty(batch, pixel_first.shape[-1], height, width)
    for row in range(height):
        for col in range(width):
            maps[:, :, row, col] = pixel_first[:, row * width + col, :]
    return maps


@pytest.mark.parametrize("kind,heads", GATED_BLOCKS)
def test_attention_map_lays_weights_out_row_major(kind: str, heads: int) -> None:
    block = make_block(kind, heads).eval()
    x = feature_map()
    torch.testing.assert_close(block.attention_map(x), manual_maps(block, x))


def test_self_attention_map() -> None:
    maps = SelfAttention2d(CHANNELS).attention_map(feature_map())
    assert maps.shape == (2, HEIGHT * WIDTH, HEIGHT // 2, WIDTH // 2)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, HEIGHT * WIDTH))


@pytest.mark.parametrize("heads", [1, 2])
def test_efficient_attention_map(heads: int) -> None:
    maps = EfficientAttention2d(CHANNELS, heads=heads).attention_map(feature_map())
    assert maps.shape == (2, CHANNELS // 8, HEIGHT, WIDTH)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, CHANNELS // 8))


# --- factory and argument checks ---------------------------------------------------------------

@pytest.mark.parametrize("kind,expected", [
    ("none", nn.Identity), ("self", SelfAttention2d), ("external", ExternalAttention2d),
    ("efficient", EfficientAttention2d)])
def test_build_attention_kinds(kind: str, expected: type) -> None:
    assert isinstance(build_attention(kind, CHANNELS), expected)


def test_factory_covers_every_declared_kind() -> None:
    assert set(ATTENTION_KINDS) == {"none", "self", "external", "efficient"}


def test_build_attention_passes_memory_size_and_heads() -> None:
    block = build_attention("external", CHANNELS, memory_size=MEMORY, heads=2)
    assert block.heads == 2
    assert block.memory_key.weight.shape == (MEMORY, CHANNELS // 2)
    assert block.memory_value.weight.shape == (CHANNELS // 2, MEMORY)


def test_build_attention_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        build_attention("bogus", CHANNELS)


def test_self_attention_has_one_head() -> None:
    with pytest.raises(ValueError, match="single head"):
        build_attention("self", CHANNELS, heads=2)


# ("efficient", 16, 2): one query channel per head, whose softmax over channels is always 1.
@pytest.mark.parametrize("kind,channels,heads", [
    ("self", 12, 1), ("external", 10, 4), ("efficient", 12, 1), ("efficient", 16, 4),
    ("efficient", 16, 2)])
def test_build_attention_rejects_indivisible_channels(kind: str, channels: int,
                                                      heads: int) -> None:
    with pytest.raises(ValueError, match=f"channels={channels}|got {channels}"):
        build_attention(kind, channels, heads=heads)


@pytest.mark.parametrize("size", [(5, 6), (4, 7), (3, 3)])
def test_self_attention_rejects_odd_maps(size: tuple[int, int]) -> None:
    block = SelfAttention2d(CHANNELS)
    x = torch.randn(1, CHANNELS, *size)
    with pytest.raises(ValueError, match="even height and width"):
        block(x)
    with pytest.raises(ValueError, match="even height and width"):
        block.attention_map(x)


# --- cost --------------------------------------------------------------------------------------

def counted_flops(block: nn.Module, side: int, batch: int = 2) -> int:
    x = torch.randn(batch, CHANNELS, side, side)
    with FlopCounterMode(display=False) as counter:
        block.attend(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("kind,heads", [("external", 1), ("external", 2), ("efficient", 1),
                                        ("efficient", 2)])
def test_linear_blocks_cost_scales_with_pixel_count(kind: str, heads: int) -> None:
    # a + b N: the folded orders multiply weights once per forward (a), whatever the pixels.
    block = make_block(kind, heads).eval()
    flops = {side: counted_flops(block, side) for side in (4, 8, 16)}
    assert flops[16] - flops[8] == 4 * (flops[8] - flops[4])


@pytest.mark.parametrize("fold", [True, False])
def test_external_flops_match_the_formula(fold: bool) -> None:
    block = ExternalAttention2d(CHANNELS, memory_size=MEMORY).eval()
    block.fold_projections = fold
    samples_pixels = 2 * 8 * 8
    if fold:
        # M_k W_q and W_o M_v (S C^2 each, once), then an S x C matrix each way per pixel.
        macs = 2 * MEMORY * CHANNELS ** 2 + samples_pixels * 2 * MEMORY * CHANNELS
    else:
        # Two 1x1 convs (C x C) and the two memories (C x S) per pixel.
        macs = samples_pixels * (2 * CHANNELS * CHANNELS + 2 * CHANNELS * MEMORY)
    assert counted_flops(block, 8) == 2 * macs  # 2 FLOPs per multiply-accumulate


def test_self_attention_cost_grows_faster_than_pixel_count() -> None:
    block = SelfAttention2d(CHANNELS).eval()
    assert counted_flops(block, 16) > 4 * counted_flops(block, 8)


# --- re-associated orders: the block before the re-association ----------------------------
# The functions below are the attend() of commit ba55d5d (before the folded orders), kept as the
# reference the folded orders must reproduce.

def reference_external_attend(block: ExternalAttention2d, x: Tensor) -> Tensor:
    queries = block.query(x).flatten(2)  # (B, C, N)
    batch, channels, num_pixels = queries.shape
    queries = queries.view(batch, block.heads, channels // block.heads, num_pixels)
    logits = block.memory_key(queries.transpose(2, 3))  # (B, heads, N, S)
    out = block.memory_value(double_normalise(logits, token_dim=2))  # (B, heads, N, C/heads)
    return block.out(out.transpose(2, 3).reshape(x.shape))


def reference_efficient_attend(block: EfficientAttention2d, x: Tensor) -> Tensor:
    keys = block._split(block.keys(x)).softmax(dim=-1)  # (B, h, dk, N)
    queries = block._split(block.queries(x)).softmax(dim=2)  # (B, h, dk, N)
    values = block._split(block.values(x))  # (B, h, dv, N)
    context = keys @ values.transpose(2, 3)  # (B, h, dk, dv)
    out = context.transpose(2, 3) @ queries  # (B, h, dv, N)
    return block.reprojection(out.reshape(x.shape[0], -1, *x.shape[-2:]))


def gated_step(block: nn.Module, forward: Callable[[nn.Module, Tensor], Tensor], x: Tensor,
               grad_out: Tensor, bf16: bool) -> dict[str, Tensor]:
    """One training-mode forward (a power iteration per weight) and backward of the gated block
    (gamma is 1): out - x, the gradients of x and of every parameter, and SN's u and v."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(block, x)
    out.float().backward(grad_out)
    results = {"attend": (out - x).detach().float(), "x.grad": x.grad}
    results.update({f"{name}.grad": param.grad for name, param in block.named_parameters()})
    results.update({name: buffer for name, buffer in block.named_buffers()})  # SN's u and v
    return results


def scale(results: dict[str, Tensor], name: str, grad_out: Tensor) -> float:
    """The magnitude round-off is measured against. gamma's gradient is one dot product,
    <grad_out, attend>, whose round-off grows with the sum of |terms|, not with its value."""
    if name == "gamma.grad":
        return (grad_out * results["attend"]).abs().sum().item()
    return results[name].abs().max().item()


def random_block(kind: str, channels: int, memory_size: int, heads: int) -> nn.Module:
    block = build_attention(kind, channels, memory_size=memory_size, heads=heads)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_()  # gamma 1-ish, biases non-zero; weights are normalised anyway
        block.gamma.fill_(1.0)
    return block


def assert_orders_agree(kind: str, block: nn.Module, side: int, bf16: bool) -> None:
    attend = {"external": reference_external_attend, "efficient": reference_efficient_attend}[kind]

    def reference(old_block: nn.Module, x: Tensor) -> Tensor:
        return x + old_block.gamma * attend(old_block, x)

    x = torch.randn(2, block_channels(block), side, side)
    grad_out = torch.randn_like(x)
    new = gated_step(copy.deepcopy(block), lambda new_block, t: new_block(t), x, grad_out, bf16)
    old = gated_step(copy.deepcopy(block), reference, x, grad_out, bf16)
    assert new.keys() == old.keys()
    if not bf16:
        # float32 round-off: 5e-5 of each tensor's scale, about 400 float32 epsilons for sums over
        # up to 8192 pixels. Seen: external at most 2.2e-6 (M_v's gradient), efficient 1.9e-5
        # (the query bias's gradient, a sum over pixels that nearly cancels).
        for name in old:
            error = (new[name] - old[name]).abs().max().item()
            assert error <= 5e-5 * scale(old, name, grad_out), (name, error)
        return
    # Under bf16 autocast both orders round; neither is the truth. Both are compared with the
    # float32 result: the folded order may not be more than twice as far from it as the old
    # order, plus one bf16 rounding (2^-8) of the tensor's scale.
    exact = gated_step(copy.deepcopy(block), reference, x, grad_out, bf16=False)
    for name in exact:
        size = scale(exact, name, grad_out)
        new_error = (new[name] - exact[name]).abs().max().item()
        old_error = (old[name] - exact[name]).abs().max().item()
        assert new_error <= 2 * old_error + 2 ** -8 * size, (name, new_error, old_error)


def block_channels(block: nn.Module) -> int:
    return block.out.weight.shape[0] if isinstance(block, ExternalAttention2d) \
        else block.reprojection.weight.shape[0]


# C = 64: with 4 heads and S = 64 the automatic choice is the unfolded order, so both are forced.
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", [16, 32, 64])
@pytest.mark.parametrize("memory_size", [16, 64])
@pytest.mark.parametrize("heads", [1, 4])
def test_folded_external_equals_the_old_order(heads: int, memory_size: int, side: int,
                                              bf16: bool) -> None:
    block = random_block("external", 64, memory_size, heads)
    block.fold_projections = True
    assert_orders_agree("external", block, side, bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", [16, 64])
@pytest.mark.parametrize("heads", [1, 4])
def test_folded_efficient_equals_the_old_order(heads: int, side: int, bf16: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    block = random_block("efficient", 64, MEMORY, heads)
    monkeypatch.setattr(block, "folds_values", lambda channels, num_pixels: True)
    assert_orders_agree("efficient", block, side, bf16)


@pytest.mark.parametrize("heads,memory_size", [(1, 64), (4, 16)])
def test_unfolded_external_is_the_old_order_exactly(heads: int, memory_size: int) -> None:
    block = random_block("external", 64, memory_size, heads).eval()  # u, v stay put
    block.fold_projections = False
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block.attend(x), reference_external_attend(block, x),
                               rtol=0, atol=0)


@pytest.mark.parametrize("channels,memory_size,heads,folds", [
    (32, 64, 1, True),  # one head: S C against C^2 + S C, always cheaper
    (256, 64, 4, True),  # 4 S C = 65536 against C^2 + S C = 81920
    (128, 64, 4, False),  # 4 S C = 32768 against C^2 + S C = 24576
    (128, 16, 4, True),
    (96, 48, 3, False),  # 3 S C = C^2 + S C: no gain, keep the old order
])
def test_external_folds_only_where_it_is_cheaper(channels: int, memory_size: int, heads: int,
                                                 folds: bool) -> None:
    block = ExternalAttention2d(channels, memory_size=memory_size, heads=heads)
    assert block.fold_projections is folds


def test_efficient_folds_from_a_few_pixels_on() -> None:
    block = EfficientAttention2d(256)
    # Multiply-accumulates per sample at C = 256 (dk = 32, dv = 128): folded 2 N C dk + 2 C dk dv
    # = 16384 N + 2097152, unfolded 2 N C dv + 2 N dk dv = 73728 N: folded from N = 37 up.
    assert not block.folds_values(256, 36)
    assert block.folds_values(256, 37)
    assert block.folds_values(256, 64 * 64)


def test_folded_blocks_keep_the_state_dict_keys() -> None:
    for kind in ("external", "efficient"):
        block = random_block(kind, 64, 16, 1)
        reference_keys = set(make_block(kind, 1).state_dict())
        assert set(block.state_dict()) == reference_keys


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("heads,residual", [(1, True), (2, True), (2, False)])
def test_folded_external_backward_is_the_gradient(heads: int, residual: bool) -> None:
    # Its hand-written backward against finite differences, in float64.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(heads * 3, 8, dtype=torch.float64, requires_grad=True)
    values = torch.randn(8, heads * 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *args: _FoldedExternalAttention.apply(*args, heads, residual, torch.float64),
        (x, keys, values, bias))


def test_folded_external_keeps_one_attention_map_for_backward() -> None:
    # What autograd holds between forward and backward: x itself, the small weights, and one
    # (B, heads*S, N) map of normalised weights (plus its per-pixel sums): no C-wide map.
    block = random_block("external", 64, 16, 2)
    assert block.fold_projections
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(x)
    maps = [t for t in saved if t.numel() >= 2 * 16 * 16 * 16]
    assert sorted(tuple(t.shape) for t in maps) == [(2, 32, 256), (2, 64, 256)]
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in maps)


def test_folded_external_keeps_channels_last() -> None:
    block = random_block("external", 64, 16, 1).eval()
    x = torch.randn(2, 64, 8, 8)
    out = block(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, block(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fold", [True, False])
def test_checkpoint_saved_before_the_folded_order_samples_the_same(fold: bool) -> None:
    # Written by the code of commit ba55d5d (tests/fixtures/make_old_checkpoint.py): a tiny
    # EAGAN G with a 2-head external attention block, its gamma set to 1, and 4 images it drew
    # with each BN mode.
    sampler = load_generator(FIXTURES / "old_eagan_ckpt.pt", ema=False)  # strict: same keys
    block = sampler.generator.attention
    assert isinstance(block, ExternalAttention2d) and block.fold_projections and block.heads == 2
    block.fold_projections = fold
    expected = torch.load(FIXTURES / "old_eagan_samples.pt", weights_only=True)
    images, labels = sampler.sample(4, seed=0, bn="batch")
    assert torch.equal(labels, expected["labels_seed0"])
    running, _ = sampler.sample(4, seed=1, bn="running")
    # Images in [-1, 1], within float32 round-off of what the old code drew: the folded order
    # 7.7e-7 from them; the old order reproduces them bit for bit on the machine that wrote
    # them, and within 2e-6 on another CPU (other kernels, other summation orders).
    torch.testing.assert_close(images, expected["batch_bn_seed0"], rtol=0, atol=1e-5)
    torch.testing.assert_close(running, expected["running_bn_seed1"], rtol=0, atol=1e-5)
