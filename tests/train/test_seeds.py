"""--seeds: one run folder per seed, trained one after another, continued by the same command."""
import hashlib
import signal

import pytest
import torch

from eagan.cli import main
from eagan.config import load_config
from eagan.train import checkpoint as ckpt
from eagan.train.loop import train
from eagan.train.seeds import parse_seeds
from tests.train.test_faults import fork_training, wait_for

STEPS = ["train.total_steps=8", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
OVERRIDES = [item for step in STEPS for item in ("--set", step)]


@pytest.fixture(autouse=True)
def one_thread():
    """The killed training runs in a process with one thread (fork_training); the runs it is
    compared with do the same, as a float sum's order depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def file_hashes(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_same_networks(a_path, b_path):
    a, b = ckpt.load_checkpoint(a_path), ckpt.load_checkpoint(b_path)
    assert a["step"] == b["step"]
    for network in ("generator", "discriminator", "optimizer_g"):
        flat_a, flat_b = _tensors(a[network]), _tensors(b[network])
        assert flat_a.keys() == flat_b.keys()
        for name, value in flat_a.items():
            assert torch.equal(value, flat_b[name]), f"{network}.{name}"


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in
                _tensors(value, f"{prefix}.{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in
                _tensors(value, f"{prefix}.{i}").items()}
    return {}


def straight_run(config_path, run_dir, seed):
    config = load_config(config_path, [f"run_dir={run_dir}", f"train.seed={seed}", *STEPS])
    train(config, show_progress=False)
    return run_dir


@pytest.mark.slow
def test_killed_during_the_second_seed_the_same_command_continues_exactly(tmp_path,
                                                                            tiny_config_path):
    base = tmp_path / "run"
    process = fork_training(tiny_config_path, "--seeds", "0,1", *OVERRIDES)
    seed1 = base / "seed1"
    # Checkpoints every step: the kill lands mid-step or mid-write of the second seed.
    wait_for(lambda: ckpt.latest_checkpoint(seed1) is not None and
             ckpt.step_checkpoints(seed1)[-1][0] >= 3, process, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert ckpt.step_checkpoints(seed1)[-1][0] < 8  # killed before the end
    assert ckpt.step_checkpoints(base / "seed0")[-1][0] == 8
    seed0_before = file_hashes(base / "seed0")

    assert main(["-c", str(tiny_config_path), "--train", "--seeds", "0,1", "--no-progress",
                 *OVERRIDES]) == 0
    assert file_hashes(base / "seed0") == seed0_before  # the finished seed is not touched
    for seed in (0, 1):
        straight = straight_run(tiny_config_path, tmp_path / f"straight{seed}", seed)
        assert_same_networks(ckpt.step_path(straight, 8), ckpt.step_path(base / f"seed{seed}",
                                                                            8))
    # Seeds give different runs, recorded as such.
    assert load_config(base / "seed1" / "config.yaml").train.seed == 1
    g0, g1 = (ckpt.load_checkpoint(ckpt.step_path(base / f"seed{seed}", 8))["generator"]
              for seed in (0, 1))
    assert any(not torch.equal(g0[name], g1[name]) for name in g0)


def test_a_seed_stopped_before_its_first_checkpoint_starts_again(tmp_path, tiny_config_path,
                                                                 capsys):
    args = ["-c", str(tiny_config_path), "--train", "--seeds", "2", "--no-progress", *OVERRIDES]
    assert main(args) == 0
    seed_dir = tmp_path / "run" / "seed2"
    for _, path in ckpt.step_checkpoints(seed_dir):  # as if killed before the first checkpoint
        path.unlink()
    assert main(args) == 0
    assert "seed 2: training in" in capsys.readouterr().out
    straight = straight_run(tiny_config_path, tmp_path / "straight", 2)
    assert_same_networks(ckpt.step_path(straight, 8), ckpt.step_path(seed_dir, 8))
    # The restarted run logged each step once.
    lines = (seed_dir / "stats.jsonl").read_text().splitlines()
    assert len(lines) == len((straight / "stats.jsonl").read_text().splitlines())

    assert main(args) == 0
    assert "seed 2: finished" in capsys.readouterr().out


def test_a_seed_folder_of_another_config_is_refused(tmp_path, tiny_config_path, capsys):
    args = ["-c", str(tiny_config_path), "--train", "--seeds", "0", "--no-progress"]
    assert main([*args, "--set", "train.total_steps=2"]) == 0
    before = file_hashes(tmp_path / "run" / "seed0")
    assert main([*args, "--set", "model.memory_size=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed0: holds a run of another config" in err
    assert "model.memory_size: 8 -> 4" in err
    assert file_hashes(tmp_path / "run" / "seed0") == before


@pytest.mark.parametrize("text", ["", "1,x", "-1", "0,0", "1.5"])
def test_bad_seed_lists_are_user_errors(tiny_config_path, capsys, text):
    assert main(["-c", str(tiny_config_path), "--train", "--seeds", text, "--no-progress"]) == 2
    assert "--seeds: expected distinct comma-separated integers" in capsys.readouterr().err
    assert parse_seeds("3,0,7") == [3, 0, 7]
