"""What the training loop does between steps, each at its own interval: log the mean losses,
the attention gates and the peak memory; draw the sample and attention grids; evaluate and keep
best.pt; write and prune checkpoints."""
from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from torch import Tensor, nn
from tqdm import tqdm

from eagan.config import Config, to_dict
from eagan.errors import UserError, first_line
from eagan.nets.bn_mode import bn_mode
from eagan.nets.models import attention_gammas
from eagan.sampling import grid_image
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import CollectiveFailed, DistContext, broadcast_flag
from eagan.train.signals import Interrupted, StopRequest
from eagan.train.steps import GANModules, LossMeans
from eagan.train.tracking import Tracker
from eagan.visualize import attention_figure

GRID_PER_ROW = 8
# The metrics hook: evaluate(generator, step, rank, world_size), called on every rank, returns
# on rank 0 a dict with at least the protocol's primary distance (None elsewhere).
Evaluator = Callable[[nn.Module, int, int, int], dict[str, Any] | None]
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


class EvaluationFailed(UserError):
    """Evaluation failed during training; a single process saved a checkpoint at that step
    first (``saved``), a torchrun job keeps its last one."""

    def __init__(self, step: int, error: BaseException, saved: Path | None) -> None:
        kept = f"the run is saved in {saved}" if saved else "the last checkpoint is kept"
        super().__init__(f"step {step}: evaluation failed ({first_line(error)}); {kept}: fix "
                         f"the cause and run the same command with --resume")


@dataclass
class Maintenance:
    """What the loop does between steps, at its own intervals: log the mean losses, draw the
    sample and attention grids, evaluate (keeping best.pt), write and prune checkpoints."""

    config: Config
    context: DistContext
    run_dir: Path
    gan: GANModules
    generator_ema: nn.Module | None
    tracker: Tracker | None  # rank 0 only
    progress: tqdm
    evaluate: Evaluator | None
    best_metric: str
    best_score: float | None
    fixed_z: Tensor
    grid_labels: Tensor | None
    state: ckpt.TrainingState
    num_classes: int
    class_names: list[str]
    tick_step: int
    stop: StopRequest
    tick_start: float = field(default_factory=time.perf_counter)
    loss_means: LossMeans = field(default_factory=LossMeans)

    def after_step(self, step: int) -> bool:
        """Everything due after ``step``; True when the run must stop (a signal, as rank 0
        saw it: rank 0 speaks for all), once this step is saved."""
        tc = self.config.train
        last = step == tc.total_steps
        if step % tc.log_every == 0 or last:
            self.log(step)
        if self.tracker is not None and (step % tc.sample_every == 0 or last):
            self.draw_grids(step)
        if self.evaluate is not None and self.config.eval.every and (
                step % self.config.eval.every == 0 or last):
            self.evaluation(step)
        stop_now = broadcast_flag(self.context, self.stop.requested)
        if step % tc.checkpoint_every == 0 or last or stop_now:
            self.save(step, ckpt.step_path(self.run_dir, step))
            if self.context.is_main:
                ckpt.prune(self.run_dir, tc.keep_checkpoints)
            # Also the barrier after the write: a signal that came during it stops the run
            # here, on this step's checkpoint.
            stop_now = broadcast_flag(self.context, self.stop.requested)
        return stop_now

    def log(self, step: int) -> None:
        now = time.perf_counter()
        stats = tick_statistics(self.gan, self.loss_means.pop(),
                                (step - self.tick_step) / max(now - self.tick_start, 1e-9))
        if self.tracker is not None:
            self.tracker.scalars(step, stats)
        self.progress.set_postfix(d=f"{stats['Loss/D/total']:.3f}",
                                  g=f"{stats['Loss/G/total']:.3f}")
        self.tick_start, self.tick_step = now, step

    def draw_grids(self, step: int) -> None:
        sampler = self.generator_ema if self.generator_ema is not None else self.gan.generator
        with torch.no_grad(), bn_mode(sampler, "batch"):
            self.tracker.image("Samples/fixed_z", step, grid_image(
                sampler(self.fixed_z, self.grid_labels), GRID_PER_ROW))
        log_attention_maps(self.tracker, sampler, self.fixed_z, self.grid_labels, step)

    def evaluation(self, step: int) -> None:
        evaluated = self.generator_ema if self.config.evaluates_ema else self.gan.generator
        improved = False
        # In a single process a signal drops the evaluation at once (the step is saved next);
        # under torchrun every rank must finish it, or their collectives would part ways.
        interruptible = self.stop.interruptible() if not self.context.enabled \
            else contextlib.nullcontext()
        try:
            with interruptible:
                results = self.evaluate(evaluated, step, self.context.rank,
                                        self.context.world_size)
        except Interrupted:
            tqdm.write(f"step {step}: evaluation dropped on a signal (not repeated on --resume)")
            return
        except Exception as error:
            self._evaluation_failed(step, error)
        if self.context.is_main:
            self.tracker.scalars(step, {**{name: results[key] for key, name in
                                           METRIC_SCALARS.items() if key in results},
                                        "Timing/eval_sec": results["elapsed_s"]},
                                 labels=evaluation_labels(results))
            score = results[self.best_metric]
            improved = self.best_score is None or score < self.best_score
            self.best_score = score if improved else self.best_score
        if broadcast_flag(self.context, improved):
            self.save(step, self.run_dir / ckpt.BEST_NAME)

    def _evaluation_failed(self, step: int, error: Exception) -> NoReturn:
        """Stop on a failed evaluation. A single process first saves this step: hours of
        training must not go with it. Under torchrun the other ranks may still be inside the
        evaluation and cannot join a save: this rank ends (process_group tells the others why)
        and the job keeps its last checkpoint."""
        if isinstance(error, CollectiveFailed):
            raise error  # another rank's failure, which process_group reports
        saved = None
        if not self.context.enabled:
            saved = ckpt.step_path(self.run_dir, step)
            self.save(step, saved)
        if isinstance(error, (UserError, torch.OutOfMemoryError, OSError)):
            raise EvaluationFailed(step, error, saved) from None
        raise error

    def save(self, step: int, path: Path) -> None:
        ckpt.save_training_state(path, self.state, self.context, step=step,
                                 config=to_dict(self.config), num_classes=self.num_classes,
                                 class_names=self.class_names, fixed_z=self.fixed_z.cpu(),
                                 best_score=self.best_score, best_metric=self.best_metric)


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



def log_attention_maps(tracker: Tracker, generator: nn.Module, z: Tensor,
                        labels: Tensor | None, step: int) -> None:
    figure = attention_figure(generator, z[:GRID_PER_ROW],
                              None if labels is None else labels[:GRID_PER_ROW])
    if figure is not None:
        tracker.image("Attention/generator", step, figure)


