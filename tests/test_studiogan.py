"""Importing StudioGAN's SAGAN checkpoints: StudioGAN's own files and outputs (made with its code
at commits 8a03c51 and 9289cca, tests/fixtures/studiogan/README.md) against our networks, the
run folder written, and everything the import must refuse."""
from __future__ import annotations

import pickle
import shutil
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from eagan.cli import main
from eagan.config import Config, config_from_dict, to_dict
from eagan.errors import UserError
from eagan.nets.factory import build_discriminator
from eagan.sampling import load_generator
from eagan.studiogan import import_studiogan
from eagan.train.checkpoint import load_checkpoint, load_weights
from tests.fakedata import write_tiny_imagenet

FIXTURES = Path(__file__).parent / "fixtures" / "studiogan"
TINY_CLASSES = 3
# Tiny networks: one thread is faster than a pool on shared cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fixture_file(folder: str, kind: str) -> Path:
    return next((FIXTURES / folder).glob(f"model={kind}-best-weights-step=*.pth"))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A fake Tiny-ImageNet whose wnids.txt is in descending order, so that StudioGAN's class
    numbering (sorted folder names) is the reverse of ours."""
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet(root, n_classes=TINY_CLASSES)
    return root


@pytest.fixture
def roots(cifar_root, tiny_root) -> dict[str, Path]:
    return {"cifar10": cifar_root, "tiny_imagenet": tiny_root}


def make_config(folder: str, roots: dict[str, Path], *overrides: str) -> Config:
    """The config that describes the networks of fixture ``folder`` (see its README), with
    ``section.key=value`` overrides."""
    cifar = folder.endswith("cifar32")
    raw = {"data": {"dataset": "cifar10" if cifar else "tiny_imagenet", "download": False,
                    "root": str(roots["cifar10" if cifar else "tiny_imagenet"]),
                    "image_size": 32 if cifar else 64},
           "model": {"attention": "self", "z_dim": 16, "g_base_channels": 2,
                     "d_base_channels": 4 if cifar else 2},
           "train": {"batch_size": 4, "n_dis": 1, "device": "cpu", "seed": 5,
                     "ema_decay": 0.9 if folder == "8a03c51-cifar32" else 0.0},
           "eval": {"every": 0}}
    if not cifar:
        raw["model"].update(g_attention_after=2, d_attention_after=3)
    for override in overrides:
        key, value = override.split("=")
        section, name = key.split(".")
        raw[section][name] = yaml.safe_load(value)
    return config_from_dict(raw, source="test")


def our_labels(studiogan_labels: torch.Tensor, class_names: list[str], dataset: str
               ) -> torch.Tensor:
    """Our class index of each StudioGAN class index: StudioGAN numbered Tiny-ImageNet's classes
    by sorted wnid, we by wnids.txt; CIFAR-10's are the same."""
    if dataset == "cifar10":
        return studiogan_labels
    by_name = sorted(class_names)
    return torch.tensor([class_names.index(by_name[int(s)]) for s in studiogan_labels])


@pytest.mark.parametrize("folder", ["8a03c51-cifar32", "8a03c51-tiny64", "9289cca-cifar32"])
def test_imported_networks_give_studiogans_outputs(folder, roots, tmp_path):
    config = make_config(folder, roots)
    rng_before = torch.get_rng_state()
    path = import_studiogan([FIXTURES / folder], config, tmp_path / "run")
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert sorted(entry.name for entry in (tmp_path / "run").iterdir()) == \
        [path.name, "config.yaml"]
    expected = torch.load(FIXTURES / folder / "outputs.pt", weights_only=True)
    payload = load_checkpoint(path)
    labels = our_labels(expected["labels"], payload["class_names"], config.data.dataset)
    d_labels = our_labels(expected["d_labels"], payload["class_names"], config.data.dataset)
    if folder.endswith("tiny64"):  # the class reordering is exercised, not the identity
        assert not torch.equal(labels, expected["labels"])

    with torch.no_grad():
        generator = load_generator(path, ema=False).generator  # eval mode: running statistics
        torch.testing.assert_close(generator(expected["z"], labels), expected["g_images"])
        discriminator = build_discriminator(config.model, config.data.image_size,
                                            payload["num_classes"])
        load_weights(discriminator, payload["discriminator"], path, "discriminator")
        images = torch.cat([expected["g_images"], expected["g_images"].flip(3)])
        torch.testing.assert_close(discriminator.eval()(images, d_labels), expected["d_logits"])
        if "g_ema_images" in expected:
            sampled = load_generator(path, ema=True)
            assert sampled.is_ema
            torch.testing.assert_close(sampled.generator(expected["z"], labels),
                                       expected["g_ema_images"])


