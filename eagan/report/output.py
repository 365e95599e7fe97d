"""What ``--report`` writes: report.md (groups, comparisons, runs, plots, how to read them),
the same tables as CSV, a plot of every compared measure against the step and one of the
attention gates."""
from __future__ import annotations

import csv
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from eagan.errors import UserError
from eagan.eval.digits import CLASSIFIER_NAME, FEATURES_NAME
from eagan.files import atomic_output, ensure_writable_dir
from eagan.report.runs import Group, find_runs, group_runs, read_run
from eagan.report.statistics import (AT_BEST, CONFIDENCE, MEASURES, Comparison, compare, mean_std,
                                     run_flags, run_statistics)

AT_BEST_NAMES = {"is_mean": "IS", "kid_mean": "KID", "precision": "precision",
                 "recall": "recall", "min_class_accuracy": "lowest class accuracy"}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std_text(values: list[float | None], digits: int = 3) -> str:
    if not values or None in values:
        return "-"
    mean, std = mean_std(values)
    return _number(mean, digits) + (f" +- {_number(std, digits)}" if not math.isnan(std) else "")


def _digits(key: str) -> int:
    return 5 if key.startswith("kid") else 3


def _measure_cells(statistics: list[dict[str, float]], primary: str, last_k: int,
                   combine: Any) -> dict[str, str]:
    """The measure columns of a group (``combine`` = mean +- std over seeds) or of a run
    (``combine`` = the one value), named after the run's protocol."""
    first = MEASURES[primary][0].name
    cells = {}
    for measure in MEASURES[primary]:
        at_best = f"best {measure.name}" if measure.key == primary else \
            f"{measure.name} at best {first}"
        cells[at_best] = combine([s[f"best_{measure.key}"] for s in statistics], measure.key)
        if measure.key == primary:
            cells["step of best"] = " ".join(str(int(s["best_step"])) for s in statistics)
    for key in AT_BEST[primary]:
        if key == "kid_std":
            continue
        name = f"{AT_BEST_NAMES[key]} at best"
        cells[name] = combine([s.get(f"{key}_at_best") for s in statistics], key)
    for measure in MEASURES[primary]:
        cells[f"last {measure.name}"] = combine([s[f"last_{measure.key}"] for s in statistics],
                                                measure.key)
        cells[f"mean of last {last_k} {measure.name}"] = combine(
            [s[f"last_k_{measure.key}"] for s in statistics], measure.key)
    return cells


def group_rows(groups: list[Group], last_k: int) -> tuple[list[str], list[list[str]]]:
    rows = []
    for group in groups:
        others = {k: v for k, v in group.differs.items() if k != "model.attention"}
        evaluated = group.evaluated
        row = {"group": group.name, "attention": group.attention,
               "differs": ", ".join(f"{k}={v}" for k, v in others.items()) or "-",
               "dataset": group.dataset, "evaluated as": str(group.label or "-"),
               "seeds": str(len(evaluated)) + (f" (+{len(group.runs) - len(evaluated)} "
                                               f"without evaluation)"
                                               if len(evaluated) < len(group.runs) else "")}
        if group.label is not None:
            primary = group.label.primary
            statistics = [run_statistics(r, primary, last_k) for r in evaluated]
            cells = _measure_cells(statistics, primary, last_k,
                                   lambda values, key: _mean_std_text(values, _digits(key)))
            name = MEASURES[primary][0].name
            cells[f"best {name} per seed"] = " ".join(
                f"{s[f'best_{primary}']:.3f} (seed {r.seed})" for s, r in zip(statistics,
                                                                                evaluated))
            row.update(cells)
        row["steps/s"] = _mean_std_text([r.steps_per_sec for r in group.runs], 2)
        row["peak memory (GB)"] = _mean_std_text([r.peak_memory_gb for r in group.runs], 2)
        flagged = [f"seed {r.seed}: {'; '.join(run_flags(r))}" for r in group.runs
                   if run_flags(r)]
        row["flagged runs"] = " / ".join(flagged) or "none"
        rows.append(row)
    return _as_table(rows)


