"""Typed configuration: dataclasses with defaults, YAML files, dotted command-line overrides.

Precedence is defaults, then the YAML file, then ``--set section.key=value`` overrides. Every
value is checked before any work starts; a mistake raises UserError naming the file (or the
override), the dotted key, what was expected and, for a typo, the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eagan.errors import UserError
from eagan.eval.protocols import PROTOCOLS
from eagan.nets.attention import ATTENTION_KINDS
from eagan.nets.augment import parse_policy
from eagan.nets.bn_mode import BN_MODES
from eagan.nets.losses import LOSSES
from eagan.nets.models import TOPOLOGIES

DATASETS = ("cifar10", "tiny_imagenet", "folder", "digits")
METRICS = ("fid", "is", "kid", "prc")


def option(default: Any, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, positive: bool = False) -> Any:
    """A dataclass field carrying its allowed values for validation."""
    rules = {"choices": choices, "min": min, "max": max, "positive": positive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class DataConfig:
    dataset: str = option("cifar10", choices=DATASETS)
    root: str = "data"
    image_size: int = option(32, choices=tuple(TOPOLOGIES))
    hflip: bool = True
    resize: bool = True  # false: an image of another size than image_size is an error
    download: bool = True  # fetch CIFAR-10 when it is absent and the machine is online
    in_memory: bool = True  # the whole uint8 set on the training device; else a DataLoader
    num_workers: int = option(4, min=0)


@dataclass
class ModelConfig:
    attention: str = option("external", choices=ATTENTION_KINDS)
    memory_size: int = option(64, positive=True)  # S, the external memory units
    heads: int = option(1, positive=True)
    z_dim: int = option(128, positive=True)
    g_base_channels: int = option(64, positive=True)
    d_base_channels: int = option(64, positive=True)
    g_attention_after: int | None = option(None, positive=True)  # None: the recipe's block
    d_attention_after: int | None = option(None, positive=True)
    conditional: bool = True  # class-conditional when the dataset has classes
    # An AC-GAN classifier head on D, trained with train.aux_loss_weight (not in the recipe).
    aux_classifier: bool = False


@dataclass
class TrainConfig:
    total_steps: int = option(100_000, positive=True)  # generator updates
    batch_size: int = option(64, positive=True)  # global, split across ranks
    lr_g: float = option(2e-4, positive=True)
    lr_d: float = option(2e-4, positive=True)
    beta1: float = option(0.5, min=0.0, max=1.0)
    beta2: float = option(0.999, min=0.0, max=1.0)
    adam_eps: float = option(1e-6, positive=True)
    n_dis: int = option(5, positive=True)  # discriminator updates per generator update
    loss: str = option("hinge", choices=tuple(LOSSES))
    aux_loss_weight: float = option(1.0, positive=True)  # with model.aux_classifier
    ema_decay: float = option(0.0, min=0.0, max=1.0)  # 0 keeps no EMA generator
    ema_start_step: int = option(0, min=0)
    # DiffAugment policy for every image D sees, e.g. "color,translation,cutout"; "" is off
    # (the recipe). Not in the paper; made for small training sets (eagan/nets/augment.py).
    augment: str = ""
    seed: int = option(0, min=0)
    # "auto": bf16 autocast on a GPU that supports it, else fp32. The paper configs say fp32.
    precision: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = False
    compile: bool = False
    # torch.compile mode; "reduce-overhead" adds CUDA graphs, which suit these small steps.
    compile_mode: str = option("default", choices=("default", "reduce-overhead",
                                                   "max-autotune"))
    fused_adam: bool = False
    sync_batchnorm: bool = False  # one set of G batch statistics across DDP ranks
    # Under torchrun, how long a rank waits in a collective for the others before the job ends
    # (a failed or hung rank). It must exceed the longest time rank 0 works alone: a
    # checkpoint write, and at the first evaluation the reference statistics.
    collective_timeout_s: float = option(300.0, positive=True)
    nonfinite: str = option("stop", choices=("stop", "skip"))
    device: str = option("auto", choices=("auto", "cpu", "cuda"))
    log_every: int = option(100, positive=True)
    sample_every: int = option(1000, positive=True)  # sample and attention-map grids
    checkpoint_every: int = option(2000, positive=True)
    keep_checkpoints: int = option(3, positive=True)


@dataclass
class EvalConfig:
    protocol: str = option("studiogan2021", choices=tuple(PROTOCOLS))
    every: int = option(2000, min=0)  # 0 turns evaluation during training off
    num_samples: int | None = option(None, positive=True)  # None: the protocol's count
    batch_size: int = option(100, positive=True)  # Inception's; see evaluation.py for G's
    # The generator's BatchNorm while evaluating: null takes the protocol's (running).
    bn_mode: str | None = option(None, choices=BN_MODES)
    seed: int = option(0, min=0)
    # A local weights-inception-2015-12-05-6726825d.pth or pt_inception-2015-12-05-6726825d.pth
    # (the same file); null downloads the protocol's engine's release once.
    inception_weights: str | None = None
    cache_dir: str = "~/.cache/eagan"
    use_ema: bool = True  # evaluate the EMA generator when there is one
    # fid and is are always computed; kid (with its std) and prc (precision and recall) on
    # request, from the same Inception features as FID.
    metrics: list[str] = option(["fid", "is"], choices=METRICS)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str | None = None  # None: runs/<config file name>

    @property
    def evaluates_ema(self) -> bool:
        """Whether evaluation scores the EMA generator: there is one and eval.use_ema says so.
        The trainer's evaluation and its results' labels both follow this."""
        return self.train.ema_decay > 0 and self.eval.use_ema


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as 'key: old -> new'."""
    differences = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += config_differences(before, after, f"{dotted}.")
        elif before != after:
            differences.append(f"{dotted}: {before!r} -> {after!r}")
    return differences


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read config file ({error})") from None
    except (ValueError, RecursionError) as error:  # an impossible date; nesting too deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise UserError(f"{path}: malformed YAML: {reason}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, "
                        f"got {type(raw).__name__}")
    config = apply_overrides(raw, overrides, source=str(path))
    if config.run_dir is None:
        config.run_dir = str(Path("runs") / path.stem)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> Config:
    """Validate ``raw`` (a YAML file's or a checkpoint's config), then apply each override,
    validated one at a time so that an error names the override rather than the file."""
    config = config_from_dict(raw, source=source)
    for override in overrides:
        _apply_override(raw, override)
        config = config_from_dict(raw, source=f"--set {override}")
    return config