def test_run_folder_resumes_as_a_run_of_our_trainer(roots, tmp_path):
    """The written run is what the trainer writes (fixed grid noise included); --sample reads it
    and --train --resume continues it from StudioGAN's step."""
    folder = "8a03c51-cifar32"
    files = [fixture_file(folder, kind) for kind in ("G", "D", "G_ema")]
    path = import_studiogan(files, make_config(folder, roots), tmp_path / "run")
    imported = load_checkpoint(path)
    assert imported["step"] == 3 and imported["best_score"] is None
    assert imported["config"]["run_dir"] == str(tmp_path / "run")
    assert imported["imported_from_studiogan"]["best_fid"] == pytest.approx(123.456)
    assert imported["optimizer_g"]["state"] == {} and imported["optimizer_d"]["state"] == {}

    # A run of the same config started by our trainer draws the same fixed grid noise.
    fresh_config = tmp_path / "fresh.yaml"
    fresh = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    fresh["run_dir"] = str(tmp_path / "fresh")
    fresh_config.write_text(yaml.safe_dump(fresh))
    assert main(["-c", str(fresh_config), "--train", "--no-progress",
                 "--set", "train.total_steps=1"]) == 0
    trained = load_checkpoint(tmp_path / "fresh" / "ckpt-0000001.pt")
    assert torch.equal(trained["fixed_z"], imported["fixed_z"])
    assert trained["class_names"] == imported["class_names"]

    assert main(["--sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "samples"),
                 "--num-samples", "8", "--bn-mode", "running"]) == 0
    assert any((tmp_path / "samples").iterdir())

    assert main(["-c", str(tmp_path / "run" / "config.yaml"), "--train", "--resume",
                 "--no-progress", "--set", "train.total_steps=4"]) == 0
    resumed = load_checkpoint(tmp_path / "run" / "ckpt-0000004.pt")
    assert resumed["step"] == 4
    for network in ("generator", "discriminator", "generator_ema"):
        name = "linear.parametrizations.weight.original"
        assert not torch.equal(resumed[network][name], imported[network][name]), network


def test_a_folder_gives_its_best_files(roots, tmp_path):
    """StudioGAN keeps best and current files side by side; the best ones are imported."""
    folder = tmp_path / "studiogan"
    shutil.copytree(FIXTURES / "9289cca-cifar32", folder)
    for kind in ("G", "D"):
        (folder / f"model={kind}-current-weights-step=9.pth").write_bytes(b"not read")
    path = import_studiogan([folder], make_config("9289cca-cifar32", roots), tmp_path / "run")
    assert path.name == "ckpt-0000003.pt"


