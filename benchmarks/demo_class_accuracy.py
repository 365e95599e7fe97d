"""Quality of the CPU demo over a run: the digits protocol (eagan/eval/digits.py) on every
checkpoint of a run folder, raw and EMA generator, with the demo's quality bars.

The protocol fits an SVC on the demo's training digits and, for 1,000 digits generated for
requested classes, reports the share named as requested (overall and per class), the spread
(within each class, how much the images vary pixel for pixel, over how much the real digits of
that class do) and a Frechet distance (FD) to the held-out digits in the classifier's decision
values. Training with the demo config records the same numbers every 500 steps for the EMA
generator; this script adds the raw generator and checkpoints a run did not evaluate.

Goal, PASS/MISS per generator (the demo's bars): at least 90% named as requested, no class
below 70%, and spread at least 0.7.

    python benchmarks/demo_class_accuracy.py runs/demo_digits [more checkpoints or run folders]
        [--threads T] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.config import config_from_dict  # noqa: E402
from eagan.errors import UserError  # noqa: E402
from eagan.eval.runs import generation_batch_size, load_scorer  # noqa: E402
from eagan.sampling import generator_from_checkpoint  # noqa: E402
from eagan.train.checkpoint import load_checkpoint, step_checkpoints  # noqa: E402

MIN_ACCURACY = 0.9
MIN_CLASS_ACCURACY = 0.7  # no class lost
MIN_SPREAD = 0.7  # generated within-class pixel spread over the real one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help="checkpoint files or run folders (all their step checkpoints)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser.parse_args(argv)


def expand(paths: list[Path]) -> list[Path]:
    checkpoints = []
    for path in paths:
        if path.is_dir():
            found = [ckpt for _, ckpt in step_checkpoints(path)]
            if not found:
                raise UserError(f"{path}: run folder holds no step checkpoint (ckpt-*.pt)")
            checkpoints.extend(found)
        elif path.is_file():
            checkpoints.append(path)
        else:
            raise UserError(f"{path}: no such checkpoint file or run folder")
    return checkpoints


def passes(result: dict) -> bool:
    return (result["class_accuracy"] >= MIN_ACCURACY and result["min_class_accuracy"]
            >= MIN_CLASS_ACCURACY and result["class_spread"] >= MIN_SPREAD)


def score_checkpoints(checkpoints: list[Path]) -> list[dict]:
    """The digits protocol's result for each checkpoint's raw and (if any) EMA generator."""
    results, scorers = [], {}
    for checkpoint in checkpoints:
        payload = load_checkpoint(checkpoint)  # read (and warned about) once
        config = config_from_dict(payload["config"], source=f"{checkpoint} (stored config)")
        if config.data.dataset != "digits":
            raise UserError(f"{checkpoint}: not a digits checkpoint (dataset "
                            f"{config.data.dataset!r})")
        config.eval.protocol, config.eval.num_samples = "digits", None
        key = (config.data.image_size, config.eval.cache_dir)
        if key not in scorers:  # one classifier fit for every checkpoint of a size
            scorers[key] = load_scorer(config, torch.device("cpu"), show_progress=False)
        protocol, score = scorers[key]
        for use_ema in (False, True) if payload.get("generator_ema") is not None else (False,):
            sampled = generator_from_checkpoint(payload, checkpoint, ema=use_ema)
            result = score(sampled.generator, protocol, generation_batch_size=generation_batch_size(
                protocol, config.train.batch_size, config.eval.batch_size),
                ema=use_ema, step=sampled.step)
            result["checkpoint"] = str(checkpoint)
            result["verdict"] = "PASS" if passes(result) else "MISS"
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = score_checkpoints(expand(args.checkpoints))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    classifier = results[0]["classifier"]
    print(f"classifier: {classifier['name']}, accuracy {classifier['held_out_accuracy']:.3f} on "
          f"the held-out digits; FD of the real training digits: "
          f"{classifier['real_train_fd']:.3f}")
    print(f"goal: accuracy >= {MIN_ACCURACY}, every class >= {MIN_CLASS_ACCURACY}, spread >= "
          f"{MIN_SPREAD}; {results[0]['num_samples']} images, seed {results[0]['seed']}\n")
    print(f"{'checkpoint':<24} {'step':>6} {'G':>4} {'accuracy':>8} {'spread':>6} "
          f"{'FD':>7}  {'per class 0..9':<50} verdict")
    for r in results:
        per_class = " ".join(f"{a:.2f}" for a in r["per_class_accuracy"])
        print(f"{Path(r['checkpoint']).name:<24} {r['step']:>6} {'ema' if r['ema'] else 'raw':>4} "
              f"{r['class_accuracy']:>8.3f} {r['class_spread']:>6.2f} {r['fd']:>7.3f}  "
              f"{per_class:<50} {r['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
