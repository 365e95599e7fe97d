"""Named evaluation protocols: what a number was measured under (sample count, reference split,
IS splits, the generator's BatchNorm mode, the Inception engine), and their resolution for a
dataset. Kept apart from metrics.py so that the config and the command line can offer the
names without importing the Inception engines."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from eagan.data import HELD_OUT_SPLITS
from eagan.errors import UserError
from eagan.nets.bn_mode import BN_MODES

# The digits protocol's scorer: a classifier fitted on real digits (eagan/digits_eval.py).
DIGITS_ENGINE = "digits-svc"


@dataclass(frozen=True)
class ProtocolPreset:
    """A named evaluation protocol before it is applied to a dataset."""

    name: str
    num_samples: int  # generated images (per metric when is_own_samples)
    reference: str  # "held-out" (the dataset's test/val split) or "train"
    is_splits: int
    bn_mode: str  # default; "batch": BN normalises with batch statistics; "running": eval BN
    engine: str  # one of metrics.ENGINES, or DIGITS_ENGINE
    is_own_samples: bool  # IS on its own sample set (True) or on FID's
    train_batch_generation: bool  # generate in batches of the training batch size
    description: str
    primary: str = "fid"  # the distance (lower is better) the best checkpoint follows


@dataclass(frozen=True)
class Protocol:
    """A protocol resolved for one dataset: everything needed to evaluate and to label a number."""

    name: str
    num_samples: int
    reference_split: str
    is_splits: int
    bn_mode: str
    engine: str
    is_own_samples: bool
    train_batch_generation: bool
    primary: str = "fid"
    # Set when the preset asks for a held-out split the dataset does not have.
    reference_note: str | None = None


PROTOCOLS: dict[str, ProtocolPreset] = {
    "studiogan2021": ProtocolPreset(
        name="studiogan2021", num_samples=10_000, reference="held-out", is_splits=1,
        bn_mode="running", engine="pytorch-fid", is_own_samples=True,
        train_batch_generation=True,
        description="StudioGAN at 8a03c51 / the EAGAN paper: pytorch-fid's Inception on floats, "
                    "FID of 10k generated vs the test (Tiny-ImageNet: val) split, IS (fc with "
                    "bias, 1 split) on another 10k, full batches of the training batch size, "
                    "BN running statistics, uniform labels"),
    "standard": ProtocolPreset(
        name="standard", num_samples=50_000, reference="train", is_splits=10,
        bn_mode="running", engine="torch-fidelity", is_own_samples=False,
        train_batch_generation=False,
        description="torch-fidelity's TF-exact Inception on uint8, 50k generated vs the "
                    "training split, IS with 10 splits on the same 50k, BN running statistics, "
                    "uniform labels"),
    "digits": ProtocolPreset(
        name="digits", num_samples=1000, reference="held-out", is_splits=0,
        bn_mode="batch", engine=DIGITS_ENGINE, is_own_samples=False,
        train_batch_generation=True, primary="fd",
        description="scikit-learn digits only: class accuracy, within-class spread and a "
                    "Frechet distance (FD) in the decision values of an SVC fitted on the "
                    "training digits, against the 360 held-out digits; 1,000 images, classes "
                    "in turn, full batches of the training batch size, BN batch statistics "
                    "(as the sample grids); not FID"),
}

def resolve_protocol(name: str, dataset: str, num_samples_override: int | None = None, *,
                     available_splits: Collection[str] = (),
                     bn_mode_override: str | None = None) -> Protocol:
    """The preset ``name`` applied to ``dataset``; ``available_splits`` matters only for datasets
    outside HELD_OUT_SPLITS (a folder: "test" is used for a held-out reference if present;
    without one the training split is used and the protocol says so in reference_note)."""
    if name not in PROTOCOLS:
        raise UserError(f"eval.protocol: unknown protocol {name!r}; expected one of "
                        f"{', '.join(PROTOCOLS)}")
    preset = PROTOCOLS[name]
    note = None
    if preset.reference == "train":
        split = "train"
    elif dataset in HELD_OUT_SPLITS:
        split = HELD_OUT_SPLITS[dataset]
    elif "test" in available_splits:
        split = "test"
    else:
        split = "train"
        note = (f"no held-out split: dataset {dataset!r} has no test split, so protocol "
                f"{name!r} scores against the training images")
    num_samples = preset.num_samples if num_samples_override is None else num_samples_override
    # A covariance needs two samples, and every IS split needs at least one.
    minimum = max(2, preset.is_splits)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise UserError(f"eval.num_samples: {num_samples!r} is too small for protocol {name!r}; "
                        f"expected an integer >= {minimum}")
    mode = preset.bn_mode if bn_mode_override is None else bn_mode_override
    if mode not in BN_MODES:
        raise UserError(f"eval.bn_mode: expected one of {', '.join(BN_MODES)}, got {mode!r}")
    return Protocol(name=name, num_samples=num_samples, reference_split=split,
                    is_splits=preset.is_splits, bn_mode=mode, engine=preset.engine,
                    is_own_samples=preset.is_own_samples,
                    train_batch_generation=preset.train_batch_generation,
                    primary=preset.primary, reference_note=note)
