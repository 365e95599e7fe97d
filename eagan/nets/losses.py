"""Adversarial losses as pure functions of discriminator logits.

Every discriminator loss takes ``real_logits`` and ``fake_logits`` of shape (B,) and returns
``(loss, loss_real, loss_fake)``, three 0-d tensors with ``loss = loss_real + loss_fake``, so the
two halves can be logged separately. Every generator loss takes ``fake_logits`` (B,) and returns a
0-d tensor. Both are minimised.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

DLoss = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
GLoss = Callable[[Tensor], Tensor]


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss for D (Lim & Ye 2017, "Geometric GAN"; used by SAGAN, Zhang et al. 2019).

    loss_real = mean(relu(1 - D(x))), loss_fake = mean(relu(1 + D(G(z)))).
    """
    loss_real = F.relu(1.0 - real_logits).mean()
    loss_fake = F.relu(1.0 + fake_logits).mean()
    return loss_real + loss_fake, loss_real, loss_fake


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """Hinge loss for G: -mean(D(G(z))) (Lim & Ye 2017)."""
    return -fake_logits.mean()


def d_nonsaturating_loss(real_logits: Tensor,
                         fake_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Original GAN loss for D (Goodfellow et al., 2014) on logits.

    Binary cross-entropy with real = 1, fake = 0, written with softplus for numerical
    stability: -log(sigmoid(t)) = softplus(-t) and -log(1 - sigmoid(t)) = softplus(t).
    """
    loss_real = F.softplus(-real_logits).mean()
    loss_fake = F.softplus(fake_logits).mean()
    return loss_real + loss_fake, loss_real, loss_fake


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating G loss (Goodfellow et al., 2014): -log(sigmoid(D(G(z)))) = softplus(-t)."""
    return F.softplus(-fake_logits).mean()


def d_wasserstein_loss(real_logits: Tensor,
                       fake_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Wasserstein critic loss (Arjovsky et al., 2017): -mean(D(x)) + mean(D(G(z))).

    Only meaningful with a Lipschitz constraint on D; here spectral norm provides it.
    """
    loss_real = -real_logits.mean()
    loss_fake = fake_logits.mean()
    return loss_real + loss_fake, loss_real, loss_fake


def g_wasserstein_loss(fake_logits: Tensor) -> Tensor:
    """Wasserstein generator loss (Arjovsky et al., 2017): -mean(D(G(z)))."""
    return -fake_logits.mean()


LOSSES: dict[str, tuple[DLoss, GLoss]] = {
    "hinge": (d_hinge_loss, g_hinge_loss),
    "nonsaturating": (d_nonsaturating_loss, g_nonsaturating_loss),
    "wasserstein": (d_wasserstein_loss, g_wasserstein_loss),
}
