"""Score maths on features, in float64: the Inception Score of logits, Gaussian statistics,
the Frechet distance, and KID and precision/recall through torch-fidelity's functions.

FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", 2017. IS: Salimans et al., "Improved Techniques for Training GANs", 2016.
A new metric is a function of feature sets here and one entry in evaluate_generator's result.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor
from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                       kid_features_to_metric)
from torch_fidelity.metric_prc import (KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                       prc_features_to_metric)


def inception_score_from_logits(logits: Tensor, splits: int) -> tuple[float, float]:
    """Inception Score (Salimans et al., 2016): exp(E_x KL(p(y|x) || p(y))) per split.

    logits: (N, K). The N rows are cut into ``splits`` consecutive chunks (the same boundaries as
    torch-fidelity, without its shuffle, and as StudioGAN); p(y) is the mean of p(y|x) within a
    chunk. Returns the mean and the (population) std over the chunks.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in [1, {n}], got {splits}")
    log_p = logits.double().log_softmax(dim=1)  # (N, K)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, K)
        log_marginal = chunk.exp().mean(dim=0).log()  # (K,)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)  # (n_i,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def gaussian_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    array = features.double().cpu().numpy()  # (N, D)
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _clip_to_rank(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below rounding level (numpy's matrix_rank
    tolerance) set to 0: with fewer samples than dimensions most of them are rounding noise,
    whose square roots (about 1e-8 of the largest each) would add up over 2048 dimensions."""
    tolerance = values.size * np.finfo(np.float64).eps * max(values.max(initial=0.0), 0.0)
    return np.where(values > tolerance, values, 0.0)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau, 1982; the
    FID of Heusel et al., 2017): |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    With sigma1 = W W^T (W = V sqrt(L) from its eigen-decomposition, keeping the r eigenvalues
    above rounding level), sigma1 sigma2 = W (W^T sigma2) has the non-zero eigenvalues of the
    symmetric PSD r x r matrix W^T sigma2 W; tr((sigma1 sigma2)^(1/2)) is the sum of their
    square roots. Those eigenvalues are the squares of sigma-scale numbers, so no tolerance is
    applied to them (one relative to the largest would drop every direction below about 7e-7 of
    the largest variance and inflate the distance): only round-off negatives become 0. Two
    symmetric eigen-decompositions replace a general one (pytorch-fid's sqrtm, torch-fidelity's
    eigvals): real even when the covariances are singular (fewer samples than dimensions),
    several times faster, and cheaper still when r is small.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be two vectors of one length, got {mu1.shape}, {mu2.shape}")
    if sigma1.shape != (mu1.size, mu1.size) or sigma2.shape != sigma1.shape:
        raise ValueError(f"covariances must be {mu1.size}x{mu1.size}, got {sigma1.shape}, "
                         f"{sigma2.shape}")
    values, vectors = np.linalg.eigh(sigma1)  # (D,), (D, D)
    values = _clip_to_rank(values)
    kept = values > 0
    w = vectors[:, kept] * np.sqrt(values[kept])  # (D, r): sigma1 = w w^T
    middle = w.T @ sigma2 @ w  # (r, r)
    middle = (middle + middle.T) / 2  # remove rounding asymmetry before eigvalsh
    trace_covmean = np.sqrt(np.maximum(np.linalg.eigvalsh(middle), 0.0)).sum()
    diff = mu1 - mu2  # (D,)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)



# KID (Binkowski et al., 2018): the unbiased MMD^2 with the cubic polynomial kernel, averaged over
# random subsets (torch-fidelity's defaults: 100 subsets of 1000, fewer when there are fewer
# samples). Precision and recall (Kynkaanniemi et al., 2019): the share of generated samples
# inside the k-nearest-neighbour balls of the real ones, and the reverse, k = 3.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PRC_NEIGHBORHOOD = 3


def kernel_inception_distance(generated: Tensor, reference: Tensor, seed: int
                              ) -> dict[str, float | int]:
    """KID mean and std over subsets of features (N, D) and (M, D), through torch-fidelity,
    with the subset count and size used."""
    size = min(KID_SUBSET_SIZE, len(generated), len(reference))
    kid = kid_features_to_metric(generated, reference, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD],
            "kid_subsets": KID_SUBSETS, "kid_subset_size": size}


def precision_recall(generated: Tensor, reference: Tensor) -> dict[str, float | int]:
    """Precision and recall of generated against reference features, through torch-fidelity."""
    prc = prc_features_to_metric(generated.float(), reference.float(),
                                 prc_neighborhood=PRC_NEIGHBORHOOD, save_cpu_ram=True,
                                 verbose=False)
    return {"precision": prc[KEY_METRIC_PRECISION], "recall": prc[KEY_METRIC_RECALL],
            "prc_neighborhood": PRC_NEIGHBORHOOD}
