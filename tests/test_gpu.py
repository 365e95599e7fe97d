"""The device every mode runs on (--device, else train.device), and the tests that need CUDA.

The CUDA tests carry the `cuda` marker and skip without a GPU; benchmarks/gpu_check.py runs
them (python -m pytest -m cuda tests/test_gpu.py) and reads the properties they record.
The device tests at the top run anywhere.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from eagan.cli import main
from eagan.config import load_config
from eagan.train import checkpoint as ckpt
from eagan.train import loop as trainer
from eagan.train.distributed import resolve_device
from eagan.train.loop import train
from tests.helpers import assert_same_training_state

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
cuda_test = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def run_cli(*args) -> int:
    return main([str(arg) for arg in args] + ["--no-progress"])


# --- device choice (any machine) --------------------------------------------------------------

class _Stop(Exception):
    """Raised by the spies below once they have seen the device a mode asked for."""


@pytest.fixture
def device_spies(monkeypatch) -> dict[str, object]:
    """Pretend CUDA is present and catch the device each mode passes on: --sample to
    generator_from_checkpoint, --eval also, --train to process_group (which resolves it on
    every rank)."""
    seen: dict[str, list] = {"checkpoint": [], "train": []}

    def spy(name: str, key: str):
        def record(*args, **kwargs):
            seen[name].append(kwargs[key] if key in kwargs else args[0])
            raise _Stop
        return record

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("eagan.cli.generator_from_checkpoint", spy("checkpoint", "device"))
    monkeypatch.setattr("eagan.train.loop.process_group", spy("train", "device_preference"))
    return seen


@pytest.mark.parametrize("option,expected", [
    (["--device", "cpu"], "cpu"),
    (["--device", "auto"], "cuda"),
    ([], "cuda"),  # the config's train.device, auto by default
    (["--set", "train.device=cpu"], "cpu"),
    (["--set", "train.device=cpu", "--device", "auto"], "cuda"),  # the option wins
])
def test_every_mode_runs_on_the_device_asked_for(option, expected, device_spies,
                                                 tiny_config_path, two_step_run, tmp_path):
    with pytest.raises(_Stop):
        run_cli("-c", tiny_config_path, "--train", *option)
    # --eval and --sample with -c, then from the checkpoint's stored config (train.device auto).
    for config in (["-c", tiny_config_path], []):
        for mode in (["--eval"], ["--sample", "--out", tmp_path / "out"]):
            with pytest.raises(_Stop):
                run_cli(*config, *mode, "--ckpt", two_step_run, *option)
    assert resolve_device(device_spies["train"][0]).type == expected
    assert [torch.device(d).type for d in device_spies["checkpoint"]] == [expected] * 4


@pytest.mark.skipif(CUDA, reason="a GPU is present")
@pytest.mark.parametrize("mode", [["--train"], ["--eval", "--ckpt", "run"],
                                  ["--sample", "--ckpt", "run"]])
@pytest.mark.parametrize("how", [["--device", "cuda"], ["--set", "train.device=cuda"]])
def test_cuda_asked_without_cuda_is_a_one_line_user_error(mode, how, tiny_config_path, tmp_path,
                                                         two_step_run, capsys):
    before = sorted(tmp_path.rglob("*")) + sorted(two_step_run.rglob("*"))
    capsys.readouterr()
    code = run_cli("-c", tiny_config_path,
                   *[two_step_run if arg == "run" else arg for arg in mode], *how)
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("error: train.device (or --device): 'cuda' was asked for but no CUDA "
                   "device is available\n")
    assert sorted(tmp_path.rglob("*")) + sorted(two_step_run.rglob("*")) == before  # unwritten


def test_device_option_rejects_unknown_devices(tiny_config_path, capsys):
    assert run_cli("-c", tiny_config_path, "--train", "--device", "tpu") == 2
    assert "--device: invalid choice: 'tpu'" in capsys.readouterr().err


# --- CUDA (marked `cuda`, skipped without a GPU) ----------------------------------------------

def peak_cuda_bytes(run) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    assert run() == 0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@cuda_test
@needs_cuda
def test_train_eval_sample_run_on_cuda(tiny_config_path, tmp_path, standin_weights, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    evaluation = ["--inception-weights", standin_weights, "--set", "eval.batch_size=8",
                  "--set", f"eval.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    common = ["-c", tiny_config_path, "--device", "cuda"]
    assert peak_cuda_bytes(lambda: run_cli(*common, "--train", "--set", "eval.every=2",
                                           "--set", "eval.num_samples=8", *evaluation)) > 0
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["Metrics/fid"]) for line in stats if "Metrics/fid" in line)
    assert peak_cuda_bytes(lambda: run_cli(*common, "--eval", "--ckpt", run_dir,
                                           "--num-samples", 8, *evaluation)) > 0
    assert peak_cuda_bytes(lambda: run_cli(*common, "--sample", "--ckpt", run_dir, "--out",
                                           tmp_path / "samples", "--num-samples", 8,
                                           "--attention")) > 0
    assert (tmp_path / "samples" / "run-step4-samples.npz").is_file()


def demo_config(tmp_path: Path, name: str, *overrides: str):
    return load_config(REPO / "configs" / "demo_digits.yaml", [
        f"run_dir={tmp_path / name}", "train.device=cuda", "train.total_steps=50",
        "train.log_every=10", "train.sample_every=1000", "train.checkpoint_every=50",
        *overrides])


def logged_losses(run_dir: Path) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key.startswith("Loss/")}
            for line in lines]


# Tolerance of the 50-step comparison: each logged loss (a mean over 10 steps) within 0.1 + 10%
# of fp32's. GAN training amplifies rounding differences step by step, so this checks that
# the run stays on the same course, not round-off.
MIXED_PRECISION_ATOL, MIXED_PRECISION_RTOL = 0.1, 0.1


@cuda_test
@needs_cuda
def test_bf16_and_fp16_train_the_demo_for_50_steps_close_to_fp32(tmp_path, record_property):
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        result = train(demo_config(tmp_path, precision, f"train.precision={precision}"),
                       show_progress=False)
        assert result.run_dir == tmp_path / precision
        losses[precision] = logged_losses(tmp_path / precision)
        assert all(math.isfinite(v) for line in losses[precision] for v in line.values())
    scaler = ckpt.load_checkpoint(ckpt.step_path(tmp_path / "fp16", 50))["scaler_g"]
    record_property("fp16_loss_scale_g", json.dumps(scaler, default=str))
    worst = {}
    for precision in ("bf16", "fp16"):
        for line, reference in zip(losses[precision], losses["fp32"], strict=True):
            for key, value in reference.items():
                error = abs(line[key] - value)
                worst[precision] = max(worst.get(precision, 0.0), error)
                assert error <= MIXED_PRECISION_ATOL + MIXED_PRECISION_RTOL * abs(value), \
                    (precision, key, line[key], value)
    record_property("worst_loss_difference", json.dumps(worst))


@cuda_test
@needs_cuda
def test_channels_last_and_fused_adam_match_the_plain_step(tmp_path, record_property,
                                                           monkeypatch):
    # TF32 convolutions (PyTorch's default for cuDNN) differ by 1e-3 between conv algorithms.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    first = {}
    for name, switches in (("plain", []), ("fast", ["train.channels_last=true",
                                                     "train.fused_adam=true"])):
        train(demo_config(tmp_path, name, "train.total_steps=2", "train.log_every=1",
                          "train.checkpoint_every=2", "train.precision=fp32", *switches),
              show_progress=False)
        first[name] = logged_losses(tmp_path / name)
    record_property("first_step_losses", json.dumps(first))
    # The first step sees identical weights; channels_last may pick other conv kernels.
    for key, value in first["plain"][0].items():
        assert first["fast"][0][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    assert all(math.isfinite(v) for line in first["fast"] for v in line.values())


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@cuda_test
@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_first_step_matches_eager_on_cuda(mode, tmp_path, record_property,
                                                   monkeypatch):
    from torch._dynamo.utils import counters

    # TF32 convolutions (PyTorch's default for cuDNN) differ by 1e-3 between conv algorithms,
    # more than the 1e-4 this test asks of the compiler.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    steps = ["train.total_steps=1", "train.log_every=1", "train.checkpoint_every=1",
             "train.precision=fp32"]
    eager = train(demo_config(tmp_path, "eager", *steps), show_progress=False)
    torch._dynamo.reset()
    counters.clear()
    # Inductor says why it skips CUDA graphs on its perf_hints log ("skipping cudagraphs due
    # to ...") and counts the skips.
    torch._logging.set_logs(perf_hints=True)
    collect = _Collect()
    logging.getLogger("torch._inductor").addHandler(collect)
    try:
        compiled = train(demo_config(tmp_path, mode, *steps, "train.compile=true",
                                     f"train.compile_mode={mode}"), show_progress=False)
    finally:
        logging.getLogger("torch._inductor").removeHandler(collect)
        torch._logging.set_logs()
    skips = [m for m in collect.messages if "cudagraph" in m.lower()]
    record_property("cudagraph_skips", int(counters["inductor"]["cudagraph_skips"]))
    record_property("cudagraph_messages", json.dumps(sorted(set(skips))[:10]))
    if mode == "reduce-overhead":
        used = counters["inductor"]["cudagraph_skips"] == 0 and not skips
        record_property("cudagraphs", "used" if used else "skipped")
    for key, value in logged_losses(eager.run_dir)[0].items():
        got = logged_losses(compiled.run_dir)[0][key]
        assert got == pytest.approx(value, rel=1e-4, abs=1e-6), (mode, key, got, value)


SYNC_BN_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {repo!r})
from eagan.config import ModelConfig
from eagan.nets.models import build_generator

dist.init_process_group("nccl")
assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
torch.manual_seed(0)
plain = build_generator(ModelConfig(g_base_channels=4, d_base_channels=4, memory_size=8), 32, 10)
synced = nn.SyncBatchNorm.convert_sync_batchnorm(__import__("copy").deepcopy(plain)).cuda()
plain = plain.cuda()
assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
z, y = torch.randn(8, plain.z_dim, device="cuda"), torch.randint(10, (8,), device="cuda")
out_plain = plain(z, y)
out_synced = DistributedDataParallel(synced)(z, y)
out_plain.square().mean().backward()
out_synced.square().mean().backward()
torch.testing.assert_close(out_synced, out_plain, rtol=1e-4, atol=1e-5)
for (name, a), (_, b) in zip(plain.named_parameters(), synced.named_parameters()):
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
dist.destroy_process_group()
print("sync-bn ok")
"""


