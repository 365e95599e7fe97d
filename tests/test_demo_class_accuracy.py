"""The demo's class-accuracy measure (benchmarks/demo_class_accuracy.py) on real digits, whose
answers are known: their own labels, shifted labels, and one image repeated."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from eagan.data import load_images

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
