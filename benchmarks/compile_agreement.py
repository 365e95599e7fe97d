"""Does torch.compile train the same networks as eager mode? One training step of a config,
run by eagan.train.loop.train twice from the same seed: eager, then with train.compile on (the
default inductor backend, or --backend), and the losses logged for that step compared.

It checks one goal and prints a PASS/MISS line for it: every loss of the compiled step is within
1e-4 (relative) of the eager one. It also prints how long each run took (compilation included)
and the largest difference of any weight after the step; Adam moves every weight by about the
learning rate whatever the size of its gradient, so weights whose true gradient is zero (conv
biases followed by batch norm) differ by up to the learning rate and say little.

    python benchmarks/compile_agreement.py [-c configs/demo_digits.yaml] [--backend NAME]
        [--set section.key=value ...] [--json]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.config import load_config  # noqa: E402
from eagan.errors import UserError  # noqa: E402
from eagan.train import checkpoint as ckpt  # noqa: E402
from eagan.train.loop import train  # noqa: E402

LOSS_TOLERANCE = 1e-4  # relative
ONE_STEP = ["train.total_steps=1", "train.log_every=1", "train.checkpoint_every=1",
            "train.sample_every=1000", "eval.every=0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, default=Path("configs/demo_digits.yaml"))
    parser.add_argument("--backend", default=None,
                        help="torch.compile backend (default: torch's, inductor)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as the CLI's --set")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def one_step(config_path: Path, overrides: list[str], run_dir: Path, compiled: bool
             ) -> tuple[dict[str, float], dict, float]:
    """The step's logged losses, the checkpoint after it and the run's wall time."""
    config = load_config(config_path, [*overrides, *ONE_STEP, f"run_dir={run_dir}",
                                       f"train.compile={str(compiled).lower()}"])
    start = time.perf_counter()
    train(config, show_progress=False)
    seconds = time.perf_counter() - start
    stats = json.loads((run_dir / "stats.jsonl").read_text().splitlines()[0])
    losses = {name: value for name, value in stats.items() if name.startswith("Loss/")}
    return losses, ckpt.load_checkpoint(ckpt.step_path(run_dir, 1)), seconds


def largest_weight_difference(eager: dict, compiled: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for network in ("generator", "discriminator"):
        for name, value in eager[network].items():
            if value.is_floating_point():
                difference = (compiled[network][name] - value).abs().max().item()
                if difference > worst:
                    worst, where = difference, f"{network}.{name}"
    return worst, where


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend is not None:
        torch.compile = functools.partial(torch.compile, backend=args.backend)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            eager_losses, eager_ckpt, eager_s = one_step(
                args.config, args.overrides, Path(scratch) / "eager", compiled=False)
            compiled_losses, compiled_ckpt, compiled_s = one_step(
                args.config, args.overrides, Path(scratch) / "compiled", compiled=True)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    relative = {name: abs(compiled_losses[name] - value) / max(abs(value), 1e-12)
                for name, value in eager_losses.items()}
    weight_difference, where = largest_weight_difference(eager_ckpt, compiled_ckpt)
    passed = max(relative.values()) <= LOSS_TOLERANCE
    verdict = (f"{'PASS' if passed else 'MISS'}  every loss of the compiled step within "
               f"{LOSS_TOLERANCE:g} of eager (largest: {max(relative.values()):.2e})")
    if args.json:
        print(json.dumps({"backend": args.backend or "inductor", "eager_seconds": eager_s,
                          "compiled_seconds": compiled_s, "eager": eager_losses,
                          "compiled": compiled_losses, "relative": relative,
                          "largest_weight_difference": [weight_difference, where],
                          "verdict": verdict}, indent=2))
        return 0
    print(f"{args.config}: one training step, eager {eager_s:.1f} s, compiled "
          f"({args.backend or 'inductor'}) {compiled_s:.1f} s, both including start-up\n")
    print(f"{'loss':<22} {'eager':>14} {'compiled':>14} {'relative':>10}")
    for name, value in eager_losses.items():
        print(f"{name:<22} {value:>14.7f} {compiled_losses[name]:>14.7f} {relative[name]:>10.1e}")
    print(f"\nlargest weight difference after the step: {weight_difference:.2e} ({where})")
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
