"""Damaged files of every kind through the real command line, in-process: whatever the bytes,
exit code 2, at most two lines on stderr naming the file, no traceback, nothing written.

Seeded, so a failure reproduces; each table is built from a few hundred cases that run in
milliseconds each (the expensive part, a tiny trained run, is made once per module).
"""
import contextlib
import hashlib
import io
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

from eagan.cli import main
from eagan.config import Config
from eagan.train import checkpoint as ckpt
from tests.fakedata import write_image_folder, write_tiny_imagenet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    name: str
    path: Path  # the damaged file, which the message must name
    args: list[str]


def run_cli(args: list) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(arg) for arg in args] + ["--no-progress"])
    return code, err.getvalue()


def files_under(*folders: Path) -> dict[Path, tuple[int, int]]:
    """Every file with its size and modification time: what 'nothing written' compares."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns)
            for folder in folders for path in folder.rglob("*") if path.is_file()}


def check_cases(cases: list[Case], *watched: Path) -> None:
    """Run every case; collect the failures so one report shows them all. Nothing may be
    written in ``watched`` nor beside the damaged file."""
    failures = []
    for case in cases:
        watched_now = (*watched, case.path.parent)
        before = files_under(*watched_now)
        try:
            code, err = run_cli(case.args)
        except BaseException as error:  # noqa: BLE001 - what escapes main is the failure
            code, err = None, f"raised {type(error).__name__}: {error}"
        problems = [what for what, bad in (
            (f"exit {code}", code != 2),
            ("more than 2 lines", err.count("\n") > 2),
            ("a traceback", "Traceback" in err),
            ("file not named", str(case.path) not in err),
            ("weights_only advice", "weights_only=False" in err),
            ("files written", files_under(*watched_now) != before),
        ) if bad]
        if problems:
            failures.append(f"{case.name}: {', '.join(problems)}: {err.strip()[:300]!r}")
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures[:20])


def random_bytes(rng: random.Random) -> bytes:
    """Noise, noise that starts like a zip (PyTorch's format), or noise ending in a valid
    digest footer (so the loader gets past the digest)."""
    data = rng.randbytes(rng.choice([0, 1, 7, 64, 512, 4096]))
    kind = rng.randrange(3)
    if kind == 1:
        data = b"PK\x03\x04" + data
    elif kind == 2:
        data += ckpt.DIGEST_MAGIC + hashlib.sha256(data).digest()
    return data


def damaged_copies(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Half truncations at random lengths, half single flipped bits at random positions."""
    copies = []
    for i in range(count):
        if i % 2 == 0:
            cut = rng.randrange(len(data))
            copies.append((f"cut at {cut}", data[:cut]))
        else:
            at, bit = rng.randrange(len(data)), rng.randrange(8)
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            copies.append((f"bit {bit} of byte {at}", bytes(flipped)))
    return copies


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, two_step_run):
    root = tmp_path_factory.mktemp("fuzz")
    return root, two_step_run, two_step_run.parent / "tiny.yaml"


def checkpoint_cases(root: Path, config: Path, recorded: Path,
                     contents: list[tuple[str, bytes]]) -> list[Case]:
    """Each content through --sample, --eval and --train --resume in turn."""
    cases = []
    for i, (name, data) in enumerate(contents):
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        if i % 3 == 2:  # the latest checkpoint of a run folder
            (folder / "config.yaml").write_bytes(recorded.read_bytes())
            path = folder / "ckpt-0000002.pt"
            args = ["-c", config, "--train", "--resume", "--set", f"run_dir={folder}"]
        else:
            path = folder / "x.pt"
            args = ["-c", config, "--sample", "--ckpt", path, "--out", folder / "out"] \
                if i % 3 == 0 else ["-c", config, "--eval", "--ckpt", path]
        path.write_bytes(data)
        cases.append(Case(f"{name} via {args[2]}", path, args))
    return cases


