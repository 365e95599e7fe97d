import os

import numpy as np
import pytest
import torch

from eagan.sampling import class_grid_labels, slerp, to_uint8, write_npz


def test_to_uint8_rounds_and_clamps():
    images = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0])
    expected = torch.tensor([0, 0, 0, 128, 191, 255, 255], dtype=torch.uint8)  # 127.5 -> 128
    assert torch.equal(to_uint8(images), expected)


@pytest.mark.parametrize("num_classes, expected", [
    (3, [0, 0, 1, 1, 2, 2]),
    # More classes than grid rows: 10 evenly spaced classes, first and last included.
    (200, [0, 0, 22, 22, 44, 44, 66, 66, 88, 88, 111, 111, 133, 133, 155, 155, 177, 177,
           199, 199]),
])
def test_class_grid_labels(num_classes, expected):
    assert class_grid_labels(num_classes, 2, torch.device("cpu")).tolist() == expected
    assert class_grid_labels(0, 2, torch.device("cpu")) is None


def test_slerp_keeps_the_ends_and_the_norm_of_orthogonal_latents():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    torch.testing.assert_close(middle.norm(), torch.tensor(3.0))
    torch.testing.assert_close(middle, torch.full((1, 2), 3.0 / 2 ** 0.5))


def test_npz_is_uint8_nhwc_with_labels(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    write_npz(images, torch.tensor([4, 9]), tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as saved:
        assert saved["arr_0"].shape == (2, 4, 4, 3) and saved["arr_0"].dtype == np.uint8
        # Pixel (0, 0) of image 0: channel c is -1 + 32c/95, so (32c/95) * 127.5 rounded.
        assert saved["arr_0"][0, 0, 0].tolist() == [0, 43, 86]
        assert saved["labels"].tolist() == [4, 9]
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "s.npz").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it
