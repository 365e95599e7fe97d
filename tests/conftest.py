"""Shared fixtures: a fake CIFAR-10 in its real on-disk format and a tiny config over it; and
the grouping that lets pytest-xdist run the suite in parallel safely."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch
import yaml
from packaging.version import Version

from eagan.cli import main
from tests.fakedata import write_cifar10
from tests.inception_standin import build_standin_inception_weights


def loadgroup_is_broken() -> bool:
    """pytest 9.2 keeps node ids where pytest-xdist 3.8 cannot append "@group" to them, so
    --dist loadgroup spreads every group over the workers without a word."""
    try:
        xdist_version = importlib.metadata.version("pytest-xdist")
    except importlib.metadata.PackageNotFoundError:
        return False
    return Version(pytest.__version__) >= Version("9.2") and \
        Version(xdist_version) <= Version("3.8.0")


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist each worker (and every process it starts) computes on one thread: two
    workers with a thread pool each on two cores made every Inception test three times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    elif config.getoption("dist", "no") == "loadgroup" and loadgroup_is_broken():
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with this pytest-xdist ignores xdist_group "
            f"(github.com/pytest-dev/pytest-xdist/issues/1386): install the test extras of "
            f"setup.cfg (pytest<9.2)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Real torchrun jobs start three processes each (the agent and two ranks): under
    # pytest-xdist (-n 2 --dist loadgroup) they run on one worker, one after another, so that
    # two jobs never share the two cores with the other worker's tests.
    for item in items:
        if "torchrun" in item.name:
            item.add_marker(pytest.mark.xdist_group("torchrun_jobs"))
    # Slow tests first (a stable sort): a worker that draws one near the end would run on alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# Tiny widths (G 16 channels, D 8) and a handful of images: a training step takes milliseconds.
TINY_CONFIG = {
    "data": {"dataset": "cifar10", "image_size": 32, "download": False},
    "model": {"attention": "external", "memory_size": 8, "g_base_channels": 4,
              "d_base_channels": 4, "z_dim": 16},
    "train": {"total_steps": 4, "batch_size": 8, "n_dis": 2, "log_every": 2,
              "sample_every": 2, "checkpoint_every": 2, "keep_checkpoints": 2, "seed": 3},
    "eval": {"every": 0},
}


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    # The test split is the evaluations' reference set: each image is an Inception pass.
    write_cifar10(root, n_train=40, n_test=8)
    return root


@pytest.fixture
def tiny_config_path(tmp_path, cifar_root) -> Path:
    """A tiny config over the fake CIFAR-10, with its run folder inside tmp_path."""
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["data"]["root"] = str(cifar_root)
    config["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def one_torch_thread():
    """Run the test's torch work on one thread: the same reduction order as subprocesses started
    with OMP_NUM_THREADS=1 (so results compare bit for bit), and no spinning thread pools on a
    machine whose cores other jobs share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory) -> Path:
    """Inception weights of the real architecture, randomly initialised (no download)."""
    return build_standin_inception_weights(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, cifar_root) -> Path:
    """A run of the tiny config trained for 2 steps by the command line, its config file
    (tiny.yaml) beside the run folder; one per test module."""
    folder = tmp_path_factory.mktemp("trained")
    config = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    config["data"]["root"] = str(cifar_root)
    config["run_dir"] = str(folder / "run")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_torch_thread, which a module fixture cannot use
    try:
        assert main(["-c", str(folder / "tiny.yaml"), "--train", "--no-progress",
                     "--set", "train.total_steps=2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "run"
