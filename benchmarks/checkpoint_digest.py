"""What the checkpoint digest costs, on a checkpoint of a config's size (G, D, both Adam
states, the data order of CIFAR-10's training split).

The digest (eagan/train/checkpoint.py) is torch.save's own CRC-32 of every record plus our sha256 of
the archive's bookkeeping. It checks one goal and prints a PASS/MISS line for it: computing the
sha256 footer takes under 5% of the save (eagan's save: torch.save, footer, fsync, rename). For
comparison it prints what the CRC-32s cost inside torch.save (on by default in PyTorch; eagan
keeps them on), what a sha256 of every byte would cost, and the load-time check.

    python benchmarks/checkpoint_digest.py [-c configs/cifar10_eagan.yaml] [--repeats 5]
        [--dir FOLDER] [--threads T]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from torch.utils.serialization import config as serialization_config  # noqa: E402

from eagan.config import Config, load_config, to_dict  # noqa: E402
from eagan.data import ImageSet, make_batch_source  # noqa: E402
from eagan.files import atomic_output  # noqa: E402
from eagan.train import checkpoint as ckpt  # noqa: E402
from eagan.train.distributed import DistContext  # noqa: E402
from eagan.train.steps import LatentSampler, build_gan  # noqa: E402

DIGEST_GOAL = 0.05  # of the save time
CIFAR10_TRAIN = 50_000  # images whose order the checkpoint holds


def training_payload(config: Config, num_classes: int = 10) -> dict:
    """What the trainer saves, at the config's sizes: networks, Adam states after one update
    (both moments allocated), the data order of a CIFAR-10-sized set, latents, the fixed z."""
    context = DistContext(0, 1, torch.device("cpu"))
    gan, _, generator_ema = build_gan(config, num_classes, context)
    for optimizer in (gan.opt_g, gan.opt_d):
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.randn_like(param)
        optimizer.step()
    size = config.data.image_size
    images = ImageSet(torch.zeros(CIFAR10_TRAIN, 3, size, size, dtype=torch.uint8),
                      torch.zeros(CIFAR10_TRAIN, dtype=torch.int64), num_classes,
                      [str(c) for c in range(num_classes)], "zeros")
    batches = make_batch_source(images, config.train.batch_size, config.train.seed, "cpu")
    latents = LatentSampler(config.model.z_dim, num_classes, config.train.batch_size, context,
                            seed=1)
    return {
        "format": ckpt.FORMAT, "step": 2000, "config": to_dict(config),
        "num_classes": num_classes, "class_names": images.class_names,
        "generator": gan.generator.state_dict(),
        "discriminator": gan.discriminator.state_dict(),
        "generator_ema": None if generator_ema is None else generator_ema.state_dict(),
        "optimizer_g": gan.opt_g.state_dict(), "optimizer_d": gan.opt_d.state_dict(),
        "scaler_g": gan.scaler_g.state_dict(), "scaler_d": gan.scaler_d.state_dict(),
        "data_order": [batches.state_dict()], "latents": latents.state_dict(),
        "rng": [{"torch": torch.get_rng_state()}],
        "fixed_z": torch.randn(100, config.model.z_dim), "best_score": 14.1, "best_metric": "fid",
    }


def save_without_digest(payload: dict, path: Path) -> None:
    with atomic_output(path, "the checkpoint") as tmp_path:
        torch.save(payload, tmp_path)


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="configs/cifar10_eagan.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="runs",
                        help="where to write (a scratch folder inside it; default runs/, where "
                             "checkpoints go)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config)
    payload = training_payload(config)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".checkpoint-digest-", dir=args.dir))
    try:
        plain, digested = scratch / "plain.pt", scratch / "digested.pt"
        save_without_digest(payload, plain)  # warm-up: page cache, allocator
        ckpt.save_checkpoint(payload, digested)
        # Interleaved, so that load from other jobs hits all alike.
        save_plain, save_no_crc, save_digest, footer = [], [], [], []
        for _ in range(args.repeats):
            save_plain += timed(lambda: save_without_digest(payload, plain), 1)
            with serialization_config.patch({"save.compute_crc32": False}):
                save_no_crc += timed(lambda: save_without_digest(payload, plain), 1)
            save_digest += timed(lambda: ckpt.save_checkpoint(payload, digested), 1)
            with open(digested, "rb") as handle:
                size = digested.stat().st_size - ckpt.FOOTER_SIZE
                footer += timed(lambda: ckpt._structure_digest(handle, size), 1)
        data = digested.read_bytes()[:-ckpt.FOOTER_SIZE]
        every_byte = timed(lambda: hashlib.sha256(data).digest(), args.repeats)
        load = timed(lambda: torch.load(digested, weights_only=True), args.repeats)
        load_checked = timed(lambda: ckpt.load_checkpoint(digested), args.repeats)
    finally:
        shutil.rmtree(scratch)

    median = statistics.median
    share = median(footer) / median(save_digest)
    ms = lambda times: f"{median(times) * 1e3:.1f} ms"  # noqa: E731
    rows = [
        ("checkpoint size", f"{len(data) / 2**20:.1f} MiB"),
        ("save: torch.save (CRC-32s on), fsync, rename", ms(save_plain)),
        ("the same with torch.save's CRC-32s off", ms(save_no_crc)),
        ("save with digest (eagan.train.checkpoint.save_checkpoint)", ms(save_digest)),
        ("  of which the sha256 footer", ms(footer)),
        ("footer share of the save", f"{share:.2%}"),
        ("(a sha256 of every byte instead)", ms(every_byte)),
        ("torch.load", ms(load)),
        ("load_checkpoint (digest and CRC-32s checked first)", ms(load_checked)),
    ]
    print(f"{args.config}: medians of {args.repeats}, {torch.get_num_threads()} threads, "
          f"written under {args.dir}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")
    verdict = "PASS" if share < DIGEST_GOAL else "MISS"
    print(f"goal: digest under {DIGEST_GOAL:.0%} of the save time: {verdict} ({share:.1%})")


if __name__ == "__main__":
    main()
