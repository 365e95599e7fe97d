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
import re
import time
from collections.abc import Collection, Mapping, Sequence
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
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, \
    kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, \
    prc_features_to_metric
from torch_fidelity.utils import (
    create_feature_extractor,
    get_featuresdict_from_dataset,
    get_featuresdict_from_generative_model,
)
from tqdm import tqdm

from eagan.distributed import DistContext, gather_to_main
from eagan.errors import UserError, first_line
from eagan.files import atomic_output
from eagan.protocols import Protocol
from eagan.sampling import bn_mode, to_uint8

__all__ = ["bn_mode"]  # re-exported: metrics callers set the generator's BN mode with it

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


# ----------------------------------------------------------------------------- metrics of features

def inception_score_from_logits(logits: Tensor, splits: int) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))) per split.

    logits: (N, K). The N rows are cut into ``splits`` consecutive chunks (the same boundaries as
    torch-fidelity, without its shuffle, and as StudioGAN); p(y) is the mean of p(y|x) within a
    chunk. Returns the mean and the (population) std over the chunks.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}], got {splits}")
    log_p = logits.double().log_softmax(dim=1)  # (N, K)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, K)
        log_marginal = chunk.exp().mean(dim=0).log()  # (K,)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)  # (n_i,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def gaussian_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    array = features.double().cpu().numpy()  # (N, D)
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _clip_to_rank(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below rounding level (numpy's matrix_rank
    tolerance) set to 0: with fewer samples than dimensions most of them are rounding noise,
    whose square roots (about 1e-8 of the largest each) would add up over 2048 dimensions."""
    tolerance = values.size * np.finfo(np.float64).eps * max(values.max(initial=0.0), 0.0)
    return np.where(values > tolerance, values, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau, 1982; the
    FID of Heusel et al., 2017): |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    With sigma1 = W W^T (W = V sqrt(L) from its eigen-decomposition, keeping the r eigenvalues
    above rounding level), sigma1 sigma2 = W (W^T sigma2) has the non-zero eigenvalues of the
    symmetric PSD r x r matrix W^T sigma2 W; tr((sigma1 sigma2)^(1/2)) is the sum of their
    square roots. Those eigenvalues are the squares of sigma-scale numbers, so no tolerance is
    applied to them (one relative to the largest would drop every direction below about 7e-7 of
    the largest variance and inflate the distance): only round-off negatives become 0. Two
    symmetric eigen-decompositions replace a general one (pytorch-fid's sqrtm, torch-fidelity's
    eigvals): real even when the covariances are singular (fewer samples than dimensions),
    several times faster, and cheaper still when r is small.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be two vectors of one length, got {mu1.shape}, {mu2.shape}")
    if sigma1.shape != (mu1.size, mu1.size) or sigma2.shape != sigma1.shape:
        raise ValueError(f"covariances must be {mu1.size}x{mu1.size}, got {sigma1.shape}, "
                         f"{sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)  # (D,), (D, D)
    values = _clip_to_rank(values)
    kept = values > 0
    w = vectors[:, kept] * np.sqrt(values[kept])  # (D, r): sigma1 = w w^T
    middle = w.T @ sigma2 @ w  # (r, r)
    middle = (middle + middle.T) / 2  # remove rounding asymmetry before eigvalsh
    trace_covmean = np.sqrt(np.maximum(np.linalg.eigvalsh(middle), 0.0)).sum()
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


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
            raise UserError(f"cannot download the Inception weights ({type(error).__name__}: {first_line(error)[:160]}); put "
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


# ----------------------------------------------------------------------------- reference cache

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def reference_statistics_path(cache_dir: Path, reference_name: str, images: Tensor,
                              weights_sha256: str, engine: str = Inception.name) -> Path:
    """Cache file of the reference statistics: the name, the image count, a digest of the
    images (a folder dataset can change under one name, or be resized), the engine (the same
    weights give other features through the other engine's preprocessing) and the weights'
    hash."""
    array = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(memoryview(array).cast("B"))
    name = (f"{_safe_name(reference_name)}-n{array.shape[0]}-images{digest.hexdigest()[:12]}"
            f"-{engine}-inception{weights_sha256[:16]}.npz")
    return Path(cache_dir).expanduser() / "fid_stats" / name


def reference_statistics(inception: InceptionEngine, images: Tensor, reference_name: str,
                         cache_dir: Path, batch_size: int,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu (2048,), sigma (2048, 2048)) of the reference images, computed once
    and cached as .npz; a cache file that cannot be read is recomputed."""
    path = reference_statistics_path(cache_dir, reference_name, images, inception.weights_sha256,
                                     inception.name)
    if path.is_file():
        try:
            with np.load(path) as cached:
                if (str(cached["weights_sha256"]) == inception.weights_sha256
                        and str(cached["engine"]) == inception.name):
                    return cached["mu"], cached["sigma"]
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size, progress=progress)
    mu, sigma = gaussian_statistics(features[inception.fid_layer])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that an interrupted run never leaves a truncated cache file.
    with atomic_output(path) as tmp_path, open(tmp_path, "wb") as file:
        np.savez(file, mu=mu, sigma=sigma, weights_sha256=inception.weights_sha256,
                 engine=inception.name, reference_name=reference_name)
    return mu, sigma


# ----------------------------------------------------------------------------- KID, precision

# KID (Binkowski et al., 2018): the unbiased MMD^2 with the cubic polynomial kernel, averaged over
# random subsets (torch-fidelity's defaults: 100 subsets of 1000, fewer when there are fewer
# samples). Precision and recall (Kynkaanniemi et al., 2019): the share of generated samples
# inside the k-nearest-neighbour balls of the real ones, and the reverse, k = 3.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3


def kernel_inception_distance(generated: Tensor, reference: Tensor, seed: int
                              ) -> dict[str, float | int]:
    """KID mean and std over subsets of features (N, D) and (M, D), through torch-fidelity,
    with the subset count and size used."""
    size = min(KID_SUBSET_SIZE, len(generated), len(reference))
    kid = kid_features_to_metric(generated, reference, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD],
            "kid_subsets": KID_SUBSETS, "kid_subset_size": size}


