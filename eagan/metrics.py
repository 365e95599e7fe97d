"""FID and IS of a generator through torch-fidelity's Inception, under named protocols.

FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", 2017. IS: Salimans et al., "Improved Techniques for Training GANs", 2016. Both use
torch-fidelity's TF-exact InceptionV3 port ('2048' pool features for FID, 'logits_unbiased' for
IS); the statistics, the Frechet distance and the score are computed here in float64.

How generated images reach Inception: the generator is wrapped in torch-fidelity's
GenerativeModelModuleWrapper and streamed through its own sampling loop, so nothing as large as
50k images is held in memory and torch-fidelity shows its progress bar. That loop draws z from
numpy.random.RandomState(seed); the labels of a conditional generator come from our own seeded
torch.Generator (torch-fidelity's conditional path calls np.int, which NumPy 1.24 removed), so
the same checkpoint, seed and batch size give the same numbers, and evaluating never touches the
global RNGs that training relies on for exact resume.

Usage: load Inception once (Inception.load checks and hashes the weights: do it before training
starts, so that missing weights fail early), resolve a protocol, then call evaluate_generator as
often as needed. Expect about 0.3 s per image on two CPU cores: real protocols need a GPU.

Reference statistics are cached in our own cache folder under a name that carries the weights'
sha256 and a digest of the images, so statistics from stand-in weights (tests) or from a
changed dataset can never be mistaken for real ones. torch-fidelity's own feature cache is not
used at all (we call its feature helpers directly), so nothing is written to
$TORCH_HOME/fidelity_cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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

from eagan.errors import UserError
from eagan.sampling import bn_mode, to_uint8

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registered name
FID_LAYER = "2048"
IS_LAYER = "logits_unbiased"


# ----------------------------------------------------------------------------- protocols

@dataclass(frozen=True)
class ProtocolPreset:
    """A named evaluation protocol before it is applied to a dataset."""

    name: str
    num_samples: int  # generated images
    reference: str  # "held-out" (the dataset's test/val split) or "train"
    is_splits: int
    bn_mode: str  # "batch": BN normalises with batch statistics; "running": eval-mode BN
    description: str


@dataclass(frozen=True)
class Protocol:
    """A protocol resolved for one dataset: everything needed to evaluate and to label a number."""

    name: str
    num_samples: int
    reference_split: str
    is_splits: int
    bn_mode: str


PROTOCOLS: dict[str, ProtocolPreset] = {
    "studiogan2021": ProtocolPreset(
        name="studiogan2021", num_samples=10_000, reference="held-out", is_splits=1,
        bn_mode="batch",
        description="StudioGAN 2021 / the EAGAN paper: 10k generated vs the test (Tiny-ImageNet: "
                    "val) split, IS with 1 split, BN batch statistics, uniform labels"),
    "standard": ProtocolPreset(
        name="standard", num_samples=50_000, reference="train", is_splits=10,
        bn_mode="running",
        description="50k generated vs the training split, IS with 10 splits, BN running "
                    "statistics, uniform labels"),
}

# The held-out split of the datasets whose splits are fixed; other datasets use "test" when
# they have one and fall back to "train".
HELD_OUT_SPLITS = {"cifar10": "test", "tiny_imagenet": "val"}


def resolve_protocol(name: str, dataset: str, num_samples_override: int | None = None, *,
                     available_splits: Collection[str] = ()) -> Protocol:
    """The preset ``name`` applied to ``dataset``; ``available_splits`` matters only for datasets
    outside HELD_OUT_SPLITS (a folder: "test" is used for a held-out reference if present)."""
    if name not in PROTOCOLS:
        raise UserError(f"eval.protocol: unknown protocol {name!r}; expected one of "
                        f"{', '.join(PROTOCOLS)}")
    preset = PROTOCOLS[name]
    if preset.reference == "train":
        split = "train"
    elif dataset in HELD_OUT_SPLITS:
        split = HELD_OUT_SPLITS[dataset]
    else:
        split = "test" if "test" in available_splits else "train"
    num_samples = preset.num_samples if num_samples_override is None else num_samples_override
    # A covariance needs two samples, and every IS split needs at least one.
    minimum = max(2, preset.is_splits)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise UserError(f"eval.num_samples: {num_samples!r} is too small for protocol {name!r}; "
                        f"expected an integer >= {minimum}")
    return Protocol(name=name, num_samples=num_samples, reference_split=split,
                    is_splits=preset.is_splits, bn_mode=preset.bn_mode)


# ----------------------------------------------------------------------------- maths

def inception_score_from_logits(logits: Tensor, splits: int) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))) per split.

    logits: (N, K). The N rows are cut into ``splits`` consecutive chunks (the same boundaries as
    torch-fidelity, without its shuffle: our samples are already i.i.d.); p(y) is the mean of
    p(y|x) within a chunk. Returns the mean and the (population) std over the chunks.
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

    With sigma1 = W W^T (W = V sqrt(L) from its eigen-decomposition, keeping the r non-zero
    eigenvalues), sigma1 sigma2 = W (W^T sigma2) has the non-zero eigenvalues of the symmetric
    PSD r x r matrix W^T sigma2 W; tr((sigma1 sigma2)^(1/2)) is the sum of their square roots.
    Two symmetric eigen-decompositions replace a general one (pytorch-fid's sqrtm,
    torch-fidelity's eigvals): real even when the covariances are singular (fewer samples than
    dimensions), several times faster, and cheaper still when r is small.
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
    trace_covmean = np.sqrt(_clip_to_rank(np.linalg.eigvalsh(middle))).sum()
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


# ----------------------------------------------------------------------------- Inception weights

class _InceptionSkeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's extractor with loading skipped: only its state dict's layout is used."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
        return None


@functools.cache
def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict torch-fidelity's extractor loads (strictly)."""
    empty = io.BytesIO()  # __init__ torch.loads the path it is given; an empty dict will do
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):  # no memory, no init cost
        skeleton = _InceptionSkeleton(FEATURE_EXTRACTOR, [FID_LAYER],
                                      feature_extractor_weights_path=empty)
    return {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def check_inception_weights(path: str | Path) -> str:
    """Check that ``path`` holds InceptionV3 weights torch-fidelity can load; return their
    sha256. torch-fidelity itself loads with weights_only=False, which would run any pickle: a
    file must pass this check (weights_only=True) first."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"inception weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises a dozen types on bad files
        raise UserError(f"inception weights {path}: not a file torch.load(weights_only=True) "
                        f"can read ({_first_line(error)})") from error
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"inception weights {path}: holds a {type(state).__name__}, expected a "
                        f"state dict of tensors")
    expected = _expected_shapes()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(set(state.keys()) - expected.keys())
    if missing or unexpected:
        raise UserError(f"inception weights {path}: not torch-fidelity's InceptionV3 state dict "
                        f"({len(missing)} keys missing, e.g. {missing[:2]}; {len(unexpected)} "
                        f"unexpected, e.g. {unexpected[:2]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"inception weights {path}: {key} has shape "
                            f"{tuple(state[key].shape)}, expected {shape}")
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def resolve_inception_weights(path: str | Path | None, progress: bool = True) -> Path:
    """The weights file to use: ``path`` when given, else torch-fidelity's file in the torch hub
    cache ($TORCH_HOME/hub/checkpoints), downloaded there first if missing."""
    if path is not None:
        return Path(path).expanduser()
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if not hub_file.is_file():
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file and renames it: a failed download leaves nothing behind
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(hub_file), progress=progress)
        except OSError as error:  # URLError, timeouts and refused connections are all OSErrors
            raise UserError(f"cannot download the Inception weights ({_first_line(error)}); put "
                            f"{WEIGHTS_FILENAME} at a path given by eval.inception_weights "
                            f"(--inception-weights) or in {hub_file.parent} "
                            f"($TORCH_HOME/hub/checkpoints/)") from error
    return hub_file


# ----------------------------------------------------------------------------- features

def _device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    # torch-fidelity moves things with .cuda(): make that mean the generator's GPU.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _ImageTensorDataset(Dataset):
    """uint8 images (N, 3, H, W) one at a time, as torch-fidelity's dataset path expects (a
    TensorDataset would yield tuples)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


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