def run_rows(groups: list[Group], last_k: int) -> tuple[list[str], list[list[str]]]:
    rows = []
    for group in groups:
        for run in group.runs:
            row = {"run": str(run.path), "group": group.name, "seed": str(run.seed),
                   "evaluations": str(len(run.evaluations))}
            if run.evaluations:
                statistics = [run_statistics(run, group.label.primary, last_k)]
                row.update(_measure_cells(statistics, group.label.primary, last_k,
                                          lambda values, key: _number(values[0], _digits(key))))
            row["steps/s"] = _number(run.steps_per_sec, 2)
            row["peak memory (GB)"] = _number(run.peak_memory_gb, 2)
            row["flags"] = "; ".join(run_flags(run)) or "-"
            rows.append(row)
    return _as_table(rows)


def _as_table(rows: list[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Dict rows as (header, rows); the header is every column in first-seen order."""
    header = list(dict.fromkeys(key for row in rows for key in row))
    return header, [[row.get(key, "-") for key in header] for row in rows]


def comparison_rows(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["A", "B", "evaluated as", "measure", "mean A", "mean B", "A - B",
              f"{CONFIDENCE:.0%} CI (Welch)", "verdict"]
    rows = [[c.a.name, c.b.name, str(c.a.label), c.measure, _number(c.mean_a), _number(c.mean_b),
             _number(c.diff), "-" if math.isnan(c.low) else
             f"[{_number(c.low)}, {_number(c.high)}]", c.verdict] for c in comparisons]
    return header, rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def header_lines(groups: list[Group], command: str) -> list[str]:
    runs = sum(len(g.runs) for g in groups)
    lines = ["# Comparison of runs", "",
             f"{runs} runs in {len(groups)} groups (runs whose configs differ only in the seed); "
             f"made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`.", ""]
    labels = {g.label for g in groups if g.label is not None}
    if any(label.is_digits for label in labels):
        lines += [f"**Digits protocol, not FID**: the numbers come from a classifier fitted on "
                  f"the real training digits ({CLASSIFIER_NAME}). Class accuracy is the share "
                  f"of generated digits it names as the class they were drawn for; class "
                  f"spread, their within-class pixel spread over that of real digits; FD, the "
                  f"Frechet distance to the held-out digits in {FEATURES_NAME}. They compare "
                  f"only with other digits-protocol numbers.", ""]
    stand_in = sorted({label.scorer[:16] for label in labels if not label.official})
    if stand_in:
        lines += [f"**Stand-in Inception weights** ({', '.join(stand_in)}): the FID, IS and KID "
                  f"and the precision/recall below come from weights that are not (or not "
                  f"recorded as) the released InceptionV3's and mean nothing beyond showing the "
                  f"tool at work.", ""]
    return lines


def explanation(last_k: int) -> list[str]:
    return [
        "How to read: each group is one config trained with several seeds. Best is the value at "
        "the evaluation with the lowest primary distance (FID, or FD for digits), the one "
        "best.pt holds (the lowest of noisy numbers, so biased low); last is the final "
        f"evaluation, and the mean of the last {last_k} evaluations (all of a run's, if it has "
        "fewer) the least noisy of the three. Columns give mean +- sample std over seeds. "
        f"A - B is the difference of the group means with its {CONFIDENCE:.0%} confidence "
        "interval from Welch's t (scipy.stats.t, each seed one sample, Welch-Satterthwaite "
        "degrees of freedom); the verdict names the better group only when the interval "
        "excludes 0. Each interval excludes 0 by chance one time in 20 when the groups do not "
        "differ, so among many comparisons a lone verdict is weak evidence: look for verdicts "
        "that agree across best, last and last-k. Lower FID, FD and KID are better; higher "
        "IS, precision, recall, class accuracy and class spread are better. Flagged runs stay "
        "in their group: a run that "
        "stopped before its last step, or whose last evaluation drew digits with a spread "
        "under 0.5 or some class under 0.5 accuracy (collapsed). Plots: each measure against "
        "step (line: mean over seeds, band: lowest to highest seed) and the gate gamma of every "
        "attention block against step (a gamma near 0 means the network does not use that "
        "block).", ""]


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_measure(groups: list[Group], key: str, name: str, path: Path, title_note: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for group in groups:
        curves = [{e.step: e.values[key] for e in run.evaluations if key in e.values}
                  for run in group.evaluated]
        if any(curves):
            _mean_band(axes, [c for c in curves if c], group.name)
    axes.set_xlabel("generator step")
    axes.set_ylabel(name)
    axes.set_title(f"{name} against step (mean over seeds, band: min to max){title_note}",
                   fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)


def plot_gammas(groups: list[Group], path: Path) -> bool:
    """One panel per attention block; False (nothing written) when no run has one."""
    blocks = sorted({block for g in groups for r in g.runs for block in r.gammas})
    if not blocks:
        return False
    plt = _pyplot()
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
    _save_figure(figure, path)
    return True


def _save_figure(figure: Any, path: Path) -> None:
    """Written as the tables are, through a temporary file renamed into place: a report stopped
    or failing mid-write leaves the earlier picture whole. The format is named because the
    temporary file's suffix is not the picture's."""
    try:
        with atomic_output(path, "the report figure") as tmp_path:
            figure.savefig(tmp_path, dpi=100, format=path.suffix.lstrip("."))
    finally:
        _pyplot().close(figure)


def _mean_band(axes: Any, curves: list[dict[int, float]], label: str) -> None:
    steps = sorted(set().union(*curves))
    values = [[curve[s] for curve in curves if s in curve] for s in steps]
    seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
    line, = axes.plot(steps, [np.mean(v) for v in values], marker="o", markersize=3,
                      label=f"{label} ({seeds})")
    axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                      color=line.get_color(), alpha=0.2)


def write_report(arguments: list[str], out_dir: str | Path | None, last_k: int = 3,
                 command: str = "run.py --report") -> Path:
    """Read the runs, group, compare, and write report.md, the CSVs and the plots into
    ``out_dir`` (default reports/report-<UTC time>); returns the Markdown text's path. Every
    check happens before anything is written."""
    if last_k < 1:
        raise UserError(f"--last-k: expected a value >= 1, got {last_k}")
    runs = [read_run(path) for path in find_runs(arguments)]
    groups = group_runs(runs)
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
    labels = {g.label for g in groups if g.label is not None}
    stand_in = " - stand-in Inception weights" if any(not label.official for label in labels) \
        else ""
    plots = []
    for primary in dict.fromkeys(label.primary for label in labels):
        for measure in MEASURES[primary]:
            plot_name = f"{measure.key}_vs_step.png"
            plot_measure(groups, measure.key, measure.name, out / plot_name,
                         stand_in if primary == "fid" else "")
            plots.append(f"![{measure.name} against step]({plot_name})")
    if plot_gammas(groups, out / "gamma_vs_step.png"):
        plots.append("![gamma against step](gamma_vs_step.png)")
    else:
        plots.append("No run has an attention block: no gamma plot.")

    lines = header_lines(groups, command)
    lines += ["## Groups", "", _table(*tables["groups"]), "",
              f"## Comparisons ({CONFIDENCE:.0%} confidence intervals from Welch's t)", "",
              _table(*tables["comparisons"]) if comparisons else
              "No two groups share a dataset and an evaluation protocol.", "",
              "## Runs", "", _table(*tables["runs"]), "", "## Plots", ""]
    lines += [line for plot in plots for line in (plot, "")]
    lines += explanation(last_k)
    text = "\n".join(lines)
    with atomic_output(out / "report.md") as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    print(text)
    return out / "report.md"
