"""The command line: ``python run.py -c CONFIG (--train | --eval | --sample) [options]``.

Exit codes: 0 success, 2 a mistake the user can fix (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from eagan.attention import GatedAttention2d
from eagan.checkpoint import resolve_checkpoint_arg
from eagan.config import Config, load_config
from eagan.distributed import resolve_device
from eagan.errors import UserError
from eagan.files import ensure_writable_dir
from eagan.sampling import BN_MODES, class_grid_labels, grid_image, load_generator, save_png, \
    write_npz
from eagan.visualize import attention_figure

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise UserError(f"command line: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description="EAGAN: GANs with external attention.")
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train (or --resume) a run")
    mode.add_argument("--eval", action="store_true", help="FID and IS of a checkpoint")
    mode.add_argument("--sample", action="store_true", help="grids and .npz from a checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder's latest checkpoint exactly")
    parser.add_argument("--ckpt", help="checkpoint file, or a run folder (best.pt, else latest)")
    parser.add_argument("--raw", action="store_true",
                        help="use the raw generator even when the checkpoint has an EMA copy")
    parser.add_argument("--protocol", choices=("studiogan2021", "standard"),
                        help="evaluation protocol (default: the config's eval.protocol)")
    parser.add_argument("--num-samples", type=int, help="generated images (eval or sample)")
    parser.add_argument("--inception-weights", help="local Inception weights file")
    parser.add_argument("--out", help="output folder for --sample (default: samples/)")
    parser.add_argument("--bn", choices=BN_MODES, default="batch",
                        help="generator BatchNorm mode for --sample (default: batch)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--interpolate", action="store_true",
                        help="also write a latent interpolation grid")
    parser.add_argument("--attention", action="store_true",
                        help="also write attention-map figures")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="device for every mode (default: the config's train.device, auto: "
                             "CUDA when present)")
    parser.add_argument("--no-progress", action="store_true", help="no banner or progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        overrides = list(args.overrides)
        if args.run_dir:
            overrides.append(f"run_dir={args.run_dir}")
        if args.device:
            overrides.append(f"train.device={args.device}")
        if args.protocol:
            overrides.append(f"eval.protocol={args.protocol}")
        if args.inception_weights:
            overrides.append(f"eval.inception_weights={args.inception_weights}")
        if args.num_samples is not None:
            if args.num_samples <= 0:
                raise UserError(f"--num-samples: expected a value > 0, got {args.num_samples}")
            if args.eval:
                overrides.append(f"eval.num_samples={args.num_samples}")
        config = load_config(args.config, overrides)
        resolve_device(config.train.device)  # an impossible device stops every mode here
        if args.train:
            return _train(config, args)
        if args.ckpt is None:
            raise UserError(f"--{'eval' if args.eval else 'sample'} needs --ckpt PATH "
                            "(a checkpoint file or a run folder)")
        if args.eval:
            return _evaluate(config, args)
        return _sample(config, args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # Training saves and exits on its own; this is an interrupt while loading or sampling.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _train(config: Config, args: argparse.Namespace) -> int:
    from eagan.evaluation import make_training_evaluator
    from eagan.trainer import train

    evaluate = None
    if config.eval.every:
        device = resolve_device(config.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        evaluate = make_training_evaluator(config, device, show_progress=not args.no_progress)
    train(config, resume=args.resume, show_progress=not args.no_progress, evaluate=evaluate)
    return 0


def _evaluate(config: Config, args: argparse.Namespace) -> int:
    from eagan.evaluation import evaluate_checkpoint

    evaluate_checkpoint(config, resolve_checkpoint_arg(args.ckpt), use_ema=not args.raw,
                        show_progress=not args.no_progress)
    return 0


def _sample(config: Config, args: argparse.Namespace) -> int:
    """A class grid, N images as .npz and, on request, interpolation and attention figures."""
    path = resolve_checkpoint_arg(args.ckpt)
    device = resolve_device(config.train.device)
    sampler = load_generator(path, ema=not args.raw, device=device)
    if args.attention and not isinstance(sampler.generator.attention, GatedAttention2d):
        raise UserError(f"{path}: --attention: this generator has no attention block")
    out_dir = ensure_writable_dir(args.out or "samples", "the output folder")
    stem = f"{path.parent.name}-step{sampler.step}" + ("-ema" if sampler.is_ema else "")
    per_row = 8
    labels = class_grid_labels(sampler.num_classes, per_row, torch.device("cpu"))
    count = len(labels) if labels is not None else per_row * per_row
    images, _ = sampler.sample(count, labels=labels, seed=args.seed, bn=args.bn)
    written = [out_dir / f"{stem}-grid.png"]
    save_png(grid_image(images, per_row), written[-1])

    images, labels = sampler.sample(args.num_samples or 1000, seed=args.seed, bn=args.bn)
    written.append(out_dir / f"{stem}-samples.npz")
    write_npz(images, labels, written[-1])
    if args.interpolate:
        written.append(out_dir / f"{stem}-interpolation.png")
        save_png(grid_image(sampler.interpolate(rows=8, steps=per_row, seed=args.seed,
                                                bn=args.bn), per_row), written[-1])
    if args.attention:
        rng = torch.Generator().manual_seed(args.seed)
        z = torch.randn(per_row, sampler.generator.z_dim, generator=rng).to(device)
        grid_labels = torch.randint(sampler.num_classes, (per_row,), generator=rng).to(device) \
            if sampler.num_classes else None
        written.append(out_dir / f"{stem}-attention.png")
        save_png(attention_figure(sampler.generator, z, grid_labels), written[-1])
    for output in written:
        print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
