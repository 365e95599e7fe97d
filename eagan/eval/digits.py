"""The ``digits`` protocol: how well a class-conditional generator trained on scikit-learn's
digits draws the digit it is asked for, scored by a classifier fitted on the real training
digits. Not FID: no Inception network is involved, and the numbers compare only with other
``digits`` numbers.

The classifier is scikit-learn's SVC (RBF kernel, C = 1, gamma "scale", one-against-one), about
98% accurate on the 360 held-out digits. Real and generated images take the same path to it:
grey, average-pooled to the native 8x8 of the digits, in [0, 1]. Per generator:

- class accuracy: the share of images the classifier names as the class they were drawn for,
  overall and per class;
- class spread: within each class, the mean over pixels of the pixels' standard deviation,
  over the same for the real training digits of that class, averaged over classes (1: as
  varied as real digits; 0: one image per class);
- FD: the Frechet distance between the generated images and the held-out real digits in the
  classifier's feature space, its 45 one-against-one decision values (the FID recipe with this
  classifier in Inception's place). The best checkpoint follows it.

The fitted classifier is cached as plain arrays (no pickle) under a digest of the training
features, the settings and the scikit-learn version, and scored here in numpy: a cache file
that does not match its digest is refitted, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagan.errors import UserError
from eagan.eval.evaluate import runtime_provenance, side_by_side
from eagan.eval.protocols import Protocol
from eagan.eval.scores import frechet_distance, gaussian_statistics
from eagan.files import atomic_output
from eagan.nets.bn_mode import bn_mode
from eagan.sampling import to_uint8

NATIVE_SIZE = 8  # scikit-learn's digits are 8x8
NUM_CLASSES = 10
# The classifier's settings; any change makes a new cache digest.
SVC_SETTINGS = {"kernel": "rbf", "C": 1.0, "gamma": "scale", "decision_function_shape": "ovo"}
CLASSIFIER_NAME = "scikit-learn SVC (RBF kernel, C=1, gamma='scale', one-against-one)"
FEATURES_NAME = "the SVC's 45 one-against-one decision values of 8x8 grey, average-pooled images"
NOT_FID = "digits protocol: classifier-space numbers, not FID"


def to_native(images_uint8: Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float64 (N, 64) in [0, 1]: grey, average-pooled to 8x8."""
    grey = images_uint8.float().mean(dim=1, keepdim=True) / 255
    return F.adaptive_avg_pool2d(grey, NATIVE_SIZE).flatten(1).double().numpy()


