"""``run.py --report``: compare runs over seeds, with the statistics to tell a gain from noise.

Each run folder gives its config (config.yaml) and its evaluation history (the stats.jsonl
lines that carry Metrics/fid, with the labels the trainer logs beside them). Runs whose configs
differ only in the seed (and in keys that do not change what a run computes: NOT_COMPARED) form
a group. Per group: best FID over the run, last evaluation and the mean of the last k
evaluations, each as mean +- std over seeds and per seed; for every pair of groups on the same
dataset and evaluation, the difference of the means with a 95% confidence interval from Welch's t
(scipy.stats.t, each seed one sample) and a verdict. The best of N noisy evaluations is biased
low, which is why the last and the last-k statistics are reported beside it.

A group whose evaluations mix protocols, sample counts, BN modes or Inception weights is refused,
not averaged.
"""
from __future__ import annotations

import csv
import glob
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from eagan import checkpoint as ckpt
from eagan.errors import UserError
from eagan.files import atomic_output, ensure_writable_dir
from eagan.metrics import OFFICIAL_INCEPTION_SHA256
from eagan.protocols import PROTOCOLS

# sha256 of the released InceptionV3 weights (torch-fidelity v0.2.0's
# weights-inception-2015-12-05-6726825d.pth, the same file as pytorch-fid's); any other file is
# a stand-in whose FID means nothing.
# Config keys that do not change what a run computes: left out when runs are grouped.
NOT_COMPARED = ("train.seed", "run_dir", "data.root", "data.download", "data.num_workers",
                "train.device", "train.log_every", "train.sample_every", "train.checkpoint_every",
                "train.keep_checkpoints", "eval.cache_dir", "eval.inception_weights")
ATTENTION_SHORT = {"external": "EA", "self": "SA", "efficient": "efficient attention",
                   "none": "no attention"}
CONFIDENCE = 0.95
CLASS_ACCURACY_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / \
    "demo_class_accuracy.py"
CLASS_ACCURACY_PER_CLASS = 100


@dataclass(frozen=True)
class EvalLabel:
    """What an FID is comparable with: same protocol, sample count, BN mode and weights."""

    protocol: str
    num_samples: int | None
    bn_mode: str
    weights: str  # sha256, or "unrecorded"

    @property
    def official(self) -> bool:
        return self.weights == OFFICIAL_INCEPTION_SHA256

    def __str__(self) -> str:
        kind = "official" if self.official else (
            "unrecorded" if self.weights == "unrecorded" else "stand-in")
        weights = f"{self.weights[:8]} ({kind})" if kind != "unrecorded" else kind
        return (f"{self.protocol}, {self.num_samples} samples, BN {self.bn_mode}, "
                f"Inception {weights}")


@dataclass
class Evaluation:
    step: int
    values: dict[str, float]  # fid, is_mean, kid_mean, kid_std, precision, recall: as recorded
    label: EvalLabel


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: dotted key -> value
    evaluations: list[Evaluation]
    gammas: dict[str, list[tuple[int, float]]]  # attention block -> (step, gamma)
    steps_per_sec: float | None
    class_score: tuple[float, float] | None = None  # (accuracy, spread), --class-accuracy

    @property
    def seed(self) -> int:
        return int(self.config["train.seed"])

    def statistics(self, last_k: int) -> dict[str, float]:
        """best FID, its step and the other metrics there; last FID; mean of the last k."""
        fids = [e.values["fid"] for e in self.evaluations]
        best = self.evaluations[int(np.argmin(fids))]
        result = {"best_fid": best.values["fid"], "best_step": float(best.step),
                  "last_fid": fids[-1], "last_k_fid": float(np.mean(fids[-last_k:]))}
        for key in ("is_mean", "kid_mean", "kid_std", "precision", "recall"):
            if key in best.values:
                result[f"{key}_at_best"] = best.values[key]
        if self.class_score is not None:
            result["class_accuracy"], result["class_spread"] = self.class_score
        return result


@dataclass
class Group:
    name: str
    runs: list[Run]
    label: EvalLabel
    differs: dict[str, Any] = field(default_factory=dict)  # keys that vary between groups

    @property
    def attention(self) -> str:
        return str(self.runs[0].config.get("model.attention"))

    @property
    def dataset(self) -> str:
        return str(self.runs[0].config.get("data.dataset"))


