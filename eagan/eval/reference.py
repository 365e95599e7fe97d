"""Reference statistics of real images, computed once per engine, weights and image set and
cached as .npz under a name that carries the engine, the weights' sha256 and a digest of the
images, so that statistics from stand-in weights (tests), from the other engine or from a
changed dataset can never be mistaken for real ones."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eagan.eval.inception import Inception, InceptionEngine
from eagan.eval.scores import gaussian_statistics
from eagan.files import atomic_output, ensure_writable_dir


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def reference_statistics_path(cache_dir: Path, reference_name: str, images: Tensor,
                              weights_sha256: str, engine: str = Inception.name) -> Path:
    """Cache file of the reference statistics: the name, the image count, a digest of the
    images (a folder dataset can change under one name, or be resized), the engine (the same
    weights give other features through the other engine's preprocessing) and the weights'
    hash."""
    array = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(memoryview(array).cast("B"))
    name = (f"{_safe_name(reference_name)}-n{array.shape[0]}-images{digest.hexdigest()[:12]}"
            f"-{engine}-inception{weights_sha256[:16]}.npz")
    return Path(cache_dir).expanduser() / "fid_stats" / name


def reference_statistics(inception: InceptionEngine, images: Tensor, reference_name: str,
                         cache_dir: Path, batch_size: int,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FID statistics (mu (2048,), sigma (2048, 2048)) of the reference images, computed once
    and cached as .npz; a cache file that cannot be read is recomputed."""
    path = reference_statistics_path(cache_dir, reference_name, images, inception.weights_sha256,
                                     inception.name)
    if path.is_file():
        try:
            with np.load(path) as cached:
                if (str(cached["weights_sha256"]) == inception.weights_sha256
                        and str(cached["engine"]) == inception.name):
                    return cached["mu"], cached["sigma"]
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size, progress=progress)
    mu, sigma = gaussian_statistics(features[inception.fid_layer])
    ensure_writable_dir(path.parent, "the reference statistics cache")
    # Write then rename, so that an interrupted run never leaves a truncated cache file.
    with atomic_output(path, "the reference statistics") as tmp_path, \
            open(tmp_path, "wb") as file:
        np.savez(file, mu=mu, sigma=sigma, weights_sha256=inception.weights_sha256,
                 engine=inception.name, reference_name=reference_name)
    return mu, sigma



def reference_features(inception: InceptionEngine, images: Tensor, reference_name: str,
                       cache_dir: Path, batch_size: int, progress: bool = False) -> Tensor:
    """The reference images' FID-layer features (N, 2048), which KID and precision/recall need
    whole; cached beside the FID statistics."""
    stats_path = reference_statistics_path(cache_dir, reference_name, images,
                                           inception.weights_sha256, inception.name)
    path = stats_path.with_name(stats_path.stem + "-features.npy")
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path))
        except Exception:  # noqa: BLE001 - a truncated or foreign file is recomputed
            pass
    features = inception.image_features(images, batch_size,
                                        progress=progress)[inception.fid_layer].cpu()
    ensure_writable_dir(path.parent, "the reference statistics cache")
    with atomic_output(path, "the reference features") as tmp_path, \
            open(tmp_path, "wb") as file:
        np.save(file, features.numpy())
    return features

