"""Faults during training, with real processes and signals: nothing is lost."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eagan import checkpoint as ckpt
from eagan.cli import main
from eagan.config import load_config
from eagan.trainer import train

REPO = Path(__file__).resolve().parent.parent


def start_training(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), "-c", str(config), "--train",
                             "--no-progress", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for training")
        time.sleep(0.05)


def test_sigkill_at_any_moment_then_resume_is_exact(tmp_path, tiny_config_path):
    steps = ["train.total_steps=12", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}", *steps])
    train(straight, show_progress=False)

    run_dir = tmp_path / "killed"
    overrides = [item for step in steps for item in ("--set", step)]
    process = start_training(tiny_config_path, "--set", f"run_dir={run_dir}", *overrides)
    # Checkpoints are written every step: a kill now lands mid-step or mid-write.
    wait_for(lambda: ckpt.latest_checkpoint(run_dir) is not None and
             ckpt.step_checkpoints(run_dir)[-1][0] >= 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    latest = ckpt.latest_checkpoint(run_dir)
    assert ckpt.load_checkpoint(latest)["step"] < 12  # killed before the end, and loadable

    resumed = load_config(tiny_config_path, [f"run_dir={run_dir}", *steps])
    train(resumed, resume=True, show_progress=False)
    assert not list(run_dir.glob(".*.tmp"))  # stale temporaries were cleared
    a = ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 12))
    b = ckpt.load_checkpoint(ckpt.step_path(run_dir, 12))
    for network in ("generator", "discriminator"):
        for name, value in a[network].items():
            assert torch.equal(value, b[network][name]), f"{network}.{name}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_config_path, signum):
    run_dir = tmp_path / "run"
    process = start_training(tiny_config_path, "--set", "train.total_steps=100000",
                             "--set", "train.checkpoint_every=100000",
                             "--set", "train.log_every=1")
    wait_for(lambda: (run_dir / "stats.jsonl").is_file() and
             len((run_dir / "stats.jsonl").read_text().splitlines()) >= 2, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    (step, path), = ckpt.step_checkpoints(run_dir)
    assert step >= 2 and ckpt.load_checkpoint(path)["step"] == step
    assert f"stopped at step {step}" in out + err


def test_full_disk_keeps_the_previous_checkpoint(tiny_config_path, tmp_path, monkeypatch,
                                                 capsys):
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    assert main(["-c", str(tiny_config_path), "--train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ckpt-0000004.pt: cannot write the checkpoint (No space left on device)" in err
    run_dir = tmp_path / "run"
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2]
    assert ckpt.load_checkpoint(ckpt.step_path(run_dir, 2))["step"] == 2
    assert not list(run_dir.glob(".*.tmp"))
