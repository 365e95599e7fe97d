"""KID and precision/recall (eval.metrics: [fid, is, kid, prc]): the maths on known features,
the config, and the numbers through training, stats.jsonl, TensorBoard and --eval."""
import json
import socket

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eagan.cli import main
from eagan.eval.scores import kernel_inception_distance, precision_recall


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    # Subsets as large as the sets: each of the 100 is the whole set in some order, and the
    # MMD does not depend on the order.

    def k(a, b):
        return (a @ b.T / 3 + 1) ** 3

    m = 5
    xx, yy, xy = k(x, x), k(y, y), k(x, y)
    hand = ((xx.sum() - np.trace(xx)) + (yy.sum() - np.trace(yy))) / (m * (m - 1)) \
        - 2 * xy.sum() / m ** 2
    kid = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), seed=0)
    assert kid["kid_subset_size"] == 5 and kid["kid_subsets"] == 100
    assert kid["kid_mean"] == pytest.approx(hand, rel=1e-9)
    assert kid["kid_std"] == pytest.approx(0.0, abs=1e-9)


def test_precision_and_recall_on_points_on_a_line():
    """Reference 0, 1, ..., 9: each ball's radius (3rd neighbour) is at least 3. Generated
    0, 0.1, 0.2, 0.3: all inside the reference balls (precision 1); their balls (radius 0.2 or
    0.3) hold only the reference 0 (recall 1/10)."""
    reference = torch.stack([torch.arange(10.0), torch.zeros(10)], dim=1)
    generated = torch.stack([torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.zeros(4)], dim=1)
    result = precision_recall(generated, reference)
    assert (result["precision"], result["recall"]) == pytest.approx((1.0, 0.1))
    swapped = precision_recall(reference, generated)
    assert (swapped["precision"], swapped["recall"]) == pytest.approx((0.1, 1.0))


@pytest.mark.parametrize("value, message", [
    ("[fid, fjd]", "eval.metrics: expected one of fid, is, kid, prc, got 'fjd' (did you mean "
                   "fid?)"),
    ("kid", "eval.metrics: expected a list of strings, got 'kid'"),
])
def test_bad_metric_lists_are_user_errors(tiny_config_path, capsys, value, message):
    assert main(["-c", str(tiny_config_path), "--train", "--set", f"eval.metrics={value}",
                 "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_kid_and_prc_through_training_tensorboard_and_eval(tiny_config_path, tmp_path,
                                                            standin_weights, monkeypatch, capsys):
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(
        OSError("network disabled in tests")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # 4 samples, generated in full batches of the training batch (4): none wasted on Inception.
    quick_eval = ["--set", "eval.every=2", "--set", "eval.num_samples=4", "--set",
                  "eval.batch_size=4", "--set", f"eval.cache_dir={tmp_path / 'cache'}",
                  "--set", "eval.metrics=[fid, is, kid, prc]", "--set", "train.batch_size=4",
                  "--inception-weights", str(standin_weights), "--no-progress"]
    assert main(["-c", str(tiny_config_path), "--train", "--set", "train.total_steps=2",
                 *quick_eval]) == 0
    run_dir = tmp_path / "run"
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    evaluations = {line["step"]: line for line in stats if "Metrics/fid" in line}
    assert sorted(evaluations) == [2]
    for line in evaluations.values():
        assert 0 <= line["Metrics/precision"] <= 1 and 0 <= line["Metrics/recall"] <= 1
        assert line["Metrics/kid_std"] >= 0 and np.isfinite(line["Metrics/kid_mean"])
        assert line["Eval/protocol"] == "studiogan2021" and line["Eval/num_samples"] == 4
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"Metrics/kid_mean", "Metrics/kid_std", "Metrics/precision", "Metrics/recall"} <= \
        set(events.Tags()["scalars"])
    assert list((tmp_path / "cache" / "fid_stats").glob("cifar10-test-n8-*-features.npy"))

    capsys.readouterr()
    assert main(["-c", str(tiny_config_path), "--eval", "--ckpt", str(run_dir / "ckpt-0000002.pt"),
                 *quick_eval[2:]]) == 0
    out = capsys.readouterr().out
    assert "KID" in out and "precision / recall" in out
    result = json.loads((run_dir / "ckpt-0000002-eval-studiogan2021-bn-running.json").read_text())
    # 4 generated against 8 reference images: subsets of 4.
    assert (result["kid_subsets"], result["kid_subset_size"], result["prc_neighborhood"]) == \
        (100, 4, 3)
    # The same generator, samples, seed and (cached) reference features as during training.
    assert result["kid_mean"] == pytest.approx(evaluations[2]["Metrics/kid_mean"], rel=1e-5,
                                               abs=1e-9)
    assert (result["precision"], result["recall"]) == \
        (evaluations[2]["Metrics/precision"], evaluations[2]["Metrics/recall"])
