"""Quality of the CPU demo: do digits generated for class k look like a k, and like real ones?

A support-vector classifier (scikit-learn's SVC, RBF kernel) is fitted on the demo's training
digits and scored on its held-out test digits; it then names the class of images generated for
each requested class. Real and generated images take the same path to the classifier: the
demo's 32x32 images, grey, average-pooled to the native 8x8 of scikit-learn's digits.

Per generator it reports the share named as requested (overall and per class), the spread
(within each class, how much the images vary pixel for pixel, over how much the real digits of
that class do) and a Frechet distance between generated and held-out real digits in the
classifier's own feature space: its 45 one-against-one decision values, the numbers it votes
with (the FID recipe with this classifier in Inception's place).

Goal, PASS/MISS per generator (issue 15's bars): at least 90% named as requested, no class
below 70%, and spread at least 0.7.

    python benchmarks/demo_class_accuracy.py runs/demo_digits [more checkpoints or run folders]
        [--per-class N] [--seed S] [--threads T] [--json]

A run folder stands for all its step checkpoints (ckpt-*.pt), in step order. A checkpoint
with an EMA generator is scored twice: raw and EMA.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.svm import SVC  # the demo's extra: pip install -e '.[demo]'
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from eagan.checkpoint import load_checkpoint, step_checkpoints  # noqa: E402
from eagan.data import ImageSet, load_images  # noqa: E402
from eagan.errors import UserError  # noqa: E402
from eagan.metrics import frechet_distance, gaussian_statistics  # noqa: E402
from eagan.sampling import generator_from_checkpoint, to_uint8  # noqa: E402

DEMO_IMAGE_SIZE = 32
NATIVE_SIZE = 8  # scikit-learn's digits
MIN_ACCURACY = 0.9
MIN_CLASS_ACCURACY = 0.7  # no class lost
MIN_SPREAD = 0.7  # generated within-class pixel spread over the real one


@dataclass
class Score:
    checkpoint: str
    step: int
    generator: str  # "raw" or "ema"
    accuracy: float
    per_class: list[float]
    spread: float  # generated within-class pixel std over real, averaged over classes
    frechet: float  # to the held-out real digits, in the classifier's decision values
    verdict: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help="checkpoint files or run folders (all their step checkpoints)")
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if args.per_class < 2:
        parser.error("--per-class must be at least 2 (the spread is a standard deviation)")
    return args


def to_native(images_uint8: Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float (N, 64) in [0, 1]: grey, average-pooled to 8x8."""
    grey = images_uint8.float().mean(dim=1, keepdim=True) / 255
    pooled = F.adaptive_avg_pool2d(grey, NATIVE_SIZE)  # (N, 1, 8, 8)
    return pooled.flatten(1).numpy()


