"""Stand-in Inception weights for offline tests, for both engines.

The real weights (weights-inception-2015-12-05-6726825d.pth, about 91 MiB; pytorch-fid's
pt_inception-2015-12-05-6726825d.pth is the same file) cannot be downloaded here. We build
torch-fidelity's own FeatureExtractorInceptionV3 with weight loading skipped, re-initialise its
convolutions and its fc layer, and save its state dict. pytorch-fid's network (torchvision's
Inception3 with 1008 classes and its FID blocks) has exactly this state-dict layout, so the one
file serves both: passing it as the weights path runs either package's real loading, resize,
forward pass and our statistics code, so only the numbers differ from a real evaluation. Never
let such a file near a real cache: its features are meaningless.
"""

import io
from pathlib import Path

import torch
from torch import nn
from torch_fidelity import FeatureExtractorInceptionV3


class _SkipLoading(FeatureExtractorInceptionV3):
    """The real extractor, except that load_state_dict ignores what __init__ loaded."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
        return None


def build_standin_inception_weights(directory: Path, seed: int = 0) -> Path:
    """Write stand-in Inception weights to ``directory`` and return the file's path.

    Convolutions get Kaiming-normal weights: PyTorch's default init shrinks the activations
    through the 90-odd layers until the 2048 features are around 1e-8 and every FID is ~0.
    BatchNorm keeps its identity init (running mean 0, variance 1). The fc layer gets weights
    that spread the 1008 logits over a few units and a bias of the same size, so that an
    Inception Score differs from 1 and IS with the bias (pytorch-fid, StudioGAN) differs from IS
    without it (torch-fidelity).
    """
    # __init__ torch.loads the path it is given before calling load_state_dict (and downloads
    # the real weights when given None): hand it an in-memory empty dict.
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        extractor = _SkipLoading("inception-v3-compat", ["2048"],
                                 feature_extractor_weights_path=empty)
        for module in extractor.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.normal_(extractor.fc.weight, std=0.05)
        nn.init.normal_(extractor.fc.bias, std=2.0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "standin-inception.pth"
    torch.save(extractor.state_dict(), path)
    return path
