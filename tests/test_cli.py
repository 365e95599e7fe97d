"""End to end through the real entry point: run.py's main, on the fake CIFAR-10."""
import hashlib
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eagan
from eagan.cli import main
from eagan.train import checkpoint as ckpt


def run_cli(*args) -> int:
    return main([str(arg) for arg in args] + ["--no-progress"])


@pytest.fixture
def trained_run(tiny_config_path, tmp_path):
    assert run_cli("-c", tiny_config_path, "--train") == 0
    return tmp_path / "run"


def test_train_writes_checkpoints_tensorboard_and_jsonl(trained_run):
    assert sorted(p.name for p in trained_run.glob("ckpt-*.pt")) == \
        ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    assert {"Samples/real", "Samples/fixed_z", "Attention/generator"} <= \
        set(events.Tags()["images"])
    assert "Loss/D/real" in events.Tags()["scalars"]
    assert [e.step for e in events.Images("Samples/fixed_z")] == [2, 4]
    lines = (trained_run / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_sample_writes_class_grid_npz_interpolation_and_attention(trained_run, tmp_path):
    out = tmp_path / "samples"
    code = run_cli("-c", trained_run.parent / "tiny.yaml", "--sample", "--ckpt", trained_run,
                   "--out", out, "--num-samples", 12, "--interpolate", "--attention")
    assert code == 0
    stem = "run-step4"
    grid = np.asarray(Image.open(out / f"{stem}-grid.png"))
    # 10 classes, one row each, 8 images of 32 px with 2 px padding, drawn twice as large
    # (nearest neighbour) so that each image is 64 px wide.
    assert grid.shape == (2 * (2 + 10 * 34), 2 * (2 + 8 * 34), 3)
    assert (grid[0::2, 0::2] == grid[1::2, 1::2]).all()
    with np.load(out / f"{stem}-samples.npz") as samples:
        assert samples["arr_0"].shape == (12, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
        assert samples["labels"].shape == (12,) and samples["labels"].max() < 10
    assert (out / f"{stem}-interpolation.png").is_file()
    attention = np.asarray(Image.open(out / f"{stem}-attention.png"))
    # Each of 8 rows: the image then 6 memory-unit maps, twice as large, under a 60 px caption.
    assert attention.shape == (60 + 2 * (2 + 8 * 34), 2 * (2 + 7 * 34), 3)
    assert attention[:60].std() > 0  # the caption is drawn


def test_sample_and_eval_run_from_the_checkpoint_alone(trained_run, tmp_path, monkeypatch):
    with_config, without = tmp_path / "with", tmp_path / "without"
    assert run_cli("-c", trained_run.parent / "tiny.yaml", "--sample", "--ckpt", trained_run,
                   "--out", with_config, "--num-samples", 4) == 0
    assert run_cli("--sample", "--ckpt", trained_run, "--out", without, "--num-samples", 4) == 0
    for name in ("run-step4-grid.png", "run-step4-samples.npz"):
        assert (with_config / name).read_bytes() == (without / name).read_bytes()

    seen = {}

    def evaluate_checkpoint(config, sampled, path, **kwargs):
        seen.update(config=config, path=path, step=sampled.step)

    monkeypatch.setattr("eagan.eval.runs.evaluate_checkpoint", evaluate_checkpoint)
    assert run_cli("--eval", "--ckpt", trained_run, "--set", "eval.num_samples=8") == 0
    stored = ckpt.load_checkpoint(seen["path"])["config"]
    assert seen["path"] == trained_run / "ckpt-0000004.pt" and seen["step"] == 4
    assert seen["config"].data.root == stored["data"]["root"]
    assert seen["config"].model.attention == stored["model"]["attention"] == "external"
    assert seen["config"].eval.num_samples == 8  # --set applies on top of the stored config


def test_load_generator_samples_requested_classes(trained_run):
    sampler = eagan.load_generator(trained_run / "ckpt-0000004.pt")
    assert (sampler.step, sampler.num_classes, sampler.is_ema) == (4, 10, False)
    labels = torch.tensor([3, 3, 7])
    images, returned = sampler.sample(3, labels=labels, seed=5)
    assert images.shape == (3, 3, 32, 32) and images.abs().max() <= 1
    assert torch.equal(returned, labels)
    again, _ = sampler.sample(3, labels=labels, seed=5)
    assert torch.equal(images, again)


def test_resume_continues_from_latest(tiny_config_path, tmp_path):
    assert run_cli("-c", tiny_config_path, "--train", "--set", "train.total_steps=2") == 0
    assert run_cli("-c", tiny_config_path, "--train", "--resume") == 0
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert payload["step"] == 4


@pytest.mark.parametrize("args, message", [
    (["--train", "--eval"], "not allowed with argument"),
    ([], "one of the arguments --train --eval --sample --report --import-studiogan is required"),
    (["--sample"], "--sample needs --ckpt"),
    (["--eval"], "--eval needs --ckpt"),
    (["--sample", "--ckpt", "nowhere.pt"], "nowhere.pt: checkpoint not found"),
    (["--train", "--set", "train.lr_g=-1"], "train.lr_g: expected a value > 0"),
])
def test_user_errors_exit_2_with_one_line(tiny_config_path, capsys, args, message):
    assert run_cli("-c", tiny_config_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.slow
def test_training_evaluates_every_metric_keeps_best_and_eval_repeats_it(
        tiny_config_path, tmp_path, standin_weights, monkeypatch, capsys):
    """FID, IS, KID and precision/recall at steps 2 and 4, through stats.jsonl and TensorBoard;
    best.pt is the step of the lowest FID; --eval of it gives the same numbers again."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # 4 samples, generated in full batches of the training batch (4): none wasted on Inception.
    quick_eval = ["--set", "eval.every=2", "--set", "eval.num_samples=4", "--set",
                  "eval.batch_size=4", "--set", f"eval.cache_dir={tmp_path / 'cache'}",
                  "--set", "eval.metrics=[fid, is, kid, prc]", "--set", "train.batch_size=4",
                  "--inception-weights", standin_weights]
    assert run_cli("-c", tiny_config_path, "--train", *quick_eval) == 0
    run_dir = tmp_path / "run"
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    evaluations = {line["step"]: line for line in stats if "Metrics/fid" in line}
    assert sorted(evaluations) == [2, 4]
    for line in evaluations.values():
        assert 0 <= line["Metrics/precision"] <= 1 and 0 <= line["Metrics/recall"] <= 1
        assert line["Metrics/kid_std"] >= 0 and np.isfinite(line["Metrics/kid_mean"])
        assert line["Eval/protocol"] == "studiogan2021" and line["Eval/num_samples"] == 4
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"Metrics/fid", "Metrics/kid_mean", "Metrics/kid_std", "Metrics/precision",
            "Metrics/recall"} <= set(events.Tags()["scalars"])
    best_step = min(evaluations, key=lambda step: evaluations[step]["Metrics/fid"])
    assert ckpt.load_checkpoint(run_dir / "best.pt")["step"] == best_step
    cached = tmp_path / "cache" / "fid_stats"
    assert list(cached.glob("cifar10-test-n8-*.npz"))
    assert list(cached.glob("cifar10-test-n8-*-features.npy"))  # for KID and PRC

    capsys.readouterr()
    assert run_cli("-c", tiny_config_path, "--eval", "--ckpt", run_dir, *quick_eval[2:]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "KID" in out and "precision / recall" in out
    result = json.loads((run_dir / "best-eval-studiogan2021-bn-running.json").read_text())
    assert result["step"] == best_step and result["num_samples"] == 4
    assert result["reference"] == {"name": "cifar10-test", "split": "test", "count": 8,
                                   "held_out": True}
    assert (result["protocol"], result["bn_mode"], result["ema"]) == \
        ("studiogan2021", "running", False)
    assert result["inception"]["weights_sha256"] == \
        hashlib.sha256(standin_weights.read_bytes()).hexdigest()
    # 4 generated against 8 reference images: subsets of 4.
    assert (result["kid_subsets"], result["kid_subset_size"], result["prc_neighborhood"]) == \
        (100, 4, 3)
    # The same generator, samples, seed and (cached) reference features as the training-time
    # evaluation of that step.
    best = evaluations[best_step]
    assert result["fid"] == pytest.approx(best["Metrics/fid"], rel=1e-6)
    assert result["kid_mean"] == pytest.approx(best["Metrics/kid_mean"], rel=1e-5, abs=1e-9)
    assert (result["precision"], result["recall"]) == \
        (best["Metrics/precision"], best["Metrics/recall"])
