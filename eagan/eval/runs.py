"""Evaluation wired to a run: the reference split a protocol names, its scorer (Inception, or
the digits classifier), the generation batch size, the hook the trainer calls every eval.every
steps, and ``--eval`` on a checkpoint (a table, and one JSON file per BN mode beside it)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from eagan.config import Config
from eagan.data import SPLITS, ImageSet, load_images
from eagan.errors import UserError
from eagan.eval.digits import digits_reference, evaluate_digits, format_digits_table
from eagan.eval.evaluate import evaluate_generator, format_results_table
from eagan.eval.inception import load_inception
from eagan.eval.protocols import DIGITS_ENGINE, Protocol, resolve_protocol
from eagan.files import atomic_output
from eagan.sampling import SampledGenerator


def reference_set(config: Config) -> tuple[ImageSet, str, Protocol]:
    """The protocol resolved for the config's dataset (BN mode: eval.bn_mode, else the
    protocol's), its reference split (uint8 images and labels) and name."""
    data = config.data
    protocol = resolve_protocol(config.eval.protocol, data.dataset, config.eval.num_samples,
                                available_splits=SPLITS[data.dataset],
                                bn_mode_override=config.eval.bn_mode)
    images = load_images(data.dataset, data.root, protocol.reference_split, data.image_size,
                         download=data.download, resize=data.resize)
    return images, f"{data.dataset}-{protocol.reference_split}", protocol


def generation_batch_size(protocol: Protocol, train_batch_size: int, eval_batch_size: int
                          ) -> int:
    """The batch the generator runs at while evaluating: the training batch size under
    studiogan2021 (StudioGAN generated in training-size batches) and whenever BN uses batch
    statistics (they depend on the batch, so it must be the batch G trained with); otherwise
    eval.batch_size, which then changes nothing but speed."""
    if protocol.train_batch_generation or protocol.bn_mode == "batch":
        return train_batch_size
    return eval_batch_size


Scorer = Callable[..., Any]  # (generator, protocol, **options) -> result or None


def load_scorer(config: Config, device: torch.device, show_progress: bool = True
                ) -> tuple[Protocol, Scorer]:
    """The protocol resolved for the config and a function that scores a generator under it:
    ``scorer(generator, protocol, generation_batch_size=, ema=, step=, rank=, world_size=)``.
    The reference images and the Inception weights (or the digits classifier) are loaded now,
    so that a missing file stops a run before it trains rather than hours later."""
    reference_images, name, protocol = reference_set(config)
    if protocol.engine == DIGITS_ENGINE:
        data = config.data
        train = load_images(data.dataset, data.root, "train", data.image_size,
                            download=data.download, resize=data.resize)
        reference = digits_reference(train.images, train.labels, reference_images.images,
                                     reference_images.labels, name, config.eval.cache_dir)

        def score_digits(generator: nn.Module, protocol: Protocol, **kwargs: Any
                         ) -> dict[str, Any] | None:
            return evaluate_digits(generator, reference, protocol=protocol, seed=config.eval.seed,
                                   **kwargs)
        return protocol, score_digits

    inception = load_inception(protocol.engine, config.eval.inception_weights, device,
                               progress=show_progress)

    def score_inception(generator: nn.Module, protocol: Protocol, **kwargs: Any
                        ) -> dict[str, Any] | None:
        return evaluate_generator(
            generator, inception, reference_images=reference_images.images, reference_name=name,
            protocol=protocol, batch_size=config.eval.batch_size, seed=config.eval.seed,
            cache_dir=Path(config.eval.cache_dir).expanduser(), progress=show_progress,
            metrics=config.eval.metrics, **kwargs)
    return protocol, score_inception


def summary_line(result: dict[str, Any]) -> str:
    """One line of an evaluation's numbers, for the progress log."""
    if result["protocol"] == "digits":
        numbers = (f"FD {result['fd']:.3f}, class accuracy {result['class_accuracy']:.3f} "
                   f"(lowest {result['min_class_accuracy']:.2f}), spread "
                   f"{result['class_spread']:.3f}")
    else:
        numbers = f"FID {result['fid']:.3f}, IS {result['is_mean']:.3f}"
    return (f"step {result['step']}: {numbers} ({result['protocol']}, {result['num_samples']} "
            f"samples, BN {result['bn_mode']})")


def format_results(results: list[dict[str, Any]]) -> str:
    """The table of one checkpoint's results (one column per BN mode)."""
    if results[0]["protocol"] == "digits":
        return format_digits_table(results)
    return format_results_table(results)


def make_training_evaluator(config: Config, device: torch.device, show_progress: bool = True
                            ) -> Callable[..., dict[str, Any] | None]:
    """The trainer's evaluation hook: the protocol's scores of a generator at a step, sampled
    across the ranks under torchrun (the result on rank 0, None elsewhere)."""
    protocol, score = load_scorer(config, device, show_progress)
    generation_batch = generation_batch_size(protocol, config.train.batch_size,
                                             config.eval.batch_size)

    def evaluate(generator: nn.Module, step: int, rank: int = 0, world_size: int = 1
                 ) -> dict[str, Any] | None:
        result = score(generator, protocol, generation_batch_size=generation_batch,
                       ema=config.evaluates_ema, step=step, rank=rank, world_size=world_size)
        if result is not None and show_progress:
            tqdm.write(summary_line(result))
        return result

    return evaluate


def evaluate_checkpoint(config: Config, sampled: SampledGenerator, path: Path,
                        show_progress: bool = True,
                        bn_modes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The protocol's scores of the generator of checkpoint ``path`` in each of ``bn_modes``
    (None: eval.bn_mode, else the protocol's), on its device, generated at the batch size it
    was trained with (see generation_batch_size); prints one table with a column per mode and
    writes ``<checkpoint>-eval-<protocol>-bn-<mode>.json`` beside the checkpoint for each."""
    for key in ("dataset", "image_size"):
        trained, given = getattr(sampled.config.data, key), getattr(config.data, key)
        if trained != given:
            raise UserError(f"{path}: trained with data.{key} = {trained!r} but the config "
                            f"says {given!r}")
    protocol, score = load_scorer(config, sampled.device, show_progress)
    results, written = [], []
    for mode in bn_modes or [protocol.bn_mode]:
        moded = dataclasses.replace(protocol, bn_mode=mode)
        result = score(sampled.generator, moded, generation_batch_size=generation_batch_size(
            moded, sampled.config.train.batch_size, config.eval.batch_size),
            ema=sampled.is_ema, step=sampled.step)
        result["checkpoint"] = str(path)
        out_path = path.with_name(f"{path.stem}-eval-{protocol.name}-bn-{mode}.json")
        with atomic_output(out_path) as tmp_path:
            tmp_path.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        written.append(out_path)
    print(format_results(results))
    for out_path in written:
        print(out_path)
    return results
