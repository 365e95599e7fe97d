import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from eagan.nets.losses import (LOSSES, d_hinge_loss, d_nonsaturating_loss, d_wasserstein_loss,
                               g_hinge_loss, g_nonsaturating_loss, g_wasserstein_loss)

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_on_known_logits():
    loss, loss_real, loss_fake = d_hinge_loss(REAL, FAKE)
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 2.5]
    assert loss_real.item() == pytest.approx(2.5 / 3)
    assert loss_fake.item() == pytest.approx(3.5 / 3)
    assert loss.item() == pytest.approx(2.0)
    assert g_hinge_loss(FAKE).item() == pytest.approx(1 / 6)


def test_hinge_gradient_is_zero_beyond_the_margin():
    real = REAL.clone().requires_grad_()
    d_hinge_loss(real, FAKE)[0].backward()
    # Only logits inside the margin (x < 1) are pushed up, each by 1/B.
    assert_close(real.grad, torch.tensor([0.0, -1 / 3, -1 / 3]))


def test_nonsaturating_on_known_logits():
    logits = torch.tensor([0.0, math.log(3.0)])
    _, loss_real, loss_fake = d_nonsaturating_loss(logits, logits)
    # -log(sigmoid(0)) = log 2, -log(sigmoid(log 3)) = log(4/3); -log(1 - sigmoid(log 3)) = log 4
    assert loss_real.item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2)
    assert loss_fake.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert g_nonsaturating_loss(logits).item() == pytest.approx(loss_real.item())


def test_nonsaturating_is_binary_cross_entropy_and_stable():
    loss, loss_real, loss_fake = d_nonsaturating_loss(REAL, FAKE)
    assert_close(loss_real, F.binary_cross_entropy_with_logits(REAL, torch.ones(3)))
    assert_close(loss_fake, F.binary_cross_entropy_with_logits(FAKE, torch.zeros(3)))
    assert_close(loss, loss_real + loss_fake)
    # softplus keeps huge logits finite where log(sigmoid(x)) would give -inf.
    assert d_nonsaturating_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))[0].item() \
        == pytest.approx(2000.0)


def test_wasserstein_on_known_logits():
    loss, loss_real, loss_fake = d_wasserstein_loss(REAL, FAKE)
    assert loss_real.item() == pytest.approx(-0.5)
    assert loss_fake.item() == pytest.approx(-1 / 6)
    assert loss.item() == pytest.approx(-2 / 3)
    assert g_wasserstein_loss(FAKE).item() == pytest.approx(1 / 6)


@pytest.mark.parametrize("name", ["hinge", "nonsaturating", "wasserstein"])
def test_registry_entries_return_scalars_that_add_up(name):
    d_loss_fn, g_loss_fn = LOSSES[name]
    loss, loss_real, loss_fake = d_loss_fn(REAL, FAKE)
    for value in (loss, loss_real, loss_fake, g_loss_fn(FAKE)):
        assert value.shape == ()
    assert_close(loss, loss_real + loss_fake)


def test_registry_keys():
    assert set(LOSSES) == {"hinge", "nonsaturating", "wasserstein"}
    assert LOSSES["hinge"] == (d_hinge_loss, g_hinge_loss)
