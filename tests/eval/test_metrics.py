"""Tests of eagan/eval (Inception engines, scores, reference statistics, evaluate_generator),
offline, with stand-in Inception weights (tests/inception_standin.py) for both engines
(torch-fidelity and pytorch-fid).

Inception costs about 0.16 s per image on one idle core of the 2-core test machine (up to about
three times that in wall time in the parallel suite), so every Inception pass is shared through
a fixture and uses at most 16 images: about 130 images in all.
"""

import dataclasses
import hashlib
import json
import math
import pickle
import socket
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import mpmath
import numpy as np
import pytest
import pytorch_fid
import torch
import torch.nn.functional as F
import torch_fidelity
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

import eagan.eval.inception
from eagan.cli import main
from eagan.errors import UserError
from eagan.eval.evaluate import evaluate_generator, format_results_table
from eagan.eval.inception import (FID_LAYER, IS_LAYER, LOGITS_LAYER, NOT_COMPARABLE,
                                  PYTORCH_FID_WEIGHTS_FILENAME, WEIGHTS_FILENAME, Inception,
                                  PytorchFidInception, UnconditionalSampler,
                                  check_inception_weights, load_inception,
                                  resolve_inception_weights)
from eagan.eval.protocols import PROTOCOLS, resolve_protocol
from eagan.eval.runs import generation_batch_size
from eagan.eval.scores import frechet_distance, gaussian_statistics, inception_score_from_logits
from eagan.nets.bn_mode import bn_mode

# The module's fixtures pass images through Inception once per process: under pytest-xdist one
# worker runs the whole module, so that no other repeats them.
pytestmark = pytest.mark.xdist_group("inception_module_fixtures")

RESULT_KEYS = {"fid", "is_mean", "is_std", "protocol", "num_samples", "is_samples", "is_splits",
               "reference", "bn_mode", "ema", "step", "seed", "generation_batch_size",
               "inception_batch_size", "inception", "runtime", "comparable", "warnings",
               "elapsed_s"}


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


@pytest.fixture(scope="module")
def pytorch_fid_inception(standin_weights) -> PytorchFidInception:
    return PytorchFidInception.load(standin_weights, "cpu")