def test_best_fid_pickled_by_numpy_1_is_read(roots, tmp_path):
    """StudioGAN's released files were written under numpy 1, whose float64 pickles as
    numpy.core.multiarray.scalar (numpy 2 writes numpy._core)."""
    scalar = type(np.float64(0)).__reduce__(np.float64(0))[0]

    class Numpy1Pickler(pickle._Pickler):
        dispatch = pickle._Pickler.dispatch.copy()

        def save_global(self, obj, name=None):
            if obj is scalar:
                self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
                self.memoize(obj)
            else:
                super().save_global(obj, name)

    folder = tmp_path / "studiogan"
    shutil.copytree(FIXTURES / "9289cca-cifar32", folder)
    d_file = fixture_file("9289cca-cifar32", "D")
    payload = torch.load(d_file, weights_only=False)
    torch.save(payload, folder / d_file.name, pickle_module=types.SimpleNamespace(
        Pickler=Numpy1Pickler, __name__="pickle"))
    with zipfile.ZipFile(folder / d_file.name) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray\nscalar" in pickled
    path = import_studiogan([folder], make_config("9289cca-cifar32", roots), tmp_path / "run")
    assert load_checkpoint(path)["imported_from_studiogan"]["best_fid"] == \
        pytest.approx(123.456)


def refused(files: list[Path], config: Config, out_dir: Path) -> str:
    """The one-line message of the UserError the import raises; nothing may be written."""
    with pytest.raises(UserError) as caught:
        import_studiogan(files, config, out_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert not out_dir.exists()
    assert [entry.name for entry in out_dir.parent.iterdir() if entry.name.startswith(".")] == []
    return message


def resaved(source: Path, folder: Path, change, name: str | None = None) -> Path:
    """``source`` saved again into ``folder`` (under its name, or ``name``) after
    ``change(payload)``."""
    payload = torch.load(source, weights_only=False)
    change(payload)
    folder.mkdir(exist_ok=True)
    torch.save(payload, folder / (name or source.name))
    return folder / (name or source.name)


def test_the_earlier_64px_layout_is_refused(roots, tmp_path):
    """StudioGAN's 64-px widths before commit fd598a5 (9289cca) have no counterpart here."""
    config = make_config("8a03c51-tiny64", roots)
    message = refused([FIXTURES / "9289cca-tiny64"], config, tmp_path / "run")
    assert "model=G-best-weights-step=5.pth" in message
    assert "before its commit fd598a5" in message and "16->16, 16->8, 8->4, 4->2" in message

    # Its discriminator alone (with a generator of the later layout) is refused as well.
    d_file = resaved(fixture_file("9289cca-tiny64", "D"), tmp_path / "mixed",
                     lambda payload: payload.update(step=7), "model=D-best-weights-step=7.pth")
    message = refused([fixture_file("8a03c51-tiny64", "G"), d_file],
                      make_config("8a03c51-tiny64", roots), tmp_path / "run")
    assert message.startswith(f"{d_file}: ") and "fd598a5" in message
    assert "3->2, 2->4, 4->8, 8->16, 16->16" in message


@pytest.mark.parametrize("overrides, expected", [
    (["model.attention=external"], "model.attention is 'external' (use 'self')"),
    (["model.g_base_channels=4"], "width unit (StudioGAN's g_conv_dim) is 2; the config's "
                                  "model.g_base_channels is 4"),
    (["model.d_base_channels=8"], "width unit (StudioGAN's d_conv_dim) is 4; the config's "
                                  "model.d_base_channels is 8"),
    (["model.z_dim=32"], "takes z of (16,) dimensions; the config's model.z_dim is 32"),
    (["data.image_size=64", "model.g_attention_after=2", "model.d_base_channels=8"],
     "has 3 residual blocks, EAGAN's at 64 px (data.image_size) has 4"),
    (["model.aux_classifier=true"], "model.aux_classifier"),
    (["model.conditional=false"], "model.conditional: StudioGAN's SAGAN is class-conditional"),
    (["train.ema_decay=0.999"], "no G_ema file was given"),
])
def test_a_config_that_differs_from_the_files_is_refused(overrides, expected, roots, tmp_path):
    config = make_config("9289cca-cifar32", roots, *overrides)
    assert expected in refused([FIXTURES / "9289cca-cifar32"], config, tmp_path / "run")


@pytest.mark.parametrize("folder, override, expected", [
    ("9289cca-cifar32", "model.g_attention_after=1",
     "generator's attention is after block 2, the config's is after block 1 "
     "(model.g_attention_after)"),
    ("8a03c51-tiny64", "model.d_attention_after=4",
     "discriminator's attention is after block 3, the config's is after block 4 "
     "(model.d_attention_after)"),
])
def test_another_attention_placement_is_refused(folder, override, expected, roots, tmp_path):
    config = make_config(folder, roots, override)
    assert expected in refused([FIXTURES / folder], config, tmp_path / "run")


def test_other_classes_than_the_datasets_are_refused(tmp_path):
    write_tiny_imagenet(tmp_path / "tiny4", n_classes=4)
    config = make_config("8a03c51-tiny64", {"tiny_imagenet": tmp_path / "tiny4"})
    message = refused([FIXTURES / "8a03c51-tiny64"], config, tmp_path / "run")
    assert "trained on 3 classes; the config's dataset has 4" in message


def test_an_ema_generator_the_config_would_drop_is_refused(roots, tmp_path):
    config = make_config("8a03c51-cifar32", roots, "train.ema_decay=0.0")
    assert "set train.ema_decay" in refused([FIXTURES / "8a03c51-cifar32"], config,
                                            tmp_path / "run")


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["state_dict"].update({"shared.weight": torch.zeros(10, 4)}), "BigGAN"),
    (lambda p: (p["state_dict"].pop("bn4.running_mean"),
                p["state_dict"].update({"extra.weight_orig": torch.zeros(1)})),
     "keys 1 missing (bn4.running_mean); 1 unexpected (extra.weight_orig)"),
    (lambda p: p["state_dict"].update({"blocks.2.1.sigma": torch.zeros(1)}),
     "1 unexpected (blocks.2.1.sigma)"),
    (lambda p: p["state_dict"].update(
        {"bn4.running_var": p["state_dict"]["bn4.running_var"].double()}),
     "bn4.running_var is torch.float64 (8,), EAGAN's bn_out.running_var is torch.float32"),
    (lambda p: p.update(step=4), "holds step 4, its name says 3"),
])
def test_a_generator_file_that_does_not_map_exactly_is_refused(change, expected, roots,
                                                               tmp_path):
    g_file = resaved(fixture_file("9289cca-cifar32", "G"), tmp_path / "studiogan", change)
    message = refused([g_file, fixture_file("9289cca-cifar32", "D")],
                      make_config("9289cca-cifar32", roots), tmp_path / "run")
    assert str(g_file) in message and expected in message