@dataclass
class Inception:
    """torch-fidelity's InceptionV3 extractor loaded from checked weights, on one device."""

    extractor: FeatureExtractorInceptionV3
    weights_sha256: str
    device: torch.device

    @classmethod
    def load(cls, weights: str | Path | None, device: torch.device | str,
             progress: bool = False) -> Inception:
        """Load from a weights file (None: torch-fidelity's default file, downloaded once).
        Load once and reuse: this checks and hashes the file and builds the network."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        path = resolve_inception_weights(weights, progress=progress)
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
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        # save_cpu_ram: no DataLoader workers, the images are already in memory. Iterating a
        # DataLoader draws its base seed from the global CPU RNG: fork it (see Inception.load).
        with torch.random.fork_rng(devices=[]), _device_scope(self.device):
            return get_featuresdict_from_dataset(_ImageTensorDataset(images), self.extractor,
                                                 batch_size, self.cuda, save_cpu_ram=True,
                                                 verbose=progress)

    def generator_features(self, generator: nn.Module, num_samples: int, batch_size: int,
                           seed: int, progress: bool = False) -> dict[str, Tensor]:
        """Features of ``num_samples`` images of ``generator`` (forward(z, labels) -> [-1, 1]),
        in whatever train/eval mode the caller put it."""
        sampler = GenerativeModelModuleWrapper(
            UnconditionalSampler(generator, seed), z_size=int(generator.z_dim), z_type="normal",
            num_classes=0, make_eval=False)  # make_eval=True would undo batch-statistics BN
        with _device_scope(self.device):
            return get_featuresdict_from_generative_model(sampler, self.extractor, num_samples,
                                                          batch_size, self.cuda, seed, progress)


# ----------------------------------------------------------------------------- reference cache

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def reference_statistics_path(cache_dir: Path, reference_name: str, images: Tensor,
                              weights_sha256: str) -> Path:
    """Cache file of the reference statistics: the name, the image count, a digest of the
    images (a folder dataset can change under one name, or be resized) and the weights' hash."""
    array = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(memoryview(array).cast("B"))
    name = (f"{_safe_name(reference_name)}-n{array.shape[0]}-images{digest.hexdigest()[:12]}"
            f"-inception{weights_sha256[:16]}.npz")
    return Path(cache_dir).expanduser() / "fid_stats" / name