def smooth_float_images(count: int, seed: int) -> torch.Tensor:
    """float (count, 3, 32, 32) on the 0-255 scale: random 4x4 colour fields upsampled, values
    in [20, 220], so a brightness shift of up to 35 never clips."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)  # (N, 3, 4, 4)
    fine = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)  # (N, 3, 32, 32)
    return fine * 200 + 20


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """smooth_float_images rounded to uint8."""
    return smooth_float_images(count, seed).round().to(torch.uint8)


BASE_COUNT = 8  # images in the shared sets: each is an Inception pass


@pytest.fixture(scope="module")
def base_images() -> torch.Tensor:
    return smooth_images(BASE_COUNT, seed=0)


@pytest.fixture(scope="module")
def base_features(inception, base_images) -> dict[str, torch.Tensor]:
    return inception.image_features(base_images, batch_size=16)


@pytest.fixture(scope="module")
def base_statistics(base_features) -> tuple[np.ndarray, np.ndarray]:
    return gaussian_statistics(base_features[FID_LAYER])


@pytest.fixture(scope="module")
def shifted_statistics(inception, base_images) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """torch-fidelity statistics of base_images brightened by 10 and 35 levels (no clipping)."""
    return {shift: gaussian_statistics(inception.image_features(
        (base_images.int() + shift).to(torch.uint8), batch_size=16)[FID_LAYER])
        for shift in (10, 35)}


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

STUDIOGAN = ("pytorch-fid", True, True)  # engine, IS on its own samples, training-size batches
STANDARD = ("torch-fidelity", False, False)


@pytest.mark.parametrize("name, dataset, splits, reference, num_samples, is_splits, kind", [
    ("studiogan2021", "cifar10", (), "test", 10_000, 1, STUDIOGAN),
    ("studiogan2021", "tiny_imagenet", (), "val", 10_000, 1, STUDIOGAN),
    ("studiogan2021", "folder", ("train", "test"), "test", 10_000, 1, STUDIOGAN),
    ("studiogan2021", "digits", ("train", "test"), "test", 10_000, 1, STUDIOGAN),
    ("standard", "cifar10", (), "train", 50_000, 10, STANDARD),
    ("standard", "tiny_imagenet", (), "train", 50_000, 10, STANDARD),
    ("standard", "folder", ("train", "test"), "train", 50_000, 10, STANDARD),
])
def test_protocol_presets_resolve(name, dataset, splits, reference, num_samples, is_splits,
                                  kind):
    protocol = resolve_protocol(name, dataset, available_splits=splits)
    assert (protocol.name, protocol.reference_split, protocol.num_samples, protocol.is_splits,
            protocol.bn_mode) == (name, reference, num_samples, is_splits, "running")
    assert (protocol.engine, protocol.is_own_samples, protocol.train_batch_generation) == kind
    assert protocol.reference_note is None


def test_held_out_protocol_on_a_folder_without_test_split_says_so():
    protocol = resolve_protocol("studiogan2021", "folder", available_splits=("train",))
    assert protocol.reference_split == "train"
    assert "no held-out split" in protocol.reference_note
    assert "training images" in protocol.reference_note


def test_protocol_overrides_change_only_what_they_name():
    default = resolve_protocol("standard", "cifar10")
    override = resolve_protocol("standard", "cifar10", num_samples_override=1000,
                                bn_mode_override="batch")
    assert (override.num_samples, override.bn_mode) == (1000, "batch")
    assert override == dataclasses.replace(default, num_samples=1000, bn_mode="batch")


@pytest.mark.parametrize("name, mode, expected", [
    ("studiogan2021", "running", 64),  # StudioGAN generated at the training batch size
    ("studiogan2021", "batch", 64),
    ("standard", "running", 100),  # per-sample generator: the batch changes only speed
    ("standard", "batch", 64),  # batch statistics: always the batch G trained with
])
def test_generation_batch_size(name, mode, expected):
    protocol = resolve_protocol(name, "cifar10", bn_mode_override=mode)
    assert generation_batch_size(protocol, train_batch_size=64, eval_batch_size=100) == expected


def test_unknown_bn_mode_is_a_user_error():
    with pytest.raises(UserError, match="eval.bn_mode"):
        resolve_protocol("studiogan2021", "cifar10", bn_mode_override="frozen")


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


@pytest.mark.parametrize("condition", [1e7, 1e10])
def test_frechet_distance_on_a_wide_spectrum_matches_the_exact_value(condition):
    # Covariances Q diag(a) Q^T and Q diag(b) Q^T with a spanning 1 down to 1/condition commute,
    # so tr((sigma1 sigma2)^(1/2)) = sum sqrt(a b) and FID = sum (sqrt(a) - sqrt(b))^2 exactly:
    # evaluated with 50 digits. A relative tolerance on the eigenvalues of sigma1 sigma2 drops
    # every direction below about 7e-7 of the largest and gave +1.6e-5 here (2e-4 relative).
    dim = 512
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # (D, D) orthogonal
    a = np.logspace(0, -math.log10(condition), dim)
    b = a * (1 + 0.2 * rng.uniform(-1, 1, dim))
    mu = rng.normal(size=dim)
    with mpmath.workdps(50):
        exact = float(mpmath.fsum((mpmath.sqrt(x) - mpmath.sqrt(y)) ** 2 for x, y in zip(a, b))
                      + mpmath.fsum(mpmath.mpf(m) ** 2 for m in mu))
    value = frechet_distance(np.zeros(dim), (q * a) @ q.T, mu, (q * b) @ q.T)
    # Forming the matrices rounds at about 1e-16 of the largest eigenvalue per entry.
    assert value == pytest.approx(exact, abs=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


# ----------------------------------------------------------------------------- FID on Inception

def test_fid_of_a_set_against_itself_is_zero(base_statistics):
    # 8 samples give a rank-7 covariance in 2048 dimensions; a square root that kept the
    # rounding-noise eigenvalues (pytorch-fid's) gives about -2e-6 here. Exact arithmetic gives 0;
    # float64 leaves about 1e-15 of the trace.
    mu, sigma = base_statistics
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


@pytest.mark.slow
def test_fid_grows_with_a_brightness_shift(base_statistics, shifted_statistics):
    small, large = (frechet_distance(*base_statistics, *shifted_statistics[shift])
                    for shift in (10, 35))
    assert 1e-3 < small < large / 2, (small, large)


# ----------------------------------------------------------------------------- the two engines

def test_engines_compute_the_same_network(inception, pytorch_fid_inception, base_images,
                                          base_features):
    # pytorch-fid's network given torch-fidelity's input (TF1-exact resize, then (x - 128) /
    # 128) reproduces torch-fidelity's features (bit for bit on this CPU): the engines differ
    # only in how an image reaches the network. Its IS logits are torch-fidelity's
    # logits_unbiased plus the fc bias.
    resized = interpolate_bilinear_2d_like_tensorflow1x(
        base_images[:4].float(), size=(299, 299), align_corners=False)  # (4, 3, 299, 299)
    features = pytorch_fid_inception.float_features((resized - 128) / 128)
    torch.testing.assert_close(features[FID_LAYER], base_features[FID_LAYER][:4],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features[LOGITS_LAYER], base_features[IS_LAYER][:4]
                               + pytorch_fid_inception.fc.bias, rtol=1e-5, atol=1e-5)
    assert pytorch_fid_inception.fc.bias.abs().mean() > 0.5  # the stand-in's bias matters


@pytest.fixture(scope="module")
def pytorch_fid_statistics(pytorch_fid_inception, base_images) -> tuple[np.ndarray, np.ndarray]:
    features = pytorch_fid_inception.image_features(base_images, batch_size=16)[FID_LAYER]
    return gaussian_statistics(features)


@pytest.mark.slow
def test_engines_differ_by_what_resize_and_quantisation_explain(
        pytorch_fid_inception, base_statistics, pytorch_fid_statistics, shifted_statistics):
    # The same 8 uint8 images through both engines. Measured with the stand-in weights: FID
    # 0.0132 between the engines, against 0.454 for a brightness shift of 10 levels (with 16
    # images 0.0140, of which 0.0120 came from PyTorch's against TF1's bilinear resize and
    # 0.0022 from x/127.5 - 1 against (x - 128)/128); feeding the unrounded floats instead of
    # uint8 moves the pytorch-fid FID by 3e-5.
    between_engines = frechet_distance(*base_statistics, *pytorch_fid_statistics)
    shift_10 = frechet_distance(*base_statistics, *shifted_statistics[10])
    assert 1e-4 < between_engines < shift_10 / 10, (between_engines, shift_10)
    # What base_images were rounded from.
    floats = smooth_float_images(BASE_COUNT, seed=0) / 127.5 - 1
    unrounded = gaussian_statistics(pytorch_fid_inception.float_features(floats)[FID_LAYER])
    quantisation = frechet_distance(*pytorch_fid_statistics, *unrounded)
    assert 0 < quantisation < between_engines / 10, (quantisation, between_engines)


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


@pytest.mark.parametrize("engine, filename", [("torch-fidelity", WEIGHTS_FILENAME),
                                              ("pytorch-fid", PYTORCH_FID_WEIGHTS_FILENAME)])
def test_default_weights_in_the_hub_cache_are_used_without_download(tmp_path, standin_weights,
                                                                    engine, filename):
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / filename
    hub_file.parent.mkdir(parents=True)
    hub_file.symlink_to(standin_weights)
    assert resolve_inception_weights(None, engine=engine) == hub_file


def test_pytorch_fid_engine_loads_the_checked_file_and_leaves_the_rng_alone(
        standin_weights, pytorch_fid_inception):
    state = torch.get_rng_state()
    engine = load_inception("pytorch-fid", standin_weights, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    weights = torch.load(standin_weights, weights_only=True)
    conv = engine.network.blocks[0][0].conv.weight  # Conv2d_1a_3x3
    assert torch.equal(conv, weights["Conv2d_1a_3x3.conv.weight"])
    assert torch.equal(engine.fc.bias, weights["fc.bias"])
    assert (engine.name, engine.version, engine.official_weights) == (
        "pytorch-fid", pytorch_fid.__version__, False)


def test_only_the_pinned_sha256_counts_as_official(pytorch_fid_inception, inception,
                                                   monkeypatch):
    assert not inception.official_weights and not pytorch_fid_inception.official_weights
    monkeypatch.setattr(eagan.eval.inception, "OFFICIAL_INCEPTION_SHA256", inception.weights_sha256)
    assert inception.official_weights and pytorch_fid_inception.official_weights
    assert inception.provenance()["official_weights"] is True


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

class RecordingGenerator(TinyGenerator):
    """TinyGenerator that records, per call, the batch size and whether its BN used batch
    statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []
        self.latents: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((z.shape[0], self.bn.training))
        self.latents.append(z)
        return super().forward(z, labels)