def class_spread(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: the mean over pixels of the pixel's standard deviation within the class."""
    return np.array([features[labels == k].std(axis=0).mean() for k in range(NUM_CLASSES)])


# ----------------------------------------------------------------------------- the classifier

@dataclass(frozen=True)
class DigitsClassifier:
    """A fitted one-against-one RBF SVC as arrays, scored in numpy exactly as libsvm does:
    for classes i < j, the decision value is sum over the support vectors of i and j of their
    dual coefficient times exp(-gamma |x - sv|^2), plus the intercept; positive votes for i."""

    support_vectors: np.ndarray  # (n_sv, 64), grouped by class
    dual_coef: np.ndarray  # (NUM_CLASSES - 1, n_sv)
    intercept: np.ndarray  # (45,), pairs (0, 1), (0, 2), ..., (8, 9)
    n_support: np.ndarray  # (NUM_CLASSES,) support vectors per class
    gamma: float

    def decision_values(self, features: np.ndarray) -> np.ndarray:
        """(N, 64) -> (N, 45) one-against-one decision values."""
        squared = ((features ** 2).sum(1)[:, None] + (self.support_vectors ** 2).sum(1)[None]
                   - 2 * features @ self.support_vectors.T)
        kernel = np.exp(-self.gamma * np.maximum(squared, 0.0))  # (N, n_sv)
        bounds = np.concatenate([[0], np.cumsum(self.n_support)])
        values = []
        for i in range(NUM_CLASSES):
            for j in range(i + 1, NUM_CLASSES):
                own, other = slice(bounds[i], bounds[i + 1]), slice(bounds[j], bounds[j + 1])
                values.append(kernel[:, own] @ self.dual_coef[j - 1, own]
                              + kernel[:, other] @ self.dual_coef[i, other])
        return np.stack(values, axis=1) + self.intercept

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The class with the most pairwise votes, by libsvm's rules: a pair votes for its lower
        class only when its decision value is > 0, and equal vote counts go to the lower class."""
        values = self.decision_values(features)
        votes = np.zeros((len(features), NUM_CLASSES), dtype=np.int64)
        pair = 0
        for i in range(NUM_CLASSES):
            for j in range(i + 1, NUM_CLASSES):
                wins_i = values[:, pair] > 0
                votes[:, i] += wins_i
                votes[:, j] += ~wins_i
                pair += 1
        return votes.argmax(axis=1)


def fit_classifier(features: np.ndarray, labels: np.ndarray) -> DigitsClassifier:
    """Fit the SVC (deterministic: libsvm draws nothing at random without probabilities)."""
    try:
        from sklearn.svm import SVC
    except ImportError:
        raise UserError("eval.protocol digits needs scikit-learn: pip install -e '.[demo]'") \
            from None
    svc = SVC(**SVC_SETTINGS).fit(features, labels)
    return DigitsClassifier(np.asarray(svc.support_vectors_, np.float64),
                            np.asarray(svc.dual_coef_, np.float64),
                            np.asarray(svc.intercept_, np.float64),
                            np.asarray(svc.n_support_, np.int64), float(svc._gamma))


def classifier_digest(features: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of what the fit depends on: the training features and labels, the settings and
    the scikit-learn version."""
    import sklearn

    digest = hashlib.sha256(json.dumps({"settings": SVC_SETTINGS,
                                        "sklearn": sklearn.__version__}).encode())
    for array in (np.ascontiguousarray(features, np.float64),
                  np.ascontiguousarray(labels, np.int64)):
        digest.update(repr(array.shape).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def classifier_cache_path(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir).expanduser() / "digits" / f"svc-{digest[:16]}.npz"


def load_or_fit_classifier(features: np.ndarray, labels: np.ndarray, cache_dir: str | Path
                           ) -> tuple[DigitsClassifier, str]:
    """The classifier of these training digits and its digest: from the cache when a file
    there matches the digest and its own content hash, else fitted and cached (atomically)."""
    digest = classifier_digest(features, labels)
    path = classifier_cache_path(cache_dir, digest)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as cached:
                arrays = {name: cached[name] for name in cached.files
                          if name not in ("digest", "content_sha256")}
                if (str(cached["digest"]) == digest
                        and str(cached["content_sha256"]) == _arrays_digest(arrays)):
                    return DigitsClassifier(
                        arrays["support_vectors"], arrays["dual_coef"], arrays["intercept"],
                        arrays["n_support"], float(arrays["gamma"])), digest
        except Exception:  # noqa: BLE001 - a damaged or foreign file is refitted below
            pass
        warnings.warn(f"{path}: damaged or foreign classifier cache; refitting", stacklevel=2)
    classifier = fit_classifier(features, labels)
    arrays = {"support_vectors": classifier.support_vectors, "dual_coef": classifier.dual_coef,
              "intercept": classifier.intercept, "n_support": classifier.n_support,
              "gamma": np.float64(classifier.gamma)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "the digits classifier cache") as tmp_path, \
            open(tmp_path, "wb") as file:
        np.savez(file, **arrays, digest=digest, content_sha256=_arrays_digest(arrays))
    return classifier, digest


# ----------------------------------------------------------------------------- the reference

@dataclass(frozen=True)
class DigitsReference:
    """What generated digits are scored against: the classifier, the real per-class spread of
    the training digits and the decision-value statistics of the held-out digits."""

    classifier: DigitsClassifier
    digest: str
    real_spread: np.ndarray  # (NUM_CLASSES,)
    mu: np.ndarray
    sigma: np.ndarray
    held_out_name: str
    held_out_count: int
    held_out_accuracy: float  # the classifier's, on the held-out digits
    train_fd: float  # FD of the real training digits: the floor a generator can approach


def digits_reference(train_images: Tensor, train_labels: Tensor, held_out_images: Tensor,
                     held_out_labels: Tensor, held_out_name: str, cache_dir: str | Path
                     ) -> DigitsReference:
    """Fit (or load) the classifier on the training digits and summarise the held-out ones."""
    train_features = to_native(train_images)
    train_labels = train_labels.numpy()
    classifier, digest = load_or_fit_classifier(train_features, train_labels, cache_dir)
    held_out = to_native(held_out_images)
    mu, sigma = _statistics(classifier, held_out)
    accuracy = float((classifier.predict(held_out) == held_out_labels.numpy()).mean())
    train_fd = frechet_distance(*_statistics(classifier, train_features), mu, sigma)
    return DigitsReference(classifier, digest, class_spread(train_features, train_labels), mu,
                           sigma, held_out_name, len(held_out), accuracy, train_fd)


def _statistics(classifier: DigitsClassifier, features: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    return gaussian_statistics(torch.from_numpy(classifier.decision_values(features)))


# ----------------------------------------------------------------------------- scoring

def score_digits(images_uint8: Tensor, requested: Tensor, reference: DigitsReference
                 ) -> dict[str, Any]:
    """Accuracy (overall, per class, lowest class), spread and FD of images drawn for the
    ``requested`` classes; every class must be requested at least twice."""
    features = to_native(images_uint8)
    requested = requested.numpy()
    counts = np.bincount(requested, minlength=NUM_CLASSES)
    if counts.min() < 2:
        raise ValueError(f"every class needs at least 2 images, got counts {counts.tolist()}")
    correct = reference.classifier.predict(features) == requested
    per_class = [float(correct[requested == k].mean()) for k in range(NUM_CLASSES)]
    spread = class_spread(features, requested) / reference.real_spread
    fd = frechet_distance(*_statistics(reference.classifier, features), reference.mu,
                          reference.sigma)
    return {"fd": fd, "class_accuracy": float(correct.mean()),
            "min_class_accuracy": min(per_class), "class_spread": float(spread.mean()),
            "per_class_accuracy": per_class, "per_class_spread": spread.tolist()}


def requested_labels(num_samples: int) -> Tensor:
    """0, 1, ..., 9, 0, 1, ...: every generation batch mixes the classes as training batches
    do, which matters when BN normalises with batch statistics."""
    return torch.arange(num_samples) % NUM_CLASSES


@torch.no_grad()
def generate(generator: nn.Module, labels: Tensor, batch_size: int, seed: int, mode: str
             ) -> Tensor:
    """uint8 images for ``labels``, z from a torch.Generator seeded ``seed``, in full batches
    of ``batch_size`` (a short last batch would see other BN batch statistics)."""
    device = next(generator.parameters()).device
    total = -(-len(labels) // batch_size) * batch_size
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(total, generator.z_dim, generator=rng)
    padded = torch.arange(total) % NUM_CLASSES
    padded[:len(labels)] = labels
    chunks = []
    with bn_mode(generator, mode):
        for start in range(0, total, batch_size):
            chunks.append(to_uint8(generator(z[start:start + batch_size].to(device),
                                             padded[start:start + batch_size].to(device))).cpu())
    return torch.cat(chunks)[:len(labels)]


def evaluate_digits(generator: nn.Module, reference: DigitsReference, *, protocol: Protocol,
                    generation_batch_size: int, seed: int, ema: bool = False,
                    step: int | None = None, rank: int = 0, world_size: int = 1
                    ) -> dict[str, Any] | None:
    """The digits protocol's scores of ``generator`` with their provenance (rank 0; None on
    other ranks). Under torch.distributed every rank draws the same images, so that BN with
    synchronised batch statistics sees the same batches as one process; rank 0 scores them."""
    start = time.perf_counter()
    if generator.num_classes != NUM_CLASSES:
        raise UserError(f"eval.protocol digits: the generator has {generator.num_classes} "
                        f"classes; it scores class-conditional digits generators (10 classes)")
    labels = requested_labels(protocol.num_samples)
    images = generate(generator, labels, generation_batch_size, seed, protocol.bn_mode)
    if rank != 0:
        return None
    return {
        **score_digits(images, labels, reference),
        "protocol": protocol.name,
        "num_samples": protocol.num_samples,
        "reference": {"name": reference.held_out_name, "split": protocol.reference_split,
                      "count": reference.held_out_count, "held_out": True},
        "bn_mode": protocol.bn_mode,
        "ema": ema,
        "step": step,
        "seed": seed,
        "generation_batch_size": generation_batch_size,
        "classifier": {"name": CLASSIFIER_NAME, "features": FEATURES_NAME,
                       "digest": reference.digest,
                       "held_out_accuracy": reference.held_out_accuracy,
                       "real_train_fd": reference.train_fd},
        "runtime": runtime_provenance(generator, world_size),
        "comparable": True,
        "warnings": [NOT_FID],
        "elapsed_s": time.perf_counter() - start,
    }


def format_digits_table(results: list[dict[str, Any]]) -> str:
    """A text table of evaluate_digits results, one column per result (e.g. per BN mode)."""
    def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
        classifier = result["classifier"]
        return [
            ("FD (classifier)", f"{result['fd']:.3f} (real training digits: "
                                f"{classifier['real_train_fd']:.3f})"),
            ("class accuracy", f"{result['class_accuracy']:.3f} (lowest class "
                               f"{result['min_class_accuracy']:.2f})"),
            ("per class 0..9", " ".join(f"{a:.2f}" for a in result["per_class_accuracy"])),
            ("class spread", f"{result['class_spread']:.3f}"),
            ("BN mode", result["bn_mode"]),
            ("protocol", result["protocol"]),
            ("samples", f"{result['num_samples']} (seed {result['seed']}, full batches of "
                        f"{result['generation_batch_size']})"),
            ("reference", f"{result['reference']['name']} ({result['reference']['count']} "
                          f"images)"),
            ("classifier", f"{classifier['name']}, {classifier['held_out_accuracy']:.3f} on "
                           f"the held-out digits, digest {classifier['digest'][:16]}"),
            ("EMA generator", "yes" if result["ema"] else "no"),
            ("step", "-" if result["step"] is None else str(result["step"])),
            ("elapsed", f"{result['elapsed_s']:.1f} s"),
        ]
    return side_by_side([rows(result) for result in results], [NOT_FID])