@cuda_test
@needs_cuda
def test_sync_batchnorm_under_torchrun_with_nccl_and_one_process(tmp_path):
    # With one process the trainer runs without DDP or SyncBatchNorm (WORLD_SIZE 1), so this
    # drives our generator through NCCL's SyncBatchNorm directly; with one rank it must equal
    # plain BatchNorm.
    script = tmp_path / "sync_bn.py"
    script.write_text(SYNC_BN_SCRIPT.format(repo=str(REPO)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", str(script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and "sync-bn ok" in done.stdout, done.stderr[-3000:]


@cuda_test
@needs_cuda
def test_resume_is_exact_on_cuda_with_deterministic_algorithms(tiny_config_path, tmp_path,
                                                               monkeypatch, record_property):
    # cuBLAS needs a fixed workspace to be deterministic; read at each call.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # The trainer turns cuDNN's benchmark mode on for speed; its choice of algorithm may differ
    # between the straight and the resumed run, so it goes off again once the networks exist.
    build_gan = trainer.build_gan

    def build_gan_without_benchmark(*args, **kwargs):
        built = build_gan(*args, **kwargs)
        torch.backends.cudnn.benchmark = False
        return built

    monkeypatch.setattr(trainer, "build_gan", build_gan_without_benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            device = ["train.device=cuda", "train.precision=fp32"]
            straight = load_config(tiny_config_path, [f"run_dir={tmp_path / 'straight'}",
                                                      *device])
            train(straight, show_progress=False)
            halves = [f"run_dir={tmp_path / 'halves'}", *device]
            train(load_config(tiny_config_path, [*halves, "train.total_steps=2"]),
                  show_progress=False)
            train(load_config(tiny_config_path, halves), resume=True, show_progress=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    record_property("nondeterministic_ops", json.dumps(sorted({
        str(w.message).split(" does not have a deterministic")[0] for w in caught
        if "deterministic" in str(w.message)})))
    assert_same_training_state(ckpt.load_checkpoint(ckpt.step_path(tmp_path / "straight", 4)),
                               ckpt.load_checkpoint(ckpt.step_path(tmp_path / "halves", 4)))


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_its_sections_and_writes_json(tmp_path):
    # The reduced CPU run of benchmarks/gpu_check.py, three of its sections (the FID and the
    # other recipes take minutes on 2 busy cores): pytest's CUDA tests read back from JUnit
    # XML, one throughput row from train_throughput.py, attention_cost.py's verdicts.
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--only", "tests",
         "throughput", "attention", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows, commands = report["rows"], report["commands"]
    assert {row["section"] for row in rows} == {"tests", "throughput", "attention"}
    tests = [row for row in rows if row["section"] == "tests"]
    # Every CUDA-marked test of this module is listed, and here each skips for want of CUDA.
    marked = [name for name, value in globals().items()
              if name.startswith("test_") and any(m.name == "cuda"
                                                   for m in getattr(value, "pytestmark", []))]
    assert sorted(row["check"].split("[")[0] for row in tests) == sorted(
        [name for name in marked for _ in range(2 if name.startswith("test_compiled") else 1)])
    assert all(row["status"] == "SKIP" and "needs CUDA" in row["result"] for row in tests)
    throughput = next(row for row in rows if row["section"] == "throughput")
    assert throughput["details"]["iterations_per_s"] > 0
    assert throughput["details"]["peak_memory_mib"] > 0
    assert any(row["check"].startswith("goal 2, 16x16") for row in rows)
    # Each row names the command it came from, and every command is printed with the table.
    assert all(0 <= row["command"] < len(commands) for row in rows)
    assert all(command in done.stdout for command in commands)
