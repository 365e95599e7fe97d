"""Cost of the attention blocks of EAGAN: forward + backward time, peak memory and counted FLOPs
of SAGAN self-attention, external attention (Guo et al., 2021, arXiv 2105.02358) and efficient
attention (Shen et al., WACV 2021) on square feature maps.

It checks two goals and prints a PASS/MISS line for each:
1. external attention's cost grows linearly with the number of pixels N;
2. external attention costs at most half of self-attention's time and peak memory at 16x16 and
   32x32, and at most a quarter at 64x64 and above (forward + backward, same run).

    python benchmarks/attention_cost.py [--json] [--device cpu|cuda] [--batch N] [--repeats R]
        [--sizes 16 32 64 128] [--channels 128 256] [--plot PATH] [--threads T]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Kineto (the profiler measuring CPU memory) otherwise logs a spurious GPU error on CPU machines.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.nets.attention import build_attention  # noqa: E402

KINDS = ("self", "external", "efficient")
MEMORY_SIZE = 64  # S, the paper's best
# Goal 2: the largest external/self ratio allowed, by map side (from 16x16 up).
GOAL_MIN_SIDE = 16
GOAL_SMALL_RATIO, GOAL_LARGE_RATIO, GOAL_LARGE_SIDE = 0.5, 0.25, 64
# Goal 1 reads the log-log slope of cost against N over maps of at least SLOPE_MIN_SIDE (below it
# a fixed per-call overhead flattens the curve, which would flatter the slope).
SLOPE_MIN_SIDE = 32
LINEAR_SLOPE_MAX = 1.15
# Of the memory that is free, how much a configuration may be estimated to need before we skip it.
MEMORY_HEADROOM = 0.8

MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated during one forward+backward, minus the bytes "
            "allocated before it (input, parameters and output gradient excluded)",
    "cpu": "peak of live tensor bytes over one forward+backward, from the allocation events of "
           "torch.profiler.profile(profile_memory=True) (input, parameters and output gradient "
           "excluded)",
}


@dataclass
class Result:
    kind: str
    side: int
    channels: int
    batch: int
    time_ms: float | None = None  # median over repeats, one forward+backward of the batch
    memory_mib: float | None = None  # peak extra memory of one forward+backward of the batch
    gflop: float | None = None  # counted FLOPs of one forward+backward of the batch
    skipped: str | None = None

    @property
    def pixels(self) -> int:
        return self.side * self.side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples per step (default: 64 on CUDA, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per configuration (default: 10 on CUDA, 5 on CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="feature map sides (even)")
    parser.add_argument("--channels", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("attention_cost.png"),
                        help="where to save the PNG plot")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 on a busy machine")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.batch is None:
        # On CPU, 128x128 self-attention takes seconds per sample: 2 keeps the run to minutes.
        args.batch = 64 if args.device == "cuda" else 2
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 5
    for name in ("batch", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if any(side < 2 or side % 2 for side in args.sizes):
        parser.error("--sizes must be even (self-attention pools keys 2x2)")
    if any(channels < 8 or channels % 8 for channels in args.channels):
        parser.error("--channels must be multiples of 8")
    return args


def log(message: str) -> None:
    """Progress goes to stderr so that --json output stays clean."""
    print(message, file=sys.stderr, flush=True)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def estimated_bytes(kind: str, side: int, channels: int, batch: int) -> int:
    """A generous float32 estimate of one forward+backward's peak, to skip what cannot fit."""
    pixels = side * side
    per_sample = 12 * pixels * channels  # maps kept for backward and their gradients
    if kind == "self":
        per_sample += 5 * pixels * pixels // 4  # logits, softmax, their gradients, a copy
    elif kind == "external":
        per_sample += 5 * pixels * MEMORY_SIZE
    return 4 * batch * per_sample


