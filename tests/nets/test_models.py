import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from eagan.nets.attention import ATTENTION_KINDS
from eagan.nets.layers import WEIGHT_LAYERS, raw_weight, sn_linear
from eagan.nets.models import (Discriminator, DiscriminatorBlock, Generator, attention_gammas,
                               count_parameters)

# Smallest width where every attention kind fits everywhere: self-attention needs channels
# divisible by 8 and the 64/128 px discriminators attend after a block of base_channels.
BASE = 8
BATCH = 2
Z_DIM = 16


def _networks(image_size, num_classes, attention="self", base=BASE, **kwargs):
    generator = Generator(image_size, num_classes, z_dim=Z_DIM, base_channels=base,
                          attention=attention, **kwargs)
    discriminator = Discriminator(image_size, num_classes, base_channels=base,
                                  attention=attention, **kwargs)
    return generator, discriminator


def _inputs(num_classes, batch=BATCH):
    z = torch.randn(batch, Z_DIM)
    labels = torch.randint(0, num_classes, (batch,)) if num_classes else None
    return z, labels


def _set_gammas(network, value):
    for module in network.modules():
        if isinstance(getattr(module, "gamma", None), nn.Parameter):
            with torch.no_grad():
                module.gamma.fill_(value)


# 128 px only class-conditional, to keep the file fast on two CPU cores.
SHAPE_CASES = [(size, classes) for size in (16, 32, 64) for classes in (0, 5)] + [(128, 5)]


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("image_size, num_classes", SHAPE_CASES)
def test_output_shapes_and_range(image_size, num_classes, attention):
    torch.manual_seed(0)
    # Efficient attention needs two query channels (C/8) per head: D's first block at 64 and
    # 128 px has base_channels channels.
    base = 2 * BASE if attention == "efficient" else BASE
    generator, discriminator = _networks(image_size, num_classes, attention, base=base)
    _set_gammas(generator, 1.0)
    _set_gammas(discriminator, 1.0)
    z, labels = _inputs(num_classes)
    images = generator(z, labels)
    assert images.shape == (BATCH, 3, image_size, image_size)
    assert images.abs().max() <= 1.0
    logits = discriminator(images, labels)
    assert logits.shape == (BATCH,)
    assert torch.isfinite(logits).all()


# Hand counts with attention "none". G: linear + 3 convs per block (+ 4 embeddings per block when
# conditional) + output conv. D: 3 convs in every block with a 1x1 shortcut, 2 in blocks that
# neither downsample nor widen (16 and 32 px blocks 3-4, 128 px block 6) + linear (+ embedding).
@pytest.mark.parametrize("image_size, num_classes, g_layers, d_layers", [
    (16, 10, 1 + 2 * 7 + 1, 3 + 3 + 2 + 2 + 1 + 1),
    (32, 10, 1 + 3 * 7 + 1, 3 + 3 + 2 + 2 + 1 + 1),
    (32, 0, 1 + 3 * 3 + 1, 3 + 3 + 2 + 2 + 1),
    (64, 10, 1 + 4 * 7 + 1, 5 * 3 + 1 + 1),
    (64, 0, 1 + 4 * 3 + 1, 5 * 3 + 1),
    (128, 10, 1 + 5 * 7 + 1, 5 * 3 + 2 + 1 + 1),
    (128, 0, 1 + 5 * 3 + 1, 5 * 3 + 2 + 1),
])
def test_every_weight_layer_is_spectral_normed(image_size, num_classes, g_layers, d_layers):
    for network, expected in zip(_networks(image_size, num_classes, "none"), (g_layers, d_layers)):
        layers = [m for m in network.modules() if isinstance(m, WEIGHT_LAYERS)]
        assert len(layers) == expected
        assert all(parametrize.is_parametrized(layer, "weight") for layer in layers)


@pytest.mark.parametrize("attention", ["self", "external", "efficient"])
def test_attention_layers_are_spectral_normed(attention):
    for network in _networks(32, 10, attention):
        layers = [m for m in network.attention.modules() if isinstance(m, WEIGHT_LAYERS)]
        assert len(layers) == 4
        assert all(parametrize.is_parametrized(layer, "weight") for layer in layers)


