"""How the generator's BatchNorm normalises while it is evaluated or sampled: with the running
statistics (plain eval mode) or with each batch's own (StudioGAN's -stat_otf)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("batch", "running")


@contextlib.contextmanager
def bn_mode(generator: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Put ``generator`` in evaluation mode with BatchNorm in ``mode``; restore it on exit.

    "running": plain eval mode (BN uses its running statistics). "batch": only the BN layers
    normalise with the statistics of each batch (StudioGAN's -stat_otf) and, with
    track_running_stats off, leave their buffers untouched; every other module stays in eval
    mode, so spectral norm does no power iteration and the generator's state is unchanged.
    """
    if mode not in BN_MODES:
        raise ValueError(f"BN mode {mode!r} is not one of {BN_MODES}")
    training = {module: module.training for module in generator.modules()}
    batch_norms = [m for m in generator.modules() if isinstance(m, _BatchNorm)]
    tracking = {module: module.track_running_stats for module in batch_norms}
    generator.eval()
    if mode == "batch":
        for module in batch_norms:
            module.train()
            module.track_running_stats = False
    try:
        yield generator
    finally:
        for module, flag in training.items():
            module.training = flag
        for module, flag in tracking.items():
            module.track_running_stats = flag
