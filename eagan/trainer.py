"""The training loop: the SAGAN recipe (hinge loss, n_dis D updates per G update, Adam) with
exact resume, periodic logging, sample grids, evaluation and checkpoints.

``train`` reads top to bottom as stages: processes and run folder, data, networks, optimizers,
resume, then the loop (D updates, G update, EMA, maintenance).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import random
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from eagan import checkpoint as ckpt
from eagan.augment import DiffAugment
from eagan.config import Config, config_differences, to_dict
from eagan.data import (DeviceBatchSource, ImageFiles, ImageSet, LoaderBatchSource,
                        find_image_files, load_images, make_batch_source)
from eagan.distributed import DistContext, barrier, broadcast_flag, process_group
from eagan.errors import UserError, first_line
from eagan.factory import build_discriminator, build_generator
from eagan.files import atomic_output, ensure_writable_dir, remove_stale_temporaries
from eagan.losses import LOSSES
from eagan.models import attention_gammas, count_parameters
from eagan.protocols import PROTOCOLS
from eagan.sampling import bn_mode, class_grid_labels, grid_image
from eagan.tracking import Tracker
from eagan.visualize import attention_figure

GRID_PER_ROW = 8
# Keys a resumed run may change: how long to train, how often to log, and evaluation.
RESUMABLE_KEYS = ("train.total_steps", "train.log_every", "train.sample_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.device",
                  "data.root", "data.num_workers", "run_dir", "eval.")

# Evaluation results logged as scalars, when the evaluation computed them: the Inception
# protocols' and the digits protocol's.
METRIC_SCALARS = {"fid": "Metrics/fid", "is_mean": "Metrics/is_mean", "is_std": "Metrics/is_std",
                  "kid_mean": "Metrics/kid_mean", "kid_std": "Metrics/kid_std",
                  "precision": "Metrics/precision", "recall": "Metrics/recall",
                  "fd": "Metrics/fd", "class_accuracy": "Metrics/class_accuracy",
                  "min_class_accuracy": "Metrics/min_class_accuracy",
                  "class_spread": "Metrics/class_spread"}


def evaluation_labels(result: dict[str, Any]) -> dict[str, Any]:
    """What makes an evaluation's numbers comparable, for its stats.jsonl line: protocol,
    sample count, reference, BN mode, EMA and the scorer's sha256 (the Inception weights', or
    the digits classifier's digest)."""
    scorer = result["inception"]["weights_sha256"] if "inception" in result \
        else result["classifier"]["digest"]
    return {"Eval/protocol": result["protocol"], "Eval/num_samples": result["num_samples"],
            "Eval/reference": result["reference"]["name"], "Eval/bn_mode": result["bn_mode"],
            "Eval/ema": result["ema"], "Eval/inception_sha256" if "inception" in result
            else "Eval/classifier_sha256": scorer}


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class EvaluationFailed(UserError):
    """Evaluation failed during training; the run saved a checkpoint at that step first."""

    def __init__(self, step: int, error: BaseException, saved: Path) -> None:
        super().__init__(f"step {step}: evaluation failed ({first_line(error)}); the run is "
                         f"saved in {saved}: fix the cause and run the same command with "
                         f"--resume")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_score: float | None = None  # the lowest of the protocol's primary distance