def make_step(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(reset, step): reset frees the gradients of the last step so that each step allocates
    them again; step runs one forward and backward."""
    def reset() -> None:
        block.zero_grad(set_to_none=True)
        x.grad = None

    def step() -> None:
        block(x).backward(grad_out)

    return reset, step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_gflop(reset: Callable[[], None], step: Callable[[], None]) -> float:
    reset()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def peak_memory_mib(reset: Callable[[], None], step: Callable[[], None],
                    device: torch.device) -> float:
    reset()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch.autograd.DeviceType.CPU
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == cpu]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def timed_ms(reset: Callable[[], None], step: Callable[[], None], device: torch.device) -> float:
    reset()
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def measure_size(side: int, channels: int, batch: int, repeats: int,
                 device: torch.device) -> list[Result]:
    """Every kind at one size. The timed steps take turns between the kinds (self, external,
    efficient, self, ...), so a load that comes and goes on a shared machine slows all alike and
    the ratios to self-attention stay fair."""
    results, steps = [], {}
    for kind in KINDS:
        log(f"  {kind} {side}x{side} C={channels}")
        result = Result(kind, side, channels, batch)
        results.append(result)
        need, free = estimated_bytes(kind, side, channels, batch), available_bytes(device)
        if need > MEMORY_HEADROOM * free:
            result.skipped = (f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                              f"on {device.type}")
            continue
        torch.manual_seed(0)
        block = build_attention(kind, channels, memory_size=MEMORY_SIZE).to(device)
        with torch.no_grad():
            block.gamma.fill_(1.0)  # as in training once the block is in use
        x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
        reset, step = make_step(block, x, torch.randn_like(x))
        # FLOPs are deterministic, so their counting run doubles as the warm-up.
        result.gflop = count_gflop(reset, step)
        result.memory_mib = peak_memory_mib(reset, step, device)
        steps[kind] = reset, step
    times = {kind: [] for kind in steps}
    for _ in range(repeats):
        for kind, (reset, step) in steps.items():
            times[kind].append(timed_ms(reset, step, device))
    for result in results:
        if result.kind in times:
            result.time_ms = statistics.median(times[result.kind])
    return results


def slope(results: list[Result], value: str) -> float | None:
    """Least-squares slope of log(value) against log(pixels): 1 is linear, 2 quadratic."""
    points = [(math.log(r.pixels), math.log(getattr(r, value))) for r in results
              if r.side >= SLOPE_MIN_SIDE and getattr(r, value)]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def find(results: list[Result], kind: str, side: int, channels: int) -> Result:
    return next(r for r in results if (r.kind, r.side, r.channels) == (kind, side, channels))


def ratio(results: list[Result], kind: str, side: int, channels: int,
          value: str) -> float | None:
    numerator = getattr(find(results, kind, side, channels), value)
    denominator = getattr(find(results, "self", side, channels), value)
    return numerator / denominator if numerator and denominator else None


def verdicts(results: list[Result], sizes: list[int], channels_list: list[int],
             times_reliable: bool) -> list[str]:
    # Verdicts that read times say so when the times measured contention.
    timed_note = "" if times_reliable else " [times unreliable: busy CPU]"
    lines = []
    for channels in channels_list:
        series = sorted((r for r in results if r.kind == "external" and r.channels == channels
                         and not r.skipped), key=lambda r: r.side)
        slopes = {value: slope(series, value) for value in ("time_ms", "memory_mib")}
        self_series = [r for r in results if r.kind == "self" and r.channels == channels
                       and not r.skipped]
        self_time = slope(self_series, "time_ms")
        if None in slopes.values():
            lines.append(f"NOT MEASURED  goal 1, C={channels}: needs two sizes >= "
                         f"{SLOPE_MIN_SIDE}x{SLOPE_MIN_SIDE}")
            continue
        # FLOPs are a + b N: the folded block multiplies its weights once per step (a). The
        # FLOPs each added pixel costs, from one size to the next, relative to the first step.
        marginal = [(b.gflop - a.gflop) / (b.pixels - a.pixels) for a, b in zip(series, series[1:])]
        steps = [share / marginal[0] for share in marginal]
        exact = all(abs(share - 1) < 1e-3 for share in steps)
        counted = exact and slopes["memory_mib"] <= LINEAR_SLOPE_MAX
        lines.append(
            f"{'PASS' if counted else 'MISS'}  goal 1 (FLOPs, memory), C={channels}: external "
            f"FLOPs per added pixel {'constant' if exact else 'NOT constant'} across sizes "
            f"(ratios {', '.join(f'{share:.3f}' for share in steps)}); memory log-log slope vs "
            f"pixels {slopes['memory_mib']:.2f} (linear: <= {LINEAR_SLOPE_MAX})")
        timed = slopes["time_ms"] <= LINEAR_SLOPE_MAX
        self_note = f"; self-attention {self_time:.2f}" if self_time else ""
        lines.append(
            f"{'PASS' if timed else 'MISS'}  goal 1 (time), C={channels}: external time log-log "
            f"slope vs pixels {slopes['time_ms']:.2f} (linear: <= {LINEAR_SLOPE_MAX}){self_note}"
            f"{timed_note}")
    for side in sizes:
        if side < GOAL_MIN_SIDE:
            continue
        goal = GOAL_LARGE_RATIO if side >= GOAL_LARGE_SIDE else GOAL_SMALL_RATIO
        for channels in channels_list:
            time_ratio = ratio(results, "external", side, channels, "time_ms")
            memory_ratio = ratio(results, "external", side, channels, "memory_mib")
            where = f"goal 2, {side}x{side} C={channels}"
            if time_ratio is None or memory_ratio is None:
                lines.append(f"NOT MEASURED  {where}: a configuration was skipped")
                continue
            met = time_ratio <= goal and memory_ratio <= goal
            lines.append(f"{'PASS' if met else 'MISS'}  {where}: external/self time "
                         f"{time_ratio:.3f}, memory {memory_ratio:.3f} (goal <= {goal})"
                         f"{timed_note}")
    return lines


def format_table(results: list[Result]) -> str:
    header = (f"{'size':>7} {'C':>4} {'kind':<9} {'time ms':>9} {'x self':>7} "
              f"{'peak MiB':>9} {'x self':>7} {'GFLOP':>8} {'x self':>7}")
    rows = [header, "-" * len(header)]
    for r in results:
        size = f"{r.side}x{r.side}"
        if r.skipped:
            rows.append(f"{size:>7} {r.channels:>4} {r.kind:<9} skipped: {r.skipped}")
            continue
        cells = []
        for value, fmt in (("time_ms", ".1f"), ("memory_mib", ".1f"), ("gflop", ".3f")):
            share = ratio(results, r.kind, r.side, r.channels, value)
            cells.append(f"{getattr(r, value):>{9 if value != 'gflop' else 8}{fmt}} "
                         f"{'-' if share is None else f'{share:.3f}':>7}")
        rows.append(f"{size:>7} {r.channels:>4} {r.kind:<9} " + " ".join(cells))
    return "\n".join(rows)


def save_plot(results: list[Result], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, value, label in ((axes[0], "time_ms", "forward+backward time (ms)"),
                               (axes[1], "gflop", "forward+backward GFLOP")):
        for kind, colour in zip(KINDS, ("tab:red", "tab:blue", "tab:green")):
            for channels, style in zip(sorted({r.channels for r in results}), ("-", "--", ":")):
                series = sorted((r for r in results if (r.kind, r.channels) == (kind, channels)
                                 and not r.skipped), key=lambda r: r.pixels)
                if not series:
                    continue
                axis.plot([r.pixels for r in series], [getattr(r, value) for r in series],
                          style, marker="o", color=colour, label=f"{kind} C={channels}")
        axis.set(xscale="log", yscale="log", xlabel="pixels N = H x W", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"attention cost (batch {results[0].batch}, S={MEMORY_SIZE})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log(f"device {device.type}, batch {args.batch}, repeats {args.repeats} (median), "
        f"threads {torch.get_num_threads()}, S={MEMORY_SIZE}")
    loads = {"before": os.getloadavg()}
    results = []
    for side in args.sizes:
        for channels in args.channels:
            results += measure_size(side, channels, args.batch, args.repeats, device)
    loads["after"] = os.getloadavg()
    load, cpus = max(loads["before"][0], loads["after"][0]), os.cpu_count()
    # Our own threads can load every core; more means other jobs stalled them, and the times
    # then measure the contention.
    busy = device.type == "cpu" and load > cpus + 0.5
    lines = verdicts(results, args.sizes, args.channels, times_reliable=not busy)
    if busy:
        lines.insert(0, f"WARNING  load average {load:.1f} on {cpus} CPUs during the run: CPU "
                        f"times are unreliable (FLOPs and memory are not affected)")
    measured = any(not r.skipped for r in results)
    if measured:
        save_plot(results, args.plot)
    if args.json:
        print(json.dumps({
            "device": device.type, "batch": args.batch, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "load_average": loads,
            "memory_size": MEMORY_SIZE, "memory_method": MEMORY_METHODS[device.type],
            "results": [asdict(r) for r in results], "verdicts": lines,
            "plot": str(args.plot) if measured else None,
        }, indent=2))
        return 0
    print(f"device {device.type}, batch {args.batch}, median of {args.repeats} timed steps after "
          f"a warm-up, S={MEMORY_SIZE}; 'x self' = ratio to self-attention at the same size and C")
    print(f"threads {torch.get_num_threads()}; load average (1, 5, 15 min) before "
          f"{' '.join(f'{x:.2f}' for x in loads['before'])}, after "
          f"{' '.join(f'{x:.2f}' for x in loads['after'])} on {cpus} CPUs")
    print(f"peak memory: {MEMORY_METHODS[device.type]}")
    print("GFLOP: torch.utils.flop_counter.FlopCounterMode, forward+backward of the batch")
    print(format_table(results))
    print("\n".join(lines))
    print(f"plot: {args.plot}" if measured else "plot: none, nothing was measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
