"""FID and IS (and on request KID and precision/recall) of a generator under a protocol, with
the provenance that makes the numbers comparable, and their text table."""
from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from eagan.eval.inception import NOT_COMPARABLE, InceptionEngine
from eagan.eval.protocols import Protocol
from eagan.eval.reference import reference_features, reference_statistics
from eagan.eval.scores import (frechet_distance, gaussian_statistics, inception_score_from_logits,
                               kernel_inception_distance, precision_recall)
from eagan.nets.bn_mode import bn_mode
from eagan.train.distributed import DistContext, gather_to_main


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def runtime_provenance(generator: nn.Module, world_size: int) -> dict[str, Any]:
    """The numerics an evaluation ran under: torch, processes, BN sync, TF32 and cuDNN flags."""
    cudnn = torch.backends.cudnn
    return {
        "torch": torch.__version__,
        "device": str(_module_device(generator)),
        "world_size": world_size,
        "sync_batchnorm": any(isinstance(m, nn.SyncBatchNorm) for m in generator.modules()),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_enabled": bool(cudnn.enabled),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "cudnn_deterministic": bool(cudnn.deterministic),
    }


def evaluate_generator(generator: nn.Module, inception: InceptionEngine, *,
                       reference_images: Tensor | np.ndarray, reference_name: str,
                       protocol: Protocol, batch_size: int, generation_batch_size: int,
                       seed: int, cache_dir: str | Path, ema: bool = False,
                       step: int | None = None, progress: bool = False, rank: int = 0,
                       world_size: int = 1, metrics: Collection[str] = ("fid", "is")
                       ) -> dict[str, Any] | None:
    """FID and IS of ``generator`` under ``protocol`` against uint8 reference images
    (N, 3, H, W), with the provenance that makes the numbers comparable (or says they are not).

    Generated images come in full batches of ``generation_batch_size`` (in "batch" BN mode the
    numbers depend on it); real images go through Inception in batches of ``batch_size``. The FID
    set is drawn with seed ``seed + rank``; when the protocol scores IS on its own samples, that
    set is drawn with seed ``seed + world_size + rank``. Under torch.distributed (``world_size``
    > 1, every rank calling), each rank generates an equal share, the features are gathered on
    rank 0, which returns the result; the other ranks return None.

    ``generator``: any module with forward(z, labels) -> images in [-1, 1], attributes z_dim and
    num_classes (0: unconditional, called with labels=None), on ``inception``'s device. It is
    left exactly as it was: same train/eval flags, parameters and buffers; the global RNGs are
    not touched either. ``reference_name`` (e.g. "cifar10-test") names the reference in the
    cache and the results; ``ema`` and ``step`` are recorded as given. FID and IS are always
    computed; ``metrics`` holding "kid" or "prc" adds KID and precision/recall on the FID
    features of the same pass.
    """
    start = time.perf_counter()
    device = _module_device(generator)
    if device != inception.device:
        raise ValueError(f"the generator is on {device} but Inception on {inception.device}")
    if protocol.engine != inception.name:
        raise ValueError(f"protocol {protocol.name!r} runs on {protocol.engine}, got "
                         f"{inception.name}")
    # Equal shares, so every rank runs as many generator batches (SyncBatchNorm needs that);
    # rank 0 keeps the first num_samples of the gathered features.
    share = -(-protocol.num_samples // world_size)
    show = progress and rank == 0
    with bn_mode(generator, protocol.bn_mode):
        fid_set = inception.generator_features(generator, share, generation_batch_size,
                                               seed + rank, progress=show)
        is_set = fid_set if not protocol.is_own_samples else inception.generator_features(
            generator, share, generation_batch_size, seed + world_size + rank, progress=show)
    features = {"fid": fid_set[inception.fid_layer], "is": is_set[inception.is_layer]}
    if world_size > 1:
        parts = gather_to_main(DistContext(rank, world_size, device),
                               {name: values.cpu() for name, values in features.items()})
        if rank != 0:
            return None
        features = {name: torch.cat([part[name] for part in parts]) for name in features}
    features = {name: values[:protocol.num_samples] for name, values in features.items()}
    reference_images = torch.as_tensor(reference_images)
    mu_ref, sigma_ref = reference_statistics(inception, reference_images, reference_name,
                                             Path(cache_dir), batch_size, progress=progress)
    mu, sigma = gaussian_statistics(features["fid"])
    is_mean, is_std = inception_score_from_logits(features["is"], protocol.is_splits)
    warnings = [] if inception.official_weights else [NOT_COMPARABLE]
    if protocol.reference_note:
        warnings.append(protocol.reference_note)
    extra: dict[str, Any] = {}
    if {"kid", "prc"} & set(metrics):
        reference = reference_features(inception, reference_images, reference_name,
                                       Path(cache_dir), batch_size, progress=progress)
        if "kid" in metrics:
            extra.update(kernel_inception_distance(features["fid"], reference, seed))
        if "prc" in metrics:
            extra.update(precision_recall(features["fid"], reference))
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "is_mean": is_mean,
        "is_std": is_std,
        **extra,
        "protocol": protocol.name,
        "num_samples": protocol.num_samples,
        "is_samples": "own set" if protocol.is_own_samples else "the FID set",
        "is_splits": protocol.is_splits,
        "reference": {"name": reference_name, "split": protocol.reference_split,
                      "count": int(reference_images.shape[0]),
                      "held_out": protocol.reference_note is None
                      and protocol.reference_split != "train"},
        "bn_mode": protocol.bn_mode,
        "ema": ema,
        "step": step,
        "seed": seed,
        "generation_batch_size": generation_batch_size,
        "inception_batch_size": batch_size,
        "inception": inception.provenance(),
        "runtime": runtime_provenance(generator, world_size),
        "comparable": not warnings,
        "warnings": warnings,
        "elapsed_s": time.perf_counter() - start,
    }


