"""Data-parallel training on CPU with gloo: the same code path torchrun and NCCL take on GPUs."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eagan.nets.losses import d_hinge_loss, g_hinge_loss
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import DistContext
from eagan.train.steps import LatentSampler, StepOptions, discriminator_step, generator_step
from tests.fakedata import make_image_set
from tests.launch import fork_ranks, free_port
from tests.train.test_seeds import assert_same_networks, file_hashes
from tests.train.test_trainer import tiny_gan

GLOBAL_BATCH = 8


def train_on_two_ranks(config: Path, *args: str, env: dict[str, str] | None = None
                       ) -> subprocess.CompletedProcess:
    """The training command on two gloo ranks, each started as torchrun starts its workers."""
    return fork_ranks(["-c", str(config), "--train", "--no-progress", *args], env=env)


@pytest.mark.slow
def test_two_ranks_evaluate_once_and_keep_the_best(tiny_config_path, tmp_path, standin_weights):
    done = train_on_two_ranks(
        tiny_config_path, "--set", "train.total_steps=2", "--set", "eval.every=2",
        "--set", "eval.num_samples=7", "--set", "eval.batch_size=4", "--set",
        f"eval.cache_dir={tmp_path / 'cache'}", "--inception-weights", str(standin_weights),
        env={"TORCH_HOME": str(tmp_path / "torch_home")})
    assert done.returncode == 0, done.stderr[-2000:]
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text()
             .splitlines()]
    fids = [line["Metrics/fid"] for line in stats if "Metrics/fid" in line]
    assert len(fids) == 1 and math.isfinite(fids[0])  # logged once, by rank 0
    assert ckpt.load_checkpoint(tmp_path / "run" / "best.pt")["best_score"] == fids[0]


def first_step(rank: int, world_size: int, port: int, out: Path) -> None:
    """One D update and one G update on this rank's share of one global batch."""
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    # With the auxiliary classifier: its head and its keyword pass through DDP too.
    gan = tiny_gan(seed=0, aux_classifier=True)
    # Per-rank batch statistics are the one intended difference between the two set-ups
    # (sync_batchnorm removes it on GPUs); running statistics make G per-sample here.
    for module in gan.generator.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    if world_size > 1:
        gan.g_update = DistributedDataParallel(gan.generator)
        gan.d_update = DistributedDataParallel(gan.discriminator)
    context = DistContext(rank, world_size, torch.device("cpu"))
    per_rank = GLOBAL_BATCH // world_size
    latents = LatentSampler(16, 10, per_rank, context, seed=1)
    data = make_image_set(GLOBAL_BATCH, num_classes=10)
    real = (data.images.float() / 127.5 - 1)[rank * per_rank:(rank + 1) * per_rank]
    labels = data.labels[rank * per_rank:(rank + 1) * per_rank]
    options = StepOptions(d_loss=d_hinge_loss, g_loss=g_hinge_loss, class_weight=0.5)
    discriminator_step(gan, options, real, labels, *latents.draw(), step=0)
    generator_step(gan, options, *latents.draw(), step=0)
    if rank == 0:
        # Gradients, not weights: Adam's first step is invariant to the gradient's scale, so
        # equal weights would not show a sum where a mean belongs.
        grads = {f"{prefix}.{name}": param.grad for prefix, network in
                 (("G", gan.generator), ("D", gan.discriminator))
                 for name, param in network.named_parameters()}
        torch.save({"grads": grads}, out)
    if world_size > 1:
        dist.destroy_process_group()


def test_two_ranks_with_half_batches_match_one_rank(tmp_path):
    first_step(0, 1, 0, tmp_path / "one.pt")
    mp.start_processes(first_step, args=(2, free_port(), tmp_path / "two.pt"), nprocs=2,
                       start_method="fork")  # torch is imported already: no 3 s per process
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["grads"].keys() == two["grads"].keys()
    assert one["grads"]["D.classifier.parametrizations.weight.original"].abs().sum() > 0
    for name, grad in one["grads"].items():
        # Summation order differs (one batch of 8 against two of 4 averaged): allow float
        # round-off relative to the gradient's scale.
        scale = grad.abs().max().item()
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


def test_seeds_on_two_ranks_share_one_process_group(tiny_config_path, tmp_path):
    """--seeds on two ranks: both walk the seeds in one process group; rank 0 alone
    decides what each folder needs, restarts a seed stopped before its first checkpoint and
    refuses a folder of another config on every rank (no rank left waiting)."""
    seeds = ("--seeds", "0,1", "--set", "train.total_steps=2")
    first = train_on_two_ranks(tiny_config_path, *seeds)
    assert first.returncode == 0, first.stderr[-2000:]
    seed0, seed1 = tmp_path / "run" / "seed0", tmp_path / "run" / "seed1"
    (tmp_path / "first1.pt").write_bytes(ckpt.step_path(seed1, 2).read_bytes())
    for _, path in ckpt.step_checkpoints(seed1):  # as if stopped before its first checkpoint
        path.unlink()
    seed0_before = file_hashes(seed0)

    again = train_on_two_ranks(tiny_config_path, *seeds)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("seed 0: finished") == 1  # rank 0 alone reports
    assert again.stdout.count("seed 1: training in") == 1
    assert file_hashes(seed0) == seed0_before
    assert_same_networks(tmp_path / "first1.pt", ckpt.step_path(seed1, 2))
    assert len((seed1 / "stats.jsonl").read_text().splitlines()) == \
        len((seed0 / "stats.jsonl").read_text().splitlines())

    refused = train_on_two_ranks(tiny_config_path, *seeds, "--set", "model.memory_size=4")
    assert refused.returncode != 0
    assert refused.stderr.count("seed0: holds a run of another config") == 2  # each rank
    assert file_hashes(seed0) == seed0_before
