"""Tests of eagan.metrics, offline, with stand-in Inception weights (tests/inception_standin.py).

Inception costs about 0.2-0.6 s per image here, so every Inception pass is shared through a
fixture and uses 16 images: 96 images in all.
"""

import hashlib
import math
import pickle
import socket
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from eagan.errors import UserError
from eagan.metrics import (
    FID_LAYER,
    PROTOCOLS,
    WEIGHTS_FILENAME,
    Inception,
    UnconditionalSampler,
    bn_mode,
    check_inception_weights,
    evaluate_generator,
    format_results_table,
    frechet_distance,
    gaussian_statistics,
    inception_score_from_logits,
    resolve_inception_weights,
    resolve_protocol,
)

RESULT_KEYS = {"fid", "is_mean", "is_std", "protocol", "num_samples", "reference", "bn_mode",
               "ema", "step", "inception_weights_sha256", "seed", "batch_size", "elapsed_s"}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path) -> Iterator[list[str]]:
    """A private TORCH_HOME, and no network: every attempt raises (as offline) and is recorded;
    a test that expects one clears the list, any other attempt fails the test at teardown."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    yield attempts
    assert not attempts, f"unexpected network access: {attempts}"


@pytest.fixture(scope="module")
def inception(standin_weights) -> Inception:
    return Inception.load(standin_weights, "cpu")


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """uint8 (count, 3, 32, 32): random 4x4 colour fields upsampled, values in [20, 220], so a
    brightness shift of up to 35 never clips."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)  # (N, 3, 4, 4)
    fine = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)  # (N, 3, 32, 32)
    return (fine * 200 + 20).round().to(torch.uint8)


@pytest.fixture(scope="module")
def base_images() -> torch.Tensor:
    return smooth_images(16, seed=0)


@pytest.fixture(scope="module")
def base_statistics(inception, base_images) -> tuple[np.ndarray, np.ndarray]:
    return gaussian_statistics(inception.image_features(base_images, batch_size=16)[FID_LAYER])


class TinyGenerator(nn.Module):
    """z (B, 8) and labels (B,) -> (B, 3, 32, 32) in [-1, 1], with BN and spectral norm: the two
    kinds of state an evaluation could change."""

    def __init__(self, num_classes: int = 3, z_dim: int = 8) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.linear = nn.Linear(z_dim, 4 * 8 * 8)
        self.embed = nn.Embedding(num_classes, 4)
        self.bn = nn.BatchNorm2d(4)
        self.conv = spectral_norm(nn.Conv2d(4, 3, 3, padding=1))
        with torch.no_grad():  # running stats far from any batch's, so the BN modes differ
            self.bn.running_mean.uniform_(-2, 2)
            self.bn.running_var.uniform_(0.5, 3)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(-1, 4, 8, 8) + self.embed(labels)[:, :, None, None]  # (B, 4, 8, 8)
        h = F.interpolate(F.relu(self.bn(h)), scale_factor=4)  # (B, 4, 32, 32)
        return torch.tanh(self.conv(h))  # (B, 3, 32, 32)


def bitwise_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----------------------------------------------------------------------------- protocols

@pytest.mark.parametrize("name, dataset, splits, reference, num_samples, is_splits, bn", [
    ("studiogan2021", "cifar10", (), "test", 10_000, 1, "batch"),
    ("studiogan2021", "tiny_imagenet", (), "val", 10_000, 1, "batch"),
    ("studiogan2021", "folder", ("train", "test"), "test", 10_000, 1, "batch"),
    ("studiogan2021", "folder", ("train",), "train", 10_000, 1, "batch"),
    ("studiogan2021", "digits", ("train", "test"), "test", 10_000, 1, "batch"),
    ("standard", "cifar10", (), "train", 50_000, 10, "running"),
    ("standard", "tiny_imagenet", (), "train", 50_000, 10, "running"),
    ("standard", "folder", ("train", "test"), "train", 50_000, 10, "running"),
])
def test_protocol_presets_resolve(name, dataset, splits, reference, num_samples, is_splits, bn):
    protocol = resolve_protocol(name, dataset, available_splits=splits)
    assert (protocol.name, protocol.reference_split, protocol.num_samples, protocol.is_splits,
            protocol.bn_mode) == (name, reference, num_samples, is_splits, bn)


