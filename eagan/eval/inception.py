"""FID and IS of a generator under named protocols, through one of two Inception engines.

FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", 2017. IS: Salimans et al., "Improved Techniques for Training GANs", 2016.

Two engines run the same InceptionV3 (the TF 2015-12-05 graph ported to PyTorch; both packages
load the same weights file layout, and their released files have the same sha256):

- ``torch-fidelity`` (class Inception), the engine of the ``standard`` protocol: uint8 images,
  TF1-exact bilinear resize to 299, (x - 128) / 128; IS from the fc layer without its bias
  ('logits_unbiased'). Generated images go through torch-fidelity's own sampling loop (z from
  numpy.random.RandomState(seed)) and are rounded to uint8 first.
- ``pytorch-fid`` (class PytorchFidInception), the engine of ``studiogan2021``, which is
  StudioGAN's evaluation as of commit 8a03c51 (src/metrics/inception_network.py, FID.py, IS.py):
  pytorch-fid's network fed floats in [-1, 1] (generated images as the generator returns them,
  no uint8 rounding; real images as StudioGAN's ToTensor + Normalize(0.5, 0.5) made them),
  PyTorch's bilinear resize to 299; IS from the softmax of the fc layer with its bias.

Both engines generate in full batches (the last batch is as large as the others and only the
features needed are kept), as StudioGAN did: in batch-statistics BN mode a short last batch
would be normalised with other statistics. Labels of a conditional generator come from our own
seeded torch.Generator, so the same checkpoint, seed and batch size give the same numbers, and
evaluating never touches the global RNGs that training relies on for exact resume.

The statistics, the Frechet distance and the score are computed here in float64. Metrics live in
one section ("metrics of features"): a new one is a function of the feature sets and one entry
in ``evaluate_generator``'s result.

Usage: load an engine once with ``load_inception`` (it checks and hashes the weights: do it
before training starts, so that missing weights fail early), resolve a protocol, then call
``evaluate_generator`` as often as needed. Expect about 0.2-0.3 s per image on two CPU cores:
real protocols need a GPU.

Reference statistics are cached in our own cache folder under a name that carries the engine,
the weights' sha256 and a digest of the images, so statistics from stand-in weights (tests),
from the other engine or from a changed dataset can never be mistaken for real ones.
torch-fidelity's own feature cache is not used (we call its feature helpers directly), so
nothing is written to $TORCH_HOME/fidelity_cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import pytorch_fid
import pytorch_fid.inception
import torch
import torch_fidelity
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorInceptionV3, GenerativeModelModuleWrapper
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.utils import (create_feature_extractor, get_featuresdict_from_dataset,
                                  get_featuresdict_from_generative_model)
from tqdm import tqdm

from eagan.errors import UserError, first_line
from eagan.sampling import to_uint8

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release
PYTORCH_FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release
# sha256 of both released files: torch-fidelity v0.2.0's weights-inception-2015-12-05-6726825d.pth
# and pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the one StudioGAN used) are the same
# 95,628,359 bytes. Public checksum lists give this digest for each; torch.hub names a file after
# the first 8 hex digits of its sha256, which both names carry. Not verified on a machine of
# ours (no download possible where this was written); any other file is a stand-in.
OFFICIAL_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
NOT_COMPARABLE = "stand-in weights: not comparable"
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registered name
FID_LAYER = "2048"  # both engines' pool features, 2048-d
IS_LAYER = "logits_unbiased"  # torch-fidelity's IS layer: the fc layer without its bias
LOGITS_LAYER = "logits"  # the fc layer with its bias (1008 classes): pytorch-fid's IS layer
ENGINES = ("torch-fidelity", "pytorch-fid")

# ----------------------------------------------------------------------------- Inception weights

class _InceptionSkeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's extractor with loading skipped: only its state dict's layout is used."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
        return None


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict torch-fidelity's extractor loads (strictly); pytorch-fid's
    network (torchvision's Inception3 with 1008 classes, FID blocks) has the same layout."""
    empty = io.BytesIO()  # __init__ torch.loads the path it is given; an empty dict will do
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):  # no memory, no init cost
        skeleton = _InceptionSkeleton(FEATURE_EXTRACTOR, [FID_LAYER],
                                      feature_extractor_weights_path=empty)
    return {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}


