"""Training throughput of a config on this machine: iterations (G steps) and real images per
second, the time of a step split into data, D step, G step, bookkeeping and logging, and peak
memory, with the framework's own pieces (eagan.train.steps's iteration, eagan.data's batch
sources).

It checks one goal and prints a PASS/MISS line for it: the framework's own overhead (data,
bookkeeping and logging) is under 5% of a step.

    python benchmarks/train_throughput.py -c configs/demo_digits.yaml [--steps N] [--warmup W]
        [--set section.key=value ...] [--device cpu|cuda] [--threads T] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.config import Config, load_config  # noqa: E402
from eagan.data import DeviceBatchSource, LoaderBatchSource  # noqa: E402
from eagan.errors import UserError  # noqa: E402
from eagan.nets.models import count_parameters  # noqa: E402
from eagan.train.distributed import DistContext, resolve_device  # noqa: E402
from eagan.train.loop import check_finite, open_training_data
from eagan.train.maintenance import tick_statistics
from eagan.train.steps import (GANModules, LatentSampler, LossMeans, StepOptions, build_gan,
                               resolve_precision, train_iteration, update_ema)
from eagan.train.tracking import Tracker  # noqa: E402

OVERHEAD_GOAL = 0.05  # data + bookkeeping + logging, as a share of a step
PHASES = ("data", "d_step", "g_step", "bookkeeping", "logging")
OVERHEAD_PHASES = ("data", "bookkeeping", "logging")
PHASE_LABELS = {"data": "data (batches, z, labels)", "d_step": "D steps", "g_step": "G step",
                "bookkeeping": "bookkeeping", "logging": "logging (amortised)"}
MEMORY_METHODS = {
    "cuda": "CUDA: torch.cuda.max_memory_allocated over the timed steps",
    "cpu": "CPU: peak RSS of the whole process, resource.getrusage ru_maxrss",
}


@dataclass
class Report:
    config: str
    device: str
    threads: int
    load_average: tuple[float, float, float]
    settings: dict[str, object]
    steps: int
    warmup: int
    warmup_s: float  # the warm-up steps, compilation included
    ms_per_step: dict[str, float]  # mean per G step; logging amortised over log_every steps
    ms_per_log_tick: float
    step_ms_median: float
    iterations_per_s: float
    images_per_s: float
    free_running_iterations_per_s: float | None  # CUDA only: without per-phase synchronisation
    peak_memory_mib: float
    memory_method: str
    overhead_share: float
    busy_cpu: bool  # the load average exceeded the cores: times measured contention
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, default=Path("configs/demo_digits.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="timed G steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed G steps first: allocator, oneDNN/cuDNN autotuning, compile")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as the CLI's --set")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: the config's train.device (auto: CUDA when present)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 on a busy machine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


class PhaseClock:
    """Wall time per phase: each lap charges the time since the previous lap to one phase.

    On CUDA every lap synchronises first, so the kernels a phase queued are charged to it. A
    disabled clock does nothing (no synchronisation) and every lap reads 0.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self.last = time.perf_counter()

    def lap(self, phase: str) -> float:
        if not self.enabled:
            return 0.0
        self._sync()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        self.totals[phase] += elapsed
        return elapsed

    def charged(self) -> float:
        """Seconds charged to all phases so far."""
        return sum(self.totals.values())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Setup:
    gan: GANModules
    options: StepOptions
    generator_ema: nn.Module | None
    batches: DeviceBatchSource | LoaderBatchSource
    latents: LatentSampler
    num_classes: int
    data_note: str


def build_like_trainer(config: Config, device: torch.device) -> Setup:
    """Data, networks, optimizers, scalers and step options built by the trainer's own
    functions, for one process (no DDP, no resume)."""
    tc, data = config.train, config.data
    context = DistContext(rank=0, world_size=1, device=device)
    torch.manual_seed(tc.seed)
    dataset, batches = open_training_data(config, tc.batch_size, context)
    if isinstance(batches, LoaderBatchSource):
        data_note = (f"DataLoader, {data.num_workers} workers, {data.dataset} "
                     f"({len(dataset.labels)} files)")
    else:
        data_note = f"device-resident {data.dataset} ({len(dataset.labels)} images)"
    num_classes = dataset.num_classes if config.model.conditional else 0
    gan, options, generator_ema = build_gan(config, num_classes, context)
    latents = LatentSampler(config.model.z_dim, num_classes, tc.batch_size, context,
                            seed=tc.seed + 1)
    return Setup(gan, options, generator_ema, batches, latents, num_classes, data_note)