def test_protocol_sample_override_changes_only_the_count():
    default = resolve_protocol("standard", "cifar10")
    override = resolve_protocol("standard", "cifar10", num_samples_override=1000)
    assert override.num_samples == 1000
    assert (override.reference_split, override.is_splits, override.bn_mode) == (
        default.reference_split, default.is_splits, default.bn_mode)


def test_unknown_protocol_lists_the_choices():
    with pytest.raises(UserError, match="unknown protocol 'fancy'") as error:
        resolve_protocol("fancy", "cifar10")
    assert all(name in str(error.value) for name in PROTOCOLS)


@pytest.mark.parametrize("name, count", [("standard", 9), ("studiogan2021", 1),
                                         ("studiogan2021", True), ("studiogan2021", 2.5)])
def test_too_few_samples_is_a_user_error(name, count):
    with pytest.raises(UserError, match="eval.num_samples"):
        resolve_protocol(name, "cifar10", num_samples_override=count)


# ----------------------------------------------------------------------------- IS maths

@pytest.mark.parametrize("classes", [2, 10, 1008])
def test_confident_evenly_spread_predictions_score_the_class_count(classes):
    # Sample i puts all but e^-60 of its mass on class i: p(y) is uniform, KL = log K.
    logits = 60.0 * torch.eye(classes)  # (K, K)
    mean, std = inception_score_from_logits(logits, splits=1)
    assert mean == pytest.approx(classes, rel=1e-12)
    assert std == 0.0


def test_identical_predictions_score_one():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)).repeat(32, 1)
    assert inception_score_from_logits(logits, splits=4) == (pytest.approx(1.0, abs=1e-12), 0.0)


def test_inception_score_on_a_hand_computed_case():
    # p(y|x) = (0.8, 0.2) and (0.2, 0.8): p(y) = (0.5, 0.5), KL = 0.8 log 1.6 + 0.2 log 0.4.
    logits = torch.tensor([[0.8, 0.2], [0.2, 0.8]], dtype=torch.float64).log()
    mean, _ = inception_score_from_logits(logits, splits=1)
    assert mean == pytest.approx(math.exp(0.8 * math.log(1.6) + 0.2 * math.log(0.4)), rel=1e-12)


def test_inception_score_splits_are_consecutive_chunks():
    # First half: 4 confident classes (score 4); second half: identical rows (score 1).
    logits = torch.cat([40.0 * torch.eye(4), torch.zeros(4, 4)])  # (8, 4)
    mean, std = inception_score_from_logits(logits, splits=2)
    assert (mean, std) == (pytest.approx(2.5, rel=1e-12), pytest.approx(1.5, rel=1e-12))


def test_inception_score_matches_torch_fidelity():
    logits = 3 * torch.randn(50, 20, generator=torch.Generator().manual_seed(1))
    expected = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = inception_score_from_logits(logits, splits=10)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-9)


# ----------------------------------------------------------------------------- FID maths

def random_statistics(samples: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, dim)) @ rng.standard_normal((dim, dim)) + rng.normal(size=dim)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_of_identical_gaussians_is_zero():
    mu, sigma = random_statistics(200, 32, seed=0)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-12 * np.trace(sigma))


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_frechet_distance_of_shifted_unit_gaussians_is_the_squared_shift(dim):
    m = np.random.default_rng(dim).normal(size=dim)
    eye = np.eye(dim)
    assert frechet_distance(np.zeros(dim), eye, m, eye) == pytest.approx(m @ m, rel=1e-12)