def _load_checked_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The state dict in ``path`` (read with weights_only=True) after checking it is InceptionV3's
    2015-12-05 layout, and the file's sha256."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"inception weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - torch.load raises a dozen types on bad files
        # Not torch's message: it advises weights_only=False, wrong for an unknown file.
        raise UserError(f"inception weights {path}: not a file torch.load(weights_only=True) "
                        f"can read (damaged, cut short, or not a PyTorch file)") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"inception weights {path}: holds a {type(state).__name__}, expected a "
                        f"state dict of tensors")
    expected = _expected_shapes()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(set(state.keys()) - expected.keys(), key=str)
    if missing or unexpected:
        raise UserError(f"inception weights {path}: not the InceptionV3 state dict of "
                        f"torch-fidelity / pytorch-fid ({len(missing)} keys missing, e.g. "
                        f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"inception weights {path}: {key} has shape "
                            f"{tuple(state[key].shape)}, expected {shape}")
    with path.open("rb") as file:
        return dict(state), hashlib.file_digest(file, "sha256").hexdigest()


def check_inception_weights(path: str | Path) -> str:
    """Check that ``path`` holds InceptionV3 weights both engines can load; return their sha256.
    torch-fidelity itself loads with weights_only=False, which would run any pickle: a file must
    pass this check (weights_only=True) first."""
    return _load_checked_weights(path)[1]


_DEFAULT_WEIGHTS = {  # engine -> (file name in the torch hub cache, release URL)
    "torch-fidelity": (WEIGHTS_FILENAME, URL_INCEPTION_V3),
    "pytorch-fid": (PYTORCH_FID_WEIGHTS_FILENAME, pytorch_fid.inception.FID_WEIGHTS_URL),
}


def resolve_inception_weights(path: str | Path | None, progress: bool = True,
                              engine: str = "torch-fidelity") -> Path:
    """The weights file to use: ``path`` when given, else the engine's released file in the torch
    hub cache ($TORCH_HOME/hub/checkpoints), downloaded there first if missing."""
    if path is not None:
        return Path(path).expanduser()
    filename, url = _DEFAULT_WEIGHTS[engine]
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not hub_file.is_file():
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file and renames it: a failed download leaves nothing behind
            torch.hub.download_url_to_file(url, str(hub_file), progress=progress)
        except OSError as error:  # URLError, timeouts and refused connections are all OSErrors
            raise UserError(f"cannot download the Inception weights ({type(error).__name__}: "
                            f"{first_line(error)[:160]}); put "
                            f"{filename} (or {WEIGHTS_FILENAME} / {PYTORCH_FID_WEIGHTS_FILENAME}: "
                            f"the same file) at a path given by eval.inception_weights "
                            f"(--inception-weights) or in {hub_file.parent} "
                            f"($TORCH_HOME/hub/checkpoints/)") from error
    return hub_file


# ----------------------------------------------------------------------------- engines

