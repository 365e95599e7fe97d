"""Training on shared machines and clusters: one training process per run folder, a failure on
one torchrun rank ends the job, and a full disk at any write stops cleanly and resumes exactly."""
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.event_pb2 import Event

from eagan.cli import main
from eagan.config import load_config
from eagan.train import checkpoint as ckpt
from eagan.train.loop import train
from eagan.train.distributed import DistContext
from eagan.train.run_lock import LOCK_NAME, hold_run_dir
from tests.helpers import assert_same_training_state, evaluation_result
from tests.launch import FORK, free_port
from tests.train.test_distributed import train_on_two_ranks
from tests.train.test_faults import REPO, fork_training, latest_step, wait_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def refusal(run_dir: Path, pid: int) -> str:
    return (f"error: {run_dir}: another training process uses this run folder (pid {pid} on "
            f"{socket.gethostname()}); wait for it to end or stop it, or choose another "
            f"run_dir\n")


def file_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones too) with a hash of its bytes and its mtime."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(),
                                            path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def hold_folder(run_dir: Path, report: Connection) -> None:
    with hold_run_dir(run_dir, DistContext(0, 1, torch.device("cpu"))):
        worker = os.fork()  # as a DataLoader worker is
        if worker == 0:
            time.sleep(300)
            os._exit(0)
        report.send(worker)
        time.sleep(300)


@contextlib.contextmanager
def folder_held(run_dir: Path) -> Iterator[multiprocessing.Process]:
    """Another process holding ``run_dir`` as a training command does, with a forked worker;
    both SIGKILLed at the end, so that neither releases the lock itself."""
    receive, send = FORK.Pipe(duplex=False)
    holder = FORK.Process(target=hold_folder, args=(run_dir, send))
    holder.start()
    worker = None
    try:
        assert receive.poll(60), "the holder did not take the folder"
        worker = receive.recv()
        yield holder
    finally:
        holder.kill()
        holder.join()  # on the pid: a timeout would wait for the worker too
        if worker is not None:
            os.kill(worker, signal.SIGKILL)


# ---- One training process per run folder ----------------------------------------------------

def test_a_second_training_command_is_refused_and_touches_nothing(tiny_config_path, tmp_path,
                                                                  capsys):
    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress"]
    run_dir = tmp_path / "run"
    assert main([*args, "--set", "train.total_steps=2"]) == 0
    assert not (run_dir / LOCK_NAME).exists()  # released and removed
    capsys.readouterr()
    with folder_held(run_dir) as holder:
        before = file_state(run_dir)
        assert main(args) == 2
        assert capsys.readouterr().err == refusal(run_dir, holder.pid)
        assert file_state(run_dir) == before
        # The holder dies without releasing (SIGKILL), its worker lives on: the folder is free.
        holder.kill()
        holder.join()
        assert main(args) == 0
    assert latest_step(run_dir) == 4 and not (run_dir / LOCK_NAME).exists()


def test_two_training_commands_on_one_folder_the_second_is_refused(tiny_config_path, tmp_path):
    run_dir = tmp_path / "run"
    command = ["--resume", "--set", "train.total_steps=100000",
               "--set", "train.checkpoint_every=100000"]
    first = fork_training(tiny_config_path, *command)
    lock = run_dir / LOCK_NAME
    assert wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"pid {first.pid} "),
                    first)
    second = fork_training(tiny_config_path, *command)
    err = second.communicate(timeout=120)[1]
    assert (second.returncode, err) == (2, refusal(run_dir, first.pid))
    assert first.poll() is None  # the first one trains on
    log = run_dir / "stats.jsonl"
    assert wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 1, first)
    first.send_signal(signal.SIGINT)  # once it trains: stopping saves a checkpoint
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err[-2000:]
    (step, path), = ckpt.step_checkpoints(run_dir)
    assert f"stopped at step {step} on a signal" in out
    assert ckpt.load_checkpoint(path)["step"] == step and not lock.exists()


