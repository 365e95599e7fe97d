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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import eagan.eval.runs
from eagan.cli import main
from eagan.config import load_config
from eagan.errors import UserError
from eagan.train import checkpoint as ckpt
from eagan.train.loop import train
from tests.helpers import assert_same_training_state, evaluation_result
from tests.launch import ForkedMain, descendants, fork_ranks

REPO = Path(__file__).resolve().parents[2]
# In-process runs are compared bit for bit with subprocesses started with OMP_NUM_THREADS=1.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fork_training(config: Path, *args: str, prepare: Callable[[], None] | None = None
                  ) -> ForkedMain:
    """The training command in a process forked from this one (no 3 s of importing torch)."""
    return ForkedMain(["-c", str(config), "--train", "--no-progress", *args], prepare=prepare)


def start_training(config: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """The training command started as a user starts it, as python run.py."""
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
        # Only a real command has a start-up to kill; the others fork from this process.
        launch = start_training if moment == "start-up" else fork_training
        process = launch(tiny_config_path, *command)
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

    process = fork_training(tiny_config_path, *command)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert not list(run_dir.glob(".*.tmp"))  # stale temporaries were cleared
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 10)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 10)))
    logged = [json.loads(line)["step"] for line in
              (run_dir / "stats.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8, 10]  # every log step once, none twice


@pytest.mark.slow
def test_torchrun_killed_then_same_command_ends_exact(tmp_path, tiny_config_path):
    """A real torchrun job, SIGKILLed: the same command resumes it to the state of a straight
    run; its checkpoints hold each rank's data order and RNG, and rank 0 alone logs."""
    straight = fork_ranks(["-c", str(tiny_config_path), "--train", "--no-progress", "--set",
                           f"run_dir={tmp_path / 'straight'}", "--set", "train.total_steps=8"])
    assert straight.returncode == 0, straight.stderr[-2000:]

    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
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
    payload = ckpt.load_checkpoint(ckpt.step_path(run_dir, 8))
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 8)),
                               payload)
    assert len(payload["data_order"]) == len(payload["rng"]) == 2  # one per rank
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [6, 8]  # keep_checkpoints=2
    logged = [json.loads(line)["step"] for line in
              (run_dir / "stats.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]  # rank 0 alone logs, each step once across the kill


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


def test_full_disk_when_a_resumed_run_rewrites_its_log(tiny_config_path, tmp_path, monkeypatch,
                                                       capsys):
    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress"]
    assert main([*args, "--set", "train.total_steps=2"]) == 0
    log = tmp_path / "run" / "stats.jsonl"
    before = log.read_bytes()
    real_write_text = Path.write_text

    def write_text(self, *rest, **kwargs):
        if self.name.startswith(".stats."):  # the temporary file of the new log
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *rest, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: {log}: cannot write the training log (No space "
                                       f"left on device); the previous files are kept\n")
    assert log.read_bytes() == before and latest_step(tmp_path / "run") == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_config_path, signum):
    run_dir = tmp_path / "run"
    process = fork_training(tiny_config_path, "--set", "train.total_steps=100000",
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


# ---- Signals at every stage: the run stops on a whole checkpoint and continues exactly -------

@pytest.fixture
def stray_signals_fail():
    """A SIGINT or SIGTERM that the code under test lets through fails the test instead of
    ending pytest."""
    def stray(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the test process")
    previous = {signum: signal.signal(signum, stray) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class StandinScorer:
    """Just what reference_statistics asks of an Inception engine, with 8-d features."""
    name, weights_sha256, fid_layer = "standin", "0" * 64, "pool"

    def image_features(self, images, batch_size, progress=False):
        return {"pool": torch.randn(len(images), 8, generator=torch.Generator().manual_seed(0))}


def signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("moment", ["computing", "writing the cache"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_reference_statistics(tiny_config_path, tmp_path, monkeypatch,
                                                capsys, stray_signals_fail, signum, moment):
    """The first evaluation computes the reference statistics: a signal then drops the
    evaluation at once, saves the step and exits 0; the cache holds no temporary file."""
    from eagan.eval.reference import reference_statistics

    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}"])
    train(straight, show_progress=False)
    cache = tmp_path / "cache"

    def make_evaluator(config, device, show_progress=True):
        def evaluate(generator, step, rank=0, world_size=1):
            mu, _ = reference_statistics(StandinScorer(), torch.zeros(16, 3, 32, 32), "fake",
                                         cache, batch_size=8)
            return evaluation_result(float(mu.sum()) + 50 - step)
        return evaluate

    monkeypatch.setattr("eagan.eval.runs.make_training_evaluator", make_evaluator)
    with monkeypatch.context() as patches:
        if moment == "computing":
            features = StandinScorer.image_features
            patches.setattr(StandinScorer, "image_features", lambda *args, **kwargs: (
                signal_self(signum), features(*args, **kwargs))[1])
        else:
            real_savez = np.savez

            def savez(file, **arrays):
                file.write(b"the first bytes")
                signal_self(signum)
                real_savez(file, **arrays)
            patches.setattr(np, "savez", savez)
        args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress",
                "--set", "eval.every=2", "--set", "train.checkpoint_every=4"]
        assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert "step 2: evaluation dropped on a signal" in out and "stopped at step 2 on a" in out
    assert latest_step(run_dir) == 2 and not (run_dir / "best.pt").exists()
    assert [path for path in cache.rglob("*") if path.is_file()] == []
    assert not list(run_dir.glob(".*.tmp"))

    assert main(args) == 0  # the same command: step 4 is evaluated, step 2 is not again
    assert ckpt.load_checkpoint(run_dir / "best.pt")["step"] == 4
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 4)))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_checkpoint_write(tiny_config_path, tmp_path, monkeypatch,
                                          stray_signals_fail, capsys, signum):
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}"])
    train(straight, show_progress=False)
    real_save = torch.save

    def save_then_signal(payload, path, *args, **kwargs):
        real_save(payload, path, *args, **kwargs)
        if payload["step"] == 2:  # its digest and the rename still to come
            signal_self(signum)

    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress"]
    with monkeypatch.context() as patches:
        patches.setattr(torch, "save", save_then_signal)
        assert main(args) == 0
    assert "stopped at step 2 on a signal" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert latest_step(run_dir) == 2 and not list(run_dir.glob(".*.tmp"))
    assert ckpt.load_checkpoint(ckpt.step_path(run_dir, 2))["step"] == 2
    assert main(args) == 0
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 4)))


