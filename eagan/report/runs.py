"""Reading run folders for ``--report``: each run's config and evaluation history (the
stats.jsonl lines that carry an evaluation, with the labels the trainer logs beside them), and
grouping: runs whose configs differ only in the seed (and in keys that do not change what a run
computes: NOT_COMPARED) form a group. A group whose evaluations mix protocols, sample counts, BN
modes or scorers (Inception weights, digits classifier) is refused, not averaged."""
from __future__ import annotations

import glob
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from eagan.errors import UserError
from eagan.eval.inception import OFFICIAL_INCEPTION_SHA256
from eagan.eval.protocols import PROTOCOLS

# Config keys that do not change what a run computes: left out when runs are grouped.
NOT_COMPARED = ("train.seed", "run_dir", "data.root", "data.download", "data.num_workers",
                "train.device", "train.log_every", "train.sample_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.collective_timeout_s", "eval.cache_dir",
                "eval.inception_weights")
# An evaluation line carries its protocol's primary distance (Metrics/fid or Metrics/fd).
PRIMARY_KEYS = ("fid", "fd")


@dataclass(frozen=True)
class EvalLabel:
    """What an evaluation is comparable with: same protocol, sample count, BN mode and scorer
    (the Inception weights' sha256, or the digits classifier's digest)."""

    protocol: str
    num_samples: int | None
    bn_mode: str
    scorer: str  # sha256, or "unrecorded"

    @property
    def is_digits(self) -> bool:
        return self.protocol == "digits"

    @property
    def official(self) -> bool:
        """Whether the numbers mean what their protocol says: the official Inception weights,
        or the digits classifier (fitted the same way everywhere; there is no stand-in)."""
        return self.is_digits or self.scorer == OFFICIAL_INCEPTION_SHA256

    @property
    def primary(self) -> str:
        """The distance the runs' best checkpoints follow."""
        preset = PROTOCOLS.get(self.protocol)
        return preset.primary if preset else "fid"

    def __str__(self) -> str:
        if self.is_digits:
            scorer = f"classifier {self.scorer[:8]}"
        elif self.scorer == "unrecorded":
            scorer = "Inception unrecorded"
        else:
            scorer = f"Inception {self.scorer[:8]} ({'official' if self.official else 'stand-in'})"
        return f"{self.protocol}, {self.num_samples} samples, BN {self.bn_mode}, {scorer}"


@dataclass
class Evaluation:
    step: int
    values: dict[str, float]  # fid, is_mean, ... or fd, class_accuracy, ...: as recorded
    label: EvalLabel


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: dotted key -> value
    evaluations: list[Evaluation]
    gammas: dict[str, list[tuple[int, float]]]  # attention block -> (step, gamma)
    steps_per_sec: float | None
    peak_memory_gb: float | None  # the largest peak logged: GPU memory, else resident memory

    @property
    def seed(self) -> int:
        return int(self.config["train.seed"])


@dataclass
class Group:
    name: str
    runs: list[Run]
    label: EvalLabel | None  # None when no run of the group has an evaluation
    differs: dict[str, Any] = field(default_factory=dict)  # keys that vary between groups

    @property
    def attention(self) -> str:
        return str(self.runs[0].config.get("model.attention"))

    @property
    def dataset(self) -> str:
        return str(self.runs[0].config.get("data.dataset"))

    @property
    def evaluated(self) -> list[Run]:
        """The runs with at least one evaluation: those the statistics are taken over."""
        return [run for run in self.runs if run.evaluations]


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
    return list(dict.fromkeys(path.resolve() for path in found))


def read_run(path: Path) -> Run:
    """A run folder's config and history. A run without an evaluation (it failed or stopped
    before its first) is read too: the report lists it rather than dropping it."""
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
    evaluations, gammas, speeds, memory = [], {}, [], []
    for number, line in enumerate(stats_path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{stats_path} line {number}: not a complete log line (cut short "
                          f"when the run stopped?); skipped", stacklevel=2)
            continue
        if any(f"Metrics/{key}" in record for key in PRIMARY_KEYS):
            values = {key.removeprefix("Metrics/"): float(value) for key, value in record.items()
                      if key.startswith("Metrics/")}
            evaluations.append(Evaluation(step, values, _label_from_record(record, fallback)))
        for key, value in record.items():
            if key.startswith("Attention/gamma/"):
                gammas.setdefault(key.removeprefix("Attention/gamma/"), []).append(
                    (step, float(value)))
            elif key in ("Resources/peak_gpu_mem_gb", "Resources/peak_rss_gb"):
                memory.append(float(value))
        if "Timing/steps_per_sec" in record:
            speeds.append(float(record["Timing/steps_per_sec"]))
    return Run(path, flat, evaluations, gammas, float(np.mean(speeds)) if speeds else None,
               max(memory) if memory else None)


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
    scorer = record.get("Eval/inception_sha256") or record.get("Eval/classifier_sha256")
    return EvalLabel(record["Eval/protocol"], record.get("Eval/num_samples"),
                     record.get("Eval/bn_mode", "unrecorded"), scorer or "unrecorded")


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


def _single_label(name: str, runs: list[Run]) -> EvalLabel | None:
    seen: dict[EvalLabel, Path] = {}
    for run in runs:
        for evaluation in run.evaluations:
            seen.setdefault(evaluation.label, run.path)
    if len(seen) > 1:
        (a, where_a), (b, where_b) = list(seen.items())[:2]
        raise UserError(f"group {name}: evaluations mix protocols or Inception weights ({a} in "
                        f"{where_a}; {b} in {where_b}); they are not averaged")
    return next(iter(seen), None)
