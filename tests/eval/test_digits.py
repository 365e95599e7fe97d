"""The digits protocol: the numpy classifier against scikit-learn and against a hand-built one,
the scores on inputs whose answers are known (real digits, wrong labels, one image repeated,
noise), the digest-checked cache, and a generator scored end to end."""
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.svm import SVC

from eagan.data import load_images
from eagan.errors import UserError
from eagan.eval import digits
from eagan.eval.digits import (NUM_CLASSES, SVC_SETTINGS, DigitsClassifier, class_spread,
                               classifier_cache_path, classifier_digest, digits_reference,
                               evaluate_digits, fit_classifier, load_or_fit_classifier,
                               requested_labels, score_digits, to_native)
from eagan.eval.protocols import resolve_protocol
from eagan.nets.models import Generator


@pytest.fixture(scope="module")
def real():
    return (load_images("digits", "", "train", 16, download=False),
            load_images("digits", "", "test", 16, download=False))


@pytest.fixture(scope="module")
def reference(real, tmp_path_factory):
    train, test = real
    return digits_reference(train.images, train.labels, test.images, test.labels, "digits-test",
                            tmp_path_factory.mktemp("cache"))


def test_decision_values_and_votes_match_scikit_learn(real):
    train, test = real
    features, labels = to_native(train.images), train.labels.numpy()
    svc = SVC(**SVC_SETTINGS).fit(features, labels)
    classifier = fit_classifier(features, labels)
    noise = np.random.default_rng(0).random((300, 64))
    for inputs in (to_native(test.images), noise):
        np.testing.assert_allclose(classifier.decision_values(inputs),
                                   svc.decision_function(inputs), rtol=0, atol=1e-10)
        np.testing.assert_array_equal(classifier.predict(inputs), svc.predict(inputs))


def test_a_hand_built_classifier_gives_the_hand_computed_values():
    # One support vector per class at the unit vector e_k, dual coefficient +1 for the lower
    # class of a pair and -1 for the higher: decision(i, j)(x) = K(x, e_i) - K(x, e_j).
    gamma = 0.5
    rows, columns = np.indices((NUM_CLASSES - 1, NUM_CLASSES))
    classifier = DigitsClassifier(np.eye(NUM_CLASSES, 64), np.where(rows >= columns, 1.0, -1.0),
                                  np.zeros(45), np.ones(NUM_CLASSES, dtype=np.int64), gamma)
    inputs = np.eye(NUM_CLASSES, 64)
    values = classifier.decision_values(inputs)
    far = math.exp(-gamma * 2)  # K(e_k, e_m) for k != m: |e_k - e_m|^2 = 2
    assert values[0, 0] == pytest.approx(1 - far, abs=1e-15)  # pair (0, 1) at e_0
    assert values[1, 0] == pytest.approx(far - 1, abs=1e-15)  # pair (0, 1) at e_1
    assert values[2, 0] == pytest.approx(0.0, abs=1e-15)  # pair (0, 1) at e_2: a tie
    np.testing.assert_array_equal(classifier.predict(inputs), np.arange(NUM_CLASSES))
    # Far from every support vector each pair ties at 0, and libsvm gives a tied pair's vote
    # to its higher class (it votes for i only when the value is > 0): class 9 takes 9 votes.
    assert classifier.predict(np.zeros((1, 64)) + 5.0)[0] == 9


def test_class_spread_on_a_tiny_fixed_set():
    features = np.zeros((2 * NUM_CLASSES, 64))
    labels = np.repeat(np.arange(NUM_CLASSES), 2)
    features[labels == 3, 0] = [0.0, 1.0]  # one pixel of class 3 varies: std 0.5
    spread = class_spread(features, labels)
    assert spread[3] == pytest.approx(0.5 / 64)
    assert np.delete(spread, 3).sum() == 0.0


def test_held_out_digits_under_their_labels_score_like_real_digits(real, reference):
    _, test = real
    scores = score_digits(test.images, test.labels, reference)
    assert scores["class_accuracy"] == pytest.approx(reference.held_out_accuracy)
    assert scores["class_accuracy"] >= 0.97 and scores["min_class_accuracy"] >= 0.9
    assert 0.8 <= scores["class_spread"] <= 1.2  # as varied as the training digits
    assert scores["fd"] == pytest.approx(0.0, abs=1e-8)  # the reference itself
    assert 0 < reference.train_fd < 1  # other real digits: near