# Compared between groups: (key of Run.statistics, name, lower is better).
MEASURES = (("best_fid", "best FID", True), ("last_fid", "last FID", True),
            ("last_k_fid", "mean of last k FID", True), ("class_accuracy", "class accuracy",
                                                         False))


# ----------------------------------------------------------------------------- reading runs

def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def find_runs(arguments: list[str]) -> list[Path]:
    """Run folders named by the arguments: a run folder (it holds config.yaml), a folder of run
    folders (``runs/cifar10_eagan`` holding seed0, seed1, ...), or a glob of either."""
    found: list[Path] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument)) if glob.has_magic(argument) else [argument]
        if not matches:
            raise UserError(f"{argument}: matches no run folder")
        for match in map(Path, matches):
            if (match / "config.yaml").is_file():
                found.append(match)
                continue
            children = sorted(p.parent for p in match.glob("*/config.yaml")) \
                if match.is_dir() else []
            if not children:
                raise UserError(f"{match}: not a run folder (no config.yaml in it or in its "
                                f"sub-folders)")
            found.extend(children)
    unique = list(dict.fromkeys(path.resolve() for path in found))
    return unique


def read_run(path: Path) -> Run:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path / 'config.yaml'}: cannot read the run's config ({error})") \
            from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.yaml'}: expected a mapping, got "
                        f"{type(config).__name__}")
    flat = flatten(config)
    stats_path = path / "stats.jsonl"
    if not stats_path.is_file():
        raise UserError(f"{stats_path}: no such file; the run has logged nothing yet")
    fallback = _label_from_config(flat)
    evaluations, gammas, speeds = [], {}, []
    for line in stats_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed process
        step = int(record["step"])
        if "Metrics/fid" in record:
            values = {key.removeprefix("Metrics/"): float(value) for key, value in record.items()
                      if key.startswith("Metrics/")}
            evaluations.append(Evaluation(step, values, _label_from_record(record, fallback)))
        for key, value in record.items():
            if key.startswith("Attention/gamma/"):
                gammas.setdefault(key.removeprefix("Attention/gamma/"), []).append(
                    (step, float(value)))
        if "Timing/steps_per_sec" in record:
            speeds.append(float(record["Timing/steps_per_sec"]))
    if not evaluations:
        raise UserError(f"{stats_path}: no evaluation recorded (no Metrics/fid); train with "
                        f"eval.every > 0")
    return Run(path, flat, evaluations, gammas, float(np.mean(speeds)) if speeds else None)


def _label_from_config(flat: dict[str, Any]) -> EvalLabel:
    """The label of evaluations logged without one: what the run's config asked for."""
    protocol = str(flat.get("eval.protocol"))
    preset = PROTOCOLS.get(protocol)
    num_samples = flat.get("eval.num_samples") or (preset.num_samples if preset else None)
    return EvalLabel(protocol, num_samples, preset.bn_mode if preset else "unrecorded",
                     "unrecorded")


def _label_from_record(record: dict[str, Any], fallback: EvalLabel) -> EvalLabel:
    if "Eval/protocol" not in record:
        return fallback
    return EvalLabel(record["Eval/protocol"], record.get("Eval/num_samples"),
                     record.get("Eval/bn_mode", "unrecorded"),
                     record.get("Eval/inception_sha256") or "unrecorded")


# ----------------------------------------------------------------------------- grouping