def precision_recall(generated: Tensor, reference: Tensor) -> dict[str, float | int]:
    """Precision and recall of generated against reference features, through torch-fidelity."""
    prc = prc_features_to_metric(generated.float(), reference.float(),
                                 prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True,
                                 verbose=False)
    return {"precision": prc[KEY_METRIC_PRECISION], "recall": prc[KEY_METRIC_RECALL],
            "prc_neighborhood": PRC_NEIGHBORHOOD}


def reference_features(inception: InceptionEngine, images: Tensor, reference_name: str,
                       cache_dir: Path, batch_size: int, progress: bool = False) -> Tensor:
    """The reference images' FID-layer features (N, 2048), which KID and precision/recall need
    whole; cached beside the FID statistics."""
    stats_path = reference_statistics_path(cache_dir, reference_name, images,
                                           inception.weights_sha256, inception.name)
    path = stats_path.with_name(stats_path.stem + "-features.npy")
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path))
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size,
                                        progress=progress)[inception.fid_layer].cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp_path, open(tmp_path, "wb") as file:
        np.save(file, features.numpy())
    return features


# ----------------------------------------------------------------------------- evaluation

def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def runtime_provenance(generator: nn.Module, world_size: int) -> dict[str, Any]:
    """The numerics an evaluation ran under: torch, processes, BN sync, TF32 and cuDNN flags."""
    cudnn = torch.backends.cudnn
    return {
        "torch": torch.__version__,
        "device": str(_module_device(generator)),
        "world_size": world_size,
        "sync_batchnorm": any(isinstance(m, nn.SyncBatchNorm) for m in generator.modules()),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_enabled": bool(cudnn.enabled),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "cudnn_deterministic": bool(cudnn.deterministic),
    }


