"""One config trained with several seeds: a run folder per seed under the config's
(``runs/cifar10_eagan/seed0``, ...), trained one after another.

Each seed's folder is an ordinary run folder, resumed exactly as a single run is; running the
same command again skips the seeds that reached ``train.total_steps``, resumes those that hold a
checkpoint, and starts the others from step 0.
"""
from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from eagan.config import Config, config_differences, to_dict
from eagan.errors import UserError
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import DistContext, barrier, broadcast_object
from eagan.train.loop import TrainResult
from eagan.train.run_lock import hold_run_dir

# What a run writes before its first checkpoint; removed when such a run starts again.
BEFORE_FIRST_CHECKPOINT = ("config.yaml", "stats.jsonl", "tensorboard", ckpt.BEST_NAME)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; distinct integers >= 0, in the order given."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct comma-separated integers >= 0 such as "
                        f"0,1,2, got {text!r}")
    return seeds


def seed_run_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / f"seed{seed}"


def seed_config(config: Config, seed: int) -> Config:
    """``config`` with ``train.seed`` = seed and its run folder's ``seed<seed>`` sub-folder."""
    seeded = copy.deepcopy(config)
    seeded.train.seed = seed
    seeded.run_dir = str(seed_run_dir(config.run_dir, seed))
    return seeded


def seed_run_state(config: Config, resumable_keys: tuple[str, ...]) -> str:
    """'finished', 'resume' or 'start' for a seed's run folder. A folder recorded with another
    config (outside ``resumable_keys``) is refused; one whose run was stopped before its first
    checkpoint is emptied of what that run wrote, so that it starts again from step 0."""
    run_dir = Path(config.run_dir)
    recorded = run_dir / "config.yaml"
    if recorded.is_file():
        try:
            stored = yaml.safe_load(recorded.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{recorded}: cannot read the recorded config ({error})") from None
        differences = [line for line in config_differences(stored or {}, to_dict(config))
                       if not line.startswith(resumable_keys)]
        if differences:
            raise UserError(f"{run_dir}: holds a run of another config ("
                            + "; ".join(differences) + "); choose another run_dir")
    checkpoints = ckpt.step_checkpoints(run_dir)
    if checkpoints:
        return "finished" if checkpoints[-1][0] >= config.train.total_steps else "resume"
    for name in BEFORE_FIRST_CHECKPOINT:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return "start"


def agreed_run_state(config: Config, resumable_keys: tuple[str, ...],
                     context: DistContext) -> str:
    """seed_run_state decided by rank 0 alone, once every rank has left the previous run, and
    sent to the others: no rank reads a file that rank 0 is removing or still writing. A
    refused folder is a UserError on every rank."""
    barrier(context)
    verdict: str | UserError | None = None  # filled in by rank 0
    if context.is_main:
        try:
            verdict = seed_run_state(config, resumable_keys)
        except UserError as error:
            verdict = error
    verdict = broadcast_object(context, verdict)
    if isinstance(verdict, UserError):
        raise verdict
    return verdict


def _silent(line: str) -> None:
    """What a rank other than 0 reports: nothing."""


def train_seeds(config: Config, seeds: list[int],
                train_one: Callable[[Config, bool], TrainResult],
                resumable_keys: tuple[str, ...], context: DistContext,
                report: Callable[[str], None] = print) -> None:
    """Train ``config`` once per seed, one after another: ``train_one(seed_config, resume)``
    for each seed that has not finished, holding its folder (run_lock) from the look at it to
    the end of its run. Under torchrun every process walks the seeds in the one process group
    ``context``; rank 0 alone reads, cleans and reports the folders. A run stopped by a signal
    stops the command: the same command continues it."""
    report = report if context.is_main else _silent  # rank 0 speaks for all
    for seed in seeds:
        seeded = seed_config(config, seed)
        with hold_run_dir(Path(seeded.run_dir), context):
            state = agreed_run_state(seeded, resumable_keys, context)
            if state == "finished":
                report(f"seed {seed}: finished ({seeded.run_dir}), skipped")
                continue
            report(f"seed {seed}: {'resuming' if state == 'resume' else 'training'} in "
                   f"{seeded.run_dir}")
            if train_one(seeded, state == "resume").interrupted:
                return
