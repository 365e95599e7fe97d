import pytest
import torch

from eagan.nets.models import Generator
from eagan.visualize import (MAPS_PER_IMAGE, attention_caption, attention_figure,
                             generator_attention, heat_colours)


def tiny_generator(attention: str) -> Generator:
    torch.manual_seed(0)
    generator = Generator(32, 10, z_dim=16, base_channels=4, attention=attention, memory_size=8)
    if attention != "none":
        generator.attention.gamma.data.fill_(1.0)
    return generator


@pytest.mark.parametrize("attention, maps_shape, total", [
    # External: each memory unit's share of every pixel (8 units, 16x16 map); shares over the
    # units sum to 1 per pixel, and 6 of the 8 units are shown.
    ("external", (2, MAPS_PER_IMAGE, 16, 16), None),
    # Self: 6 query pixels, each a distribution over the 8x8 pooled keys.
    ("self", (2, MAPS_PER_IMAGE, 8, 8), 1.0),
])
def test_generator_attention_maps(attention, maps_shape, total):
    generator = tiny_generator(attention)
    z, labels = torch.randn(2, 16), torch.tensor([1, 7])
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    images, maps, names = generator_attention(generator, z, labels)
    assert len(names) == MAPS_PER_IMAGE
    assert images.shape == (2, 3, 32, 32)
    assert maps.shape == maps_shape
    assert maps.min() >= 0 and maps.max() <= 1
    if total is not None:
        torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.full(maps_shape[:2], total))
    # Drawing maps leaves the generator exactly as it was (BN statistics, SN vectors).
    for name, value in generator.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_external_maps_are_the_most_varied_units():
    generator = tiny_generator("external")
    z, labels = torch.randn(2, 16), torch.tensor([1, 7])
    captured = []
    generator.attention.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    _, maps, names = generator_attention(generator, z, labels)
    generator.eval()  # as generator_attention ran it: no spectral-norm power iteration
    every_unit = generator.attention.attention_map(captured[0])  # (2, 8, 16, 16)
    spread = every_unit.flatten(2).std(-1).mean(0)  # (8,)
    shown = maps.flatten(2).std(-1).mean(0)  # (6,)
    # Units can tie, so compare the spreads shown with the six largest, not indices.
    torch.testing.assert_close(shown.sort(descending=True).values,
                               spread.sort(descending=True).values[:6], rtol=1e-3, atol=1e-4)
    # Each column is named after its unit, whose map it shows.
    units = [int(name.removeprefix("unit ")) for name in names]
    torch.testing.assert_close(maps, every_unit[:, units], rtol=1e-3, atol=1e-3)


def test_captions_name_what_rows_and_columns_show():
    z, labels = torch.randn(2, 16), torch.tensor([1, 7])
    title, columns = attention_caption(tiny_generator("external"), z, labels)
    assert title.startswith("One row per generated sample: the image, then each chosen memory "
                            "unit's share of every pixel")
    assert columns[0] == "image" and all(c.startswith("unit ") for c in columns[1:])
    title, columns = attention_caption(tiny_generator("self"), z, labels)
    assert "where each chosen query pixel" in title
    # Evenly spaced queries over the 16x16 map: pixel 0 is (0, 0), the last (15, 15).
    assert columns[1] == "query (0, 0)" and columns[-1] == "query (15, 15)"
    assert attention_caption(tiny_generator("none"), z, labels) is None


def test_figure_layout_and_no_attention():
    figure = attention_figure(tiny_generator("external"), torch.randn(3, 16),
                              torch.tensor([0, 1, 2]))
    # 3 rows of (image + 6 maps), 32 px tiles with 2 px padding.
    assert figure.shape == (3, 2 + 3 * 34, 2 + 7 * 34)
    assert figure.min() >= 0 and figure.max() <= 1
    assert attention_figure(tiny_generator("none"), torch.randn(3, 16),
                            torch.tensor([0, 1, 2])) is None


def test_heat_colours_scale_each_map_to_the_palette_ends():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    coloured = heat_colours(maps, size=4)
    assert coloured.shape == (1, 1, 3, 4, 4)
    low, high = coloured[0, 0, :, 0, 0], coloured[0, 0, :, 3, 3]
    # viridis runs from dark purple to yellow.
    assert low[2] > low[1] and high[0] > high[2] and high[1] > high[2]