def test_spectral_norm_brings_largest_singular_value_to_one():
    torch.manual_seed(0)
    for network in _networks(32, 10, "self"):
        network.train()
        layers = [m for m in network.modules() if isinstance(m, WEIGHT_LAYERS)]
        with torch.no_grad():
            for layer in layers:
                # Random raw weights: the orthogonal init already has singular values of 1.
                raw_weight(layer).normal_(0.0, 3.0)
                for _ in range(200):  # each training-mode access runs one power iteration
                    layer.weight
            network.eval()
            for layer in layers:
                weight = layer.weight
                sigma = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)
                assert sigma.item() == pytest.approx(1.0, rel=1e-2)


# StudioGAN's SAGAN counts (its README's CIFAR-10 and Tiny-ImageNet tables), and the exact counts
# of our topology
# worked out by hand, layer by layer (see the module docstring of eagan.nets.models).
@pytest.mark.parametrize("image_size, num_classes, g_target, d_target, g_exact, d_exact", [
    (32, 10, 4.39e6, 1.08e6, 4_386_308, 1_075_586),
    (64, 200, 13.39e6, 19.75e6, 13_387_396, 19_752_642),
])
def test_parameter_counts_match_studiogan_sagan(image_size, num_classes, g_target, d_target,
                                                g_exact, d_exact):
    g_count = count_parameters(Generator(image_size, num_classes))
    d_count = count_parameters(Discriminator(image_size, num_classes))
    assert g_count == pytest.approx(g_target, rel=0.02)
    assert d_count == pytest.approx(d_target, rel=0.02)
    assert (g_count, d_count) == (g_exact, d_exact)