def test_random_bytes_as_checkpoints(workspace):
    root, trained, config = workspace
    rng = random.Random(0)
    contents = [(f"random #{i}", random_bytes(rng)) for i in range(210)]
    check_cases(checkpoint_cases(root / "random", config, trained / "config.yaml", contents),
                trained)


def test_truncated_and_flipped_checkpoints(workspace):
    root, trained, config = workspace
    real = (trained / "ckpt-0000002.pt").read_bytes()
    contents = damaged_copies(real, random.Random(1), 210)
    check_cases(checkpoint_cases(root / "damaged", config, trained / "config.yaml", contents),
                trained)


def test_damaged_inception_weights(workspace, standin_weights, monkeypatch, tmp_path):
    """Noise and truncations of a real-architecture weights file. (A flipped bit inside a
    weight cannot be told from a real file of other weights: evaluations record the file's
    sha256 instead.)"""
    root, trained, config = workspace
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    rng = random.Random(2)
    real = standin_weights.read_bytes()
    contents = [(f"random #{i}", random_bytes(rng)) for i in range(30)]
    contents += [(f"cut at {cut}", real[:cut]) for cut in
                 sorted(rng.randrange(len(real)) for _ in range(5))]
    cases = []
    for i, (name, data) in enumerate(contents):
        path = tmp_path / f"weights{i}.pth"
        path.write_bytes(data)
        cases.append(Case(name, path, ["-c", config, "--eval", "--ckpt", trained,
                                       "--num-samples", "4", "--inception-weights", path]))
    check_cases(cases, trained, tmp_path / "torch_home")


def yaml_noise(rng: random.Random) -> str:
    """Text made of the characters YAML gives meaning to."""
    alphabet = list(":-[]{},&*!|>'\"%@`#?\t\n ") + ["train", "model", "a", "1", "2001-02-30",
                                                     "\\x", "\\u", "~", "1e400", "!!python/"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))


def can_be_a_config(text: str) -> bool:
    """A text YAML reads as nothing or as a mapping of valid section names may be a valid
    config (defaults fill the rest): such texts are not damage and are left out."""
    try:
        raw = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - anything unreadable is damage
        return False
    sections = set(Config.__dataclass_fields__)
    return raw is None or (isinstance(raw, dict) and set(raw) <= sections)


def test_damaged_config_yaml(workspace, tmp_path):
    root, trained, config = workspace
    rng = random.Random(3)
    real = config.read_bytes()
    texts = [random_bytes(rng) for _ in range(25)]
    texts += [yaml_noise(rng).encode() for _ in range(60)]
    # Deep nesting, a self-referencing alias, an impossible date.
    texts += [t.encode() for t in ("train: " + "[" * 100000, "a: &x [*x]\n",
                                   "data:\n  root: 2001-02-30\n")]
    texts += [data for _, data in damaged_copies(real, rng, 60)]
    cases = []
    for i, data in enumerate(texts):
        if can_be_a_config(data.decode("utf-8", "replace")):
            continue
        path = tmp_path / f"config{i}.yaml"
        path.write_bytes(data)
        cases.append(Case(repr(data[:40]), path, ["-c", path, "--sample", "--ckpt", trained,
                                                  "--out", tmp_path / "out"]))
    assert len(cases) >= 100
    check_cases(cases, trained, tmp_path / "out")


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> dict[str, bytes]:
    folder = write_image_folder(tmp_path_factory.mktemp("real_images"), None, 1, 32)
    png = (folder / "img_00000.png").read_bytes()
    jpeg = io.BytesIO()
    Image.open(folder / "img_00000.png").save(jpeg, format="JPEG", quality=90)
    return {"png": png, "jpg": jpeg.getvalue()}