def evaluate_generator(generator: nn.Module, inception: InceptionEngine, *,
                       reference_images: Tensor | np.ndarray, reference_name: str,
                       protocol: Protocol, batch_size: int, generation_batch_size: int,
                       seed: int, cache_dir: str | Path, ema: bool = False,
                       step: int | None = None, progress: bool = False, rank: int = 0,
                       world_size: int = 1, metrics: Collection[str] = ("fid", "is")
                       ) -> dict[str, Any] | None:
    """FID and IS of ``generator`` under ``protocol`` against uint8 reference images
    (N, 3, H, W), with the provenance that makes the numbers comparable (or says they are not).

    Generated images come in full batches of ``generation_batch_size`` (in "batch" BN mode the
    numbers depend on it); real images go through Inception in batches of ``batch_size``. The FID
    set is drawn with seed ``seed + rank``; when the protocol scores IS on its own samples, that
    set is drawn with seed ``seed + world_size + rank``. Under torch.distributed (``world_size``
    > 1, every rank calling), each rank generates an equal share, the features are gathered on
    rank 0, which returns the result; the other ranks return None.

    ``generator``: any module with forward(z, labels) -> images in [-1, 1], attributes z_dim and
    num_classes (0: unconditional, called with labels=None), on ``inception``'s device. It is
    left exactly as it was: same train/eval flags, parameters and buffers; the global RNGs are
    not touched either. ``reference_name`` (e.g. "cifar10-test") names the reference in the
    cache and the results; ``ema`` and ``step`` are recorded as given. FID and IS are always
    computed; ``metrics`` holding "kid" or "prc" adds KID and precision/recall on the FID
    features of the same pass.
    """
    start = time.perf_counter()
    device = _module_device(generator)
    if device != inception.device:
        raise ValueError(f"the generator is on {device} but Inception on {inception.device}")
    if protocol.engine != inception.name:
        raise ValueError(f"protocol {protocol.name!r} runs on {protocol.engine}, got "
                         f"{inception.name}")
    # Equal shares, so every rank runs as many generator batches (SyncBatchNorm needs that);
    # rank 0 keeps the first num_samples of the gathered features.
    share = -(-protocol.num_samples // world_size)
    show = progress and rank == 0
    with bn_mode(generator, protocol.bn_mode):
        fid_set = inception.generator_features(generator, share, generation_batch_size,
                                               seed + rank, progress=show)
        is_set = fid_set if not protocol.is_own_samples else inception.generator_features(
            generator, share, generation_batch_size, seed + world_size + rank, progress=show)
    features = {"fid": fid_set[inception.fid_layer], "is": is_set[inception.is_layer]}
    if world_size > 1:
        parts = gather_to_main(DistContext(rank, world_size, device),
                               {name: values.cpu() for name, values in features.items()})
        if rank != 0:
            return None
        features = {name: torch.cat([part[name] for part in parts]) for name in features}
    features = {name: values[:protocol.num_samples] for name, values in features.items()}
    reference_images = torch.as_tensor(reference_images)
    mu_ref, sigma_ref = reference_statistics(inception, reference_images, reference_name,
                                             Path(cache_dir), batch_size, progress=progress)
    mu, sigma = gaussian_statistics(features["fid"])
    is_mean, is_std = inception_score_from_logits(features["is"], protocol.is_splits)
    warnings = [] if inception.official_weights else [NOT_COMPARABLE]
    if protocol.reference_note:
        warnings.append(protocol.reference_note)
    extra: dict[str, Any] = {}
    if {"kid", "prc"} & set(metrics):
        reference = reference_features(inception, reference_images, reference_name,
                                       Path(cache_dir), batch_size, progress=progress)
        if "kid" in metrics:
            extra.update(kernel_inception_distance(features["fid"], reference, seed))
        if "prc" in metrics:
            extra.update(precision_recall(features["fid"], reference))
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "is_mean": is_mean,
        "is_std": is_std,
        **extra,
        "protocol": protocol.name,
        "num_samples": protocol.num_samples,
        "is_samples": "own set" if protocol.is_own_samples else "the FID set",
        "is_splits": protocol.is_splits,
        "reference": {"name": reference_name, "split": protocol.reference_split,
                      "count": int(reference_images.shape[0]),
                      "held_out": protocol.reference_note is None
                      and protocol.reference_split != "train"},
        "bn_mode": protocol.bn_mode,
        "ema": ema,
        "step": step,
        "seed": seed,
        "generation_batch_size": generation_batch_size,
        "inception_batch_size": batch_size,
        "inception": inception.provenance(),
        "runtime": runtime_provenance(generator, world_size),
        "comparable": not warnings,
        "warnings": warnings,
        "elapsed_s": time.perf_counter() - start,
    }