def group_runs(runs: list[Run]) -> list[Group]:
    """Runs whose configs agree outside NOT_COMPARED, one group each, named by what differs."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.config.items() if k not in NOT_COMPARED))
        by_key.setdefault(key, []).append(run)
    compared = [dict(key) for key in by_key]
    keys = sorted({k for config in compared for k in config}, key=lambda k: (
        k != "model.attention", k))
    varying = [k for k in keys if len({config.get(k) for config in compared}) > 1]
    groups = []
    for members in by_key.values():
        first = members[0].config
        differs = {k: first.get(k) for k in varying}
        name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in differs.items()) or "all runs"
        groups.append(Group(name, sorted(members, key=lambda r: r.seed),
                            _single_label(name, members), differs))
    for group in groups:
        seeds = [run.seed for run in group.runs]
        if len(set(seeds)) != len(seeds):
            twins = [str(r.path) for r in group.runs if seeds.count(r.seed) > 1]
            raise UserError(f"group {group.name}: runs {', '.join(twins)} have the same config "
                            f"and seed; give one of them")
    return sorted(groups, key=lambda g: g.name)


def _single_label(name: str, runs: list[Run]) -> EvalLabel:
    seen: dict[EvalLabel, Path] = {}
    for run in runs:
        for evaluation in run.evaluations:
            seen.setdefault(evaluation.label, run.path)
    if len(seen) > 1:
        (a, where_a), (b, where_b) = list(seen.items())[:2]
        raise UserError(f"group {name}: evaluations mix protocols or Inception weights ({a} in "
                        f"{where_a}; {b} in {where_b}); they are not averaged")
    return next(iter(seen))


# ----------------------------------------------------------------------------- statistics

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


def compare(groups: list[Group], last_k: int) -> list[Comparison]:
    """Every pair of groups on the same dataset and evaluation, for every measure both have."""
    comparisons = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if (a.dataset, a.label) != (b.dataset, b.label):
                continue
            names = _short_names(a, b)
            for key, measure, lower_is_better in MEASURES:
                values_a = [r.statistics(last_k).get(key) for r in a.runs]
                values_b = [r.statistics(last_k).get(key) for r in b.runs]
                if None in values_a or None in values_b:
                    continue
                diff, low, high = welch_interval(values_a, values_b)
                comparisons.append(Comparison(
                    a, b, measure.replace("last k", f"last {last_k}"), float(np.mean(values_a)),
                    float(np.mean(values_b)), diff, low, high,
                    verdict(low, high, lower_is_better, *names, len(values_a), len(values_b))))
    return comparisons


def _short_names(a: Group, b: Group) -> tuple[str, str]:
    if a.attention != b.attention:
        return (ATTENTION_SHORT.get(a.attention, a.attention),
                ATTENTION_SHORT.get(b.attention, b.attention))
    return a.name, b.name


# ----------------------------------------------------------------------------- class accuracy

def score_class_accuracy(runs: list[Run]) -> None:
    """The demo's class accuracy and spread (benchmarks/demo_class_accuracy.py) of each digits
    run's latest checkpoint (raw generator), stored on the run; other datasets are skipped."""
    digits = [run for run in runs if run.config.get("data.dataset") == "digits"]
    if not digits:
        return
    if not CLASS_ACCURACY_SCRIPT.is_file():
        raise UserError(f"--class-accuracy: {CLASS_ACCURACY_SCRIPT} not found (it ships with a "
                        f"checkout of the repository)")
    spec = importlib.util.spec_from_file_location("demo_class_accuracy", CLASS_ACCURACY_SCRIPT)
    measure = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = measure  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(measure)
    except ImportError as error:
        raise UserError(f"--class-accuracy needs scikit-learn (pip install -e '.[demo]'): "
                        f"{error}") from None
    finally:
        sys.modules.pop(spec.name, None)
    from eagan.data import load_images

    train = load_images("digits", "", "train", measure.DEMO_IMAGE_SIZE, download=False)
    held_out = load_images("digits", "", "test", measure.DEMO_IMAGE_SIZE, download=False)
    classifier = measure.fit_classifier(train)
    real_spread = measure.class_spread(measure.to_native(train.images), train.labels.numpy(),
                                       10)
    reference = measure.classifier_statistics(classifier, held_out.images)
    for run in digits:
        latest = ckpt.latest_checkpoint(run.path)
        if latest is None:
            raise UserError(f"{run.path}: --class-accuracy: the run holds no step checkpoint")
        score = measure.score(latest, ckpt.load_checkpoint(latest), False, classifier,
                              real_spread, reference, CLASS_ACCURACY_PER_CLASS, 0)
        run.class_score = (score.accuracy, score.spread)


# ----------------------------------------------------------------------------- output

