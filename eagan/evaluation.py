"""Evaluation wired to a run: the reference split a protocol names, the generation batch size,
the hook the trainer calls every eval.every steps, and ``--eval`` on a checkpoint (a table, and
one JSON file per BN mode beside it)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from eagan.config import Config
from eagan.data import SPLITS, load_images
from eagan.errors import UserError
from eagan.files import atomic_output
from eagan.metrics import evaluate_generator, format_results_table, load_inception
from eagan.protocols import Protocol, resolve_protocol
from eagan.sampling import SampledGenerator


def reference_set(config: Config) -> tuple[Tensor, str, Protocol]:
    """The protocol resolved for the config's dataset (BN mode: eval.bn_mode, else the
    protocol's), its reference images (uint8) and name."""
    data = config.data
    protocol = resolve_protocol(config.eval.protocol, data.dataset, config.eval.num_samples,
                                available_splits=SPLITS[data.dataset],
                                bn_mode_override=config.eval.bn_mode)
    images = load_images(data.dataset, data.root, protocol.reference_split, data.image_size,
                         download=data.download, resize=data.resize)
    return images.images, f"{data.dataset}-{protocol.reference_split}", protocol


def generation_batch_size(protocol: Protocol, train_batch_size: int, eval_batch_size: int
                          ) -> int:
    """The batch the generator runs at while evaluating: the training batch size under
    studiogan2021 (StudioGAN generated in training-size batches) and whenever BN uses batch
    statistics (they depend on the batch, so it must be the batch G trained with); otherwise
    eval.batch_size, which then changes nothing but speed."""
    if protocol.train_batch_generation or protocol.bn_mode == "batch":
        return train_batch_size
    return eval_batch_size


def make_training_evaluator(config: Config, device: torch.device, show_progress: bool = True
                            ) -> Callable[..., dict[str, Any] | None]:
    """The trainer's evaluation hook: FID and IS of a generator at a step, sampled across the
    ranks under torchrun (the result on rank 0, None elsewhere). The reference split and the
    Inception weights are loaded now, so that a missing file stops the run before it trains
    rather than hours later."""
    images, name, protocol = reference_set(config)
    inception = load_inception(protocol.engine, config.eval.inception_weights, device,
                               progress=show_progress)
    is_ema = config.evaluates_ema

    def evaluate(generator: nn.Module, step: int, rank: int = 0, world_size: int = 1
                 ) -> dict[str, Any] | None:
        result = evaluate_generator(
            generator, inception, reference_images=images, reference_name=name,
            protocol=protocol, batch_size=config.eval.batch_size,
            generation_batch_size=generation_batch_size(protocol, config.train.batch_size,
                                                        config.eval.batch_size),
            seed=config.eval.seed, cache_dir=Path(config.eval.cache_dir).expanduser(),
            ema=is_ema, step=step, progress=show_progress, rank=rank, world_size=world_size,
            metrics=config.eval.metrics)
        if result is not None and show_progress:
            tqdm.write(f"step {step}: FID {result['fid']:.3f}, IS {result['is_mean']:.3f} "
                       f"({result['protocol']}, {result['num_samples']} samples, BN "
                       f"{result['bn_mode']})")
        return result

    return evaluate


def evaluate_checkpoint(config: Config, sampled: SampledGenerator, path: Path,
                        show_progress: bool = True,
                        bn_modes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """FID and IS of the generator of checkpoint ``path`` in each of ``bn_modes`` (None:
    eval.bn_mode, else the protocol's), on its device, generated at the batch size it was
    trained with (see generation_batch_size); prints one table with a column per mode and
    writes ``<checkpoint>-eval-<protocol>-bn-<mode>.json`` beside the checkpoint for each."""
    device = sampled.device
    for key in ("dataset", "image_size"):
        trained, given = getattr(sampled.config.data, key), getattr(config.data, key)
        if trained != given:
            raise UserError(f"{path}: trained with data.{key} = {trained!r} but the config "
                            f"says {given!r}")
    images, name, protocol = reference_set(config)
    inception = load_inception(protocol.engine, config.eval.inception_weights, device,
                               progress=show_progress)
    results, written = [], []
    for mode in bn_modes or [protocol.bn_mode]:
        moded = dataclasses.replace(protocol, bn_mode=mode)
        result = evaluate_generator(
            sampled.generator, inception, reference_images=images, reference_name=name,
            protocol=moded, batch_size=config.eval.batch_size,
            generation_batch_size=generation_batch_size(
                moded, sampled.config.train.batch_size, config.eval.batch_size),
            seed=config.eval.seed,
            cache_dir=Path(config.eval.cache_dir).expanduser(), ema=sampled.is_ema,
            step=sampled.step, progress=show_progress, metrics=config.eval.metrics)
        result["checkpoint"] = str(path)
        out_path = path.with_name(f"{path.stem}-eval-{protocol.name}-bn-{mode}.json")
        with atomic_output(out_path) as tmp_path:
            tmp_path.write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        written.append(out_path)
    print(format_results_table(results))
    for out_path in written:
        print(out_path)
    return results