def test_wrong_labels_repeated_images_and_noise(real, reference):
    _, test = real
    wrong = score_digits(test.images, (test.labels + 1) % NUM_CLASSES, reference)
    assert wrong["class_accuracy"] <= 0.05
    copies = test.images[:1].expand(40, -1, -1, -1)
    repeated = score_digits(copies, torch.arange(40) % NUM_CLASSES, reference)
    assert repeated["class_spread"] == 0.0
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (500, 3, 16, 16), generator=rng, dtype=torch.uint8)
    scored = score_digits(noise, requested_labels(500), reference)
    assert scored["class_accuracy"] <= 0.2  # chance is 0.1
    assert scored["fd"] > 20 * reference.train_fd
    with pytest.raises(ValueError, match="at least 2 images"):
        score_digits(test.images[:10], torch.arange(10), reference)


def test_cache_refits_a_damaged_file_and_the_digest_follows_the_settings(real, tmp_path,
                                                                         monkeypatch):
    train, _ = real
    features, labels = to_native(train.images), train.labels.numpy()
    fitted, digest = load_or_fit_classifier(features, labels, tmp_path)
    path = classifier_cache_path(tmp_path, digest)
    cached, _ = load_or_fit_classifier(features, labels, tmp_path)
    np.testing.assert_array_equal(cached.dual_coef, fitted.dual_coef)

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged or foreign classifier cache; refitting"):
        refitted, _ = load_or_fit_classifier(features, labels, tmp_path)
    np.testing.assert_array_equal(refitted.dual_coef, fitted.dual_coef)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refit rewrote a good file
        load_or_fit_classifier(features, labels, tmp_path)

    assert classifier_digest(features[:-1], labels[:-1]) != digest
    monkeypatch.setitem(digits.SVC_SETTINGS, "C", 2.0)
    assert classifier_digest(features, labels) != digest


def test_without_scikit_learn_the_protocol_is_a_one_line_error(real, monkeypatch):
    train, _ = real
    monkeypatch.setitem(sys.modules, "sklearn.svm", None)
    with pytest.raises(UserError, match=r"^eval.protocol digits needs scikit-learn: pip install"):
        fit_classifier(to_native(train.images[:20]), train.labels[:20].numpy())


def test_a_generator_scored_end_to_end(reference):
    torch.manual_seed(0)
    generator = Generator(16, NUM_CLASSES, z_dim=8, base_channels=2, attention="none")
    protocol = resolve_protocol("digits", "digits", 40, available_splits=("train", "test"))
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    result = evaluate_digits(generator, reference, protocol=protocol, generation_batch_size=16,
                             seed=3, ema=True, step=7)
    again = evaluate_digits(generator, reference, protocol=protocol, generation_batch_size=16,
                            seed=3, ema=True, step=7)
    assert result["fd"] == again["fd"] and result["per_class_accuracy"] == \
        again["per_class_accuracy"]  # the same seed, the same images
    assert all(torch.equal(before[k], v) for k, v in generator.state_dict().items())
    assert (result["protocol"], result["num_samples"], result["bn_mode"], result["step"]) == \
        ("digits", 40, "batch", 7)
    assert result["classifier"]["digest"] == reference.digest
    assert result["reference"] == {"name": "digits-test", "split": "test", "count": 360,
                                   "held_out": True}
    assert len(result["per_class_accuracy"]) == NUM_CLASSES
    assert result["min_class_accuracy"] == min(result["per_class_accuracy"])
    assert evaluate_digits(generator, reference, protocol=protocol, generation_batch_size=16,
                           seed=3, rank=1, world_size=2) is None
    wrong = Generator(16, 3, z_dim=8, base_channels=2, attention="none")
    with pytest.raises(UserError, match="has 3 classes"):
        evaluate_digits(wrong, reference, protocol=protocol, generation_batch_size=16, seed=0)
