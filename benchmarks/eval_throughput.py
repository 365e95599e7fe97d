"""Evaluation throughput: images per second through EAGAN's evaluation path (eagan.eval.inception:
Inception.load, then Inception.generator_features and the Inception Score, as one evaluation of
a checkpoint runs them) against calling torch_fidelity.calculate_metrics directly on the same
generator, the same sample count, batch size and seed.

It checks one goal and prints a PASS/MISS line for it: our path is not slower.

    python benchmarks/eval_throughput.py [-c configs/demo_digits.yaml | --ckpt PATH]
        [--num-samples N] [--batch-size B] [--repeats R] [--inception-weights PATH]
        [--device cpu|cuda] [--threads T] [--set section.key=value ...] [--json]

Everything torch and torch-fidelity would cache goes to a temporary TORCH_HOME, deleted at the
end. Without --inception-weights and without the real weights in the torch hub cache
($TORCH_HOME/hub/checkpoints), stand-in weights are built there as tests/inception_standin.py
builds them: the same network with random convolutions, so the timing is that of the real one.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch_fidelity
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.config import Config, load_config  # noqa: E402
from eagan.errors import UserError  # noqa: E402
from eagan.eval.inception import (IS_LAYER, WEIGHTS_FILENAME, Inception,  # noqa: E402
                                  UnconditionalSampler)
from eagan.eval.protocols import PROTOCOLS  # noqa: E402
from eagan.eval.scores import inception_score_from_logits  # noqa: E402
from eagan.nets.bn_mode import bn_mode  # noqa: E402
from eagan.nets.factory import build_generator  # noqa: E402
from eagan.nets.models import count_parameters  # noqa: E402
from eagan.sampling import load_generator  # noqa: E402

# Our path runs torch-fidelity's own sampling loop, so the two should time alike; this much
# slower still counts as "not slower" (timing noise on a shared machine).
NOISE_TOLERANCE = 0.03
# Classes of a freshly built generator, per dataset (a folder's: --num-classes).
DATASET_CLASSES = {"cifar10": 10, "tiny_imagenet": 200, "digits": 10}
IS_AGREEMENT = 1e-3  # relative: both paths must have scored the same images


@dataclass
class Report:
    generator: str
    device: str
    threads: int
    load_average: tuple[float, float, float]
    inception_weights: str
    num_samples: int
    batch_size: int
    seed: int
    bn_mode: str
    order: list[str]
    seconds: dict[str, list[float]]  # per path, every run in the order above
    load_seconds: dict[str, list[float]]  # the part of each run that loaded Inception
    images_per_s: dict[str, float]  # per path, from its fastest run
    images_per_s_after_load: dict[str, float]  # the same run, loading Inception left out
    inception_score: dict[str, float]
    busy_cpu: bool  # the load average exceeded the cores: times measured contention
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, default=Path("configs/demo_digits.yaml"),
                        help="builds a fresh generator and gives eval.protocol, eval.batch_size, "
                             "eval.seed (ignored with --ckpt, whose stored config is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as the CLI's --set")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="a training checkpoint: time its generator (EMA when it has one)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of a fresh generator (default: the dataset's; folder: 0)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="generated images per run (default: 64 on CPU, 5000 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the config's eval.batch_size")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per path, alternating ABBA...; the fastest counts (default 2)")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help=f"{WEIGHTS_FILENAME} (default: the torch hub cache's, else stand-in "
                             "weights)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 on a busy machine")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.num_samples is None:
        args.num_samples = 5000 if args.device == "cuda" else 64
    for name in ("num_samples", "batch_size", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2")
    if args.num_classes is not None and args.num_classes < 0:
        parser.error("--num-classes must be at least 0")
    return args


def log(message: str) -> None:
    """Progress goes to stderr so that --json output stays clean."""
    print(message, file=sys.stderr, flush=True)


def the_generator(args: argparse.Namespace, device: torch.device
                  ) -> tuple[nn.Module, Config, str]:
    """The generator to time, the config its evaluation settings come from, and a description."""
    if args.ckpt is not None:
        sampled = load_generator(args.ckpt, ema=True, device=device)
        what = f"{'EMA ' if sampled.is_ema else ''}generator of {args.ckpt} (step {sampled.step})"
        return sampled.generator, sampled.config, what
    config = load_config(args.config, args.overrides)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = DATASET_CLASSES.get(config.data.dataset, 0)
    if not config.model.conditional:
        num_classes = 0
    torch.manual_seed(config.train.seed)
    generator = build_generator(config.model, config.data.image_size, num_classes)
    generator.to(device).eval()
    what = (f"fresh untrained generator of {args.config} ({num_classes} classes, "
            f"{config.data.image_size}x{config.data.image_size})")
    return generator, config, what


def the_weights(given: Path | None, scratch: Path) -> tuple[Path, str]:
    """The weights file to use and how it was found; call before TORCH_HOME is redirected."""
    if given is not None:
        return given, f"{given} (--inception-weights)"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME
    if cached.is_file():
        return cached, f"{cached} (torch hub cache)"
    from tests.inception_standin import build_standin_inception_weights

    path = build_standin_inception_weights(scratch / "standin")
    return path, ("STAND-IN weights built as tests/inception_standin.py does, in a temporary "
                  "folder (no real weights here): the same network, so the same timing")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_eagan(generator: nn.Module, weights: Path, device: torch.device, num_samples: int,
              batch_size: int, seed: int, mode: str, is_splits: int
              ) -> tuple[float, float, float]:
    """Our path, as evaluating a checkpoint runs it for the generated side (training loads
    Inception once per run instead): (seconds, of which loading Inception, IS)."""
    sync(device)
    start = time.perf_counter()
    inception = Inception.load(weights, device)
    loaded = time.perf_counter()
    with bn_mode(generator, mode):
        features = inception.generator_features(generator, num_samples, batch_size, seed)
    score, _ = inception_score_from_logits(features[IS_LAYER], is_splits)
    sync(device)
    return time.perf_counter() - start, loaded - start, score


@contextlib.contextmanager
def timing_calls(module_name: str, function_name: str, sink: list[float]) -> Iterator[None]:
    """Record the seconds of every call to module.function (what it does is unchanged)."""
    module = importlib.import_module(module_name)
    original: Callable = getattr(module, function_name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    setattr(module, function_name, timed)
    try:
        yield
    finally:
        setattr(module, function_name, original)


def run_torch_fidelity(generator: nn.Module, weights: Path, device: torch.device,
                       num_samples: int, batch_size: int, seed: int, mode: str,
                       is_splits: int) -> tuple[float, float, float]:
    """torch-fidelity called directly, its feature cache off: (seconds, of which creating
    its Inception, IS)."""
    loads: list[float] = []
    sync(device)
    start = time.perf_counter()
    # make_eval=False and the same BN mode as ours: both generators do the same arithmetic.
    wrapped = torch_fidelity.GenerativeModelModuleWrapper(
        UnconditionalSampler(generator, seed), z_size=int(generator.z_dim), z_type="normal",
        num_classes=0, make_eval=False)
    with bn_mode(generator, mode), timing_calls("torch_fidelity.metrics",
                                                "create_feature_extractor", loads), \
            (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()):
        metrics = torch_fidelity.calculate_metrics(
            input1=wrapped, input1_model_num_samples=num_samples, isc=True,
            isc_splits=is_splits, batch_size=batch_size, cuda=device.type == "cuda",
            cache=False, feature_extractor_weights_path=str(weights), rng_seed=seed,
            verbose=False)
    sync(device)
    return time.perf_counter() - start, sum(loads), float(metrics["inception_score_mean"])


def measure(args: argparse.Namespace, scratch: Path) -> Report:
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    weights, weights_note = the_weights(args.inception_weights, scratch)
    # From here on torch and torch-fidelity write into the scratch folder only (main restores
    # TORCH_HOME).
    os.environ["TORCH_HOME"] = str(scratch / "torch_home")
    generator, config, what = the_generator(args, device)
    num_samples = args.num_samples
    batch_size = min(args.batch_size or config.eval.batch_size, num_samples)
    seed = config.eval.seed
    preset = PROTOCOLS[config.eval.protocol]
    order = [("eagan", "torch-fidelity")[(i + i // 2) % 2] for i in range(2 * args.repeats)]
    runners = {"eagan": run_eagan, "torch-fidelity": run_torch_fidelity}
    seconds: dict[str, list[float]] = {path: [] for path in runners}
    loads: dict[str, list[float]] = {path: [] for path in runners}
    scores = {}
    common = (generator, weights, device, num_samples, batch_size, seed, preset.bn_mode,
              preset.is_splits)
    for path in order:
        log(f"  {path}: {num_samples} samples")
        elapsed, load_s, scores[path] = runners[path](*common)
        seconds[path].append(elapsed)
        loads[path].append(load_s)
    best = {path: min(range(args.repeats), key=times.__getitem__)
            for path, times in seconds.items()}
    rates = {path: num_samples / seconds[path][i] for path, i in best.items()}
    after_load = {path: num_samples / (seconds[path][i] - loads[path][i])
                  for path, i in best.items()}
    # Our own threads can load every core; more means other jobs stalled them.
    busy = device.type == "cpu" and max(load_before, os.getloadavg()[0]) > os.cpu_count() + 0.5
    report = Report(
        generator=f"{what}; {count_parameters(generator) / 1e6:.3f} M parameters",
        device=str(device), threads=torch.get_num_threads(), load_average=os.getloadavg(),
        inception_weights=weights_note, num_samples=num_samples, batch_size=batch_size,
        seed=seed, bn_mode=preset.bn_mode, order=order, seconds=seconds, load_seconds=loads,
        images_per_s=rates, images_per_s_after_load=after_load, inception_score=scores,
        busy_cpu=busy)
    ratio = rates["eagan"] / rates["torch-fidelity"]
    met = ratio >= 1 - NOISE_TOLERANCE
    report.verdict = (f"{'PASS' if met else 'MISS'}  our evaluation path is not slower: "
                      f"{rates['eagan']:.2f} images/s vs torch-fidelity's "
                      f"{rates['torch-fidelity']:.2f} (ratio {ratio:.3f}; goal >= "
                      f"{1 - NOISE_TOLERANCE:.2f}, the timing noise allowed)"
                      f"{' [times unreliable: busy CPU]' if busy else ''}")
    if busy:
        report.notes.append(f"WARNING  load average above the {os.cpu_count()} CPUs during the "
                            "run: the times measured contention; rerun on an idle machine")
    difference = abs(scores["eagan"] - scores["torch-fidelity"]) / abs(scores["torch-fidelity"])
    if difference > IS_AGREEMENT:
        report.notes.append(f"WARNING: the Inception Scores differ by {100 * difference:.2f}%: "
                            "the two paths did not score the same images")
    return report


def format_report(report: Report) -> str:
    load = " / ".join(f"{value:.2f}" for value in report.load_average)
    lines = [
        f"{report.generator}",
        f"on {report.device}: {report.threads} torch thread(s), load average {load} "
        f"(1/5/15 min) on {os.cpu_count()} cores",
        f"Inception weights: {report.inception_weights}",
        f"{report.num_samples} samples, batch {report.batch_size}, seed {report.seed}, BN mode "
        f"{report.bn_mode}; each run loads Inception, generates, extracts features and "
        f"scores IS; runs in the order {', '.join(report.order)}",
        "",
        f"{'path':<15} {'runs: total s (loading Inception s)':<36} {'images/s':>8} "
        f"{'w/o load':>8} {'IS':>8}",
        "-" * 79,
    ]
    for path in ("eagan", "torch-fidelity"):
        runs = ", ".join(f"{total:.2f} ({load:.2f})" for total, load in
                         zip(report.seconds[path], report.load_seconds[path]))
        lines.append(f"{path:<15} {runs:<36} {report.images_per_s[path]:>8.2f} "
                     f"{report.images_per_s_after_load[path]:>8.2f} "
                     f"{report.inception_score[path]:>8.4f}")
    lines += [
        "-" * 79,
        "images/s: of the fastest run; w/o load: the same run less its Inception loading "
        "(eagan: Inception.load, which checks the weights with torch.load(weights_only=True) "
        "and sha256 first; torch-fidelity: create_feature_extractor)",
        *report.notes,
        report.verdict,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    previous_home = os.environ.get("TORCH_HOME")
    try:
        with tempfile.TemporaryDirectory(prefix="eagan-eval-bench-") as scratch:
            try:
                report = measure(args, Path(scratch))
            finally:
                if previous_home is None:
                    os.environ.pop("TORCH_HOME", None)
                else:
                    os.environ["TORCH_HOME"] = previous_home
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