@dataclass
class GANModules:
    """The networks, their optimizers and loss scalers, and the wrappers the steps call:
    ``*_update`` for the forward whose gradients are applied (DDP-wrapped under torchrun,
    compiled on request), ``*_forward`` for forwards that update nothing."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    g_update: nn.Module
    d_update: nn.Module
    g_forward: nn.Module
    d_forward: nn.Module


@dataclass(frozen=True)
class StepOptions:
    d_loss: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
    g_loss: Callable[[Tensor], Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False
    nonfinite: str = "stop"
    # Weight of the auxiliary classifier's cross-entropy; 0: D has no classifier head.
    class_weight: float = 0.0
    # Applied to every image D sees, real and fake, in D and G steps (train.augment).
    augment: Callable[[Tensor], Tensor] = DiffAugment("")

    def layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else images


def discriminator_step(gan: GANModules, options: StepOptions, real: Tensor,
                       real_labels: Tensor | None, z: Tensor, fake_labels: Tensor | None,
                       step: int) -> dict[str, Tensor]:
    """One D update on a real batch and G(z); returns its detached losses by logged name:
    on real, on fake, the total and, with an auxiliary classifier, its loss on real."""
    with options.autocast():
        with torch.no_grad():
            fake = gan.g_forward(z, fake_labels)
        # One D forward over real and fake together: D has no batch norm, and DDP expects a
        # single forward per backward.
        both = options.layout(options.augment(torch.cat([real, fake.to(real.dtype)])))
        both_labels = None if fake_labels is None else torch.cat([real_labels, fake_labels])
        if options.class_weight:
            logits, class_logits = gan.d_update(both, both_labels, classify=True)
        else:
            logits = gan.d_update(both, both_labels)
        loss, loss_real, loss_fake = options.d_loss(*logits.float().split(len(real)))
        losses = {"Loss/D/real": loss_real, "Loss/D/fake": loss_fake}
        if options.class_weight:
            # The classifier learns from real images only: early fakes carry no class yet.
            losses["Loss/D/classifier"] = F.cross_entropy(class_logits[:len(real)].float(),
                                                          real_labels)
            loss = loss + options.class_weight * losses["Loss/D/classifier"]
        losses["Loss/D/total"] = loss
    _apply_update(gan.opt_d, gan.scaler_d, loss, options.nonfinite, step, "discriminator")
    return {name: value.detach() for name, value in losses.items()}


def generator_step(gan: GANModules, options: StepOptions, z: Tensor,
                   fake_labels: Tensor | None, step: int) -> dict[str, Tensor]:
    """One G update against a frozen D; returns its detached losses by logged name: the total
    and, with an auxiliary classifier, the cross-entropy of D's classifier on G(z) against the
    requested labels."""
    gan.discriminator.requires_grad_(False)
    try:
        with options.autocast():
            fake = options.layout(options.augment(gan.g_update(z, fake_labels)))
            losses = {}
            if options.class_weight:
                logits, class_logits = gan.d_forward(fake, fake_labels, classify=True)
                losses["Loss/G/classifier"] = F.cross_entropy(class_logits.float(), fake_labels)
            else:
                logits = gan.d_forward(fake, fake_labels)
            loss = options.g_loss(logits.float())
            if options.class_weight:
                loss = loss + options.class_weight * losses["Loss/G/classifier"]
            losses["Loss/G/total"] = loss
        _apply_update(gan.opt_g, gan.scaler_g, loss, options.nonfinite, step, "generator")
    finally:
        gan.discriminator.requires_grad_(True)
    return {name: value.detach() for name, value in losses.items()}


def train_iteration(gan: GANModules, options: StepOptions,
                    batches: DeviceBatchSource | LoaderBatchSource, latents: LatentSampler,
                    loss_means: LossMeans, n_dis: int, step: int,
                    lap: Callable[[str], object] | None = None) -> tuple[Tensor, Tensor]:
    """Iteration ``step + 1``: ``n_dis`` D updates, each with a fresh real batch, z and labels,
    then one G update with D frozen; every loss is summed into ``loss_means``. Returns whether
    any D loss was not finite and G's total loss, for check_finite (no device sync here).
    ``lap(phase)``, when given, is called as each phase ends: the throughput benchmark's clock."""
    lap = lap or (lambda phase: None)
    d_bad = torch.zeros((), dtype=torch.bool, device=latents.device)
    for _ in range(n_dis):
        real, real_labels = batches.next()
        z, fake_labels = latents.draw()
        lap("data")
        losses_d = discriminator_step(gan, options, real,
                                      real_labels if latents.num_classes else None, z,
                                      fake_labels, step)
        lap("d_step")
        d_bad |= ~torch.isfinite(losses_d["Loss/D/total"])
        loss_means.add(losses_d)
        lap("bookkeeping")
    z, fake_labels = latents.draw()
    lap("data")
    losses_g = generator_step(gan, options, z, fake_labels, step)
    lap("g_step")
    loss_means.add(losses_g)
    return d_bad, losses_g["Loss/G/total"]