@pytest.mark.slow
def test_evaluate_generator_end_to_end_on_torch_fidelity(inception, standin_weights,
                                                         base_images, base_statistics, tmp_path):
    torch.manual_seed(0)
    generator = RecordingGenerator().train()  # as the trainer leaves it
    before = bitwise_state(generator)
    protocol = resolve_protocol("standard", "cifar10", num_samples_override=10)
    cache_dir = tmp_path / "cache"
    torch_rng, numpy_rng = torch.get_rng_state(), np.random.get_state()

    def evaluate():
        return evaluate_generator(generator, inception, reference_images=base_images,
                                  reference_name="smooth-train", protocol=protocol,
                                  batch_size=16, generation_batch_size=4, seed=7,
                                  cache_dir=cache_dir, ema=True, step=1234)

    first, second = evaluate(), evaluate()  # the second reads the cached reference statistics

    # Full batches: 10 samples in batches of 4 are 3 calls of 4, in running-statistics BN.
    assert generator.calls == [(4, False)] * 6
    assert first.keys() == RESULT_KEYS
    del first["elapsed_s"], second["elapsed_s"]
    assert first == second
    sha256 = hashlib.sha256(standin_weights.read_bytes()).hexdigest()
    assert first == {
        "fid": first["fid"], "is_mean": first["is_mean"], "is_std": first["is_std"],
        "protocol": "standard", "num_samples": 10, "is_samples": "the FID set", "is_splits": 10,
        "reference": {"name": "smooth-train", "split": "train", "count": BASE_COUNT,
                      "held_out": False},
        "bn_mode": "running", "ema": True, "step": 1234, "seed": 7,
        "generation_batch_size": 4, "inception_batch_size": 16,
        "inception": {"engine": "torch-fidelity", "engine_version": torch_fidelity.__version__,
                      "weights_sha256": sha256, "official_weights": False,
                      "generated_input": "uint8 (rounded)",
                      "resize": "TF1-exact bilinear to 299", "is_logits": "fc without bias"},
        "runtime": first["runtime"], "comparable": False, "warnings": [NOT_COMPARABLE]}
    assert first["runtime"] == {
        "torch": torch.__version__, "device": "cpu", "world_size": 1, "sync_batchnorm": False,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic}
    assert math.isfinite(first["fid"]) and first["fid"] > 0
    # 10 samples in 10 splits: p(y) of a one-sample split is its p(y|x), so every split scores 1.
    assert (first["is_mean"], first["is_std"]) == (pytest.approx(1.0, abs=1e-12), 0.0)

    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".npz" and sha256[:16] in files[0].name
    assert "torch-fidelity" in files[0].name
    with np.load(files[0]) as cached:  # the reference's statistics, as computed by the fixture
        np.testing.assert_allclose(cached["mu"], base_statistics[0], rtol=1e-6)
        np.testing.assert_allclose(cached["sigma"], base_statistics[1], rtol=1e-6, atol=1e-12)
    assert not (tmp_path / "torch_home").exists()  # nothing in TORCH_HOME (fidelity_cache)

    assert_same_state(before, generator)
    assert all(module.training for module in generator.modules())
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_rng))

    table = format_results_table([{**first, "elapsed_s": 1.5}])
    assert table.splitlines()[0].split() == ["FID", f"{first['fid']:.3f}"]
    assert f"smooth-train (split train, {BASE_COUNT} images)" in table
    assert ["WARNING", NOT_COMPARABLE] in [line.split(None, 1) for line in table.splitlines()]