def _device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    # torch-fidelity moves things with .cuda(): make that mean the generator's GPU.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _ImageTensorDataset(Dataset):
    """uint8 images (N, 3, H, W) one at a time, as torch-fidelity's dataset path expects (a
    TensorDataset would yield tuples)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _check_uint8_images(images: Tensor | np.ndarray) -> Tensor:
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


class UnconditionalSampler(nn.Module):
    """z (B, z_dim) -> uint8 images (B, 3, H, W). A conditional generator gets uniform labels
    drawn here from a seeded torch.Generator, so torch-fidelity sees an unconditional model."""

    def __init__(self, generator: nn.Module, seed: int) -> None:
        super().__init__()
        self.generator = generator
        self.num_classes = int(generator.num_classes)
        self.label_rng = torch.Generator().manual_seed(seed)

    def forward(self, z: Tensor) -> Tensor:
        labels = None
        if self.num_classes > 0:
            labels = torch.randint(self.num_classes, (z.shape[0],),
                                   generator=self.label_rng).to(z.device)  # (B,)
        return to_uint8(self.generator(z, labels))  # (B, 3, H, W)


class _EngineProvenance:
    """What every engine records about itself in a result."""

    name: ClassVar[str]
    version: ClassVar[str]
    fid_layer: ClassVar[str] = FID_LAYER
    is_layer: ClassVar[str]
    generated_input: ClassVar[str]
    resize: ClassVar[str]
    weights_sha256: str

    @property
    def official_weights(self) -> bool:
        return self.weights_sha256 == OFFICIAL_INCEPTION_SHA256

    def provenance(self) -> dict[str, Any]:
        return {"engine": self.name, "engine_version": self.version,
                "weights_sha256": self.weights_sha256, "official_weights": self.official_weights,
                "generated_input": self.generated_input, "resize": self.resize,
                "is_logits": "fc with bias" if self.is_layer == LOGITS_LAYER
                else "fc without bias"}


@dataclass
class Inception(_EngineProvenance):
    """torch-fidelity's InceptionV3 extractor loaded from checked weights, on one device."""

    name: ClassVar[str] = "torch-fidelity"
    version: ClassVar[str] = torch_fidelity.__version__
    is_layer: ClassVar[str] = IS_LAYER
    generated_input: ClassVar[str] = "uint8 (rounded)"
    resize: ClassVar[str] = "TF1-exact bilinear to 299"

    extractor: FeatureExtractorInceptionV3
    weights_sha256: str
    device: torch.device

    @classmethod
    def load(cls, weights: str | Path | None, device: torch.device | str,
             progress: bool = False) -> Inception:
        """Load from a weights file (None: torch-fidelity's default file, downloaded once).
        Load once and reuse: this checks and hashes the file and builds the network."""
        device = _resolve_device(device)
        path = resolve_inception_weights(weights, progress=progress, engine=cls.name)
        sha256 = check_inception_weights(path)
        # Building the network runs PyTorch's default init, which draws from the global CPU RNG:
        # fork it, so that loading Inception mid-training does not shift the training stream.
        with torch.random.fork_rng(devices=[]), _device_scope(device):
            extractor = create_feature_extractor(
                FEATURE_EXTRACTOR, [FID_LAYER, IS_LAYER], cuda=device.type == "cuda",
                feature_extractor_weights_path=str(path), verbose=False)
        return cls(extractor, sha256, device)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def image_features(self, images: Tensor | np.ndarray, batch_size: int,
                       progress: bool = False) -> dict[str, Tensor]:
        """Features {'2048': (N, 2048), 'logits_unbiased': (N, 1008)} of uint8 (N, 3, H, W)."""
        images = _check_uint8_images(images)
        # save_cpu_ram: no DataLoader workers, the images are already in memory. Iterating a
        # DataLoader draws its base seed from the global CPU RNG: fork it (see Inception.load).
        with torch.random.fork_rng(devices=[]), _device_scope(self.device):
            return get_featuresdict_from_dataset(_ImageTensorDataset(images), self.extractor,
                                                 batch_size, self.cuda, save_cpu_ram=True,
                                                 verbose=progress)

    def generator_features(self, generator: nn.Module, num_samples: int, batch_size: int,
                           seed: int, progress: bool = False) -> dict[str, Tensor]:
        """Features of ``num_samples`` images of ``generator`` (forward(z, labels) -> [-1, 1]),
        in whatever train/eval mode the caller put it, generated in full batches."""
        sampler = GenerativeModelModuleWrapper(
            UnconditionalSampler(generator, seed), z_size=int(generator.z_dim), z_type="normal",
            num_classes=0, make_eval=False)  # make_eval=True would undo batch-statistics BN
        # torch-fidelity's loop shortens the last batch: ask for whole batches and keep the
        # first num_samples (its z stream is drawn batch by batch, so those are unchanged).
        whole_batches = -(-num_samples // batch_size) * batch_size
        with _device_scope(self.device):
            features = get_featuresdict_from_generative_model(
                sampler, self.extractor, whole_batches, batch_size, self.cuda, seed, progress)
        return {layer: values[:num_samples] for layer, values in features.items()}


@dataclass
class PytorchFidInception(_EngineProvenance):
    """pytorch-fid's InceptionV3 (FID blocks, PyTorch bilinear resize to 299, inputs in [-1, 1])
    plus the fc layer with its bias, as StudioGAN's inception_network.py assembled them."""

    name: ClassVar[str] = "pytorch-fid"
    version: ClassVar[str] = pytorch_fid.__version__
    is_layer: ClassVar[str] = LOGITS_LAYER
    generated_input: ClassVar[str] = "float"
    resize: ClassVar[str] = "PyTorch bilinear to 299"

    network: nn.Module  # pytorch_fid.inception.InceptionV3, pool features (block 3)
    fc: nn.Linear  # 2048 -> 1008, with bias
    weights_sha256: str
    device: torch.device

    @classmethod
    def load(cls, weights: str | Path | None, device: torch.device | str,
             progress: bool = False) -> PytorchFidInception:
        """Load from a weights file (None: pytorch-fid's default file, downloaded once)."""
        device = _resolve_device(device)
        path = resolve_inception_weights(weights, progress=progress, engine=cls.name)
        state, sha256 = _load_checked_weights(path)
        # pytorch-fid's InceptionV3 has no weights-path argument: it builds torchvision's
        # Inception3 (1008 classes) with its FID blocks and loads (strictly) whatever its
        # load_state_dict_from_url returns. Returning the checked state dict there keeps
        # pytorch-fid's own construction and nothing is downloaded. The default init draws from
        # the global CPU RNG: fork it (see Inception.load).
        with torch.random.fork_rng(devices=[]), mock.patch.object(
                pytorch_fid.inception, "load_state_dict_from_url",
                lambda *args, **kwargs: state):
            network = pytorch_fid.inception.InceptionV3(
                [pytorch_fid.inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                resize_input=True, normalize_input=False)  # StudioGAN fed [-1, 1] directly
            fc = nn.Linear(2048, state["fc.weight"].shape[0])
        fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
        return cls(network.to(device).eval(), fc.requires_grad_(False).to(device).eval(), sha256,
                   device)

    @torch.no_grad()
    def float_features(self, images: Tensor) -> dict[str, Tensor]:
        """Features {'2048': (B, 2048), 'logits': (B, 1008)} of float images (B, 3, H, W) in
        [-1, 1] on the engine's device, resized to 299 inside."""
        pool = self.network(images.float())[0].flatten(1)  # (B, 2048)
        return {FID_LAYER: pool, LOGITS_LAYER: self.fc(pool)}

    def image_features(self, images: Tensor | np.ndarray, batch_size: int,
                       progress: bool = False) -> dict[str, Tensor]:
        """Features of uint8 (N, 3, H, W), scaled to [-1, 1] as StudioGAN's torchvision
        transforms did (ToTensor's x / 255, then Normalize's (x - 0.5) / 0.5)."""
        images = _check_uint8_images(images)
        parts = []
        for chunk in tqdm(images.split(batch_size), disable=not progress, leave=False,
                          desc="Inception"):
            scaled = (chunk.to(self.device).float() / 255 - 0.5) / 0.5  # (B, 3, H, W)
            parts.append({k: v.cpu() for k, v in self.float_features(scaled).items()})
        return {layer: torch.cat([part[layer] for part in parts]) for layer in parts[0]}

    @torch.no_grad()
    def generator_features(self, generator: nn.Module, num_samples: int, batch_size: int,
                           seed: int, progress: bool = False) -> dict[str, Tensor]:
        """Features of ``num_samples`` images of ``generator``, fed to Inception as the floats it
        returns, generated in full batches of ``batch_size`` with z and uniform labels drawn
        from torch.Generator().manual_seed(seed)."""
        rng = torch.Generator().manual_seed(seed)
        num_classes = int(generator.num_classes)
        parts = []
        for _ in tqdm(range(-(-num_samples // batch_size)), disable=not progress, leave=False,
                      desc="Generating"):
            z = torch.randn(batch_size, int(generator.z_dim), generator=rng)  # (B, z_dim)
            labels = torch.randint(num_classes, (batch_size,), generator=rng).to(self.device) \
                if num_classes > 0 else None  # (B,)
            images = generator(z.to(self.device), labels)  # (B, 3, H, W) in [-1, 1]
            parts.append({k: v.cpu() for k, v in self.float_features(images).items()})
        return {layer: torch.cat([part[layer] for part in parts])[:num_samples]
                for layer in parts[0]}


InceptionEngine = Inception | PytorchFidInception
_ENGINE_CLASSES: dict[str, type[Inception] | type[PytorchFidInception]] = {
    Inception.name: Inception, PytorchFidInception.name: PytorchFidInception}


def load_inception(engine: str, weights: str | Path | None, device: torch.device | str,
                   progress: bool = False) -> InceptionEngine:
    """The engine named ``engine`` (one of ENGINES, as a protocol's ``engine`` says), loaded once
    from checked weights (None: the engine's released file, downloaded once)."""
    return _ENGINE_CLASSES[engine].load(weights, device, progress=progress)


