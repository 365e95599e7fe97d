"""DiffAugment (eagan/nets/augment.py): shapes, gradients, seeded draws, per-image independence,
exact values of translation and cutout on known images, and its place in the training steps."""
import pytest
import torch

from eagan.config import load_config
from eagan.errors import UserError
from eagan.nets.augment import DiffAugment, color, cutout, parse_policy, translation
from eagan.train.steps import StepOptions, discriminator_step, generator_step

FULL = "color,translation,cutout"


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_op_keeps_shape_and_dtype_and_passes_gradients():
    images = torch.randn(6, 3, 16, 16, requires_grad=True)
    for policy in ("color", "translation", "cutout", FULL):
        out = DiffAugment(policy)(images, seeded())
        assert out.shape == images.shape and out.dtype == images.dtype
        (grad,) = torch.autograd.grad(out.square().sum(), images)
        assert grad.abs().sum() > 0, policy


def test_the_same_seed_gives_the_same_draws_and_another_seed_others():
    images = torch.randn(8, 3, 16, 16)
    augment = DiffAugment(FULL)
    assert torch.equal(augment(images, seeded(3)), augment(images, seeded(3)))
    assert not torch.equal(augment(images, seeded(3)), augment(images, seeded(4)))


def test_the_empty_policy_returns_its_input():
    images = torch.randn(4, 3, 8, 8)
    augment = DiffAugment("")
    assert not augment and augment(images) is images
    assert parse_policy(" color , cutout ") == ("color", "cutout")
    with pytest.raises(ValueError, match="'colour'"):
        parse_policy("colour")


def test_each_image_of_a_batch_gets_its_own_draw():
    # 64 copies of one image, as a D step's real and fake halves would be if G copied the data:
    # one shared draw would leave them equal; per-image draws make nearly all of them differ.
    image = torch.randn(1, 3, 16, 16)
    for op in (color, translation, cutout):
        out = op(image.expand(64, -1, -1, -1), seeded())
        distinct = torch.unique(out.flatten(1), dim=0)
        assert len(distinct) >= 8, op.__name__


def test_translation_moves_a_pixel_by_whole_pixels_within_the_reach():
    images = torch.zeros(200, 1, 16, 16)
    images[:, :, 8, 8] = 1.0  # one lit pixel; 16 * 1/8 = 2 pixels of reach
    out = translation(images, seeded())
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(200))  # moved, never lost
    where = out[:, 0].flatten(1).argmax(dim=1)
    rows, cols = where // 16, where % 16
    assert rows.min() == 6 and rows.max() == 10 and cols.min() == 6 and cols.max() == 10


def test_translation_fills_uncovered_pixels_with_zero():
    out = translation(torch.ones(200, 1, 16, 16), seeded())
    shifted = out.sum(dim=(1, 2, 3)) < 256
    assert shifted.any() and set(out.unique().tolist()) == {0.0, 1.0}


def test_cutout_zeroes_one_clipped_square_of_half_the_side():
    out = cutout(torch.ones(200, 1, 16, 16), seeded())
    zeros = (out == 0)[:, 0]
    assert zeros.sum(dim=(1, 2)).max() == 64  # 8x8 when it lies wholly inside
    assert zeros.sum(dim=(1, 2)).min() >= 16  # a centre in the corner still cuts 4x4
    for mask in zeros:  # the zeros form one rectangle: its bounding box is all zero
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_color_changes_brightness_per_image_and_keeps_grey_images_grey():
    grey = torch.rand(32, 1, 8, 8).expand(-1, 3, -1, -1)
    out = color(grey, seeded())
    assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)  # saturation: no effect
    assert len(torch.unique(out.mean(dim=(1, 2, 3)) - grey.mean(dim=(1, 2, 3)))) == 32


def test_config_key_takes_a_policy_and_refuses_an_unknown_op(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  augment: translation,cutout\n")
    assert load_config(path).train.augment == "translation,cutout"
    assert load_config(tmp_path / "c.yaml", ['train.augment=""']).train.augment == ""
    with pytest.raises(UserError, match="train.augment: unknown augmentation 'flip'"):
        load_config(path, ["train.augment=color,flip"])


class Recorder(torch.nn.Module):
    """A stand-in D that keeps the images it is given and scores them by their mean."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, images, labels=None):
        self.seen.append(images.detach().clone())
        return self.weight * images.mean(dim=(1, 2, 3))


class Constant(torch.nn.Module):
    """A stand-in G that draws one fixed image whatever z says."""

    def __init__(self, image):
        super().__init__()
        self.image = torch.nn.Parameter(image)

    def forward(self, z, labels=None):
        return self.image.expand(len(z), -1, -1, -1)


@pytest.mark.parametrize("policy", ["", FULL])
def test_training_steps_show_d_augmented_real_and_fake_with_independent_draws(policy):
    from eagan.nets.losses import LOSSES
    from eagan.train.steps import GANModules

    image = torch.randn(1, 3, 16, 16)
    generator, discriminator = Constant(image.clone()), Recorder()
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.0)
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gan = GANModules(generator, discriminator, opt_g, opt_d, scaler, scaler, generator,
                     discriminator, generator, discriminator)
    d_loss, g_loss = LOSSES["hinge"]
    options = StepOptions(d_loss=d_loss, g_loss=g_loss, augment=DiffAugment(policy))
    real = image.expand(4, -1, -1, -1)  # real and fake are the same image
    torch.manual_seed(0)
    discriminator_step(gan, options, real, None, torch.zeros(4, 1), None, step=0)
    generator_step(gan, options, torch.zeros(4, 1), None, step=0)
    d_batch, g_batch = discriminator.seen
    assert d_batch.shape == (8, 3, 16, 16) and g_batch.shape == (4, 3, 16, 16)
    if not policy:
        assert torch.equal(d_batch, image.expand(8, -1, -1, -1))
        assert torch.equal(g_batch, image.expand(4, -1, -1, -1))
    else:
        # Every one of the 8 real and fake copies augmented differently, and the G step too.
        assert len(torch.unique(d_batch.flatten(1), dim=0)) == 8
        assert len(torch.unique(g_batch.flatten(1), dim=0)) == 4
        assert generator.image.grad is not None and generator.image.grad.abs().sum() > 0