def run_steps(setup: Setup, config: Config, first_step: int, count: int,
              clock: PhaseClock | None, tracker: Tracker, progress: tqdm
              ) -> tuple[list[float], list[float]]:
    """Training iterations first_step + 1 .. first_step + count as the trainer's loop runs
    them (its train_iteration: n_dis D updates and one G update; then the non-finite check,
    EMA, progress bar, a log tick every log_every steps and at the last one); with a clock,
    each part is charged to its phase. Returns the seconds of each iteration without its log
    tick, and of each log tick."""
    tc, gan, options = config.train, setup.gan, setup.options
    device = setup.latents.device
    clock = clock or PhaseClock(device, enabled=False)
    loss_means = LossMeans()
    step, last_step = first_step, first_step + count
    iteration_times, tick_times = [], []
    while step < last_step:
        clock.start()
        charged_before = clock.charged()
        d_bad, loss_g = train_iteration(gan, options, setup.batches, setup.latents, loss_means,
                                        tc.n_dis, step, lap=clock.lap)
        step += 1
        if tc.nonfinite == "stop":
            check_finite(step, d_bad, loss_g, Path(tracker.writer.log_dir))
        if setup.generator_ema is not None:
            decay = tc.ema_decay if step > tc.ema_start_step else 0.0
            update_ema(setup.generator_ema, gan.generator, decay)
        progress.update(1)
        clock.lap("bookkeeping")
        iteration_times.append(clock.charged() - charged_before)
        if step % tc.log_every == 0 or step == last_step:
            tracker.scalars(step, tick_statistics(gan, loss_means.pop(), 0.0))
            tick_times.append(clock.lap("logging"))
    return iteration_times, tick_times