def test_damaged_images_in_a_folder_dataset(workspace, tmp_path, real_images):
    """Noise with image names, truncations of PNG and JPEG, flipped bits of PNG. Left out, as
    no decoder can call them damaged: a flipped bit inside JPEG's compressed data (it decodes
    to other pixels) and damage to PNG's closing IEND chunk (after every pixel is read)."""
    root, trained, config = workspace
    rng = random.Random(4)
    contents = [(f"random #{i}", rng.choice(["png", "jpg"]), random_bytes(rng))
                for i in range(20)]
    for kind, data in real_images.items():
        contents += [(f"{kind} cut at {cut}", kind, data[:cut]) for cut in
                     (rng.randrange(len(data) - 12) for _ in range(10))]
    png = real_images["png"]
    for _ in range(20):
        flipped = bytearray(png)
        flipped[rng.randrange(len(png) - 12)] ^= 1 << rng.randrange(8)
        contents.append(("png bit flip", "png", bytes(flipped)))
    cases = []
    for i, (name, kind, data) in enumerate(contents):
        folder = tmp_path / f"images{i}"
        write_image_folder(folder, ["cats", "dogs"], n_per_class=1, size=32)
        path = folder / "dogs" / f"damaged.{kind}"
        path.write_bytes(data)
        cases.append(Case(name, path, ["-c", config, "--train", "--set", "data.dataset=folder",
                                       "--set", f"data.root={folder}", "--set",
                                       f"run_dir={tmp_path / 'run'}"]))
    check_cases(cases, tmp_path / "run", trained)


def test_damaged_dataset_files(workspace, tmp_path, cifar_root):
    """CIFAR-10's pickles and tarball, Tiny-ImageNet's class list and annotations."""
    root, trained, config = workspace
    rng = random.Random(5)
    cases = []
    batches = cifar_root / "cifar-10-batches-py"
    tarball = io.BytesIO()
    with tarfile.open(fileobj=tarball, mode="w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    tarball = tarball.getvalue()
    for i in range(12):
        data_root = tmp_path / f"cifar{i}"
        if i % 2:
            shutil.copytree(batches, data_root / "cifar-10-batches-py")
            name = rng.choice(["data_batch_1", "batches.meta"])
            path = data_root / "cifar-10-batches-py" / name
            real = path.read_bytes()
            data = rng.choice([random_bytes(rng), real[:rng.randrange(len(real))]])
        else:
            path = data_root / "cifar-10-python.tar.gz"
            data = rng.choice([random_bytes(rng), tarball[:rng.randrange(len(tarball))]])
            data_root.mkdir()
        path.write_bytes(data)
        cases.append(Case(f"cifar {path.name}", path, [
            "-c", config, "--train", "--set", f"data.root={data_root}",
            "--set", f"run_dir={tmp_path / 'run'}"]))
    tiny = write_tiny_imagenet(tmp_path / "tiny_source", n_classes=2, n_train_per_class=1,
                               n_val=2)
    for i in range(12):
        data_root = tmp_path / f"tiny{i}"
        shutil.copytree(tiny, data_root / "tiny-imagenet-200")
        # wnids.txt is read for training; the annotations for the reference split, which
        # training with evaluation loads before it starts.
        name = "wnids.txt" if i % 2 else "val/val_annotations.txt"
        path = data_root / "tiny-imagenet-200" / name
        real = path.read_bytes()
        if rng.randrange(2):
            data = random_bytes(rng)
        else:  # cut inside a class id, so that the rest can only be read wrong
            starts = [at for at in range(len(real)) if real[at:at + 1] == b"n"]
            data = real[:rng.choice(starts) + rng.randrange(2, 8)]
        path.write_bytes(data)
        cases.append(Case(f"tiny-imagenet {name}", path, [
            "-c", config, "--train", "--set", "data.dataset=tiny_imagenet", "--set",
            "data.image_size=64", "--set", f"data.root={data_root}", "--set", "eval.every=2",
            "--set", f"run_dir={tmp_path / 'run'}"]))
    check_cases(cases, tmp_path / "run", trained)