class LossMeans:
    """Named losses summed on the device between log ticks (no sync per step); ``pop`` returns
    each name's mean over the updates that reported it, with one sync, and starts afresh. D
    reports n_dis times per step, so its means cover every D update of the tick."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums[name] + value.float() if name in self.sums \
                else value.float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> dict[str, float]:
        names = list(self.sums)
        sums = torch.stack([self.sums[name] for name in names]).tolist() if names else []
        means = {name: total / self.counts[name] for name, total in zip(names, sums)}
        self.sums, self.counts = {}, {}
        return means


class LatentSampler:
    """Fresh z ~ N(0, I) and uniform labels for every D and G update, from a generator of its
    own so the draws resume exactly. Every rank draws the global batch and keeps its slice, so
    R ranks together see what one process with the whole batch would."""

    def __init__(self, z_dim: int, num_classes: int, batch_size: int, context: DistContext,
                 seed: int) -> None:
        self.z_dim, self.num_classes = z_dim, num_classes
        self.global_batch = batch_size * context.world_size
        self.slice = slice(context.rank * batch_size, (context.rank + 1) * batch_size)
        self.device = context.device
        self.rng = torch.Generator(device=context.device).manual_seed(seed)

    def draw(self) -> tuple[Tensor, Tensor | None]:
        z = torch.randn(self.global_batch, self.z_dim, device=self.device, generator=self.rng)
        labels = None
        if self.num_classes:
            labels = torch.randint(self.num_classes, (self.global_batch,), device=self.device,
                                   generator=self.rng)[self.slice]
        return z[self.slice], labels

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.rng.set_state(state["rng"])


# The metrics hook: evaluate(generator, step, rank, world_size), called on every rank, returns
# on rank 0 a dict with at least 'fid' (None elsewhere).
Evaluator = Callable[[nn.Module, int, int, int], dict[str, Any] | None]


def train(config: Config, resume: bool = False, show_progress: bool = True,
          make_evaluator: Callable[[torch.device], Evaluator] | None = None,
          context: DistContext | None = None) -> TrainResult:
    """Train G and D as ``config`` says, in ``config.run_dir``; ``resume`` continues the run
    there from its latest checkpoint. When ``config.eval.every`` is set, ``make_evaluator`` is
    called once with this process's device, once the process group is up, and the evaluator
    it returns runs every ``config.eval.every`` steps. ``context`` is the process group of a
    command that trains several runs (``--seeds``); without it, train joins its own."""
    # ---- Processes, device, evaluator --------------------------------------------------------
    if context is None:
        with process_group(config.train.device) as own_context:
            return train(config, resume, show_progress, make_evaluator, own_context)
    evaluate = None
    if make_evaluator is not None and config.eval.every:
        evaluate = make_evaluator(context.device)
    return _train(config, context, resume, show_progress, evaluate)


def _train(config: Config, context: DistContext, resume: bool, show_progress: bool,
           evaluate: Evaluator | None) -> TrainResult:
    tc = config.train
    device = context.device
    if tc.batch_size % context.world_size:
        raise UserError(f"train.batch_size: {tc.batch_size} is not divisible by the "
                        f"{context.world_size} processes")
    run_dir = Path(config.run_dir)
    resume_from = _prepare_run_dir(run_dir, config, resume, context)
    payload = None
    if resume_from is not None:  # before the data: a damaged checkpoint fails in seconds
        payload = ckpt.load_checkpoint(resume_from, map_location=device)
        _check_resumable(payload["config"], to_dict(config), resume_from)
    # The same seed on every rank: identical initial networks; per-rank randomness comes from
    # the data and latent samplers, which slice one global draw.
    _seed_everything(tc.seed)

    # ---- Data ---------------------------------------------------------------------------------
    per_rank_batch = tc.batch_size // context.world_size
    dataset, batches = open_training_data(config, per_rank_batch, context)
    num_classes = dataset.num_classes if config.model.conditional else 0

    # ---- Networks, optimizers, latents -------------------------------------------------------
    gan, options, generator_ema = build_gan(config, num_classes, context)
    generator, discriminator = gan.generator, gan.discriminator
    evaluated = generator_ema if config.evaluates_ema else generator
    latents = LatentSampler(config.model.z_dim, num_classes, per_rank_batch, context,
                            seed=tc.seed + 1)
    # Fixed latents for the sample grids: the same images to watch from the first step on.
    grid_labels = class_grid_labels(num_classes, GRID_PER_ROW, device)
    grid_count = GRID_PER_ROW * (GRID_PER_ROW if grid_labels is None else
                                 len(grid_labels) // GRID_PER_ROW)
    fixed_z = torch.randn(grid_count, config.model.z_dim,
                          generator=torch.Generator().manual_seed(tc.seed + 2)).to(device)

    # ---- Resume -------------------------------------------------------------------------------
    # Everything a checkpoint restores besides the per-rank data order and RNGs.
    state = ckpt.TrainingState(
        generator=generator, discriminator=discriminator, generator_ema=generator_ema,
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

    # ---- Checkpoints --------------------------------------------------------------------------
    def save(step: int, path: Path) -> None:
        ckpt.save_training_state(path, state, context, step=step, config=to_dict(config),
                                 num_classes=num_classes,
                                 class_names=list(dataset.class_names),
                                 fixed_z=fixed_z.cpu(), best_score=best_score,
                                 best_metric=best_metric)

    # ---- Logging ------------------------------------------------------------------------------
    tracker = Tracker(run_dir, truncate_after=start_step) if context.is_main else None
    if tracker is not None and start_step == 0:
        # Real batches as training will see them; the data order is rewound afterwards.
        order_at_start = copy.deepcopy(batches.state_dict())
        real_grid = torch.cat([batches.next()[0] for _ in range(
            -(-GRID_PER_ROW ** 2 // per_rank_batch))])[:GRID_PER_ROW ** 2]
        batches.load_state_dict(order_at_start)
        tracker.image("Samples/real", 0, grid_image(real_grid, GRID_PER_ROW))
    if context.is_main and show_progress:
        _print_banner(config, context, dataset, generator, discriminator, run_dir, start_step)
    progress = tqdm(total=tc.total_steps, initial=start_step, disable=not (
        show_progress and context.is_main), dynamic_ncols=True, desc="train")

    # ---- The loop -----------------------------------------------------------------------------
    stop_request = _StopRequest()
    loss_means = LossMeans()
    tick_start, tick_step = time.perf_counter(), start_step
    step = start_step
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(stop_request)
        cleanup.callback(progress.close)
        if tracker is not None:
            cleanup.callback(tracker.close)
        while step < tc.total_steps:
            # -- n_dis discriminator updates, then one generator update.
            d_bad, loss_g = train_iteration(gan, options, batches, latents, loss_means,
                                            tc.n_dis, step)
            step += 1

            # -- Non-finite losses: stop (the default) before anything is saved.
            if tc.nonfinite == "stop":
                check_finite(step, d_bad, loss_g, run_dir)

            # -- EMA of the generator's weights.
            if generator_ema is not None:
                decay = tc.ema_decay if step > tc.ema_start_step else 0.0
                update_ema(generator_ema, generator, decay)

            progress.update(1)

            # -- Maintenance: logs, grids, evaluation, checkpoints.
            if step % tc.log_every == 0 or step == tc.total_steps:
                now = time.perf_counter()
                stats = tick_statistics(gan, loss_means.pop(),
                                        (step - tick_step) / max(now - tick_start, 1e-9))
                if tracker is not None:
                    tracker.scalars(step, stats)
                progress.set_postfix(d=f"{stats['Loss/D/total']:.3f}",
                                     g=f"{stats['Loss/G/total']:.3f}")
                tick_start, tick_step = now, step

            if tracker is not None and (step % tc.sample_every == 0 or step == tc.total_steps):
                sampler = generator_ema if generator_ema is not None else generator
                with torch.no_grad(), bn_mode(sampler, "batch"):
                    tracker.image("Samples/fixed_z", step, grid_image(
                        sampler(fixed_z, grid_labels), GRID_PER_ROW))
                _log_attention_maps(tracker, sampler, fixed_z, grid_labels, step)

            if evaluate is not None and config.eval.every and (
                    step % config.eval.every == 0 or step == tc.total_steps):
                improved = False
                try:
                    results = evaluate(evaluated, step, context.rank, context.world_size)
                except Exception as error:
                    # Hours of training must not go with it: keep this step, then stop.
                    save(step, ckpt.step_path(run_dir, step))
                    if isinstance(error, (UserError, torch.OutOfMemoryError, OSError)):
                        raise EvaluationFailed(step, error, ckpt.step_path(run_dir, step)) \
                            from None
                    raise
                if context.is_main:
                    tracker.scalars(step, {**{name: results[key] for key, name in
                                              METRIC_SCALARS.items() if key in results},
                                           "Timing/eval_sec": results["elapsed_s"]},
                                    labels=evaluation_labels(results))
                    improved = best_score is None or results[best_metric] < best_score
                    best_score = results[best_metric] if improved else best_score
                if broadcast_flag(context, improved):
                    save(step, run_dir / ckpt.BEST_NAME)

            stop_now = broadcast_flag(context, stop_request.requested)
            if step % tc.checkpoint_every == 0 or step == tc.total_steps or stop_now:
                save(step, ckpt.step_path(run_dir, step))
                if context.is_main:
                    ckpt.prune(run_dir, tc.keep_checkpoints)
                barrier(context)
            if stop_now:
                break

    if context.is_main:
        why = " on a signal" if stop_request.requested else ""
        best = f"best {best_metric} {best_score:.3f}, " if best_score is not None else ""
        tqdm.write(f"stopped at step {step}{why}: {best}checkpoints, logs and grids in {run_dir}")
    return TrainResult(run_dir=run_dir, step=step, best_score=best_score)


def check_finite(step: int, d_bad: Tensor, loss_g: Tensor, run_dir: Path) -> None:
    """Raise NonFiniteLoss naming the step and the loss (one device sync per step)."""
    bad = torch.stack([d_bad, ~torch.isfinite(loss_g)]).tolist()
    if any(bad):
        which = "discriminator" if bad[0] else "generator"
        raise NonFiniteLoss(f"step {step}: the {which} loss is not finite; stopped, the last "
                            f"good checkpoint is kept in {run_dir}")


def tick_statistics(gan: GANModules, mean_losses: dict[str, float],
                    steps_per_sec: float) -> dict[str, float]:
    """The scalars logged once per tick: the mean losses (LossMeans.pop), learning rates,
    speed, every attention gate and the peak memory (GPU, else the process's resident)."""
    stats = dict(mean_losses)
    stats.update({
        "Progress/lr_g": gan.opt_g.param_groups[0]["lr"],
        "Progress/lr_d": gan.opt_d.param_groups[0]["lr"],
        "Timing/steps_per_sec": steps_per_sec,
    })
    for prefix, network in (("G", gan.generator), ("D", gan.discriminator)):
        stats.update({f"Attention/gamma/{prefix}/{name}": value
                      for name, value in attention_gammas(network).items()})
    device = next(gan.generator.parameters()).device
    if device.type == "cuda":
        stats["Resources/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak resident memory so far (Linux reports KiB)
        stats["Resources/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return stats


def build_gan(config: Config, num_classes: int, context: DistContext
              ) -> tuple[GANModules, StepOptions, nn.Module | None]:
    """G and D on the device with their optimizers, loss scalers, DDP and compile wrappers, the
    step options, and the EMA copy of G (None without EMA), as ``config.train`` asks."""
    tc, device = config.train, context.device
    generator = build_generator(config.model, config.data.image_size, num_classes).to(device)
    discriminator = build_discriminator(config.model, config.data.image_size,
                                        num_classes).to(device)
    if tc.sync_batchnorm and context.enabled:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    if tc.channels_last:
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    generator_ema = None
    if tc.ema_decay > 0:
        generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    adam = dict(eps=tc.adam_eps, betas=(tc.beta1, tc.beta2), fused=tc.fused_adam or None)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr_g, **adam)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d, **adam)
    precision = resolve_precision(tc.precision, device)
    scale_fp16 = precision == "fp16"
    scaler_g = torch.amp.GradScaler(device.type, enabled=scale_fp16)
    scaler_d = torch.amp.GradScaler(device.type, enabled=scale_fp16)

    g_update, d_update = generator, discriminator
    if context.enabled:
        g_update = DistributedDataParallel(generator)
        d_update = DistributedDataParallel(discriminator)
    g_forward, d_forward = generator, discriminator
    if tc.compile:
        compile_ = functools.partial(torch.compile, mode=tc.compile_mode)
        g_forward, d_forward = compile_(generator), compile_(discriminator)
        # Without DDP the update and plain forwards are one module: compile it once.
        g_update = g_forward if g_update is generator else compile_(g_update)
        d_update = d_forward if d_update is discriminator else compile_(d_update)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gan = GANModules(generator=generator, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d,
                     scaler_g=scaler_g, scaler_d=scaler_d, g_update=g_update, d_update=d_update,
                     g_forward=g_forward, d_forward=d_forward)
    d_loss_fn, g_loss_fn = LOSSES[tc.loss]
    options = StepOptions(d_loss=d_loss_fn, g_loss=g_loss_fn,
                          autocast=functools.partial(_autocast, precision, device),
                          channels_last=tc.channels_last, nonfinite=tc.nonfinite,
                          class_weight=tc.aux_loss_weight if config.model.aux_classifier
                          else 0.0, augment=DiffAugment(tc.augment))
    return gan, options, generator_ema


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


def _apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor,
                  nonfinite: str, step: int, name: str) -> None:
    """Backward and optimizer step; with nonfinite='skip' a NaN or inf loss skips the step."""
    optimizer.zero_grad(set_to_none=True)
    if nonfinite == "skip" and not torch.isfinite(loss).item():
        tqdm.write(f"step {step + 1}: the {name} loss is not finite; update skipped")
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes bf16 on a CUDA device with bf16 support and fp32 elsewhere."""
    if precision != "auto":
        return precision
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "fp32"


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _prepare_run_dir(run_dir: Path, config: Config, resume: bool,
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
        _check_resumable(_read_recorded_config(recorded), to_dict(config), recorded)
    barrier(context)  # every rank has looked before rank 0 writes config.yaml
    if not resume and holds_run:
        raise UserError(f"{run_dir}: the run folder already holds a run; pass --resume to "
                        f"continue it or choose another run_dir")
    if resume and latest is None and context.is_main:
        tqdm.write(f"no checkpoint in {run_dir}: starting from step 0")
    return latest


def _read_recorded_config(path: Path) -> dict[str, Any]:
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError):
        recorded = None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: not a readable run config; move the run folder aside or "
                        f"choose another run_dir")
    return recorded


def _check_resumable(stored: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    differences = [line for line in config_differences(stored, current)
                   if not line.startswith(RESUMABLE_KEYS)]
    if differences:
        raise UserError(f"{path}: cannot resume, the config differs from the checkpoint's: "
                        + "; ".join(differences))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopRequest:
    """Turns SIGINT and SIGTERM into a request checked once per step: the loop saves a
    checkpoint and exits cleanly instead of dying mid-write."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _log_attention_maps(tracker: Tracker, generator: nn.Module, z: Tensor,
                        labels: Tensor | None, step: int) -> None:
    figure = attention_figure(generator, z[:GRID_PER_ROW],
                              None if labels is None else labels[:GRID_PER_ROW])
    if figure is not None:
        tracker.image("Attention/generator", step, figure)


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