def reference_statistics(inception: Inception, images: Tensor, reference_name: str,
                         cache_dir: Path, batch_size: int,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu (2048,), sigma (2048, 2048)) of the reference images, computed once
    and cached as .npz; a cache file that cannot be read is recomputed."""
    path = reference_statistics_path(cache_dir, reference_name, images, inception.weights_sha256)
    if path.is_file():
        try:
            with np.load(path) as cached:
                if str(cached["weights_sha256"]) == inception.weights_sha256:
                    return cached["mu"], cached["sigma"]
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size, progress=progress)[FID_LAYER]
    mu, sigma = gaussian_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that an interrupted run never leaves a truncated cache file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        np.savez(file, mu=mu, sigma=sigma, weights_sha256=inception.weights_sha256,
                 reference_name=reference_name)
    os.replace(file.name, path)
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


def reference_features(inception: Inception, images: Tensor, reference_name: str,
                       cache_dir: Path, batch_size: int, progress: bool = False) -> Tensor:
    """The reference images' FID-layer features (N, 2048), which KID and precision/recall need
    whole; cached beside the FID statistics."""
    stats_path = reference_statistics_path(cache_dir, reference_name, images,
                                           inception.weights_sha256)
    path = stats_path.with_name(stats_path.stem + "-features.npy")
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path))
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size, progress=progress)[FID_LAYER]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as file:
        np.save(file, features.cpu().numpy())
    os.replace(file.name, path)
    return features.cpu()


# ----------------------------------------------------------------------------- evaluation

def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def evaluate_generator(generator: nn.Module, inception: Inception, *,
                       reference_images: Tensor | np.ndarray, reference_name: str,
                       protocol: Protocol, batch_size: int, seed: int, cache_dir: str | Path,
                       ema: bool = False, step: int | None = None, progress: bool = False,
                       rank: int = 0, world_size: int = 1, metrics: Collection[str] = ("fid", "is")
                       ) -> dict[str, Any] | None:
    """FID and IS of ``generator`` under ``protocol`` against uint8 reference images
    (N, 3, H, W).

    Under torch.distributed (``world_size`` > 1, every rank calling), each rank generates its
    share of the samples with seed ``seed + rank``, the features are gathered on rank 0, which
    returns the result; the other ranks return None. One process uses ``seed`` alone.

    ``generator``: any module with forward(z, labels) -> images in [-1, 1], attributes z_dim and
    num_classes (0: unconditional, called with labels=None), on ``inception``'s device. It is
    left exactly as it was: same train/eval flags, parameters and buffers; the global RNGs are
    not touched either. ``reference_name`` (e.g. "cifar10-test") names the reference in the
    cache and the results; ``ema`` and ``step`` are recorded as given. In "batch" BN mode the
    numbers depend on ``batch_size``, so it is recorded too. FID and IS are always computed;
    ``metrics`` holding "kid" or "prc" adds KID and precision/recall on the same features.
    """
    start = time.perf_counter()
    device = _module_device(generator)
    if device != inception.device:
        raise ValueError(f"the generator is on {device} but Inception on {inception.device}")
    # Equal shares, so every rank runs as many generator batches (SyncBatchNorm needs that);
    # rank 0 keeps the first num_samples of the gathered features.
    share = -(-protocol.num_samples // world_size)
    with bn_mode(generator, protocol.bn_mode):
        features = inception.generator_features(generator, share, batch_size, seed + rank,
                                                progress=progress and rank == 0)
    if world_size > 1:
        features = _gather_features(features, rank, world_size)
        if rank != 0:
            return None
        features = {layer: values[:protocol.num_samples] for layer, values in features.items()}
    reference_images = torch.as_tensor(reference_images)
    mu_ref, sigma_ref = reference_statistics(inception, reference_images, reference_name,
                                             Path(cache_dir), batch_size, progress=progress)
    mu, sigma = gaussian_statistics(features[FID_LAYER])
    is_mean, is_std = inception_score_from_logits(features[IS_LAYER], protocol.is_splits)
    extra: dict[str, Any] = {}
    if {"kid", "prc"} & set(metrics):
        reference = reference_features(inception, reference_images, reference_name,
                                       Path(cache_dir), batch_size, progress=progress)
        if "kid" in metrics:
            extra.update(kernel_inception_distance(features[FID_LAYER], reference, seed))
        if "prc" in metrics:
            extra.update(precision_recall(features[FID_LAYER], reference))
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "is_mean": is_mean,
        "is_std": is_std,
        **extra,
        "protocol": protocol.name,
        "num_samples": protocol.num_samples,
        "reference": {"name": reference_name, "split": protocol.reference_split,
                      "count": int(reference_images.shape[0])},
        "bn_mode": protocol.bn_mode,
        "ema": ema,
        "step": step,
        "inception_weights_sha256": inception.weights_sha256,
        "seed": seed,
        "batch_size": batch_size,
        "elapsed_s": time.perf_counter() - start,
    }


def _gather_features(features: dict[str, Tensor], rank: int, world_size: int
                     ) -> dict[str, Tensor]:
    """Every rank's features concatenated in rank order on rank 0 (others get their own)."""
    mine = {layer: values.cpu() for layer, values in features.items()}
    gathered = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return mine
    return {layer: torch.cat([part[layer] for part in gathered]) for layer in mine}


def format_results_table(result: Mapping[str, Any]) -> str:
    """A small two-column text table of an evaluate_generator result."""
    reference = result["reference"]
    step = "-" if result["step"] is None else str(result["step"])
    rows = [
        ("FID", f"{result['fid']:.3f}"),
        ("IS", f"{result['is_mean']:.3f} +- {result['is_std']:.3f}"),
        *([("KID", f"{result['kid_mean']:.5f} +- {result['kid_std']:.5f} "
                   f"({result['kid_subsets']} subsets of {result['kid_subset_size']})")]
          if "kid_mean" in result else []),
        *([("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f} "
                                  f"(k = {result['prc_neighborhood']})")]
          if "precision" in result else []),
        ("protocol", result["protocol"]),
        ("samples", f"{result['num_samples']} (seed {result['seed']}, batch "
                    f"{result['batch_size']})"),
        ("reference", f"{reference['name']} (split {reference['split']}, "
                      f"{reference['count']} images)"),
        ("BN mode", result["bn_mode"]),
        ("EMA generator", "yes" if result["ema"] else "no"),
        ("step", step),
        ("Inception sha256", result["inception_weights_sha256"][:16]),
        ("elapsed", f"{result['elapsed_s']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