@pytest.mark.slow
def test_bn_mode_switch_and_full_batches_on_pytorch_fid(pytorch_fid_inception, base_images,
                                                        tmp_path):
    generator = RecordingGenerator().train()
    results = {}
    for mode in ("running", "batch"):
        protocol = resolve_protocol("studiogan2021", "cifar10", num_samples_override=3,
                                    bn_mode_override=mode)
        generator.calls.clear()
        generator.latents.clear()
        results[mode] = evaluate_generator(
            generator, pytorch_fid_inception, reference_images=base_images[:4],
            reference_name="smooth-test", protocol=protocol, batch_size=4,
            generation_batch_size=2, seed=0, cache_dir=tmp_path)
        # 3 samples in full batches of 2, twice: one set for FID, its own set for IS.
        assert generator.calls == [(2, mode == "batch")] * 4
        fid_latents, is_latents = torch.cat(generator.latents[:2]), torch.cat(generator.latents[2:])
        assert not torch.allclose(fid_latents, is_latents)
    running, batch = results["running"], results["batch"]
    assert (running["bn_mode"], batch["bn_mode"]) == ("running", "batch")
    assert (running["is_samples"], running["is_splits"]) == ("own set", 1)
    assert running["inception"]["engine"] == "pytorch-fid"
    assert running["inception"]["is_logits"] == "fc with bias"
    # The running statistics were set far from any batch's: the modes give other images.
    assert abs(running["fid"] - batch["fid"]) > 1e-3 * running["fid"]
    assert running["is_mean"] != batch["is_mean"]
    table = format_results_table([running, batch])
    fid_row = next(line for line in table.splitlines() if line.startswith("FID"))
    assert fid_row.split()[1:] == [f"{running['fid']:.3f}", "|", f"{batch['fid']:.3f}"]
    assert any(line.split()[2:] == ["running", "|", "batch"] for line in table.splitlines()
               if line.startswith("BN mode"))