def config_from_dict(raw: dict[str, Any], source: str) -> Config:
    """Build and validate a Config from plain data (a YAML file's or a checkpoint's)."""
    config = _build(Config, raw, source, prefix="")
    _check_consistency(config, source)
    return config


def _apply_override(raw: dict[str, Any], override: str) -> None:
    source = f"--set {override}"
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"{source}: expected section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    *sections, leaf = key.strip().split(".")
    target = raw
    for section in sections:
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise UserError(f"{source}: {section} is not a section")
    target[leaf] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            home = _section_of(str(key))
            if close:
                hint = f"; did you mean {prefix}{close[0]}?"
            elif home:
                hint = f"; it belongs in {home}.{key}"
            else:
                hint = f"; valid keys: {', '.join(fields)}"
            raise UserError(f"{source}: unknown key {prefix}{key}{hint}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], source, f"{prefix}{name}.")
        else:
            values[name] = _check_value(raw[name], hint, spec.metadata, source, prefix + name)
    return cls(**values)


def _section_of(key: str) -> str | None:
    """The section that defines ``key``, for a key written under the wrong one."""
    for name, hint in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(hint) and key in {f.name for f in dataclasses.fields(hint)}:
            return name
    return None


def _check_value(value: Any, hint: Any, rules: typing.Mapping, source: str, key: str) -> Any:
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    base = next(a for a in hint.__args__ if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    value = _coerce(value, base, source, key, optional)
    choices = rules.get("choices")
    for item in value if isinstance(value, list) else [value]:
        if choices and item not in choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
            hint_text = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: {key}: expected one of {', '.join(map(str, choices))}, "
                            f"got {item!r}{hint_text}")
    if rules.get("positive") and value <= 0:
        raise UserError(f"{source}: {key}: expected a value > 0, got {value!r}")
    if rules.get("min") is not None and value < rules["min"]:
        raise UserError(f"{source}: {key}: expected a value >= {rules['min']}, got {value!r}")
    if rules.get("max") is not None and value > rules["max"]:
        raise UserError(f"{source}: {key}: expected a value <= {rules['max']}, got {value!r}")
    return value


def _coerce(value: Any, base: type, source: str, key: str, optional: bool) -> Any:
    expected = base.__name__ + (" or null" if optional else "")
    wrong = UserError(f"{source}: {key}: expected {expected}, got {value!r}")
    if base is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if base is float:
        # PyYAML reads 1e-4 (no dot) as a string; accept any text that is a plain number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if typing.get_origin(base) is list:  # a list of strings, the only list type used
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise UserError(f"{source}: {key}: expected a list of strings, got {value!r}")
        return list(value)
    raise TypeError(f"unsupported config type {base}")


def _check_consistency(config: Config, source: str) -> None:
    """Constraints between keys that no single field can express."""
    size = config.data.image_size
    topology = TOPOLOGIES[size]
    for net, key, blocks in (("G", "g_attention_after", len(topology.g_out)),
                             ("D", "d_attention_after", len(topology.d_out))):
        after = getattr(config.model, key)
        if after is not None and after > blocks:
            raise UserError(f"{source}: model.{key}: the {size}-px {net} has {blocks} "
                            f"blocks, got {after}")
    if config.model.attention == "self" and config.model.heads != 1:
        raise UserError(f"{source}: model.heads: self-attention has a single head, "
                        f"got {config.model.heads}")
    try:
        parse_policy(config.train.augment)
    except ValueError as error:
        raise UserError(f"{source}: train.augment: {error}") from None
    if config.model.aux_classifier and not config.model.conditional:
        raise UserError(f"{source}: model.aux_classifier: true needs class labels, but "
                        f"model.conditional is false (an unconditional run)")
    if config.train.ema_start_step and not config.train.ema_decay:
        raise UserError(f"{source}: train.ema_start_step: set train.ema_decay > 0 to use an EMA")
    if config.eval.protocol == "digits" and (config.data.dataset != "digits"
                                             or not config.model.conditional):
        raise UserError(f"{source}: eval.protocol: 'digits' scores class-conditional generators "
                        f"of data.dataset digits, got dataset {config.data.dataset!r}"
                        f"{'' if config.model.conditional else ', unconditional'}")
