"""Bad input through the real CLI: one line naming the file, key or path, exit code 2, and no
file written, changed or removed."""
import hashlib
import io
import shutil
import socket
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.serialization import config as serialization_config

from eagan.cli import main
from eagan.errors import UserError
from eagan.train import checkpoint as ckpt
from tests.fakedata import write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Workspace:
    root: Path
    config: Path  # the tiny config, run folder root/run
    trained: Path  # a finished run of the tiny config (read only)

    def write_config(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path


@pytest.fixture
def workspace(tmp_path, tiny_config_path, two_step_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return Workspace(tmp_path, tiny_config_path, two_step_run)


def folder_dataset(ws: Workspace, build) -> list[str]:
    root = ws.root / "images"
    build(root)
    return ["-c", ws.config, "--train", "--set", "data.dataset=folder",
            "--set", f"data.root={root}"]


def corrupt_image(root: Path) -> None:
    write_image_folder(root, ["cats", "dogs"], n_per_class=2, size=32)
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def empty_class(root: Path) -> None:
    write_image_folder(root, ["cats"], n_per_class=2, size=32)
    (root / "dogs").mkdir()


def mixed_sizes(root: Path) -> None:
    write_image_folder(root, ["cats"], n_per_class=2, size=32)
    write_image_folder(root, ["dogs"], n_per_class=2, size=40)


def truncated_checkpoint(ws: Workspace) -> Path:
    data = (ws.trained / "ckpt-0000002.pt").read_bytes()
    path = ws.root / "truncated.pt"
    path.write_bytes(data[:len(data) // 2])
    return path


def foreign_checkpoint(ws: Workspace) -> Path:
    path = ws.root / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return path


def checkpoint_of_other_networks(ws: Workspace) -> Path:
    payload = torch.load(ws.trained / "ckpt-0000002.pt", weights_only=True)
    payload["generator"]["attention.query.bias"] = torch.zeros(16)
    path = ws.root / "older.pt"
    ckpt.save_checkpoint(payload, path)
    return path


def no_attention_checkpoint(ws: Workspace) -> Path:
    """A checkpoint whose networks have no attention block (the config says so)."""
    payload = torch.load(ws.trained / "ckpt-0000002.pt", weights_only=True)
    payload["config"]["model"]["attention"] = "none"
    payload["generator"] = {name: value for name, value in payload["generator"].items()
                            if not name.startswith("attention.")}
    path = ws.root / "plain-G.pt"
    ckpt.save_checkpoint(payload, path)
    return path


def flipped_weight_checkpoint(ws: Workspace) -> Path:
    """One bit of one weight flipped inside the file: it still loads, only the digest tells."""
    data = bytearray((ws.trained / "ckpt-0000002.pt").read_bytes())
    weight = ckpt.load_checkpoint(ws.trained / "ckpt-0000002.pt")["generator"]["linear.bias"]
    at = bytes(data).index(weight.numpy().tobytes())
    data[at] ^= 0x01
    path = ws.root / "flipped.pt"
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # still a loadable file
    return path


def footerless_checkpoint(ws: Workspace) -> Path:
    path = ws.root / "cut.pt"
    path.write_bytes((ws.trained / "ckpt-0000002.pt").read_bytes()[:-ckpt.FOOTER_SIZE])
    return path


def run_started_with_another_config(ws: Workspace) -> Path:
    """A run killed before its first checkpoint: config.yaml and nothing else."""
    run_dir = ws.root / "run"
    run_dir.mkdir()
    recorded = yaml.safe_load((ws.trained / "config.yaml").read_text())
    recorded["train"]["lr_g"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    return run_dir


def copied_run(ws: Workspace) -> Path:
    shutil.copytree(ws.trained, ws.root / "run")
    return ws.root / "run"


def a_file(ws: Workspace) -> Path:
    path = ws.root / "plain.txt"
    path.write_text("not a folder")
    return path


def garbage_weights(ws: Workspace) -> Path:
    path = ws.root / "inception.pth"
    path.write_bytes(b"garbage" * 100)
    return path


def digits_config(ws: Workspace) -> Path:
    config = yaml.safe_load(ws.config.read_text())
    config["data"]["dataset"] = "digits"
    return ws.write_config("digits.yaml", yaml.safe_dump(config))


# (id, arguments given the workspace, fragments the message must contain)
CASES = [
    ("malformed-yaml", lambda ws: ["-c", ws.write_config("bad.yaml", "train: [1\n"), "--train"],
     ["bad.yaml", "malformed YAML"]),
    ("top-level-not-mapping", lambda ws: ["-c", ws.write_config("list.yaml", "- 1\n"),
                                          "--train"], ["list.yaml", "mapping"]),
    ("unknown-key", lambda ws: ["-c", ws.write_config("typo.yaml", "train:\n  lr_gg: 1.0\n"),
                                "--train"], ["typo.yaml", "train.lr_gg", "train.lr_g"]),
    ("wrong-type", lambda ws: ["-c", ws.write_config("type.yaml", "train:\n  n_dis: five\n"),
                               "--train"], ["type.yaml", "train.n_dis", "expected int"]),
    ("negative-lr", lambda ws: ["-c", ws.config, "--train", "--set", "train.lr_g=-0.1"],
     ["train.lr_g", "> 0"]),
    ("zero-batch", lambda ws: ["-c", ws.config, "--train", "--set", "train.batch_size=0"],
     ["train.batch_size", "> 0"]),
    ("n-dis-zero", lambda ws: ["-c", ws.config, "--train", "--set", "train.n_dis=0"],
     ["train.n_dis", "> 0"]),
    ("unbuildable-size", lambda ws: ["-c", ws.config, "--train", "--set", "data.image_size=48"],
     ["data.image_size", "32, 64, 128"]),
    ("unbuildable-width", lambda ws: ["-c", ws.config, "--train", "--set",
                                      "model.attention=self", "--set", "model.g_base_channels=3"],
     ["model", "generator", "divisible by 8"]),
    ("classifier-without-classes", lambda ws: ["-c", ws.config, "--train", "--set",
                                               "model.aux_classifier=true", "--set",
                                               "model.conditional=false"],
     ["model.aux_classifier", "unconditional"]),
    ("attention-after-too-deep", lambda ws: ["-c", ws.config, "--train", "--set",
                                             "model.d_attention_after=9"],
     ["model.d_attention_after", "4 blocks"]),
    ("override-without-equals", lambda ws: ["-c", ws.config, "--train", "--set", "train.lr_g"],
     ["--set train.lr_g", "section.key=value"]),
    ("missing-config", lambda ws: ["-c", ws.root / "absent.yaml", "--train"],
     ["absent.yaml", "not found"]),
    ("two-modes", lambda ws: ["-c", ws.config, "--train", "--sample"], ["not allowed with"]),
    ("no-mode", lambda ws: ["-c", ws.config], ["--train --eval --sample", "required"]),
    ("missing-dataset-folder", lambda ws: ["-c", ws.config, "--train", "--set",
                                           "data.dataset=folder", "--set",
                                           f"data.root={ws.root / 'nowhere'}"], ["nowhere"]),
    ("empty-dataset-folder", lambda ws: folder_dataset(ws, lambda r: r.mkdir()),
     ["images", "no image"]),
    ("corrupt-image", lambda ws: folder_dataset(ws, corrupt_image), ["broken.png"]),
    ("mixed-sizes-without-resize", lambda ws: folder_dataset(ws, mixed_sizes) + [
        "--set", "data.resize=false"], ["dogs", "40x40", "expected 32x32"]),
    ("class-folder-without-images", lambda ws: folder_dataset(ws, empty_class),
     ["dogs", "no image"]),
    ("cifar-absent-offline", lambda ws: ["-c", ws.config, "--train", "--set",
                                         f"data.root={ws.root / 'nocifar'}"],
     ["nocifar", "cifar-10-python.tar.gz"]),
    ("tiny-imagenet-absent", lambda ws: ["-c", ws.config, "--train", "--set",
                                         "data.dataset=tiny_imagenet", "--set",
                                         "data.image_size=64", "--set",
                                         f"data.root={ws.root / 'notiny'}"],
     ["notiny", "tiny-imagenet-200"]),
    ("truncated-checkpoint", lambda ws: ["-c", ws.config, "--sample", "--ckpt",
                                         truncated_checkpoint(ws), "--out", ws.root / "out"],
     ["truncated.pt", "not a readable checkpoint"]),
    ("foreign-checkpoint", lambda ws: ["-c", ws.config, "--sample", "--ckpt",
                                       foreign_checkpoint(ws), "--out", ws.root / "out"],
     ["foreign.pt", "not an EAGAN checkpoint"]),
    ("checkpoint-of-other-networks", lambda ws: ["-c", ws.config, "--sample", "--ckpt",
                                                 checkpoint_of_other_networks(ws), "--out",
                                                 ws.root / "out"],
     ["older.pt", "generator weights do not fit", "unexpected attention.query.bias"]),
    ("checkpoint-folder-without-checkpoints", lambda ws: ["-c", ws.config, "--sample", "--ckpt",
                                                          ws.root, "--out", ws.root / "out"],
     ["holds no checkpoint"]),
    ("resume-other-architecture", lambda ws: [
        "-c", ws.config, "--train", "--resume", "--set", f"run_dir={copied_run(ws)}",
        "--set", "model.attention=self", "--set", "model.memory_size=16"],
     ["ckpt-0000002.pt", "cannot resume", "model.attention: 'external' -> 'self'",
      "model.memory_size: 8 -> 16"]),
    ("eval-without-checkpoint", lambda ws: ["-c", ws.config, "--eval"], ["--eval needs --ckpt"]),
    ("sample-without-checkpoint", lambda ws: ["-c", ws.config, "--sample"],
     ["--sample needs --ckpt"]),
    ("bad-inception-weights", lambda ws: [
        "-c", ws.config, "--eval", "--ckpt", ws.trained, "--num-samples", "4",
        "--inception-weights", garbage_weights(ws)], ["inception.pth"]),
    ("missing-inception-weights", lambda ws: [
        "-c", ws.config, "--eval", "--ckpt", ws.trained, "--num-samples", "4",
        "--inception-weights", ws.root / "absent.pth"], ["absent.pth"]),
    ("eval-config-of-another-dataset", lambda ws: [
        "-c", digits_config(ws), "--eval", "--ckpt", ws.trained, "--num-samples", "4"],
     ["data.dataset", "cifar10", "digits"]),
    ("unwritable-output-folder", lambda ws: ["-c", ws.config, "--sample", "--ckpt", ws.trained,
                                             "--out", a_file(ws) / "samples"],
     ["plain.txt", "not writable"]),
    ("unwritable-run-folder", lambda ws: ["-c", ws.config, "--train", "--set",
                                          f"run_dir={a_file(ws) / 'run'}"],
     ["plain.txt", "not writable"]),
    ("run-folder-holds-a-run", lambda ws: ["-c", ws.config, "--train", "--set",
                                           f"run_dir={copied_run(ws)}"],
     ["already holds a run", "--resume"]),
    ("resume-before-first-checkpoint-other-config", lambda ws: [
        "-c", ws.config, "--train", "--resume", "--set",
        f"run_dir={run_started_with_another_config(ws)}"],
     ["config.yaml", "cannot resume", "train.lr_g: 0.5 -> 0.0002"]),
    ("flipped-bit-in-a-weight", lambda ws: ["-c", ws.config, "--sample", "--ckpt",
                                            flipped_weight_checkpoint(ws), "--out",
                                            ws.root / "out"],
     ["flipped.pt", "do not match the digest"]),
    ("checkpoint-without-digest", lambda ws: ["-c", ws.config, "--eval", "--ckpt",
                                              footerless_checkpoint(ws)],
     ["cut.pt", "digest at its end is missing"]),
    ("attention-maps-without-attention", lambda ws: [
        "-c", ws.config, "--sample", "--ckpt", no_attention_checkpoint(ws), "--attention",
        "--out", ws.root / "out"], ["plain-G.pt", "no attention block"]),
    ("zero-samples", lambda ws: ["-c", ws.config, "--sample", "--ckpt", ws.trained,
                                 "--num-samples", "0"], ["--num-samples", "> 0"]),
]


def tree_state(*folders: Path) -> dict[Path, str]:
    """Every file under the folders with a hash of its bytes."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("make_args, fragments", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(workspace, capsys, make_args,
                                                           fragments):
    args = [str(arg) for arg in make_args(workspace)]
    before = tree_state(workspace.root, workspace.trained)
    code = main(args + ["--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in captured.err
    assert tree_state(workspace.root, workspace.trained) == before


def test_checkpoint_without_digest_of_the_first_format_loads_with_a_warning(two_step_run,
                                                                            tmp_path, capsys):
    """Checkpoints written before the digest (format v1) still load, saying they cannot be
    verified; the same bytes claiming the current format are refused."""
    payload = torch.load(two_step_run / "ckpt-0000002.pt", weights_only=True)
    payload["format"] = ckpt.UNVERIFIED_FORMAT
    torch.save(payload, tmp_path / "v1.pt")
    loaded = ckpt.load_checkpoint(tmp_path / "v1.pt")
    assert torch.equal(loaded["generator"]["linear.bias"], payload["generator"]["linear.bias"])
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'v1.pt'}: written before "
                                       f"checkpoints carried a digest; its contents cannot be "
                                       f"verified\n")
    payload["format"] = ckpt.FORMAT
    torch.save(payload, tmp_path / "v2.pt")
    with pytest.raises(UserError, match="digest at its end is missing"):
        ckpt.load_checkpoint(tmp_path / "v2.pt")


def test_checkpoints_carry_crc32s_even_when_torch_is_told_not_to(two_step_run, tmp_path):
    """Every record's CRC-32 is half the digest: save_checkpoint keeps them whatever the global
    setting, and the file stays one torch.load reads as is."""
    payload = ckpt.load_checkpoint(two_step_run / "ckpt-0000002.pt")
    with serialization_config.patch({"save.compute_crc32": False}):
        ckpt.save_checkpoint(payload, tmp_path / "a.pt")
    with zipfile.ZipFile(io.BytesIO((tmp_path / "a.pt").read_bytes()[:-ckpt.FOOTER_SIZE])) \
            as archive:
        infos = archive.infolist()
        assert len(infos) > 10
        for info in infos:
            assert info.CRC == zlib.crc32(archive.read(info)), info.filename
    assert torch.load(tmp_path / "a.pt", weights_only=True)["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / "a.pt")["step"] == 2