def test_files_of_different_saves_or_kinds_are_refused(roots, tmp_path):
    config = make_config("9289cca-cifar32", roots)
    g_file, d_file = fixture_file("9289cca-cifar32", "G"), fixture_file("8a03c51-tiny64", "D")
    assert "different saves" in refused([g_file, d_file], config, tmp_path / "run")
    assert "a second G checkpoint" in refused([g_file, fixture_file("8a03c51-cifar32", "G")],
                                              config, tmp_path / "run")
    assert "no model=D-...-weights-step=N.pth" in refused([g_file], config, tmp_path / "run")
    other = tmp_path / "G.pth"
    shutil.copy(g_file, other)
    assert "not named as StudioGAN names" in refused([other, d_file], config, tmp_path / "run")
    assert "holds no StudioGAN checkpoint" in refused([tmp_path], config, tmp_path / "run")


def flip_byte_in_record(path: Path, pick) -> None:
    """Flip one byte in the middle of the zip record ``pick`` chooses from the archive."""
    with zipfile.ZipFile(path) as archive:
        info = pick(archive.infolist())
    data = bytearray(path.read_bytes())
    name_length, extra_length = np.frombuffer(
        bytes(data[info.header_offset + 26:info.header_offset + 30]), dtype="<u2")
    start = info.header_offset + 30 + int(name_length) + int(extra_length)
    data[start + info.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
     "not a readable StudioGAN checkpoint"),
    (lambda path: flip_byte_in_record(path, lambda infos: max(infos,
                                                              key=lambda i: i.file_size)),
     "does not match the CRC-32"),
    (lambda path: flip_byte_in_record(path, lambda infos: next(
        i for i in infos if i.filename.endswith("data.pkl"))), "does not match the CRC-32"),
    (lambda path: path.write_text("model weights\n"), "not a readable StudioGAN checkpoint"),
    (lambda path: torch.save({"weights": torch.zeros(2)}, path), "expected a dict whose "
                                                                 "'state_dict'"),
])
def test_damaged_or_foreign_files_are_refused_naming_the_file(damage, expected, roots,
                                                              tmp_path):
    folder = tmp_path / "studiogan"
    shutil.copytree(FIXTURES / "9289cca-cifar32", folder)
    d_file = next(folder.glob("model=D-*"))
    damage(d_file)
    message = refused([folder], make_config("9289cca-cifar32", roots), tmp_path / "run")
    assert message.startswith(f"{d_file}: ") and expected in message