def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std_text(values: list[float | None], digits: int = 3) -> str:
    if not values or None in values:
        return "-"
    mean, std = mean_std(values)
    return _number(mean, digits) + (f" +- {_number(std, digits)}" if not math.isnan(std) else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def group_rows(groups: list[Group], last_k: int) -> tuple[list[str], list[list[str]]]:
    header = ["group", "attention", "differs", "dataset", "evaluated as", "seeds",
              "best FID", "best FID per seed", "step of best", "IS at best", "KID at best",
              "precision / recall at best", "last FID", f"mean of last {last_k} FID",
              "steps/s"]
    with_class = any(r.class_score for g in groups for r in g.runs)
    if with_class:
        header += ["class accuracy", "class spread"]
    rows = []
    for group in groups:
        per_run = [r.statistics(last_k) for r in group.runs]

        def column(key: str, digits: int = 3) -> str:
            return _mean_std_text([s.get(key) for s in per_run], digits)

        others = {k: v for k, v in group.differs.items() if k != "model.attention"}
        row = [group.name, group.attention, ", ".join(f"{k}={v}" for k, v in others.items())
               or "-", group.dataset, str(group.label), str(len(group.runs)), column("best_fid"),
               " ".join(f"{s['best_fid']:.3f} (seed {r.seed})" for s, r in
                        zip(per_run, group.runs)),
               " ".join(str(int(s["best_step"])) for s in per_run), column("is_mean_at_best"),
               column("kid_mean_at_best", 5), column("precision_at_best") + " / "
               + column("recall_at_best"), column("last_fid"), column("last_k_fid"),
               _mean_std_text([r.steps_per_sec for r in group.runs], 2)]
        if with_class:
            row += [column("class_accuracy"), column("class_spread", 2)]
        rows.append(row)
    return header, rows


def run_rows(groups: list[Group], last_k: int) -> tuple[list[str], list[list[str]]]:
    header = ["run", "group", "seed", "evaluations", "best FID", "step of best", "IS at best",
              "KID at best", "precision at best", "recall at best", "last FID",
              f"mean of last {last_k} FID", "steps/s", "class accuracy", "class spread"]
    rows = []
    for group in groups:
        for run in group.runs:
            s = run.statistics(last_k)
            rows.append([str(run.path), group.name, str(run.seed), str(len(run.evaluations)),
                         _number(s["best_fid"]), str(int(s["best_step"])),
                         _number(s.get("is_mean_at_best")), _number(s.get("kid_mean_at_best"),
                                                                     5),
                         _number(s.get("precision_at_best")), _number(s.get("recall_at_best")),
                         _number(s["last_fid"]), _number(s["last_k_fid"]),
                         _number(run.steps_per_sec, 2), _number(s.get("class_accuracy")),
                         _number(s.get("class_spread"), 2)])
    return header, rows


def comparison_rows(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["A", "B", "evaluated as", "measure", "mean A", "mean B", "A - B",
              f"{CONFIDENCE:.0%} CI (Welch)", "verdict"]
    rows = [[c.a.name, c.b.name, str(c.a.label), c.measure, _number(c.mean_a), _number(c.mean_b),
             _number(c.diff), "-" if math.isnan(c.low) else
             f"[{_number(c.low)}, {_number(c.high)}]", c.verdict] for c in comparisons]
    return header, rows


def header_lines(groups: list[Group], command: str) -> list[str]:
    runs = sum(len(g.runs) for g in groups)
    lines = ["# Comparison of runs", "",
             f"{runs} runs in {len(groups)} groups (runs whose configs differ only in the seed); "
             f"made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`.", ""]
    labels = {g.label for g in groups}
    if any(not label.official for label in labels):
        weights = ", ".join(sorted({label.weights[:16] for label in labels
                                    if not label.official}))
        lines += [f"**Stand-in Inception weights** ({weights}): the FID, IS and KID and the "
                  f"precision/recall below come from weights that are not (or not recorded "
                  f"as) the released InceptionV3's and mean nothing beyond showing the tool "
                  f"at work.", ""]
    return lines


def explanation(last_k: int) -> list[str]:
    return [
        "How to read: each group is one config trained with several seeds. Best FID is the "
        "lowest FID over a run's evaluations (biased low: the minimum of noisy numbers), last "
        f"FID the final evaluation, and the mean of the last {last_k} evaluations (all of a "
        "run's, if it has fewer) the least noisy of the three. Columns give mean +- sample "
        "std over seeds. A - B is the difference of the group means with its "
        f"{CONFIDENCE:.0%} confidence interval from "
        "Welch's t (scipy.stats.t, each seed one sample, Welch-Satterthwaite degrees of "
        "freedom); the verdict names the better group only when the interval excludes 0. "
        "Lower FID and KID are better; higher IS, precision, recall and class accuracy are "
        "better. Plots: FID against step (line: mean over seeds, band: lowest to highest seed) "
        "and the gate gamma of every attention block against step (a gamma near 0 means the "
        "network does not use that block).", ""]


def plot_fid(groups: list[Group], path: Path, title_note: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        curves = [{e.step: e.values["fid"] for e in run.evaluations} for run in group.runs]
        _mean_band(axes, curves, group.name)
    axes.set_xlabel("generator step")
    axes.set_ylabel("FID")
    axes.set_title(f"FID against step (mean over seeds, band: min to max){title_note}",
                   fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_gammas(groups: list[Group], path: Path) -> bool:
    """One panel per attention block; False (nothing written) when no run has one."""
    blocks = sorted({block for g in groups for r in g.runs for block in r.gammas})
    if not blocks:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for axes, block in zip(panels[0], blocks):
        for group in groups:
            curves = [dict(run.gammas[block]) for run in group.runs if block in run.gammas]
            if curves:
                _mean_band(axes, curves, group.name)
        axes.axhline(0.0, color="grey", linewidth=0.5)
        axes.set_title(f"gamma of {block}", fontsize=9)
        axes.set_xlabel("generator step")
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _mean_band(axes: Any, curves: list[dict[int, float]], label: str) -> None:
    steps = sorted(set().union(*curves))
    values = [[curve[s] for curve in curves if s in curve] for s in steps]
    seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
    line, = axes.plot(steps, [np.mean(v) for v in values], marker="o", markersize=3,
                      label=f"{label} ({seeds})")
    axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                      color=line.get_color(), alpha=0.2)


def write_report(arguments: list[str], out_dir: str | Path | None, last_k: int = 3,
                 class_accuracy: bool = False, command: str = "run.py --report") -> Path:
    """Read the runs, group, compare, and write report.md, the CSVs and the plots into
    ``out_dir`` (default reports/report-<UTC time>); returns the Markdown text's path. Every
    check happens before anything is written."""
    if last_k < 1:
        raise UserError(f"--last-k: expected a value >= 1, got {last_k}")
    runs = [read_run(path) for path in find_runs(arguments)]
    groups = group_runs(runs)
    if class_accuracy:
        score_class_accuracy(runs)
    comparisons = compare(groups, last_k)
    out = ensure_writable_dir(out_dir or Path("reports") /
                              f"report-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
                              "the report folder")

    tables = {"groups": group_rows(groups, last_k), "comparisons": comparison_rows(comparisons),
              "runs": run_rows(groups, last_k)}
    for name, (header, rows) in tables.items():
        with atomic_output(out / f"{name}.csv") as tmp_path, \
                open(tmp_path, "w", newline="", encoding="utf-8") as file:
            csv.writer(file).writerows([header, *rows])
    stand_in = any(not g.label.official for g in groups)
    plot_fid(groups, out / "fid_vs_step.png", " - stand-in Inception weights" if stand_in
             else "")
    has_gammas = plot_gammas(groups, out / "gamma_vs_step.png")

    lines = header_lines(groups, command)
    lines += ["## Groups", "", _table(*tables["groups"]), "",
              f"## Comparisons ({CONFIDENCE:.0%} confidence intervals from Welch's t)", "",
              _table(*tables["comparisons"]) if comparisons else
              "No two groups share a dataset and an evaluation protocol.", "",
              "## Runs", "", _table(*tables["runs"]), "", "## Plots", "",
              "![FID against step](fid_vs_step.png)", ""]
    lines += ["![gamma against step](gamma_vs_step.png)", ""] if has_gammas else \
        ["No run has an attention block: no gamma plot.", ""]
    lines += explanation(last_k)
    text = "\n".join(lines)
    with atomic_output(out / "report.md") as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    print(text)
    return out / "report.md"