def test_frechet_distance_of_scaled_isotropic_gaussians():
    # N(0, a I) vs N(0, b I): d (sqrt(a) - sqrt(b))^2.
    dim, a, b = 16, 4.0, 0.25
    expected = dim * (math.sqrt(a) - math.sqrt(b)) ** 2
    value = frechet_distance(np.zeros(dim), a * np.eye(dim), np.zeros(dim), b * np.eye(dim))
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # scipy 1.17
@pytest.mark.parametrize("samples", [200, 16])  # full rank, and 16 samples in 64 dimensions
def test_frechet_distance_matches_pytorch_fid_and_torch_fidelity(samples):
    mu1, sigma1 = random_statistics(samples, 64, seed=1)
    mu2, sigma2 = random_statistics(samples, 64, seed=2)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sqrtm of a singular product
        pytorch_fid = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    torch_fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1},
                                              {"mu": mu2, "sigma": sigma2}, verbose=False)
    assert ours == pytest.approx(pytorch_fid, rel=1e-3)
    assert ours == pytest.approx(torch_fidelity["frechet_inception_distance"], rel=1e-3)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ----------------------------------------------------------------------------- FID on Inception

def test_fid_of_a_set_against_itself_is_zero(base_statistics):
    # 16 samples give a rank-15 covariance in 2048 dimensions; a square root that kept the
    # rounding-noise eigenvalues would give about -1e-6 here. Exact arithmetic gives 0; float64
    # leaves about 1e-15 of the trace.
    mu, sigma = base_statistics
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_grows_with_a_brightness_shift(inception, base_images, base_statistics):
    distances = []
    for shift in (10, 35):
        shifted = (base_images.int() + shift).to(torch.uint8)  # no clipping: images <= 220
        features = inception.image_features(shifted, batch_size=16)[FID_LAYER]
        distances.append(frechet_distance(*base_statistics, *gaussian_statistics(features)))
    small, large = distances
    assert 1e-3 < small < large / 2, distances


# ----------------------------------------------------------------------------- weights

def test_check_accepts_the_standin_and_returns_its_sha256(standin_weights):
    assert check_inception_weights(standin_weights) == hashlib.sha256(
        standin_weights.read_bytes()).hexdigest()


def test_loading_inception_leaves_the_global_rng_alone(standin_weights):
    # Building the network runs PyTorch's default init; the trainer's RNG stream must not move.
    state = torch.get_rng_state()
    Inception.load(standin_weights, "cpu")
    assert torch.equal(torch.get_rng_state(), state)


