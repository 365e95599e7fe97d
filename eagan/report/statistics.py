"""The statistics of ``--report``: per run, each measure at the best evaluation (the one best.pt
holds: lowest primary distance), at the last one and as the mean of the last k; per pair of
groups on the same dataset and evaluation, the difference of the means over seeds with a 95%
confidence interval from Welch's t (scipy.stats.t, each seed one sample) and a verdict. The best
of N noisy evaluations is biased low, which is why the last and the last-k statistics are
reported beside it. Runs that failed or collapsed are flagged (``run_flags``), never dropped."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from eagan.report.runs import Group, Run

CONFIDENCE = 0.95
ATTENTION_SHORT = {"external": "EA", "self": "SA", "efficient": "efficient attention",
                   "none": "no attention"}
# A digits run is flagged as collapsed when its last evaluation draws less varied digits than
# this (real digits: 1) or names some class this rarely.
MIN_SPREAD = 0.5
MIN_CLASS_ACCURACY = 0.5


@dataclass(frozen=True)
class Measure:
    key: str  # the evaluation's value (Metrics/<key>)
    name: str
    lower_is_better: bool


# Per primary distance: the measures compared, the primary first, and the values shown at the
# best evaluation only.
MEASURES = {
    "fid": (Measure("fid", "FID", True),),
    "fd": (Measure("fd", "FD", True), Measure("class_accuracy", "class accuracy", False),
           Measure("class_spread", "class spread", False)),
}
AT_BEST = {"fid": ("is_mean", "kid_mean", "kid_std", "precision", "recall"),
           "fd": ("min_class_accuracy",)}


def run_statistics(run: Run, primary: str, last_k: int) -> dict[str, float]:
    """Per measure m: best_m (at the evaluation with the lowest primary distance), last_m and
    last_k_m; best_step; and the AT_BEST values there as <key>_at_best."""
    best = min(run.evaluations, key=lambda e: e.values[primary])
    result = {"best_step": float(best.step)}
    for measure in MEASURES[primary]:
        values = [e.values[measure.key] for e in run.evaluations]
        result[f"best_{measure.key}"] = best.values[measure.key]
        result[f"last_{measure.key}"] = values[-1]
        result[f"last_k_{measure.key}"] = float(np.mean(values[-last_k:]))
    for key in AT_BEST[primary]:
        if key in best.values:
            result[f"{key}_at_best"] = best.values[key]
    return result


def run_flags(run: Run) -> list[str]:
    """Why a run's numbers need a second look: no evaluation, stopped before train.total_steps,
    or (digits) collapsed at its last evaluation."""
    if not run.evaluations:
        return ["failed: no evaluation"]
    flags = []
    last = run.evaluations[-1]
    total = run.config.get("train.total_steps")
    if total is not None and last.step < total:
        flags.append(f"unfinished: last evaluation at step {last.step} of {total}")
    spread, lowest = last.values.get("class_spread"), last.values.get("min_class_accuracy")
    if spread is not None and spread < MIN_SPREAD:
        flags.append(f"collapsed: spread {spread:.2f} < {MIN_SPREAD}")
    if lowest is not None and lowest < MIN_CLASS_ACCURACY:
        flags.append(f"collapsed: a class at accuracy {lowest:.2f} < {MIN_CLASS_ACCURACY}")
    return flags


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; nan for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def welch_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE
                   ) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its confidence interval from Welch's t (unequal variances,
    Welch-Satterthwaite degrees of freedom); the interval is nan with fewer than 2 values in
    either sample."""
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    return diff, diff - half, diff + half


def verdict(low: float, high: float, lower_is_better: bool, name_a: str, name_b: str,
            seeds_a: int, seeds_b: int) -> str:
    if math.isnan(low):
        return "cannot tell: needs at least 2 seeds per group"
    if low > 0 or high < 0:
        a_higher = low > 0
        return f"{name_a if a_higher != lower_is_better else name_b} better"
    seeds = f"{seeds_a}" if seeds_a == seeds_b else f"{seeds_a} and {seeds_b}"
    return f"no difference detectable with {seeds} seeds"


@dataclass
class Comparison:
    a: Group
    b: Group
    measure: str
    mean_a: float
    mean_b: float
    diff: float
    low: float
    high: float
    verdict: str


def measure_names(primary: str, last_k: int) -> list[tuple[str, str, bool]]:
    """(statistic key, printed name, lower is better) of every compared statistic."""
    names = []
    for measure in MEASURES[primary]:
        at_best = f"best {measure.name}" if measure.key == primary else \
            f"{measure.name} at best {MEASURES[primary][0].name}"
        names += [(f"best_{measure.key}", at_best, measure.lower_is_better),
                  (f"last_{measure.key}", f"last {measure.name}", measure.lower_is_better),
                  (f"last_k_{measure.key}", f"mean of last {last_k} {measure.name}",
                   measure.lower_is_better)]
    return names


def compare(groups: list[Group], last_k: int) -> list[Comparison]:
    """Every pair of groups on the same dataset and evaluation, for every compared statistic;
    each group's evaluated runs are its samples."""
    comparisons = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a.label is None or (a.dataset, a.label) != (b.dataset, b.label):
                continue
            primary = a.label.primary
            names = _short_names(a, b)
            stats_a = [run_statistics(r, primary, last_k) for r in a.evaluated]
            stats_b = [run_statistics(r, primary, last_k) for r in b.evaluated]
            for key, name, lower_is_better in measure_names(primary, last_k):
                values_a = [s[key] for s in stats_a]
                values_b = [s[key] for s in stats_b]
                diff, low, high = welch_interval(values_a, values_b)
                comparisons.append(Comparison(
                    a, b, name, float(np.mean(values_a)), float(np.mean(values_b)), diff, low,
                    high, verdict(low, high, lower_is_better, *names, len(values_a),
                                  len(values_b))))
    return comparisons


def _short_names(a: Group, b: Group) -> tuple[str, str]:
    if a.attention != b.attention:
        return (ATTENTION_SHORT.get(a.attention, a.attention),
                ATTENTION_SHORT.get(b.attention, b.attention))
    return a.name, b.name
