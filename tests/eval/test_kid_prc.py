"""KID and precision/recall (eval.metrics: [fid, is, kid, prc]): the maths on known features and
the config. tests/test_cli.py follows the numbers through training, stats.jsonl, TensorBoard and
--eval, together with FID and IS."""

import numpy as np
import pytest
import torch

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