def _write_bad_weights(kind: str, path: Path, standin_weights: Path) -> None:
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 64)
    elif kind == "python pickle":  # an arbitrary object: weights_only refuses it
        path.write_bytes(pickle.dumps(Path("x"), protocol=2))
    elif kind == "not a dict":
        torch.save([torch.zeros(2)], path)
    elif kind == "wrong keys":
        torch.save({"conv.weight": torch.zeros(2)}, path)
    elif kind == "wrong shapes":
        keys = torch.load(standin_weights, weights_only=True, mmap=True).keys()
        torch.save({key: torch.zeros(1) for key in keys}, path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("garbage", "torch.load"),
    ("python pickle", "torch.load"),
    ("not a dict", "holds a list"),
    ("wrong keys", "keys missing"),
    ("wrong shapes", "has shape"),
])
def test_bad_weights_are_a_one_line_user_error(kind, message, tmp_path, standin_weights):
    path = tmp_path / f"{kind.replace(' ', '_')}.pth"
    _write_bad_weights(kind, path, standin_weights)
    with pytest.raises(UserError, match=message) as error:
        check_inception_weights(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_default_weights_offline_say_where_to_put_them(offline, tmp_path):
    with pytest.raises(UserError) as error:
        resolve_inception_weights(None, progress=False)
    message = str(error.value)
    assert WEIGHTS_FILENAME in message and "--inception-weights" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "\n" not in message
    assert offline, "the download should have been attempted"
    offline.clear()
    assert list((tmp_path / "torch_home" / "hub" / "checkpoints").iterdir()) == []


def test_default_weights_in_the_hub_cache_are_used_without_download(tmp_path, standin_weights):
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    hub_file.parent.mkdir(parents=True)
    hub_file.symlink_to(standin_weights)
    assert resolve_inception_weights(None) == hub_file


# ----------------------------------------------------------------------------- generator side

class LabelRecorder(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes, self.z_dim, self.seen = num_classes, 4, []

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.seen.append(labels)
        return torch.zeros(z.shape[0], 3, 8, 8)


def test_sampler_draws_seeded_uniform_labels_without_touching_global_rng():
    recorder = LabelRecorder(num_classes=5)
    rng_state = torch.get_rng_state()
    images = UnconditionalSampler(recorder, seed=3)(torch.zeros(4000, 4))
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert images.dtype == torch.uint8 and torch.all(images == 128)
    labels = recorder.seen[0]
    expected = torch.randint(5, (4000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(labels, expected)
    assert torch.bincount(labels, minlength=5).min() > 700  # uniform: 800 expected each


def test_unconditional_generator_gets_no_labels():
    recorder = LabelRecorder(num_classes=0)
    UnconditionalSampler(recorder, seed=0)(torch.zeros(2, 4))
    assert recorder.seen == [None]


@pytest.mark.parametrize("mode", ["batch", "running"])
def test_bn_mode_normalises_as_asked_and_restores_everything(mode):
    generator = TinyGenerator().train()
    before = bitwise_state(generator)
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with bn_mode(generator, mode):
        assert generator.bn.training == (mode == "batch")
        assert not generator.conv.training  # no spectral-norm power iteration
        out = generator.bn(x)
        generator(torch.randn(8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    bn = generator.bn
    expected = F.batch_norm(x, None if mode == "batch" else bn.running_mean,
                            None if mode == "batch" else bn.running_var, bn.weight, bn.bias,
                            training=mode == "batch", eps=bn.eps)
    torch.testing.assert_close(out, expected)
    assert_same_state(before, generator)
    assert all(module.training for module in generator.modules())
    assert bn.track_running_stats


# ----------------------------------------------------------------------------- end to end

def test_evaluate_generator_end_to_end(inception, standin_weights, base_images,
                                      base_statistics, tmp_path):
    torch.manual_seed(0)
    generator = TinyGenerator().train()  # as the trainer leaves it
    before = bitwise_state(generator)
    protocol = resolve_protocol("studiogan2021", "cifar10", num_samples_override=16)
    cache_dir = tmp_path / "cache"
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()

    def evaluate():
        return evaluate_generator(generator, inception, reference_images=base_images,
                                  reference_name="smooth-test", protocol=protocol, batch_size=16,
                                  seed=7, cache_dir=cache_dir, ema=True, step=1234)

    first, second = evaluate(), evaluate()  # the second reads the cached reference statistics

    assert first.keys() == RESULT_KEYS
    del first["elapsed_s"], second["elapsed_s"]
    assert first == second
    sha256 = hashlib.sha256(standin_weights.read_bytes()).hexdigest()
    assert first == {
        "fid": first["fid"], "is_mean": first["is_mean"], "is_std": 0.0,
        "protocol": "studiogan2021", "num_samples": 16,
        "reference": {"name": "smooth-test", "split": "test", "count": 16},
        "bn_mode": "batch", "ema": True, "step": 1234, "inception_weights_sha256": sha256,
        "seed": 7, "batch_size": 16}
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    assert 1.0 <= first["is_mean"] <= 1008

    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz" and sha256[:16] in files[0].name
    with np.load(files[0]) as cached:  # the reference's statistics, as computed by the fixture
        np.testing.assert_allclose(cached["mu"], base_statistics[0], rtol=1e-6)
        np.testing.assert_allclose(cached["sigma"], base_statistics[1], rtol=1e-6, atol=1e-12)
    assert not (tmp_path / "torch_home").exists()  # nothing in TORCH_HOME (fidelity_cache)

    assert_same_state(before, generator)
    assert all(module.training for module in generator.modules())
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_rng))

    table = format_results_table({**first, "elapsed_s": 1.5})
    assert table.splitlines()[0].split() == ["FID", f"{first['fid']:.3f}"]
    assert "smooth-test (split test, 16 images)" in table