def class_spread(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class: the mean over pixels of the pixel's standard deviation within the class."""
    return np.array([features[labels == k].std(axis=0).mean() for k in range(num_classes)])


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


def fit_classifier(train: ImageSet) -> SVC:
    """An RBF support-vector classifier of the 8x8 digits (about 98% on the test split) whose
    decision_function gives the 45 one-against-one decision values."""
    return SVC(decision_function_shape="ovo").fit(to_native(train.images),
                                                  train.labels.numpy())


Statistics = tuple[np.ndarray, np.ndarray]


def classifier_statistics(classifier: SVC, images_uint8: Tensor) -> Statistics:
    """Mean and covariance of the classifier's decision values on the images."""
    return gaussian_statistics(torch.from_numpy(
        classifier.decision_function(to_native(images_uint8))))


def classifier_frechet(classifier: SVC, images_uint8: Tensor, reference: Statistics) -> float:
    """Frechet distance of the images to the reference statistics in decision-value space."""
    return frechet_distance(*classifier_statistics(classifier, images_uint8), *reference)


def agreement(classifier: SVC, images_uint8: Tensor, requested: Tensor,
              real_spread: np.ndarray) -> tuple[float, list[float], float]:
    """(accuracy, accuracy per class, spread): how often the classifier names the requested
    class, and the images' within-class pixel spread over the real digits', averaged over
    classes."""
    features = to_native(images_uint8)
    requested = requested.numpy()
    correct = classifier.predict(features) == requested
    num_classes = len(real_spread)
    per_class = [float(correct[requested == k].mean()) for k in range(num_classes)]
    spread = float((class_spread(features, requested, num_classes) / real_spread).mean())
    return float(correct.mean()), per_class, spread


def passes(accuracy: float, per_class: list[float], spread: float) -> bool:
    return accuracy >= MIN_ACCURACY and min(per_class) >= MIN_CLASS_ACCURACY \
        and spread >= MIN_SPREAD


def score(checkpoint: Path, payload: dict, use_ema: bool, classifier: SVC,
          real_spread: np.ndarray, reference: Statistics, per_class: int, seed: int) -> Score:
    generator = generator_from_checkpoint(payload, checkpoint, ema=use_ema)
    if generator.config.data.dataset != "digits" or generator.num_classes != 10:
        raise UserError(f"{checkpoint}: not a class-conditional digits checkpoint (dataset "
                        f"{generator.config.data.dataset!r}, {generator.num_classes} classes)")
    requested = torch.arange(10).repeat_interleave(per_class)
    images, _ = generator.sample(len(requested), labels=requested, seed=seed)
    images = to_uint8(images)
    accuracy, per_class_accuracy, spread = agreement(classifier, images, requested, real_spread)
    verdict = "PASS" if passes(accuracy, per_class_accuracy, spread) else "MISS"
    return Score(str(checkpoint), generator.step, "ema" if generator.is_ema else "raw",
                 accuracy, per_class_accuracy, spread,
                 classifier_frechet(classifier, images, reference), verdict)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoints = expand(args.checkpoints)
        train = load_images("digits", "", "train", DEMO_IMAGE_SIZE, download=False)
        test = load_images("digits", "", "test", DEMO_IMAGE_SIZE, download=False)
        classifier = fit_classifier(train)
        test_accuracy = float((classifier.predict(to_native(test.images))
                               == test.labels.numpy()).mean())
        real_spread = class_spread(to_native(train.images), train.labels.numpy(), 10)
        reference = classifier_statistics(classifier, test.images)
        # What real digits score: the training digits against the held-out ones.
        real_frechet = classifier_frechet(classifier, train.images, reference)
        scores = []
        for checkpoint in checkpoints:
            payload = load_checkpoint(checkpoint)  # read (and warned about) once
            has_ema = payload.get("generator_ema") is not None
            for use_ema in (False, True) if has_ema else (False,):
                scores.append(score(checkpoint, payload, use_ema, classifier, real_spread,
                                    reference, args.per_class, args.seed))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"classifier_test_accuracy": test_accuracy,
                          "real_train_frechet": real_frechet,
                          "scores": [asdict(s) for s in scores]}, indent=2))
        return 0
    print(f"classifier: SVC on {len(train.labels)} training digits, accuracy "
          f"{test_accuracy:.3f} on the {len(test.labels)} test digits")
    print(f"Frechet distance to the {len(test.labels)} test digits in its decision values: "
          f"{real_frechet:.3f} for the {len(train.labels)} real training digits")
    print(f"goal: accuracy >= {MIN_ACCURACY}, every class >= {MIN_CLASS_ACCURACY}, spread >= "
          f"{MIN_SPREAD}; {args.per_class} images per class, seed {args.seed}\n")
    print(f"{'checkpoint':<24} {'step':>6} {'G':>4} {'accuracy':>8} {'spread':>6} "
          f"{'FD':>7}  {'per class 0..9':<50} verdict")
    for s in scores:
        per_class = " ".join(f"{a:.2f}" for a in s.per_class)
        print(f"{Path(s.checkpoint).name:<24} {s.step:>6} {s.generator:>4} {s.accuracy:>8.3f} "
              f"{s.spread:>6.2f} {s.frechet:>7.3f}  {per_class:<50} {s.verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