def test_an_eagan_checkpoint_under_a_studiogan_name_is_refused(roots, tmp_path):
    first = import_studiogan([FIXTURES / "9289cca-cifar32"], make_config("9289cca-cifar32",
                                                                         roots), tmp_path / "a")
    folder = tmp_path / "studiogan"
    shutil.copytree(FIXTURES / "9289cca-cifar32", folder)
    shutil.copy(first, folder / "model=D-best-weights-step=3.pth")
    message = refused([folder], make_config("9289cca-cifar32", roots), tmp_path / "run")
    assert "not a StudioGAN checkpoint" in message


def test_an_existing_run_folder_is_not_overwritten(roots, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        import_studiogan([FIXTURES / "9289cca-cifar32"], make_config("9289cca-cifar32", roots),
                         out_dir)
    assert [entry.name for entry in out_dir.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    import_studiogan([FIXTURES / "9289cca-cifar32"], make_config("9289cca-cifar32", roots),
                     empty)
    assert (empty / "config.yaml").is_file()


def test_a_write_that_fails_leaves_no_run_folder(roots, tmp_path, monkeypatch):
    """A checkpoint write that fails half-way (a full disk) leaves neither the run folder nor
    its staging folder behind."""
    def fail_half_way(payload, path):
        path.write_bytes(b"half a checkpoint")
        raise UserError(f"{path}: cannot write the checkpoint (No space left on device)")

    monkeypatch.setattr("eagan.train.checkpoint.save_checkpoint", fail_half_way)
    assert "No space left" in refused([FIXTURES / "9289cca-cifar32"],
                                      make_config("9289cca-cifar32", roots), tmp_path / "run")


def test_the_command_line_imports_and_refuses_in_one_line(roots, tmp_path, capsys):
    config = make_config("9289cca-cifar32", roots)
    config_path = tmp_path / "sagan.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(config)))
    folder = FIXTURES / "9289cca-cifar32"
    out = tmp_path / "imported"
    assert main(["--import-studiogan", str(folder), "-c", str(config_path), "--out",
                 str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "ckpt-0000003.pt")
    assert load_checkpoint(out / "ckpt-0000003.pt")["step"] == 3
    assert main(["--import-studiogan", str(folder), "-c", str(config_path)]) == 2
    assert capsys.readouterr().err == ("error: command line: --import-studiogan needs -c CONFIG "
                                       "(the networks' config) and --out RUN_DIR (see --help)\n")
    assert main(["--import-studiogan", str(folder), "-c", str(config_path), "--out",
                 str(out)]) == 2  # the run folder exists: refused, untouched
    assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-0000003.pt", "config.yaml"]
