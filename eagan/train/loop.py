"""The training loop: the SAGAN recipe (hinge loss, n_dis D updates per G update, Adam) with
exact resume, periodic logging, sample grids, evaluation and checkpoints.

``train`` reads top to bottom as stages: processes and run folder, data, networks, optimizers,
resume, then the loop (D updates, G update, EMA, maintenance).
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from eagan.config import Config, to_dict
from eagan.data import (DeviceBatchSource, ImageFiles, ImageSet, LoaderBatchSource,
                        find_image_files, load_images, make_batch_source)
from eagan.errors import UserError
from eagan.eval.protocols import PROTOCOLS
from eagan.files import atomic_output
from eagan.nets.models import count_parameters
from eagan.sampling import class_grid_labels, grid_image
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import DistContext, process_group
from eagan.train.maintenance import GRID_PER_ROW, Evaluator, Maintenance
from eagan.train.run_dir import check_resumable, prepare_run_dir
from eagan.train.run_lock import hold_run_dir
from eagan.train.signals import StopRequest
from eagan.train.steps import (LatentSampler, build_gan, resolve_precision, train_iteration,
                               update_ema)
from eagan.train.tracking import Tracker


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_score: float | None = None  # the lowest of the protocol's primary distance
    interrupted: bool = False  # a signal stopped it: the command stops too (--seeds)


def train(config: Config, resume: bool = False, show_progress: bool = True,
          make_evaluator: Callable[[torch.device], Evaluator] | None = None,
          context: DistContext | None = None) -> TrainResult:
    """Train G and D as ``config`` says, in ``config.run_dir``; ``resume`` continues the run
    there from its latest checkpoint. When ``config.eval.every`` is set, ``make_evaluator`` is
    called once with this process's device, once the process group is up, and the evaluator
    it returns runs every ``config.eval.every`` steps. ``context`` is the process group of a
    command that trains several runs (``--seeds``); without it, train joins its own.

    The run folder is held for the whole call (a second training process is refused, see
    run_lock). SIGINT and SIGTERM end the call cleanly: before the first step at once, later
    with a checkpoint of the current step (see signals)."""
    # ---- Processes, run folder, device, evaluator -------------------------------------------
    if context is None:
        with process_group(config.train.device, config.train.collective_timeout_s) \
                as own_context:
            return train(config, resume, show_progress, make_evaluator, own_context)
    with StopRequest() as stop, hold_run_dir(Path(config.run_dir), context):
        evaluate = None
        if make_evaluator is not None and config.eval.every:
            evaluate = make_evaluator(context.device)
        return _train(config, context, resume, show_progress, evaluate, stop)


def _train(config: Config, context: DistContext, resume: bool, show_progress: bool,
           evaluate: Evaluator | None, stop: StopRequest) -> TrainResult:
    tc = config.train
    device = context.device
    if tc.batch_size % context.world_size:
        raise UserError(f"train.batch_size: {tc.batch_size} is not divisible by the "
                        f"{context.world_size} processes")
    run_dir = Path(config.run_dir)
    resume_from = prepare_run_dir(run_dir, config, resume, context)
    payload = None
    if resume_from is not None:  # before the data: a damaged checkpoint fails in seconds
        payload = ckpt.load_checkpoint(resume_from, map_location=device)
        check_resumable(payload["config"], to_dict(config), resume_from)
    # The same seed on every rank: identical initial networks; per-rank randomness comes from
    # the data and latent samplers, which slice one global draw.
    _seed_everything(tc.seed)

    # ---- Data ---------------------------------------------------------------------------------
    per_rank_batch = tc.batch_size // context.world_size
    dataset, batches = open_training_data(config, per_rank_batch, context)
    num_classes = dataset.num_classes if config.model.conditional else 0

    # ---- Networks, optimizers, latents -------------------------------------------------------
    gan, options, generator_ema = build_gan(config, num_classes, context)
    latents = LatentSampler(config.model.z_dim, num_classes, per_rank_batch, context,
                            seed=tc.seed + 1)
    grid_labels, fixed_z = grid_latents(config, num_classes, device)

    # ---- Resume -------------------------------------------------------------------------------
    # Everything a checkpoint restores besides the per-rank data order and RNGs.
    state = ckpt.TrainingState(
        generator=gan.generator, discriminator=gan.discriminator, generator_ema=generator_ema,
        optimizer_g=gan.opt_g, optimizer_d=gan.opt_d, scaler_g=gan.scaler_g,
        scaler_d=gan.scaler_d, latents=latents, data_order=batches)
    # best.pt follows the lowest value of the protocol's primary distance (FID, or FD).
    best_metric = PROTOCOLS[config.eval.protocol].primary
    start_step, best_score = 0, None
    if payload is not None:
        ckpt.restore_training_state(payload, resume_from, state, context)
        fixed_z = payload["fixed_z"].to(device)
        start_step = payload["step"]
        best_score = ckpt.best_score(payload, best_metric)
    if context.is_main and resume_from is None:
        with atomic_output(run_dir / "config.yaml") as tmp_path:
            tmp_path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    # ---- Logging ------------------------------------------------------------------------------
    with contextlib.ExitStack() as cleanup:
        tracker = cleanup.enter_context(Tracker(run_dir, truncate_after=start_step)) \
            if context.is_main else None
        if tracker is not None and start_step == 0:
            _log_real_grid(tracker, batches, per_rank_batch)
        if context.is_main and show_progress:
            _print_banner(config, context, dataset, gan.generator, gan.discriminator, run_dir,
                          start_step)
        progress = tqdm(total=tc.total_steps, initial=start_step, disable=not (
            show_progress and context.is_main), dynamic_ncols=True, desc="train")
        cleanup.callback(progress.close)
        maintenance = Maintenance(
            config=config, context=context, run_dir=run_dir, gan=gan,
            generator_ema=generator_ema, tracker=tracker, progress=progress, evaluate=evaluate,
            best_metric=best_metric, best_score=best_score, fixed_z=fixed_z,
            grid_labels=grid_labels, state=state, num_classes=num_classes,
            class_names=list(dataset.class_names), tick_step=start_step, stop=stop)

        # ---- The loop -------------------------------------------------------------------------
        stop.defer()  # from here a signal ends the run at the end of a step, with a checkpoint
        step = start_step
        while step < tc.total_steps:
            # -- n_dis discriminator updates, then one generator update.
            d_bad, loss_g = train_iteration(gan, options, batches, latents,
                                            maintenance.loss_means, tc.n_dis, step)
            step += 1

            # -- Non-finite losses: stop (the default) before anything is saved.
            if tc.nonfinite == "stop":
                check_finite(step, d_bad, loss_g, run_dir)

            # -- EMA of the generator's weights.
            if generator_ema is not None:
                decay = tc.ema_decay if step > tc.ema_start_step else 0.0
                update_ema(generator_ema, gan.generator, decay)
            progress.update(1)

            # -- Maintenance: logs, grids, evaluation, checkpoints.
            if maintenance.after_step(step):
                break

    best_score = maintenance.best_score
    if context.is_main:
        why = " on a signal" if stop.requested else ""
        best = f"best {best_metric} {best_score:.3f}, " if best_score is not None else ""
        tqdm.write(f"stopped at step {step}{why}: {best}checkpoints, logs and grids in {run_dir}")
    return TrainResult(run_dir=run_dir, step=step, best_score=best_score,
                       interrupted=stop.requested)


def grid_latents(config: Config, num_classes: int, device: torch.device
                  ) -> tuple[Tensor | None, Tensor]:
    """Labels and fixed latents of the sample grids: the same images to watch from the first
    step on (a resumed run takes the checkpoint's latents)."""
    grid_labels = class_grid_labels(num_classes, GRID_PER_ROW, device)
    grid_count = GRID_PER_ROW * (GRID_PER_ROW if grid_labels is None else
                                 len(grid_labels) // GRID_PER_ROW)
    fixed_z = torch.randn(grid_count, config.model.z_dim, generator=torch.Generator()
                          .manual_seed(config.train.seed + 2)).to(device)
    return grid_labels, fixed_z


def _log_real_grid(tracker: Tracker, batches: DeviceBatchSource | LoaderBatchSource,
                   per_rank_batch: int) -> None:
    """Real batches as training will see them; the data order is rewound afterwards."""
    order_at_start = copy.deepcopy(batches.state_dict())
    real_grid = torch.cat([batches.next()[0] for _ in range(
        -(-GRID_PER_ROW ** 2 // per_rank_batch))])[:GRID_PER_ROW ** 2]
    batches.load_state_dict(order_at_start)
    tracker.image("Samples/real", 0, grid_image(real_grid, GRID_PER_ROW))


def check_finite(step: int, d_bad: Tensor, loss_g: Tensor, run_dir: Path) -> None:
    """Raise NonFiniteLoss naming the step and the loss (one device sync per step)."""
    bad = torch.stack([d_bad, ~torch.isfinite(loss_g)]).tolist()
    if any(bad):
        which = "discriminator" if bad[0] else "generator"
        raise NonFiniteLoss(f"step {step}: the {which} loss is not finite; stopped, the last "
                            f"good checkpoint is kept in {run_dir}")


def open_training_data(config: Config, per_rank_batch: int, context: DistContext
                        ) -> tuple[ImageSet | ImageFiles, DeviceBatchSource | LoaderBatchSource]:
    """The training split and its endless batches: held whole on the device when it fits
    (data.in_memory, and always for the array datasets), else decoded by DataLoader workers."""
    data = config.data
    common = dict(batch_size=per_rank_batch, seed=config.train.seed, device=context.device,
                  hflip=data.hflip, rank=context.rank, world_size=context.world_size)
    if data.in_memory or data.dataset in ("cifar10", "digits"):
        images = load_images(data.dataset, data.root, "train", data.image_size,
                             download=data.download, resize=data.resize)
        return images, make_batch_source(images, **common)
    files = find_image_files(data.dataset, data.root, "train")
    return files, LoaderBatchSource(files, data.image_size, num_workers=data.num_workers,
                                    resize=data.resize, **common)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _print_banner(config: Config, context: DistContext, dataset: ImageSet | ImageFiles,
                  generator: nn.Module,
                  discriminator: nn.Module, run_dir: Path, start_step: int) -> None:
    lines = [
        f"device        {context.device} x {context.world_size} process(es)",
        f"dataset       {config.data.dataset} ({len(dataset.labels)} images, "
        f"{dataset.num_classes} classes) from {dataset.source}",
        f"networks      G {count_parameters(generator) / 1e6:.2f} M, "
        f"D {count_parameters(discriminator) / 1e6:.2f} M parameters, "
        f"attention {config.model.attention}",
        f"precision     {resolve_precision(config.train.precision, context.device)}"
        f"{', channels_last' if config.train.channels_last else ''}"
        f"{', compiled' if config.train.compile else ''}",
        f"run folder    {run_dir}" + (f" (resuming at step {start_step})" if start_step else ""),
    ]
    tqdm.write("\n".join(lines))