def _result_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    reference = result["reference"]
    inception, runtime = result["inception"], result["runtime"]
    step = "-" if result["step"] is None else str(result["step"])
    weights = f"{inception['weights_sha256'][:16]} " + (
        "(official)" if inception["official_weights"] else f"({NOT_COMPARABLE})")
    return [
        ("FID", f"{result['fid']:.3f}"),
        ("IS", f"{result['is_mean']:.3f} +- {result['is_std']:.3f}"),
        ("BN mode", result["bn_mode"]),
        *([("KID", f"{result['kid_mean']:.5f} +- {result['kid_std']:.5f} "
                   f"({result['kid_subsets']} subsets of {result['kid_subset_size']})")]
          if "kid_mean" in result else []),
        *([("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f} "
                                  f"(k = {result['prc_neighborhood']})")]
          if "precision" in result else []),
        ("protocol", result["protocol"]),
        ("samples", f"{result['num_samples']} (seed {result['seed']}; IS on "
                    f"{result['is_samples']}, {result['is_splits']} split"
                    f"{'s' if result['is_splits'] > 1 else ''})"),
        ("generation", f"full batches of {result['generation_batch_size']}, "
                       f"{runtime['world_size']} process(es), sync BN "
                       f"{'on' if runtime['sync_batchnorm'] else 'off'}"),
        ("reference", f"{reference['name']} (split {reference['split']}, "
                      f"{reference['count']} images)"),
        ("EMA generator", "yes" if result["ema"] else "no"),
        ("step", step),
        ("Inception", f"{inception['engine']} {inception['engine_version']}, "
                      f"{inception['generated_input']} fakes, {inception['resize']}, IS from "
                      f"{inception['is_logits']}"),
        ("weights sha256", weights),
        ("numerics", f"torch {runtime['torch']} on {runtime['device']}, TF32 matmul "
                     f"{runtime['tf32_matmul']} / cuDNN {runtime['tf32_cudnn']}, cuDNN "
                     f"benchmark {runtime['cudnn_benchmark']}, deterministic "
                     f"{runtime['cudnn_deterministic']}"),
        ("elapsed", f"{result['elapsed_s']:.1f} s"),
    ]


def format_results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A text table of evaluate_generator results, one column per result (e.g. per BN mode)."""
    warnings = dict.fromkeys(warning for result in results for warning in result["warnings"])
    return side_by_side([_result_rows(result) for result in results], list(warnings))


def side_by_side(columns: Sequence[Sequence[tuple[str, str]]], notes: Sequence[str]) -> str:
    """Rows of (label, value), one column per result: a row whose values all agree is printed
    once; then every note (a warning) once."""
    width = max(len(label) for label, _ in columns[0])
    lines = []
    for index, (label, first) in enumerate(columns[0]):
        values = [column[index][1] for column in columns]
        joined = first if all(value == first for value in values) else "  |  ".join(values)
        lines.append(f"{label:<{width}}  {joined}")
    lines += [f"{'WARNING':<{width}}  {note}" for note in notes]
    return "\n".join(lines)
