"""run.py --report: grouping by config minus seed, statistics over seeds, Welch intervals,
refusals, plots; then end to end on the digits demo."""
import csv
import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image

from eagan.cli import main
from eagan.config import Config, to_dict
from eagan.eval.inception import OFFICIAL_INCEPTION_SHA256
from eagan.report.statistics import welch_interval
from eagan.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]

STANDIN = "ab" * 32
# Hand computation: Welch's t for two samples of 3 with equal variances has 4 degrees of
# freedom, and t(0.975, 4) = 2.7764 (any t table).
T_975_DF4 = 2.7764


def write_run(folder, attention, seed, fids, *, gammas=None, weights=STANDIN, root="data",
              protocol="studiogan2021", is_means=None, step_every=100):
    """A run folder as the trainer leaves it: config.yaml and stats.jsonl with one training
    line and one evaluation line per evaluation (FIDs at steps 100, 200, ...)."""
    config = to_dict(Config())
    config["model"]["attention"] = attention
    config["train"]["seed"] = seed
    config["data"]["root"] = root
    config["run_dir"] = str(folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for i, fid in enumerate(fids):
        step = (i + 1) * step_every
        train_line = {"step": step, "Loss/D/total": 1.0, "Timing/steps_per_sec": 2.0 + seed}
        for block, values in (gammas or {}).items():
            train_line[f"Attention/gamma/{block}"] = values[i]
        lines.append(train_line)
        lines.append({"step": step, "Metrics/fid": fid,
                      "Metrics/is_mean": (is_means or [1.0] * len(fids))[i],
                      "Metrics/is_std": 0.0, "Timing/eval_sec": 1.0,
                      "Eval/protocol": protocol, "Eval/num_samples": 10000,
                      "Eval/reference": "cifar10-test", "Eval/bn_mode": "batch",
                      "Eval/ema": False, "Eval/inception_sha256": weights})
    (folder / "stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def synthetic_runs(tmp_path):
    """EA and SA, 3 seeds each; best FIDs EA 10, 12, 14 and SA 13, 15, 17."""
    runs = tmp_path / "runs"
    ea_best, sa_best = [10.0, 12.0, 14.0], [13.0, 15.0, 17.0]
    for seed in range(3):
        gamma = {"G/attention": [0.1 * seed, 0.2, 0.3], "D/attention": [0.0, -0.1, -0.2]}
        # Best at step 200, then worse; a different data.root does not split a group.
        write_run(runs / "ea" / f"seed{seed}", "external", seed,
                  [ea_best[seed] + 5, ea_best[seed], ea_best[seed] + 1], gammas=gamma,
                  root=f"/elsewhere{seed}", is_means=[1.0, 7.0 + seed, 2.0])
        write_run(runs / "sa" / f"seed{seed}", "self", seed,
                  [sa_best[seed] + 2, sa_best[seed] + 3, sa_best[seed]], gammas=gamma)
    return runs


def test_groups_means_stds_and_welch_interval(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--report", str(synthetic_runs / "*" / "seed*"), "--out", str(out),
                 "--last-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Comparison of runs") and "Stand-in Inception weights" in printed

    groups = {row["group"]: row for row in read_csv(out / "groups.csv")}
    assert set(groups) == {"attention=external", "attention=self"}
    ea, sa = groups["attention=external"], groups["attention=self"]
    assert (ea["seeds"], sa["seeds"]) == ("3", "3")
    assert ea["best FID"] == "12.000 +- 2.000" and sa["best FID"] == "15.000 +- 2.000"
    assert ea["best FID per seed"] == "10.000 (seed 0) 12.000 (seed 1) 14.000 (seed 2)"
    assert ea["step of best"] == "200 200 200" and sa["step of best"] == "300 300 300"
    assert ea["IS at best"] == "8.000 +- 1.000"  # 7, 8, 9 at the best step
    assert ea["last FID"] == "13.000 +- 2.000"
    # Mean of the last 2: (best + best + 1) / 2 -> 12.5 +- 2 for EA; SA (best + 3 + best) / 2.
    assert ea["mean of last 2 FID"] == "12.500 +- 2.000"
    assert sa["mean of last 2 FID"] == "16.500 +- 2.000"
    assert ea["steps/s"] == "3.00 +- 1.00"
    assert ea["evaluated as"] == f"studiogan2021, 10000 samples, BN batch, Inception " \
                                 f"{STANDIN[:8]} (stand-in)"

    best = next(row for row in read_csv(out / "comparisons.csv") if row["measure"] ==
                "best FID")
    # EA - SA = -3; se = sqrt(4/3 + 4/3); 4 degrees of freedom.
    half = T_975_DF4 * math.sqrt(8 / 3)
    low, high = (float(x) for x in best["95% CI (Welch)"].strip("[]").split(","))
    assert float(best["A - B"]) == -3.0
    assert low == pytest.approx(-3 - half, abs=2e-3) and high == pytest.approx(-3 + half,
                                                                               abs=2e-3)
    assert best["verdict"] == "no difference detectable with 3 seeds"
    measures = [row["measure"] for row in read_csv(out / "comparisons.csv")]
    assert measures == ["best FID", "last FID", "mean of last 2 FID"]
    assert len(read_csv(out / "runs.csv")) == 6


def test_welch_interval_with_unequal_variances_against_t_tables():
    diff, low, high = welch_interval([10.0, 10.1, 10.2], [12.0, 12.3, 12.6])
    assert diff == pytest.approx(-2.2)
    # Variances of the means 0.01 / 3 and 0.09 / 3: Welch-Satterthwaite gives
    # (0.1 / 3)^2 / ((0.01 / 3)^2 / 2 + (0.03)^2 / 2) = 2.44 degrees of freedom, so the
    # half-width lies between t(0.975, 3) = 3.182 and t(0.975, 2) = 4.303 standard errors.
    se = math.sqrt(0.1 / 3)
    assert high - diff == pytest.approx(diff - low)
    assert 3.182 * se < high - diff < 4.303 * se
    assert high < 0


def test_ea_better_verdict_and_refusals(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (ea, sa) in enumerate([(10.0, 12.0), (10.1, 12.3), (10.2, 12.6)]):
        write_run(runs / f"ea{seed}", "external", seed, [ea])
        write_run(runs / f"sa{seed}", "self", seed, [sa])
    out = tmp_path / "report"
    assert main(["--report", str(runs), "--out", str(out)]) == 0
    verdicts = {row["measure"]: row["verdict"] for row in read_csv(out / "comparisons.csv")}
    assert verdicts["best FID"] == "EA better"

    # One seed's evaluations under other Inception weights: the group is refused.
    mixed = tmp_path / "mixed"
    write_run(mixed / "seed0", "external", 0, [10.0])
    write_run(mixed / "seed1", "external", 1, [11.0], weights=OFFICIAL_INCEPTION_SHA256)
    capsys.readouterr()
    assert main(["--report", str(mixed), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group all runs: evaluations mix protocols or Inception " \
        "weights" in err and "they are not averaged" in err
    assert not (tmp_path / "refused").exists()

    for args, message in [
        ([str(tmp_path / "nowhere")], "nowhere: not a run folder"),
        ([str(tmp_path / "none*")], "matches no run folder"),
        ([str(runs / "ea0"), str(runs / "ea0"), "--last-k", "0"], "--last-k: expected"),
    ]:
        assert main(["--report", *args]) == 2
        assert message in capsys.readouterr().err


def test_different_protocols_are_separate_groups_and_not_compared(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a0", "external", 0, [10.0], protocol="studiogan2021")
    write_run(runs / "b0", "self", 0, [12.0], protocol="standard")
    config_b = yaml.safe_load((runs / "b0" / "config.yaml").read_text())
    config_b["eval"]["protocol"] = "standard"
    (runs / "b0" / "config.yaml").write_text(yaml.safe_dump(config_b))
    out = tmp_path / "report"
    assert main(["--report", str(runs), "--out", str(out)]) == 0
    groups = [row["group"] for row in read_csv(out / "groups.csv")]
    assert groups == ["attention=external, protocol=studiogan2021",
                      "attention=self, protocol=standard"]
    assert read_csv(out / "comparisons.csv") == []
    assert "No two groups share a dataset" in (out / "report.md").read_text()


def test_plots_are_written(synthetic_runs, tmp_path):
    out = tmp_path / "report"
    assert main(["--report", str(synthetic_runs / "ea"), str(synthetic_runs / "sa"),
                 "--out", str(out)]) == 0
    fid = np.asarray(Image.open(out / "fid_vs_step.png"))
    gamma = np.asarray(Image.open(out / "gamma_vs_step.png"))
    assert fid.shape[:2] == (450, 700)  # 7 x 4.5 inches at 100 dpi
    assert gamma.shape[:2] == (400, 1000)  # one 5-inch panel per block: G and D
    assert fid.std() > 0 and gamma.std() > 0
    text = (out / "report.md").read_text()
    assert "![FID against step](fid_vs_step.png)" in text
    assert "![gamma against step](gamma_vs_step.png)" in text


def test_a_full_disk_while_drawing_keeps_the_earlier_plot_whole(synthetic_runs, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "report"
    args = ["--report", str(synthetic_runs / "ea"), str(synthetic_runs / "sa"), "--out", str(out)]
    assert main(args) == 0
    before = (out / "fid_vs_step.png").read_bytes()
    real_savefig = Figure.savefig

    def half_then_full_disk(self, fname, **kwargs):
        real_savefig(self, fname, **kwargs)
        Path(fname).write_bytes(Path(fname).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", half_then_full_disk)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out / 'fid_vs_step.png'}: cannot write the report figure (No space "
                   f"left on device); the previous files are kept\n")
    assert (out / "fid_vs_step.png").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


DEMO_TINY = ["--set", "train.total_steps=4", "--set", "train.batch_size=8",
             "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
             "--set", "train.ema_start_step=0", "--set", "model.memory_size=4",
             "--set", "eval.every=2", "--set", "eval.num_samples=40", "--no-progress"]


def test_end_to_end_on_the_digits_demo(tmp_path, capsys):
    """Two attention kinds x 2 seeds of the demo at its tiny widths, scored by the digits
    protocol during training, then --report on the four runs."""
    quick = [*DEMO_TINY, "--set", f"eval.cache_dir={tmp_path / 'cache'}"]
    for kind in ("none", "external"):
        assert main(["-c", str(REPO / "configs" / "demo_digits.yaml"), "--train", "--seeds", "0,1",
                     "--run-dir", str(tmp_path / "runs" / kind), "--set",
                     f"model.attention={kind}", *quick]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["--report", str(tmp_path / "runs" / "*"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Digits protocol, not FID" in printed and "Stand-in Inception" not in printed
    groups = {row["group"]: row for row in read_csv(out / "groups.csv")}
    assert set(groups) == {"attention=external", "attention=none"}
    assert groups["attention=none"]["evaluated as"].startswith("digits, 40 samples, BN batch, "
                                                               "classifier ")
    runs = read_csv(out / "runs.csv")
    assert sorted((row["group"], row["seed"], row["evaluations"]) for row in runs) == [
        ("attention=external", "0", "2"), ("attention=external", "1", "2"),
        ("attention=none", "0", "2"), ("attention=none", "1", "2")]
    for row in runs:
        stats = [json.loads(line) for line in
                 open(f"{row['run']}/stats.jsonl").read().splitlines()]
        evaluations = [line for line in stats if "Metrics/fd" in line]
        best = min(evaluations, key=lambda line: line["Metrics/fd"])
        assert float(row["best FD"]) == pytest.approx(best["Metrics/fd"], abs=1e-3)
        assert float(row["class accuracy at best FD"]) == pytest.approx(
            best["Metrics/class_accuracy"], abs=1e-3)
        assert int(row["step of best"]) == best["step"]
        # Training kept best.pt by the same distance.
        kept = ckpt.load_checkpoint(Path(row["run"]) / "best.pt")
        assert (kept["step"], kept["best_metric"]) == (best["step"], "fd")
        assert kept["best_score"] == pytest.approx(best["Metrics/fd"])
        assert float(row["peak memory (GB)"]) > 0
    comparisons = [row["measure"] for row in read_csv(out / "comparisons.csv")]
    assert comparisons == [
        "best FD", "last FD", "mean of last 3 FD", "class accuracy at best FD",
        "last class accuracy", "mean of last 3 class accuracy", "class spread at best FD",
        "last class spread", "mean of last 3 class spread"]
    for plot in ("fd", "class_accuracy", "class_spread", "gamma"):
        assert (out / f"{plot}_vs_step.png").is_file()


def write_digits_run(folder, seed, evaluations, total_steps=3000):
    """A digits run folder: (step, FD, accuracy, lowest class accuracy, spread) per evaluation."""
    config = to_dict(Config())
    config["data"]["dataset"], config["eval"]["protocol"] = "digits", "digits"
    config["train"]["seed"], config["train"]["total_steps"] = seed, total_steps
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": step, "Metrics/fd": fd, "Metrics/class_accuracy": accuracy,
              "Metrics/min_class_accuracy": lowest, "Metrics/class_spread": spread,
              "Eval/protocol": "digits", "Eval/num_samples": 1000, "Eval/bn_mode": "batch",
              "Eval/classifier_sha256": "cd" * 32}
             for step, fd, accuracy, lowest, spread in evaluations]
    (folder / "stats.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines)
                                        + '{"step": 3000, "Metrics/fd": 0.')  # cut short


def test_failed_and_collapsed_digits_runs_stay_in_their_group_and_are_flagged(tmp_path):
    runs = tmp_path / "runs"
    write_digits_run(runs / "s0", 0, [(1500, 2.0, 0.8, 0.6, 0.9), (3000, 1.0, 0.95, 0.9, 0.8)])
    write_digits_run(runs / "s1", 1, [(1500, 1.5, 0.9, 0.8, 0.7), (3000, 3.0, 0.7, 0.3, 0.4)])
    write_digits_run(runs / "s2", 2, [(1500, 0.5, 0.9, 0.8, 0.8)])
    write_digits_run(runs / "s3", 3, [])
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="not a complete log line"):
        assert main(["--report", str(runs), "--out", str(out)]) == 0
    [group] = read_csv(out / "groups.csv")
    assert group["seeds"] == "3 (+1 without evaluation)"
    assert group["best FD"] == "1.000 +- 0.500"  # 1.0, 1.5 and 0.5
    assert group["last class spread"] == "0.667 +- 0.231"  # 0.8, 0.4 and 0.8
    assert group["flagged runs"] == (
        "seed 1: collapsed: spread 0.40 < 0.5; collapsed: a class at accuracy 0.30 < 0.5 / "
        "seed 2: unfinished: last evaluation at step 1500 of 3000 / "
        "seed 3: failed: no evaluation")
    flags = {row["seed"]: row["flags"] for row in read_csv(out / "runs.csv")}
    assert flags["0"] == "-" and flags["3"] == "failed: no evaluation"


def test_training_still_needs_a_config(capsys):
    assert main(["--train"]) == 2
    assert "--train needs -c CONFIG" in capsys.readouterr().err