def _result_rows(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    reference = result["reference"]
    inception, runtime = result["inception"], result["runtime"]
    step = "-" if result["step"] is None else str(result["step"])
    weights = f"{inception['weights_sha256'][:16]} " + (
        "(official)" if inception["official_weights"] else f"({NOT_COMPARABLE})")
    return [
        ("FID", f"{result['fid']:.3f}"),
        ("IS", f"{result['is_mean']:.3f} +- {result['is_std']:.3f}"),
        ("BN mode", result["bn_mode"]),
        *([("KID", f"{result['kid_mean']:.5f} +- {result['kid_std']:.5f} "
                   f"({result['kid_subsets']} subsets of {result['kid_subset_size']})")]
          if "kid_mean" in result else []),
        *([("precision / recall", f"{result['precision']:.3f} / {result['recall']:.3f} "
                                  f"(k = {result['prc_neighborhood']})")]
          if "precision" in result else []),
        ("protocol", result["protocol"]),
        ("samples", f"{result['num_samples']} (seed {result['seed']}; IS on "
                    f"{result['is_samples']}, {result['is_splits']} split"
                    f"{'s' if result['is_splits'] > 1 else ''})"),
        ("generation", f"full batches of {result['generation_batch_size']}, "
                       f"{runtime['world_size']} process(es), sync BN "
                       f"{'on' if runtime['sync_batchnorm'] else 'off'}"),
        ("reference", f"{reference['name']} (split {reference['split']}, "
                      f"{reference['count']} images)"),
        ("EMA generator", "yes" if result["ema"] else "no"),
        ("step", step),
        ("Inception", f"{inception['engine']} {inception['engine_version']}, "
                      f"{inception['generated_input']} fakes, {inception['resize']}, IS from "
                      f"{inception['is_logits']}"),
        ("weights sha256", weights),
        ("numerics", f"torch {runtime['torch']} on {runtime['device']}, TF32 matmul "
                     f"{runtime['tf32_matmul']} / cuDNN {runtime['tf32_cudnn']}, cuDNN "
                     f"benchmark {runtime['cudnn_benchmark']}, deterministic "
                     f"{runtime['cudnn_deterministic']}"),
        ("elapsed", f"{result['elapsed_s']:.1f} s"),
    ]


def format_results_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A text table of evaluate_generator results, one column per result (e.g. per BN mode)."""
    warnings = dict.fromkeys(warning for result in results for warning in result["warnings"])
    return side_by_side([_result_rows(result) for result in results], list(warnings))


def side_by_side(columns: Sequence[Sequence[tuple[str, str]]], notes: Sequence[str]) -> str:
    """Rows of (label, value), one column per result: a row whose values all agree is printed
    once; then every note (a warning) once."""
    width = max(len(label) for label, _ in columns[0])
    lines = []
    for index, (label, first) in enumerate(columns[0]):
        values = [column[index][1] for column in columns]
        joined = first if all(value == first for value in values) else "  |  ".join(values)
        lines.append(f"{label:<{width}}  {joined}")
    lines += [f"{'WARNING':<{width}}  {note}" for note in notes]
    return "\n".join(lines)