def test_sigterm_during_an_evaluation_stops_at_once(tmp_path, tiny_config_path):
    started = tmp_path / "evaluating"

    def slow_evaluation():
        """An evaluation that would take a minute; it says when it starts."""
        def make_evaluator(config, device, show_progress=True):
            def evaluate(generator, step, rank=0, world_size=1):
                started.write_text(str(step))
                time.sleep(60)
                return {"fid": 1.0}
            return evaluate
        eagan.eval.runs.make_training_evaluator = make_evaluator

    process = fork_training(tiny_config_path, "--resume", "--set", "eval.every=3",
                            prepare=slow_evaluation)
    assert wait_for(started.is_file, process)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    assert time.monotonic() - signalled < 10  # not the minute the evaluation would take
    assert "step 3: evaluation dropped on a signal" in out and "stopped at step 3 on a" in out
    run_dir = tmp_path / "run"
    assert [step for step, _ in ckpt.step_checkpoints(run_dir)] == [2, 3]
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "best.pt").exists()


def test_sigterm_during_an_atomic_write_removes_the_temporary_file(tmp_path):
    """Outside training (--eval writing its cache or JSON, --sample) SIGTERM's default action
    would end the process mid-write; while a temporary file exists it interrupts instead."""
    script = ("import os, signal, sys, time\n"
              "from eagan.files import atomic_output\n"
              "try:\n"
              "    with atomic_output(sys.argv[1]) as tmp_path:\n"
              "        tmp_path.write_bytes(b'the first bytes')\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(30)\n"
              "except KeyboardInterrupt:\n"
              "    print('interrupted', signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "stats.npz")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "interrupted True\n"), done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
