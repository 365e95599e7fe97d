"""The run folder before training: one run per folder, resume only into the same run (the
recorded config.yaml or the checkpoint's config must match outside RESUMABLE_KEYS)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from eagan.config import Config, config_differences, to_dict
from eagan.errors import UserError
from eagan.files import ensure_writable_dir, remove_stale_temporaries
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import DistContext, barrier

# Keys a resumed run may change: how long to train, how often to log, where the data is, how
# long ranks wait for each other, and evaluation.
RESUMABLE_KEYS = ("train.total_steps", "train.log_every", "train.sample_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.device",
                  "train.collective_timeout_s", "data.root", "data.num_workers", "run_dir",
                  "eval.")



def prepare_run_dir(run_dir: Path, config: Config, resume: bool,
                     context: DistContext) -> Path | None:
    """Check the run folder and return the checkpoint to resume from, if any.

    A folder holding another run is refused rather than mixed; a folder holding this run needs
    --resume. With --resume, a folder without a checkpoint (a run killed before its first one,
    or none yet) starts from step 0, so that one command both starts and continues a run; its
    config.yaml, if any, must match as a checkpoint's would. Nothing is written here:
    config.yaml follows once the data and networks have been checked, so a failed start leaves
    no run behind.
    """
    if context.is_main:
        ensure_writable_dir(run_dir, "the run folder")
        remove_stale_temporaries(run_dir)
    barrier(context)
    latest = ckpt.latest_checkpoint(run_dir)
    recorded = run_dir / "config.yaml"
    holds_run = latest is not None or recorded.exists()
    if resume and latest is None and recorded.exists():
        check_resumable(read_recorded_config(recorded), to_dict(config), recorded)
    barrier(context)  # every rank has looked before rank 0 writes config.yaml
    if not resume and holds_run:
        raise UserError(f"{run_dir}: the run folder already holds a run; pass --resume to "
                        f"continue it or choose another run_dir")
    if resume and latest is None and context.is_main:
        tqdm.write(f"no checkpoint in {run_dir}: starting from step 0")
    return latest


def read_recorded_config(path: Path) -> dict[str, Any]:
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: not a readable run config; move the run folder aside or "
                        f"choose another run_dir")
    return recorded


def check_resumable(stored: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    differences = [line for line in config_differences(stored, current)
                   if not line.startswith(RESUMABLE_KEYS)]
    if differences:
        raise UserError(f"{path}: cannot resume, the config differs from the checkpoint's: "
                        + "; ".join(differences))


