"""Tests of eagan.attention: shapes, the double normalisation of external attention (Guo et al.,
2021, equations 10-11), agreement with manual re-computations of each block, mixed precision,
untied memories, the gated identity at init, attention maps, the factory, and linear cost."""
from __future__ import annotations

import copy
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from eagan import attention
from eagan.attention import (ATTENTION_KINDS, EfficientAttention2d, ExternalAttention,
                             ExternalAttention2d, MultiHeadExternalAttention, SelfAttention2d,
                             build_attention, double_normalise)

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


@pytest.mark.parametrize("heads", [1, 2])
def test_external_2d_normalisation_stages(heads: int) -> None:
    block = ExternalAttention2d(CHANNELS, memory_size=MEMORY, heads=heads).eval()
    captured = []
    block.memory_value.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    x = feature_map()
    block(x)
    weights = captured[0]  # (B, h, N, S)
    queries = conv1x1(x, block.query).reshape(2, heads, -1, HEIGHT * WIDTH)
    logits = torch.einsum("bhdn,sd->bhns", queries, block.memory_key.weight)
    stage_one = logits.softmax(dim=2)
    recovered = weights * (attention.NORM_EPS + stage_one.sum(dim=-1, keepdim=True))
    torch.testing.assert_close(recovered.sum(dim=2), torch.ones(2, heads, MEMORY))
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, heads, HEIGHT * WIDTH),
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
    block = make_block(kind, heads).eval()
    assert counted_flops(block, 16) == 4 * counted_flops(block, 8)


def test_external_flops_match_the_formula() -> None:
    # Two 1x1 convs (C x C) and the two memories (C x S), 2 FLOPs per multiply-accumulate.
    block = ExternalAttention2d(CHANNELS, memory_size=MEMORY).eval()
    pixels = 8 * 8
    expected = 2 * 2 * pixels * (2 * CHANNELS * CHANNELS + 2 * CHANNELS * MEMORY)
    assert counted_flops(block, 8) == expected


def test_self_attention_cost_grows_faster_than_pixel_count() -> None:
    block = SelfAttention2d(CHANNELS).eval()
    assert counted_flops(block, 16) > 4 * counted_flops(block, 8)
