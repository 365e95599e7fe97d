"""benchmarks/demo_class_accuracy.py: the digits protocol over every checkpoint of a run, raw
and EMA, with the demo's bars. The protocol itself is tested in tests/eval/test_digits.py."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from eagan.config import load_config
from eagan.data import load_images
from eagan.eval.digits import to_native
from eagan.train.loop import train

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "demo_class_accuracy.py"


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("demo_class_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_digits_at_16_and_32_px_give_the_same_native_features():
    """The protocol reads a 16 px run as it reads a 32 px one: the real digits resized to either
    size pool back to the same 8x8 to within a grey level."""
    at_16, at_32 = (load_images("digits", "", "test", size, download=False) for size in (16, 32))
    assert abs(to_native(at_16.images) - to_native(at_32.images)).max() < 1 / 255


def test_the_goal_needs_accuracy_every_class_and_spread(measure):
    good = {"class_accuracy": 0.95, "min_class_accuracy": 0.8, "class_spread": 0.8}
    assert measure.passes(good)
    assert not measure.passes({**good, "class_accuracy": 0.89})
    assert not measure.passes({**good, "min_class_accuracy": 0.6})  # one class lost
    assert not measure.passes({**good, "class_spread": 0.6})  # collapsed within classes


def test_a_run_folder_gives_one_row_per_checkpoint_and_generator(measure, tmp_path, capsys):
    config = load_config(REPO / "configs" / "demo_digits.yaml", [
        "train.total_steps=2", "train.checkpoint_every=1",
        "train.n_dis=1", "train.log_every=1", "train.sample_every=100",
        "model.g_base_channels=2", "model.d_base_channels=2", "train.ema_decay=0.5",
        "train.ema_start_step=0", "eval.every=0", f"eval.cache_dir={tmp_path / 'cache'}",
        f"run_dir={tmp_path / 'run'}"])
    train(config, show_progress=False)
    capsys.readouterr()  # training's closing line
    assert measure.main([str(tmp_path / "run"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["ema"]) for r in results] == [(1, False), (1, True), (2, False),
                                                        (2, True)]
    assert all(r["protocol"] == "digits" and r["num_samples"] == 1000 and r["fd"] > 0
               and r["verdict"] == "MISS" for r in results)


def test_a_missing_path_is_a_one_line_error(measure, tmp_path, capsys):
    assert measure.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'}: no such")