def test_two_ranks_on_a_held_folder_both_stop(tiny_config_path, tmp_path):
    run_dir = tmp_path / "run"
    with folder_held(run_dir) as holder:
        before = file_state(run_dir)
        done = train_on_two_ranks(tiny_config_path, "--resume")
        assert done.returncode != 0
        # Rank 0 was refused and told rank 1, which stopped too rather than wait.
        assert done.stderr.count(refusal(run_dir, holder.pid)) == 2
        assert file_state(run_dir) == before


def test_seeds_hold_each_seed_folder(tiny_config_path, tmp_path, capsys):
    seed1 = tmp_path / "run" / "seed1"
    with folder_held(seed1) as holder:
        assert main(["-c", str(tiny_config_path), "--train", "--seeds", "0,1", "--no-progress",
                     "--set", "train.total_steps=2"]) == 2
    captured = capsys.readouterr()
    assert "seed 0: training in" in captured.out and "seed 1" not in captured.out
    assert latest_step(tmp_path / "run" / "seed0") == 2
    assert captured.err == refusal(seed1, holder.pid)


def test_sample_never_picks_up_a_checkpoint_being_written(tiny_config_path, tmp_path,
                                                          monkeypatch, capsys):
    """--ckpt RUN_DIR takes renamed checkpoints only: neither a temporary file a killed writer
    left behind nor one being written now."""
    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress"]
    run_dir = tmp_path / "run"
    assert main([*args, "--set", "train.total_steps=2"]) == 0
    (run_dir / ".ckpt-0000009.k1l2m3.pt.tmp").write_bytes(b"half of a checkpoint")
    (run_dir / ".best.x8y9z0.pt.tmp").write_bytes(b"half of a best.pt")
    sample = ["--sample", "--ckpt", str(run_dir), "--num-samples", "4", "--no-progress",
              "--out", str(tmp_path / "samples")]
    assert ckpt.resolve_checkpoint_arg(run_dir) == ckpt.step_path(run_dir, 2)
    assert main(sample) == 0 and (tmp_path / "samples" / "run-step2-grid.png").is_file()

    seen = []
    real_save = torch.save

    def save_then_look(payload, path, *rest, **kwargs):
        real_save(payload, path, *rest, **kwargs)
        if payload.get("step") == 4:  # the file is there, its digest and rename still to come
            seen.append((ckpt.resolve_checkpoint_arg(run_dir), main(sample)))
    monkeypatch.setattr(torch, "save", save_then_look)
    assert main(args) == 0
    assert seen == [(ckpt.step_path(run_dir, 2), 0)]
    assert "run-step2-grid.png" in capsys.readouterr().out
    assert latest_step(run_dir) == 4 and not list(run_dir.glob(".*.tmp"))


# ---- A failure on one torchrun rank ends the job ---------------------------------------------

TIMEOUT_S = 10
# Rank 1's evaluation runs out of memory at step 3; rank 0's waits for it in a collective, as
# the real evaluation gathers features. Each rank writes the code main returned.
FAILING_RANK = """
import os, sys, time
import torch
import eagan.eval.runs
from eagan.cli import main
from eagan.train.distributed import DistContext, gather_to_main

out = sys.argv[1]

def make_evaluator(config, device, show_progress=True):
    def evaluate(generator, step, rank=0, world_size=1):
        if rank == 1:
            with open(os.path.join(out, "failed_at"), "w") as file:
                file.write(repr(time.time()))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        gather_to_main(DistContext(rank, world_size, device), "features")
        return {"fid": 1.0}
    return evaluate

eagan.eval.runs.make_training_evaluator = make_evaluator
code = main(sys.argv[2:])
with open(os.path.join(out, f"exit-{os.environ['RANK']}"), "w") as file:
    file.write(str(code))
sys.exit(code)
"""