def measure(config: Config, config_path: Path, device: torch.device, steps: int,
            warmup: int) -> Report:
    load_before = os.getloadavg()[0]
    setup = build_like_trainer(config, device)
    tc = config.train
    with tempfile.TemporaryDirectory(prefix="eagan-bench-") as run_dir, \
            open(os.devnull, "w") as devnull:
        # The progress bar and the logs do what the trainer's do, into throwaway places.
        tracker = Tracker(Path(run_dir))
        progress = tqdm(total=warmup + 2 * steps, file=devnull, dynamic_ncols=True)
        try:
            warmup_start = time.perf_counter()
            run_steps(setup, config, 0, warmup, None, tracker, progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            warmup_s = time.perf_counter() - warmup_start
            free_running = None
            if device.type == "cuda":
                # Per-phase synchronisation stalls the queue: measure iterations/s without it.
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                run_steps(setup, config, warmup, steps, None, tracker, progress)
                torch.cuda.synchronize(device)
                free_running = steps / (time.perf_counter() - start)
                torch.cuda.reset_peak_memory_stats(device)
            clock = PhaseClock(device)
            iteration_times, tick_times = run_steps(setup, config, warmup, steps, clock, tracker,
                                                    progress)
        finally:
            progress.close()
            tracker.close()
    # A short run ends with a log tick, as training does at its last step: charge logging at
    # the rate training pays it, once per log_every steps.
    ms_per_tick = 1e3 * statistics.mean(tick_times)
    ms = {phase: 1e3 * clock.totals[phase] / steps for phase in PHASES if phase != "logging"}
    ms["logging"] = ms_per_tick / tc.log_every
    step_ms = sum(ms.values())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    overhead = sum(ms[phase] for phase in OVERHEAD_PHASES) / step_ms
    settings = {
        "batch_size": tc.batch_size, "n_dis": tc.n_dis,
        "precision": resolve_precision(tc.precision, device),
        "channels_last": tc.channels_last, "compile": tc.compile, "fused_adam": tc.fused_adam,
        "ema": tc.ema_decay > 0, "log_every": tc.log_every,
        "attention": config.model.attention, "image_size": config.data.image_size,
        "g_parameters": count_parameters(setup.gan.generator),
        "d_parameters": count_parameters(setup.gan.discriminator), "data": setup.data_note,
    }
    iterations = 1e3 / step_ms
    # Our own threads can load every core; more means other jobs stalled them.
    busy = device.type == "cpu" and max(load_before, os.getloadavg()[0]) > os.cpu_count() + 0.5
    report = Report(
        config=str(config_path), device=str(device), threads=torch.get_num_threads(),
        load_average=os.getloadavg(), settings=settings, steps=steps, warmup=warmup,
        warmup_s=warmup_s,
        ms_per_step=ms, ms_per_log_tick=ms_per_tick,
        step_ms_median=1e3 * statistics.median(iteration_times), iterations_per_s=iterations,
        images_per_s=iterations * tc.batch_size * tc.n_dis,
        free_running_iterations_per_s=free_running, peak_memory_mib=peak,
        memory_method=MEMORY_METHODS[device.type], overhead_share=overhead, busy_cpu=busy)
    parts = ", ".join(f"{phase} {ms[phase]:.3f} ms" for phase in OVERHEAD_PHASES)
    report.verdict = (f"{'PASS' if overhead < OVERHEAD_GOAL else 'MISS'}  framework overhead "
                      f"(data + bookkeeping + logging) {100 * overhead:.2f}% of a "
                      f"{step_ms:.1f} ms step (goal < {100 * OVERHEAD_GOAL:.0f}%): {parts}"
                      f"{' [times unreliable: busy CPU]' if busy else ''}")
    if busy:
        report.notes.append(f"WARNING  load average above the {os.cpu_count()} CPUs during the "
                            "run: the times measured contention; rerun on an idle machine")
    report.notes.append(f"logging: {len(tick_times)} log tick(s) measured, {ms_per_tick:.2f} ms "
                        f"each, charged once per train.log_every = {tc.log_every} steps")
    report.notes.append("not included: sample grids, attention maps, checkpoints and evaluation "
                        "(every sample_every / checkpoint_every / eval.every steps)")
    return report


def format_report(report: Report) -> str:
    s = report.settings
    load = " / ".join(f"{value:.2f}" for value in report.load_average)
    step_ms = sum(report.ms_per_step.values())
    lines = [
        f"{report.config} on {report.device}: {report.threads} torch thread(s), "
        f"load average {load} (1/5/15 min) on {os.cpu_count()} cores",
        f"batch {s['batch_size']}, n_dis {s['n_dis']}, {s['precision']}, channels_last "
        f"{'on' if s['channels_last'] else 'off'}, compile {'on' if s['compile'] else 'off'}, "
        f"EMA {'on' if s['ema'] else 'off'}, attention {s['attention']}, "
        f"{s['image_size']}x{s['image_size']}; G {s['g_parameters'] / 1e6:.3f} M, "
        f"D {s['d_parameters'] / 1e6:.3f} M parameters",
        f"data: {s['data']}",
        f"{report.steps} timed G steps after {report.warmup} warm-up steps",
        "",
        f"{'phase':<28} {'ms/step':>9} {'share':>7}",
        "-" * 46,
    ]
    for phase in PHASES:
        value = report.ms_per_step[phase]
        lines.append(f"{PHASE_LABELS[phase]:<28} {value:>9.3f} {100 * value / step_ms:>6.2f}%")
    lines += [
        "-" * 46,
        f"{'step (mean)':<28} {step_ms:>9.3f} {100.0:>6.2f}%",
        f"{'step (median)':<28} {report.step_ms_median:>9.3f}",
        "",
        f"{'iterations/s (G steps)':<28} {report.iterations_per_s:>9.2f}",
    ]
    if report.free_running_iterations_per_s is not None:
        lines.append(f"{'iterations/s, free-running':<28} "
                     f"{report.free_running_iterations_per_s:>9.2f}  (no per-phase sync)")
    lines += [
        f"{'images/s (real, into D)':<28} {report.images_per_s:>9.1f}",
        f"{'peak memory':<28} {report.peak_memory_mib:>9.1f} MiB  ({report.memory_method})",
        *report.notes,
        report.verdict,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"train.device={args.device}")
    try:
        config = load_config(args.config, overrides)
        device = resolve_device(config.train.device)
        report = measure(config, args.config, device, args.steps, args.warmup)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
