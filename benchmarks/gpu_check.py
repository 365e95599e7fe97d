"""Everything that needs CUDA, in one command: the suite's CUDA tests, training throughput of the
paper recipes in each speed mode, a 10k-sample FID and the attention cost table. Prints one
summary table with the command line behind every row and writes the results as JSON.

    python benchmarks/gpu_check.py [--json PATH] [--budget SECONDS] [--only SECTION ...]
    python benchmarks/gpu_check.py --cpu-smoke      # the same path, reduced, on CPU

Sections, in the order they run (later ones are skipped, and say so, once --budget is spent):
  tests       python -m pytest -m cuda tests/test_gpu.py: --train/--eval/--sample on CUDA, bf16
              and fp16 (loss scaling) for 50 demo steps against fp32, channels_last + fused
              Adam, torch.compile default and reduce-overhead against eager (and whether CUDA
              graphs were used), SyncBatchNorm under torchrun with NCCL, exact resume with
              deterministic algorithms
  throughput  benchmarks/train_throughput.py on the CIFAR-10 EAGAN recipe in fp32 eager,
              bf16 + channels_last, and that plus torch.compile in default and reduce-overhead
              modes; compile time apart
  fid         run.py --eval of a checkpoint on 10k samples, reference statistics already cached
  attention   benchmarks/attention_cost.py on CUDA (EA vs SA vs efficient attention)
  sagan       the CIFAR-10 SAGAN recipe in the same four modes
  tiny        the Tiny-ImageNet EAGAN recipe in the fastest CIFAR-10 EAGAN mode

Data are fake sets in the real on-disk formats (tests/fakedata.py) and the Inception weights are
stand-ins (tests/inception_standin.py): speed does not depend on what the pixels show, and the
machine needs no network. Everything is written under a temporary folder, deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, no install
sys.path.insert(0, str(REPO / "benchmarks"))
import attention_cost  # noqa: E402

from tests.fakedata import write_cifar10, write_tiny_imagenet  # noqa: E402
from tests.inception_standin import build_standin_inception_weights  # noqa: E402

SECTIONS = ("tests", "throughput", "fid", "attention", "sagan", "tiny")
DEFAULT_BUDGET_S = 450  # 7.5 minutes: under 8 on one H100 with the start-up around it
ITERATIONS_GOAL = 40.0  # CIFAR-10 EAGAN recipe, G steps (5 D + 1 G at batch 64) per second
FID_GOAL_S = 30.0
# A row is not started with less than this much of the budget left.
MIN_START_S = 20


@dataclass
class Settings:
    """What differs between the real check on CUDA and the smoke run on CPU."""
    device: str
    steps: int  # timed G steps per throughput row
    warmup: int  # warm-up steps, compilation included
    fid_samples: int
    reference_images: int  # fake CIFAR-10 test images: the FID reference set
    train_images: int
    tiny_imagenet_classes: int
    modes: tuple[str, ...]
    attention_args: list[str]
    recipe_overrides: list[str] = field(default_factory=list)  # smaller networks in the smoke
    # Fill the reference-statistics cache in an untimed evaluation first. The smoke run skips
    # it: on CPU each evaluation spends most of its time in the 2048 x 2048 matrix square root.
    fill_cache_first: bool = True
    test_timeout_s: int = 360


MODES = {
    "fp32 eager": ["train.precision=fp32"],
    "bf16 + channels_last": ["train.precision=bf16", "train.channels_last=true"],
    "bf16 + channels_last + compile default": [
        "train.precision=bf16", "train.channels_last=true", "train.compile=true",
        "train.compile_mode=default"],
    "bf16 + channels_last + compile reduce-overhead": [
        "train.precision=bf16", "train.channels_last=true", "train.compile=true",
        "train.compile_mode=reduce-overhead"],
}

CUDA_SETTINGS = Settings(
    device="cuda", steps=100, warmup=10, fid_samples=10_000, reference_images=10_000,
    train_images=2_000, tiny_imagenet_classes=20, modes=tuple(MODES),
    attention_args=["--device", "cuda"])
CPU_SMOKE_SETTINGS = Settings(
    device="cpu", steps=2, warmup=1, fid_samples=8, reference_images=8, train_images=64,
    tiny_imagenet_classes=2, modes=("fp32 eager",),
    attention_args=["--device", "cpu", "--sizes", "8", "16", "--channels", "32", "--batch", "1",
                    "--repeats", "1", "--threads", "1"],
    recipe_overrides=["model.g_base_channels=4", "model.d_base_channels=4", "model.z_dim=16",
                      "train.batch_size=8", "train.n_dis=1"],
    fill_cache_first=False, test_timeout_s=120)


@dataclass
class Row:
    section: str
    check: str
    status: str  # PASS, FAIL (a test or a goal), SKIP, INFO (a measurement without a goal)
    result: str
    seconds: float
    command: int | None  # index into the printed command lines
    details: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="reduced run on CPU (tiny networks and sizes): checks the script")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run these sections only (default: all)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "gpu_check.json",
                        help="where to write the results (default benchmarks/gpu_check.json)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device is available (use --cpu-smoke to check the script on CPU)")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


class Runner:
    """Runs the commands one after the other within the time budget and keeps the rows."""

    def __init__(self, budget_s: float, env: dict[str, str]) -> None:
        self.deadline = time.monotonic() + budget_s
        self.env = env
        self.commands: list[str] = []
        self.rows: list[Row] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, section: str, check: str, argv: list[str], timeout_s: float,
            parse: Callable[[subprocess.CompletedProcess, float, int], list[Row]]) -> list[Row]:
        """Run ``argv`` (a row saying why not when the budget is spent) and turn its output
        into rows with ``parse(process, seconds, command_index)``."""
        if self.left() < MIN_START_S:
            rows = [Row(section, check, "SKIP", f"time budget spent ({self.left():.0f} s left)",
                        0.0, None)]
            self.rows += rows
            return rows
        index = len(self.commands)
        self.commands.append(shlex.join(argv))
        print(f"[{index}] $ {self.commands[-1]}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=self.env,
                                  timeout=max(1.0, min(timeout_s, self.left())))
        except subprocess.TimeoutExpired:
            rows = [Row(section, check, "FAIL", "timed out", time.perf_counter() - start, index)]
            self.rows += rows
            return rows
        seconds = time.perf_counter() - start
        if done.returncode != 0 and section != "tests":  # pytest's failures become rows
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            rows = [Row(section, check, "FAIL", f"exit {done.returncode}: {tail[0][:120]}",
                        seconds, index)]
        else:
            rows = parse(done, seconds, index)
        self.rows += rows
        return rows


def test_rows(junit: Path) -> Callable[[subprocess.CompletedProcess, float, int], list[Row]]:
    def parse(done: subprocess.CompletedProcess, seconds: float, index: int) -> list[Row]:
        if not junit.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return [Row("tests", "pytest -m cuda", "FAIL", tail[0][:120], seconds, index)]
        rows = []
        for case in ElementTree.parse(junit).iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None \
                else case.find("error")
            skipped = case.find("skipped")
            properties = {prop.get("name"): prop.get("value")
                          for prop in case.iter("property")}
            if problem is not None:
                status, result = "FAIL", (problem.get("message") or "failed").splitlines()[0]
            elif skipped is not None:
                status, result = "SKIP", skipped.get("message") or "skipped"
            else:
                status, result = "PASS", ", ".join(f"{k}={v}" for k, v in properties.items())
            rows.append(Row("tests", case.get("name"), status, result[:160],
                            float(case.get("time", 0)), index, properties))
        return rows
    return parse


def throughput_rows(section: str, label: str, compiled: bool
                    ) -> Callable[[subprocess.CompletedProcess, float, int], list[Row]]:
    def parse(done: subprocess.CompletedProcess, seconds: float, index: int) -> list[Row]:
        report = json.loads(done.stdout)
        rate = report["free_running_iterations_per_s"] or report["iterations_per_s"]
        images = rate * report["settings"]["batch_size"] * report["settings"]["n_dis"]
        details = {"iterations_per_s": rate, "images_per_s": images,
                   "peak_memory_mib": report["peak_memory_mib"],
                   "warmup_s": report["warmup_s"], "step_ms_median": report["step_ms_median"]}
        result = (f"{rate:.1f} it/s, {images:.0f} img/s, peak {report['peak_memory_mib']:.0f} "
                  f"MiB")
        if compiled:
            # The warm-up steps less what they would take at the compiled speed.
            details["compile_s"] = report["warmup_s"] - report["warmup"] * \
                report["step_ms_median"] / 1e3
            result += f", compile {details['compile_s']:.0f} s"
        return [Row(section, label, "INFO", result, seconds, index, details)]
    return parse


def fid_rows(eval_json: Path, settings: Settings
             ) -> Callable[[subprocess.CompletedProcess, float, int], list[Row]]:
    def parse(done: subprocess.CompletedProcess, seconds: float, index: int) -> list[Row]:
        result = json.loads(eval_json.read_text())
        details = {"fid": result["fid"], "metric_elapsed_s": result["elapsed_s"],
                   "wall_s": seconds, "num_samples": result["num_samples"]}
        status = "INFO"
        if settings.device == "cuda":
            status = "PASS" if seconds < FID_GOAL_S else "FAIL"
        cached = ", cached reference" if settings.fill_cache_first else ""
        return [Row("fid", f"FID on {result['num_samples']} samples{cached}", status,
                    f"{seconds:.1f} s end to end ({result['elapsed_s']:.1f} s in the metric; "
                    f"goal < {FID_GOAL_S:.0f} s on CUDA), FID {result['fid']:.2f}", seconds,
                    index, details)]
    return parse


def attention_rows(settings: Settings
                   ) -> Callable[[subprocess.CompletedProcess, float, int], list[Row]]:
    def parse(done: subprocess.CompletedProcess, seconds: float, index: int) -> list[Row]:
        report = json.loads(done.stdout)
        results = [attention_cost.Result(**result) for result in report["results"]]
        print(attention_cost.format_table(results))
        rows = []
        for line in report["verdicts"]:
            verdict, _, text = line.partition("  ")
            # The smoke run's sizes are too small for the goals to mean anything.
            status = {"PASS": "PASS", "MISS": "FAIL"}.get(verdict, "INFO") \
                if settings.device == "cuda" else "INFO"
            rows.append(Row("attention", text.split(":")[0], status,
                            f"{verdict}: {text.split(':', 1)[-1].strip()}", seconds, index))
        return rows
    return parse


def ignore_output(section: str, check: str
                  ) -> Callable[[subprocess.CompletedProcess, float, int], list[Row]]:
    def parse(done: subprocess.CompletedProcess, seconds: float, index: int) -> list[Row]:
        return [Row(section, check, "PASS", "done", seconds, index)]
    return parse


def make_data(work: Path, settings: Settings) -> dict[str, Path]:
    cifar = work / "cifar10"
    write_cifar10(cifar, n_train=settings.train_images, n_test=settings.reference_images)
    tiny = work / "tiny_imagenet"
    per_class = max(2, settings.train_images // settings.tiny_imagenet_classes)
    write_tiny_imagenet(tiny, n_classes=settings.tiny_imagenet_classes,
                        n_train_per_class=per_class, n_val=settings.tiny_imagenet_classes)
    weights = build_standin_inception_weights(work / "inception")
    return {"cifar": cifar, "tiny": tiny, "weights": weights}


def run_throughput(runner: Runner, settings: Settings, section: str, config: str,
                   data_root: Path, modes: tuple[str, ...]) -> list[Row]:
    rows = []
    for mode in modes:
        sets = [f"data.root={data_root}", "data.download=false", *settings.recipe_overrides,
                *MODES[mode]]
        argv = [sys.executable, "benchmarks/train_throughput.py", "-c", config, "--device",
                settings.device, "--steps", str(settings.steps), "--warmup",
                str(settings.warmup), "--json", *[arg for s in sets for arg in ("--set", s)]]
        if settings.device == "cpu":
            argv += ["--threads", "1"]
        label = f"{Path(config).stem} {mode}"
        rows += runner.run(section, label, argv, 240,
                           throughput_rows(section, label, "compile" in mode))
    return rows


def run_check(settings: Settings, sections: list[str], budget_s: float, work: Path
              ) -> tuple[list[Row], list[str]]:
    env = {**os.environ, "TORCH_HOME": str(work / "torch_home"), "PYTHONPATH": str(REPO)}
    runner = Runner(budget_s, env)  # the budget counts from here, data included
    data = make_data(work, settings)
    python = sys.executable
    if "tests" in sections:
        junit = work / "cuda_tests.xml"
        runner.run("tests", "pytest -m cuda", [
            python, "-m", "pytest", "-m", "cuda", "tests/test_gpu.py", "-q", "-p",
            "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1"],
            settings.test_timeout_s, test_rows(junit))
    eagan_rows = []
    if "throughput" in sections:
        eagan_rows = run_throughput(runner, settings, "throughput", "configs/cifar10_eagan.yaml",
                                    data["cifar"], settings.modes)
        measured = [row for row in eagan_rows if "iterations_per_s" in row.details]
        if measured and settings.device == "cuda":
            best = max(measured, key=lambda row: row.details["iterations_per_s"])
            rate = best.details["iterations_per_s"]
            runner.rows.append(Row(
                "throughput", "CIFAR-10 EAGAN, fastest mode", "PASS" if rate >= ITERATIONS_GOAL
                else "FAIL", f"{rate:.1f} it/s in {best.check} (goal >= {ITERATIONS_GOAL:.0f})",
                0.0, best.command))
    if "fid" in sections:
        run_dir = work / "fid_run"
        common = ["-c", "configs/cifar10_eagan.yaml", "--device", settings.device,
                  "--no-progress", "--set", f"data.root={data['cifar']}", "--set",
                  "data.download=false", *[arg for s in settings.recipe_overrides
                                            for arg in ("--set", s)]]
        evaluate = [python, "run.py", *common, "--eval", "--ckpt", str(run_dir),
                    "--num-samples", str(settings.fid_samples), "--inception-weights",
                    str(data["weights"]), "--set", f"eval.cache_dir={work / 'cache'}"]
        trained = runner.run("fid", "one training step for a checkpoint", [
            python, "run.py", *common, "--train", "--run-dir", str(run_dir), "--set",
            "train.total_steps=1", "--set", "train.checkpoint_every=1", "--set",
            "eval.every=0"], 180, ignore_output("fid", "one training step for a checkpoint"))
        if trained[0].status == "PASS":
            cached = runner.run("fid", "reference statistics into the cache", evaluate, 240,
                                ignore_output("fid", "reference statistics into the cache")) \
                if settings.fill_cache_first else trained
            if cached[0].status == "PASS":
                runner.run("fid", "FID", evaluate, 240,
                           fid_rows(run_dir / "ckpt-0000001-eval-studiogan2021.json", settings))
    if "attention" in sections:
        runner.run("attention", "attention cost", [
            python, "benchmarks/attention_cost.py", "--json", "--plot",
            str(work / "attention_cost.png"), *settings.attention_args], 300,
            attention_rows(settings))
    if "sagan" in sections:
        run_throughput(runner, settings, "sagan", "configs/cifar10_sagan.yaml", data["cifar"],
                       settings.modes)
    if "tiny" in sections:
        measured = [row for row in eagan_rows if "iterations_per_s" in row.details]
        best_mode = max(measured, key=lambda row: row.details["iterations_per_s"]).check \
            .removeprefix("cifar10_eagan ") if measured else settings.modes[0]
        run_throughput(runner, settings, "tiny", "configs/tiny_imagenet_eagan.yaml",
                       data["tiny"], (best_mode,))
    return runner.rows, runner.commands


def format_summary(rows: list[Row], commands: list[str]) -> str:
    header = f"{'section':<10} {'check':<52} {'status':<6} {'s':>6}  result [command]"
    lines = [header, "-" * len(header)]
    for row in rows:
        where = f" [{row.command}]" if row.command is not None else ""
        lines.append(f"{row.section:<10} {row.check[:52]:<52} {row.status:<6} "
                     f"{row.seconds:>6.1f}  {row.result}{where}")
    lines.append("")
    lines += [f"[{index}] {command}" for index, command in enumerate(commands)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = CPU_SMOKE_SETTINGS if args.cpu_smoke else CUDA_SETTINGS
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eagan-gpu-check-") as work:
        rows, commands = run_check(settings, args.only, args.budget, Path(work))
    total = time.perf_counter() - start
    machine = torch.cuda.get_device_name() if settings.device == "cuda" else platform.processor()
    print(f"\n{machine or 'cpu'}, torch {torch.__version__}, {total:.0f} s in all"
          f"{' (CPU smoke run: reduced sizes, no goals)' if args.cpu_smoke else ''}")
    print(format_summary(rows, commands))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "device": settings.device, "machine": machine, "torch": torch.__version__,
        "cpu_smoke": args.cpu_smoke, "total_s": total, "settings": asdict(settings),
        "rows": [asdict(row) for row in rows], "commands": commands}, indent=2) + "\n")
    print(f"json: {args.json}")
    return 1 if any(row.status == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