def torchrun_command(entry: list[str], config: Path, *args: str) -> list[str]:
    """A 2-process torchrun of ``entry``: run.py, or a script that calls eagan.cli.main."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", *entry, "-c", str(config), "--train",
            "--no-progress", *args]


@pytest.mark.slow
def test_torchrun_rank_failing_alone_ends_the_job_then_resume_is_exact(tiny_config_path,
                                                                        tmp_path):
    steps = ("--set", "train.total_steps=4", "--set", f"train.collective_timeout_s={TIMEOUT_S}")
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    run_dir = tmp_path / "run"
    failed = subprocess.run(torchrun_command([str(script), str(tmp_path)], tiny_config_path,
                                             *steps, "--resume", "--set", "eval.every=3"),
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ended_at = time.time()
    assert failed.returncode != 0
    assert ended_at - float((tmp_path / "failed_at").read_text()) < TIMEOUT_S
    assert [(tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)] == ["2", "2"]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    cause = ("step 3: evaluation failed (CUDA out of memory. Tried to allocate 2.00 GiB); the "
             "last checkpoint is kept: fix the cause and run the same command with --resume")
    assert sorted(errors) == [f"error: {cause}",  # rank 1's own
                              f"error: the job stopped because rank 1 failed: {cause}"]
    assert latest_step(run_dir) == 2 and not list(run_dir.glob(".*.tmp"))

    straight = train_on_two_ranks(tiny_config_path, *steps, "--set",
                                  f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = train_on_two_ranks(tiny_config_path, *steps, "--resume", "--set", "eval.every=0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 4)))


# ---- A full disk at any write ----------------------------------------------------------------

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


LOGGED_EVERY_STEP = ["train.log_every=1", "train.checkpoint_every=2"]


class FullDiskPartWay:
    """A file whose disk fills halfway through the first write that ``fills`` picks."""

    def __init__(self, handle, fills) -> None:
        self.handle, self.fills = handle, fills

    def write(self, data):
        if self.fills(data):
            self.handle.write(data[:len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def fill_disk_in(monkeypatch, file_name: str, fills) -> None:
    def open_file(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return FullDiskPartWay(handle, fills) if file_name in Path(path).name else handle
    monkeypatch.setattr("eagan.train.tracking.open", open_file, raising=False)


def fill_disk_in_stats_jsonl(monkeypatch) -> None:
    """Halfway through the line of step 3."""
    fill_disk_in(monkeypatch, "stats.jsonl", lambda line: json.loads(line)["step"] == 3)


def fill_disk_in_tensorboard(monkeypatch) -> None:
    """Halfway through the first summary of step 3."""
    def fills(record: bytes) -> bool:
        event = Event.FromString(record[12:-4])  # after the length and its CRC, before a CRC
        return event.step == 3 and event.HasField("summary")
    fill_disk_in(monkeypatch, "events.out.tfevents.", fills)


@pytest.mark.parametrize("fill_disk, failing", [
    (fill_disk_in_stats_jsonl, "stats.jsonl: cannot write the training log"),
    (fill_disk_in_tensorboard, "events.out.tfevents."),
], ids=["stats.jsonl", "tensorboard"])
def test_full_disk_while_logging_stops_cleanly_and_resume_is_exact(
        tiny_config_path, tmp_path, monkeypatch, capsys, fill_disk, failing):
    straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}",
                                              *LOGGED_EVERY_STEP])
    train(straight, show_progress=False)
    args = ["-c", str(tiny_config_path), "--train", "--resume", "--no-progress",
            *[item for key in LOGGED_EVERY_STEP for item in ("--set", key)]]
    run_dir = tmp_path / "run"

    fill_disk(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}/") and err.count("\n") == 1 and failing in err
    assert err.endswith("(No space left on device); the last checkpoint is kept: free space, "
                        "then run the same command with --resume\n")
    assert latest_step(run_dir) == 2 and not list(run_dir.glob(".*.tmp"))
    # The report reads a log whose last line was cut short, with a warning.
    cut_short = fill_disk is fill_disk_in_stats_jsonl
    with pytest.warns(UserWarning, match="line 3") if cut_short else contextlib.nullcontext():
        assert main(["--report", str(run_dir), "--out", str(tmp_path / "report")]) == 0

    monkeypatch.undo()  # space freed
    assert main(args) == 0
    err = capsys.readouterr().err
    if cut_short:
        assert err == (f"warning: {run_dir / 'stats.jsonl'}: line 3 is not a whole log line "
                       f"(cut short when the run stopped); dropped\n")
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(run_dir, 4)))
    logged = [json.loads(line)["step"] for line in
              (run_dir / "stats.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("Loss/D/total")] == [1, 2, 3, 4]
