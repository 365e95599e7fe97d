"""Faults during training, with real processes and signals: nothing is lost, and the command
that starts a run is the one that continues it."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eagan.cli import main
from eagan.config import load_config
from eagan.errors import UserError
from eagan.train import checkpoint as ckpt
from eagan.train.loop import train
from tests.helpers import assert_same_training_state, evaluation_result

REPO = Path(__file__).resolve().parents[2]
# In-process runs are compared bit for bit with subprocesses started with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def start_training(config: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *launcher, str(REPO / "run.py"), "-c", str(config),
                             "--train", "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll ``condition``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for training")
        time.sleep(0.002)
    return True


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so a
    process group does not reach them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name in field 2 may hold spaces: split after its ')'.
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL a launched command and all its processes at once, as a pre-empted job dies."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.communicate(timeout=60)


def latest_step(run_dir: Path) -> int:
    found = ckpt.step_checkpoints(run_dir)
    return found[-1][0] if found else 0


def test_sigkill_at_random_moments_same_command_ends_exact(tmp_path, tiny_config_path):
    """Kills during start-up, right after config.yaml, and at random steps; every restart is
    the identical --train --resume command; the end is bitwise the uninterrupted run."""
    steps = ["train.total_steps=10", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}", *steps])
    train(straight, show_progress=False)

    run_dir = tmp_path / "killed"
    command = ["--resume", "--set", f"run_dir={run_dir}",
               *[item for step in steps for item in ("--set", step)]]
    rng = random.Random(11)
    # Kill during start-up (importing torch alone takes longer: nothing is written yet), once
    # config.yaml is there (no checkpoint yet), then mid-step or mid-write a few steps on.
    plan = ["start-up", "config.yaml"] + [rng.randint(1, 3) for _ in range(2)]
    landed = []
    for moment in plan:
        resumed_at = latest_step(run_dir)
        process = start_training(tiny_config_path, *command)
        if moment == "start-up":
            time.sleep(rng.uniform(0.05, 0.8))
        elif moment == "config.yaml":
            wait_for(lambda: (run_dir / "config.yaml").exists(), process)
        else:
            wait_for(lambda: latest_step(run_dir) >= resumed_at + moment, process)
            time.sleep(rng.uniform(0, 0.03))
        if process.poll() is None:
            kill_job(process)
            landed.append(latest_step(run_dir) if (run_dir / "config.yaml").exists() else None)
        else:
            process.communicate(timeout=60)
    assert len(landed) >= 4, landed
    assert landed[0] is None  # during start-up: not even config.yaml
    assert landed[1] == 0  # after config.yaml, before the first checkpoint
    assert latest_step(run_dir) < 10

    process = start_training(tiny_config_path, *command)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert not list(run_dir.glob(".*.tmp"))  # stale temporaries were cleared
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 10)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 10)))
    logged = [json.loads(line)["step"] for line in
              (run_dir / "stats.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10]  # every log step once, none twice


def test_torchrun_killed_then_same_command_ends_exact(tmp_path, tiny_config_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    straight = start_training(tiny_config_path, "--set", f"run_dir={tmp_path / 'straight'}",
                              "--set", "train.total_steps=8", launcher=launcher)
    err = straight.communicate(timeout=300)[1]
    assert straight.returncode == 0, err[-2000:]

    run_dir = tmp_path / "killed"
    command = ["--resume", "--set", f"run_dir={run_dir}", "--set", "train.total_steps=8"]
    process = start_training(tiny_config_path, *command, launcher=launcher)
    assert wait_for(lambda: latest_step(run_dir) >= 2, process, timeout=300)
    time.sleep(random.Random(5).uniform(0, 0.05))
    assert process.poll() is None
    kill_job(process)
    assert latest_step(run_dir) < 8

    process = start_training(tiny_config_path, *command, launcher=launcher)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 0, err[-2000:]
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 8)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 8)))


def test_resume_starts_a_run_where_there_is_none(tiny_config_path, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["-c", str(tiny_config_path), "--train", "--resume", "--no-progress"]) == 0
    assert f"no checkpoint in {run_dir}: starting from step 0" in capsys.readouterr().out
    assert latest_step(run_dir) == 4

    # A folder holding only config.yaml (killed before the first checkpoint) starts again at 0,
    # and may change what a resume may change.
    for path in run_dir.iterdir():
        if path.is_file() and path.name != "config.yaml":
            path.unlink()
    assert main(["-c", str(tiny_config_path), "--train", "--resume", "--no-progress",
                 "--set", "train.total_steps=2"]) == 0
    assert "starting from step 0" in capsys.readouterr().out
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2]


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    UserError("inception weights /gone/weights.pth: no such file"),
], ids=["out-of-memory", "weights-removed"])
def test_evaluation_failing_saves_then_stops_and_resume_continues(
        tiny_config_path, tmp_path, monkeypatch, capsys, error):
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}"])
    train(straight, show_progress=False)

    def make_failing_evaluator(config, device, show_progress=True):
        def evaluate(generator, step, rank=0, world_size=1):
            raise error
        return evaluate

    monkeypatch.setattr("eagan.eval.runs.make_training_evaluator", make_failing_evaluator)
    # Checkpoints every 4 steps: the one at step 2 exists only because evaluation failed.
    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress",
            "--set", "eval.every=2", "--set", "train.checkpoint_every=4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert err.count("\n") == 1 and f"step 2: evaluation failed ({error}" in err
    assert f"the run is saved in {ckpt.step_path(run_dir, 2)}" in err
    assert "--resume" in err
    assert latest_step(run_dir) == 2

    monkeypatch.undo()  # fixed; here: evaluation switched off, which a resume may change
    assert main([*args, "--set", "eval.every=0"]) == 0
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 4)))


def fail_save_number(monkeypatch, failing: int) -> None:
    """Make the ``failing``-th torch.save run out of disk after writing a few bytes."""
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill_disk)


def test_full_disk_keeps_the_previous_checkpoint(tiny_config_path, tmp_path, monkeypatch,
                                                 capsys):
    fail_save_number(monkeypatch, 2)
    assert main(["-c", str(tiny_config_path), "--train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ckpt-0000004.pt: cannot write the checkpoint (No space left on device)" in err
    assert err.count("\n") == 1
    run_dir = tmp_path / "run"
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2]
    assert ckpt.load_checkpoint(ckpt.step_path(run_dir, 2))["step"] == 2
    assert not list(run_dir.glob(".*.tmp"))


def test_full_disk_at_best_keeps_the_previous_best(tiny_config_path, tmp_path, monkeypatch,
                                                   capsys):
    def make_evaluator(config, device, show_progress=True):
        def evaluate(generator, step, rank=0, world_size=1):  # FID falls: every step is best
            return evaluation_result(100.0 - step)
        return evaluate

    monkeypatch.setattr("eagan.eval.runs.make_training_evaluator", make_evaluator)
    # Saves: best.pt (step 2), ckpt-2, best.pt (step 4) fails.
    fail_save_number(monkeypatch, 3)
    assert main(["-c", str(tiny_config_path), "--train", "--no-progress",
                 "--set", "eval.every=2"]) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert err == (f"error: {run_dir / 'best.pt'}: cannot write the checkpoint (No space left "
                   f"on device); the previous files are kept\n")
    best = ckpt.load_checkpoint(run_dir / "best.pt")
    assert (best["step"], best["best_score"], best["best_metric"]) == (2, 98.0, "fid")
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2]
    assert not list(run_dir.glob(".*.tmp"))


def test_full_disk_at_the_evaluation_json(tiny_config_path, tmp_path, monkeypatch, capsys,
                                          standin_weights):
    assert main(["-c", str(tiny_config_path), "--train", "--no-progress",
                 "--set", "train.total_steps=2"]) == 0
    run_dir = tmp_path / "run"

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # The metrics are tested elsewhere; here only what happens to their result matters.
    monkeypatch.setattr("eagan.eval.runs.evaluate_generator",
                        lambda *args, **kwargs: {"fid": 1.0})
    monkeypatch.setattr(Path, "write_text", full_disk)
    capsys.readouterr()
    assert main(["-c", str(tiny_config_path), "--eval", "--no-progress", "--ckpt", str(run_dir),
                 "--num-samples", "4", "--inception-weights", str(standin_weights)]) == 2
    err = capsys.readouterr().err
    json_path = run_dir / "ckpt-0000002-eval-studiogan2021-bn-running.json"
    assert err == (f"error: {json_path}: cannot write the file (No space left on device); the "
                   f"previous files are kept\n")
    assert not json_path.exists() and not list(run_dir.glob(".*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_config_path, signum):
    run_dir = tmp_path / "run"
    process = start_training(tiny_config_path, "--set", "train.total_steps=100000",
                             "--set", "train.checkpoint_every=100000",
                             "--set", "train.log_every=1")
    assert wait_for(lambda: (run_dir / "stats.jsonl").is_file() and
                    len((run_dir / "stats.jsonl").read_text().splitlines()) >= 2, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    (step, path), = ckpt.step_checkpoints(run_dir)
    assert step >= 2 and ckpt.load_checkpoint(path)["step"] == step
    assert f"stopped at step {step}" in out + err