@pytest.mark.parametrize("attention", ["self", "external", "efficient"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_every_parameter_gets_a_finite_gradient(num_classes, attention):
    torch.manual_seed(0)
    # Two heads where each head keeps several channels (D's efficient block has only C/8 = 2).
    heads = 2 if attention == "external" else 1
    generator, discriminator = _networks(32, num_classes, attention, heads=heads)
    # At gamma = 0 the attention weights get no gradient at all.
    _set_gammas(generator, 1.0)
    _set_gammas(discriminator, 1.0)
    z, labels = _inputs(num_classes, batch=4)
    discriminator(generator(z, labels), labels).mean().backward()
    for network in (generator, discriminator):
        for name, parameter in network.named_parameters():
            assert parameter.grad is not None, name
            assert torch.isfinite(parameter.grad).all(), name
            if name.startswith("attention."):
                assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("image_size, kwargs, g_shape, d_shape", [
    (16, {}, (4 * BASE, 8, 8), (2 * BASE, 8, 8)),
    (32, {}, (4 * BASE, 16, 16), (2 * BASE, 16, 16)),
    (64, {}, (2 * BASE, 32, 32), (BASE, 32, 32)),
    (128, {}, (2 * BASE, 64, 64), (BASE, 64, 64)),
    (32, {"attention_after": 1}, (4 * BASE, 8, 8), (2 * BASE, 16, 16)),
    (64, {"attention_after": 4}, (BASE, 64, 64), (8 * BASE, 4, 4)),
])
def test_attention_sits_at_the_expected_resolution(image_size, kwargs, g_shape, d_shape):
    generator, discriminator = _networks(image_size, 3, "self", **kwargs)
    seen = {}
    for key, network in (("g", generator), ("d", discriminator)):
        network.attention.register_forward_pre_hook(
            lambda module, args, key=key: seen.__setitem__(key, tuple(args[0].shape)))
    z, labels = _inputs(3)
    discriminator(generator(z, labels), labels)
    assert seen == {"g": (BATCH, *g_shape), "d": (BATCH, *d_shape)}


def test_attention_options_reach_the_block():
    generator, discriminator = _networks(32, 3, "external", memory_size=16, heads=4)
    for network in (generator, discriminator):
        assert network.attention.heads == 4
        assert network.attention.memory_key.out_features == 16


def test_unconditional_networks_have_no_embeddings_and_ignore_labels():
    torch.manual_seed(0)
    generator, discriminator = _networks(32, 0)
    for network in (generator, discriminator):
        assert not any(isinstance(m, nn.Embedding) for m in network.modules())
    assert all(m.affine for m in generator.modules() if isinstance(m, nn.BatchNorm2d))
    z, _ = _inputs(0)
    labels = torch.tensor([0, 1])
    images = generator(z)
    torch.testing.assert_close(generator(z, labels), images)
    torch.testing.assert_close(discriminator(images, labels), discriminator(images))


def test_conditional_networks_use_their_labels():
    torch.manual_seed(0)
    generator, discriminator = _networks(32, 5)
    assert not any(m.affine for m in generator.blocks.modules() if isinstance(m, nn.BatchNorm2d))
    generator.eval()
    discriminator.eval()
    z = torch.randn(1, Z_DIM).repeat(2, 1)
    labels = torch.tensor([1, 3])
    images = generator(z, labels)
    assert not torch.allclose(images[0], images[1])
    logits = discriminator(images[:1].repeat(2, 1, 1, 1), labels)
    assert not torch.allclose(logits[0], logits[1])


def test_conditional_networks_require_labels():
    generator, discriminator = _networks(32, 5)
    z, _ = _inputs(5)
    with pytest.raises(ValueError, match="labels"):
        generator(z)
    with pytest.raises(ValueError, match="labels"):
        discriminator(torch.zeros(BATCH, 3, 32, 32))


@pytest.mark.parametrize("network, kwargs, message", [
    (Generator, {"image_size": 48}, "image_size must be one of 16, 32, 64, 128"),
    (Discriminator, {"image_size": 256}, "image_size must be one of 16, 32, 64, 128"),
    (Generator, {"attention_after": 0}, "from 1 to 3"),
    (Generator, {"attention_after": 4}, "from 1 to 3"),
    (Discriminator, {"attention_after": 5}, "from 1 to 4"),
    (Generator, {"attention": "global"}, "not one of"),
    (Discriminator, {"num_classes": -1}, "num_classes"),
    (Generator, {"z_dim": 0}, "z_dim"),
])
def test_invalid_arguments_raise_value_error(network, kwargs, message):
    arguments = {"image_size": 32, "num_classes": 10, "base_channels": BASE, **kwargs}
    with pytest.raises(ValueError, match=message):
        network(**arguments)


def test_attention_gammas_lists_every_gate():
    generator, discriminator = _networks(32, 0, "external")
    assert attention_gammas(generator) == {"attention": 0.0}
    _set_gammas(discriminator, 0.25)
    pair = nn.ModuleDict({"G": generator, "D": discriminator})
    assert attention_gammas(pair) == {"G.attention": 0.0, "D.attention": 0.25}
    assert attention_gammas(_networks(32, 0, "none")[0]) == {}


def test_count_parameters_ignores_spectral_norm_buffers():
    layer = sn_linear(3, 4)
    assert count_parameters(layer) == 3 * 4 + 4
    assert count_parameters(nn.ModuleList([layer, nn.Linear(2, 1)])) == 16 + 3


def test_auxiliary_classifier_reads_the_pooled_features_and_leaves_the_logits_alone():
    torch.manual_seed(0)
    plain = Discriminator(32, 5, base_channels=BASE, attention="external").eval()
    torch.manual_seed(0)
    with_head = Discriminator(32, 5, base_channels=BASE, attention="external",
                              aux_classifier=True).eval()
    # The head's weights come last in the orthogonal init: everything else is the same.
    with_head.load_state_dict(plain.state_dict(), strict=False)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 4])
    logits, class_logits = with_head(images, labels, classify=True)
    assert class_logits.shape == (3, 5)
    torch.testing.assert_close(logits, plain(images, labels))
    torch.testing.assert_close(with_head(images, labels), logits)
    assert count_parameters(with_head) - count_parameters(plain) == BASE * 2 * 5 + 5
    with pytest.raises(ValueError, match="aux_classifier"):
        plain(images, labels, classify=True)
    with pytest.raises(ValueError, match="needs classes"):
        Discriminator(32, 0, base_channels=BASE, aux_classifier=True)


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("in_channels, out_channels, downsample", [
    (4, 4, False),   # identity shortcut
    (4, 4, True),    # 1x1 shortcut, pooled
])
def test_discriminator_block_shortcut_sees_relu_of_its_input(in_channels, out_channels,
                                                              downsample):
    # StudioGAN's DiscBlock applies an in-place ReLU to x after keeping x0 = x, so its shortcut
    # receives ReLU(x). With the residual path zeroed and the shortcut the identity, a block is
    # then ReLU followed by the optional pooling: negative inputs map to 0.
    block = DiscriminatorBlock(in_channels, out_channels, downsample)
    block.conv2 = _Zero()
    block.shortcut = nn.Identity()
    x = torch.tensor([-2.0, -0.5, 0.25, 3.0]).repeat(1, in_channels, 4, 1)  # (1, C, 4, 4)
    expected = x.clamp(min=0)
    if downsample:
        expected = nn.functional.avg_pool2d(expected, 2)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