@pytest.mark.slow
def test_studiogan2021_through_eval_reports_both_bn_modes(tiny_config_path, tmp_path,
                                                          standin_weights, capsys):
    # Train one step at batch 4, then --eval with both BN modes: the generator runs in full
    # batches of 4 (the training batch), 4 samples for FID and 4 others for IS per mode.
    assert main(["-c", str(tiny_config_path), "--train", "--no-progress", "--set",
                 "train.total_steps=1", "--set", "train.batch_size=4"]) == 0
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["-c", str(tiny_config_path), "--eval", "--ckpt", str(run_dir), "--no-progress",
                 "--bn-mode", "both", "--num-samples", "4", "--inception-weights",
                 str(standin_weights), "--set", f"eval.cache_dir={tmp_path / 'cache'}"]) == 0
    out = capsys.readouterr().out
    results = {mode: json.loads((run_dir / f"ckpt-0000001-eval-studiogan2021-bn-{mode}.json")
                                .read_text()) for mode in ("running", "batch")}
    sha256 = hashlib.sha256(standin_weights.read_bytes()).hexdigest()
    for mode, result in results.items():
        assert (result["protocol"], result["bn_mode"], result["num_samples"]) == (
            "studiogan2021", mode, 4)
        assert (result["generation_batch_size"], result["is_samples"], result["is_splits"]) == (
            4, "own set", 1)
        assert result["reference"] == {"name": "cifar10-test", "split": "test", "count": 8,
                                       "held_out": True}
        assert result["inception"] == {
            "engine": "pytorch-fid", "engine_version": pytorch_fid.__version__,
            "weights_sha256": sha256, "official_weights": False, "generated_input": "float",
            "resize": "PyTorch bilinear to 299", "is_logits": "fc with bias"}
        assert (result["runtime"]["world_size"], result["runtime"]["sync_batchnorm"]) == (1, False)
        assert (result["comparable"], result["warnings"]) == (False, [NOT_COMPARABLE])
        assert result["step"] == 1 and result["checkpoint"].endswith("ckpt-0000001.pt")
    assert results["running"]["fid"] != results["batch"]["fid"]
    lines = out.splitlines()
    assert lines[0].split() == ["FID", f"{results['running']['fid']:.3f}", "|",
                                f"{results['batch']['fid']:.3f}"]
    assert ["WARNING", NOT_COMPARABLE] in [line.split(None, 1) for line in lines]
    assert "pytorch-fid 0.3.0, float fakes, PyTorch bilinear to 299, IS from fc with bias" in out


@pytest.mark.parametrize("args, message", [
    (["--eval", "--ckpt", "x.pt", "--bn-mode", "frozen"], "--bn-mode: expected running, batch"),
    (["--eval", "--ckpt", "x.pt", "--bn-mode", "batch,batch"], "--bn-mode: expected"),
    (["--train", "--bn-mode", "both"], "--bn-mode: only --eval reports several modes"),
])
def test_bad_bn_mode_option_is_a_one_line_user_error(tiny_config_path, capsys, args, message):
    assert main(["-c", str(tiny_config_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
