"""The command line: ``python run.py -c CONFIG (--train | --eval | --sample) [options]``,
``python run.py --report RUN_DIR [RUN_DIR ...]`` and
``python run.py --import-studiogan PATH [PATH ...] -c CONFIG --out RUN_DIR``.

Exit codes: 0 success, 2 a mistake the user can fix (one line on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import functools
import sys

from eagan.config import Config, apply_overrides, load_config
from eagan.errors import UserError
from eagan.eval.protocols import PROTOCOLS
from eagan.nets.bn_mode import BN_MODES
from eagan.sampling import generator_from_checkpoint, write_samples
from eagan.train.checkpoint import load_checkpoint, resolve_checkpoint_arg
from eagan.train.distributed import process_group, resolve_device

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> None:
        raise UserError(f"command line: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run.py", description="EAGAN: GANs with external attention.")
    parser.add_argument("-c", "--config",
                        help="YAML config file (needed by --train; --eval and --sample read "
                             "the checkpoint's own when it is left out)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train (or --resume) a run")
    mode.add_argument("--eval", action="store_true", help="FID and IS of a checkpoint")
    mode.add_argument("--sample", action="store_true", help="grids and .npz from a checkpoint")
    mode.add_argument("--report", nargs="+", metavar="RUN_DIR",
                      help="compare run folders (globs welcome) over seeds: tables and plots")
    mode.add_argument("--import-studiogan", nargs="+", metavar="PATH",
                      help="StudioGAN SAGAN checkpoint files or their folder: write them as a "
                           "run folder of -c CONFIG in --out")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run folder's latest checkpoint exactly")
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="--train once per seed, in <run folder>/seed<S>; run again to "
                             "continue what is unfinished")
    parser.add_argument("--ckpt", help="checkpoint file, or a run folder (best.pt, else latest)")
    parser.add_argument("--raw", action="store_true",
                        help="use the raw generator even when the checkpoint has an EMA copy")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS),
                        help="evaluation protocol (default: the config's eval.protocol)")
    parser.add_argument("--num-samples", type=int, help="generated images (eval or sample)")
    parser.add_argument("--inception-weights", help="local Inception weights file")
    parser.add_argument("--bn-mode", metavar="MODE[,MODE]",
                        help="generator BatchNorm mode: running or batch; --eval also takes "
                             "both (or running,batch) to report each. Default for --eval: "
                             "eval.bn_mode, else the protocol's; for --sample: batch, as the "
                             "training grids")
    parser.add_argument("--out", help="output folder for --sample (default: samples/), "
                                      "--report (default: reports/report-<time>) or "
                                      "--import-studiogan (needed)")
    parser.add_argument("--last-k", type=int, default=3,
                        help="--report: also compare the mean of the last K evaluations")
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
        if args.report:
            from eagan.report import write_report

            write_report(args.report, args.out, args.last_k,
                         command="run.py " + " ".join(sys.argv[1:] if argv is None else argv))
            return 0
        if args.import_studiogan:
            return _import_studiogan(args)
        if args.config is None and args.train:
            raise UserError("command line: --train needs -c CONFIG (see --help)")
        if not args.train and args.ckpt is None:
            raise UserError(f"--{'eval' if args.eval else 'sample'} needs --ckpt PATH "
                            "(a checkpoint file or a run folder)")
        bn_modes = _parse_bn_modes(args.bn_mode, args.eval) if args.bn_mode else None
        overrides = _config_overrides(args, bn_modes)
        if args.train:  # the device is decided once the process group is up
            return _train(load_config(args.config, overrides), args)
        given = load_config(args.config, overrides) if args.config is not None else None
        checkpoint = resolve_checkpoint_arg(args.ckpt)
        payload = load_checkpoint(checkpoint)
        # Without -c, the config stored in the checkpoint, with --set and the options on top.
        config = given or apply_overrides(payload["config"], overrides,
                                          source=f"{checkpoint} (stored config)")
        device = resolve_device(config.train.device)
        if args.eval:
            # Imported here: the Inception engines take seconds to import.
            from eagan.eval.runs import evaluate_checkpoint

            sampled = generator_from_checkpoint(payload, checkpoint, device=device,
                                                ema=not args.raw and config.eval.use_ema)
            evaluate_checkpoint(config, sampled, checkpoint, bn_modes=bn_modes,
                                show_progress=not args.no_progress)
            return 0
        sampled = generator_from_checkpoint(payload, checkpoint, ema=not args.raw,
                                            device=device)
        for output in write_samples(sampled, checkpoint, args.out or "samples",
                                    num_samples=args.num_samples or 1000, seed=args.seed,
                                    bn=bn_modes[0] if bn_modes else "batch",
                                    interpolate=args.interpolate,
                                    attention=args.attention):
            print(output)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # Training saves and exits on its own; this is an interrupt while loading or sampling.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _config_overrides(args: argparse.Namespace, bn_modes: list[str] | None) -> list[str]:
    """--set, then the options that stand for config keys, as dotted overrides."""
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.protocol:
        overrides.append(f"eval.protocol={args.protocol}")
    if args.inception_weights:
        overrides.append(f"eval.inception_weights={args.inception_weights}")
    if bn_modes is not None and len(bn_modes) == 1:
        overrides.append(f"eval.bn_mode={bn_modes[0]}")
    if args.num_samples is not None:
        if args.num_samples <= 0:
            raise UserError(f"--num-samples: expected a value > 0, got {args.num_samples}")
        if args.eval:
            overrides.append(f"eval.num_samples={args.num_samples}")
    return overrides


def _train(config: Config, args: argparse.Namespace) -> int:
    from eagan.eval.runs import make_training_evaluator
    from eagan.train.loop import train
    from eagan.train.run_dir import RESUMABLE_KEYS
    from eagan.train.seeds import parse_seeds, train_seeds

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    # Cached: --seeds loads Inception and the reference images once for all its runs (the
    # evaluator reads no key that differs between them).
    make_evaluator = functools.cache(functools.partial(
        make_training_evaluator, config, show_progress=not args.no_progress))
    if seeds is None:
        train(config, resume=args.resume, show_progress=not args.no_progress,
              make_evaluator=make_evaluator)
        return 0
    with process_group(config.train.device, config.train.collective_timeout_s) as context:
        train_seeds(config, seeds, lambda seeded, resume: train(
            seeded, resume=resume, show_progress=not args.no_progress,
            make_evaluator=make_evaluator, context=context), RESUMABLE_KEYS, context)
    return 0


def _import_studiogan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eagan.studiogan import import_studiogan

    if args.config is None or args.out is None:
        raise UserError("command line: --import-studiogan needs -c CONFIG (the networks' "
                        "config) and --out RUN_DIR (see --help)")
    config = load_config(args.config, _config_overrides(args, None))
    print(import_studiogan([Path(path) for path in args.import_studiogan], config,
                           Path(args.out)))
    return 0


def _parse_bn_modes(text: str, several_allowed: bool) -> list[str]:
    """--bn-mode: "both" is running then batch; otherwise a comma list of distinct modes."""
    modes = ["running", "batch"] if text == "both" else [m.strip() for m in text.split(",")]
    if any(mode not in BN_MODES for mode in modes) or len(set(modes)) != len(modes):
        raise UserError(f"--bn-mode: expected running, batch, both or running,batch, "
                        f"got {text!r}")
    if len(modes) > 1 and not several_allowed:
        raise UserError(f"--bn-mode: only --eval reports several modes; --train and --sample "
                        f"use one, got {text!r}")
    return modes


if __name__ == "__main__":
    sys.exit(main())
