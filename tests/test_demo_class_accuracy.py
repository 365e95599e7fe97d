"""The demo's quality measure (benchmarks/demo_class_accuracy.py) on real digits, whose
answers are known: their own labels, shifted labels, one image repeated, noise added; and on a
run folder of a two-step training run."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from eagan.config import load_config
from eagan.data import load_images
from eagan.trainer import train

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_class_accuracy.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("demo_class_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def fitted(measure):
    train = load_images("digits", "", "train", 32, download=False)
    test = load_images("digits", "", "test", 32, download=False)
    classifier = measure.fit_classifier(train)
    real_spread = measure.class_spread(measure.to_native(train.images), train.labels.numpy(), 10)
    return classifier, real_spread, test


def test_digits_at_16_and_32_px_give_the_same_native_features(measure):
    """The measure reads a 16 px run (data.image_size: 16) as it reads a 32 px one: the real
    digits resized to either size pool back to the same 8x8 to within a grey level."""
    at_16, at_32 = (load_images("digits", "", "test", size, download=False) for size in (16, 32))
    features_16, features_32 = measure.to_native(at_16.images), measure.to_native(at_32.images)
    assert abs(features_16 - features_32).max() < 1 / 255


def test_to_native_undoes_the_demo_upsampling_to_8x8(measure):
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[:, :, :4, :4] = 255  # one native pixel
    features = measure.to_native(images)
    assert features.shape == (1, 64)
    assert features[0, 0] == 1.0 and features[0, 1:].sum() == 0.0


def test_real_test_digits_pass_under_their_labels(measure, fitted):
    classifier, real_spread, test = fitted
    accuracy, per_class, spread = measure.agreement(classifier, test.images, test.labels,
                                                    real_spread)
    assert accuracy >= 0.95 and min(per_class) >= 0.85
    assert 0.8 <= spread <= 1.2  # held-out digits vary as the training digits do


def test_digits_under_wrong_labels_score_near_zero(measure, fitted):
    classifier, real_spread, test = fitted
    accuracy, _, _ = measure.agreement(classifier, test.images, (test.labels + 1) % 10,
                                       real_spread)
    assert accuracy <= 0.05


def test_one_image_repeated_has_no_spread(measure, fitted):
    classifier, real_spread, test = fitted
    copies = test.images[:1].expand(20, -1, -1, -1)
    labels = torch.arange(10).repeat(2)
    _, _, spread = measure.agreement(classifier, copies, labels, real_spread)
    assert spread == 0.0


def test_frechet_of_held_out_digits_to_themselves_is_zero_and_grows_with_noise(measure,
                                                                              fitted):
    classifier, _, test = fitted
    reference = measure.classifier_statistics(classifier, test.images)
    assert measure.classifier_frechet(classifier, test.images, reference) == \
        pytest.approx(0.0, abs=1e-8)
    rng = torch.Generator().manual_seed(0)
    noise = torch.randn(test.images.shape, generator=rng)
    distances = [measure.classifier_frechet(
        classifier, (test.images.float() + level * noise).clamp(0, 255).to(torch.uint8),
        reference) for level in (20, 50, 100)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_the_goal_needs_accuracy_every_class_and_spread(measure):
    good = [0.95] * 10
    assert measure.passes(0.95, good, 0.8)
    assert not measure.passes(0.89, good, 0.8)
    assert not measure.passes(0.95, good[:9] + [0.6], 0.8)  # one class lost
    assert not measure.passes(0.95, good, 0.6)  # collapsed within classes


def test_a_run_folder_gives_one_row_per_checkpoint(measure, tmp_path, capsys):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_digits.yaml", [
        "train.total_steps=2", "train.checkpoint_every=1", "train.batch_size=4",
        "train.n_dis=1", "train.log_every=1", "train.sample_every=100",
        "model.g_base_channels=2", "model.d_base_channels=2", "train.ema_decay=0.5",
        f"run_dir={tmp_path / 'run'}"])
    train(config, show_progress=False)
    capsys.readouterr()  # training's closing line
    assert measure.main([str(tmp_path / "run"), "--per-class", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [(row["step"], row["generator"]) for row in report["scores"]]
    assert rows == [(1, "raw"), (1, "ema"), (2, "raw"), (2, "ema")]
    assert all(row["frechet"] > 0 for row in report["scores"])
    assert report["real_train_frechet"] > 0


def test_a_missing_path_is_a_one_line_error(measure, tmp_path, capsys):
    assert measure.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'}: no such")
