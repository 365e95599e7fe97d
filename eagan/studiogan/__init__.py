"""Import PyTorch-StudioGAN's SAGAN checkpoints as EAGAN run folders.

StudioGAN (Kang & Park, github.com/POSTECH-CVLab/PyTorch-StudioGAN) saves a run as separate
files, ``model=G-best-weights-step=N.pth``, ``model=D-...`` and, with EMA, ``model=G_ema-...``
(``best`` or ``current``; its ``worker.save`` at commit 8a03c51, ``train_eval.save`` at 9289cca).
Each is a dict whose ``state_dict`` holds the network; the G and D files add ``step`` (generator
updates), the optimizer state and the seed, the D file ``best_fid``. Its "resnet" SAGAN computes
what our networks compute (eagan/nets/models.py follows it) under other names:

    StudioGAN                                  EAGAN
    G linear0, bn4, conv2d5; D linear1         linear, bn_out, conv_out; linear
    blocks.I.0 (I counts the attention too)    blocks.K (residual blocks only), attention
    conv2d0, conv2d1, conv2d2                  shortcut, conv1, conv2
    bnX.embed0, bnX.embed1 (cBN gain, bias)    bnX.embed_gain, bnX.embed_bias
    conv1x1_theta, _phi, _g, _attn; sigma (1,) theta, phi, g, o; gamma ()
    L.weight_orig, L.weight_u, L.weight_v      L.parametrizations.weight.original, .0._u, .0._v

Spectral norm's u and v mean the same in torch's old hook and its parametrization, and the
BatchNorm buffers (running statistics, num_batches_tracked) keep their names, so every tensor is
copied bit for bit. Only the class rows of the embeddings (and the u of their spectral norm,
which is indexed by class; sigma = u^T W v is unchanged) are reordered where StudioGAN numbered
the classes otherwise: it read Tiny-ImageNet and folders with torchvision's ImageFolder (folder
names sorted), where our Tiny-ImageNet follows wnids.txt; CIFAR-10 labels are the same.

Layouts: between StudioGAN's commits 9289cca (2020-09) and 8a03c51 (2021-05) its resnet widths
at 32 and 128 px did not change. At 64 px its commit fd598a5 (2020-11-10) changed them; our
networks have the later layout (that of 8a03c51 and of the released Tiny-ImageNet SAGAN). The
earlier 64-px layout (G blocks 16->16, 16->8, 8->4, 4->2 times g_conv_dim, D ending 16->16 times
d_conv_dim; 9289cca) has no counterpart here and is refused, as is anything else that would
not be reproduced exactly: other architectures, widths, classes, image sizes or attention
placements than the config's, and any key missing or left over.

The run folder written holds config.yaml and ckpt-<step>.pt, as our trainer would at step N: the
imported networks, and the rest of the training state built as train() builds it at the start
of a run (fresh Adam state, seeded RNGs, data order, latent sampler, fixed grid noise).
StudioGAN's optimizer state is not carried over, nor its best FID (best_score starts empty):
``imported_from_studiogan`` records the files read and that FID.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from eagan.config import Config, to_dict
from eagan.errors import UserError
from eagan.eval.protocols import PROTOCOLS
from eagan.files import atomic_output, ensure_writable_dir
from eagan.studiogan.files import common_step, find_files, read_studiogan_file
from eagan.studiogan.mapping import check_config, load_network, studiogan_class_order
from eagan.train import checkpoint as ckpt
from eagan.train.distributed import DistContext, resolve_device
from eagan.train.loop import grid_latents, open_training_data
from eagan.train.steps import LatentSampler, build_gan


def import_studiogan(paths: list[Path], config: Config, out_dir: Path) -> Path:
    """Write ``out_dir``, a run folder of ``config`` holding StudioGAN's networks at their step.

    ``paths``: StudioGAN's checkpoint files, or folders holding them (a folder's ``best`` files
    are taken when it has any, else its ``current`` ones): one G and one D, and a G_ema exactly
    when ``config.train.ema_decay`` > 0. The config must describe the same networks (attention
    ``self``, widths, z_dim, image size, attention placement) over a dataset with the same
    classes, which is read (listed, for the file-based datasets) to number them and to build
    the data order. ``out_dir`` must not exist or be empty; it appears whole or not at all.
    Returns the checkpoint written, ``out_dir/ckpt-<step>.pt``. Anything that cannot be
    imported exactly is a UserError, raised before anything is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists and is not an empty folder; the import "
                        f"writes a new run folder")
    files = {kind: read_studiogan_file(path, kind) for kind, path in find_files(paths).items()}
    step = common_step(files)
    check_config(config, files)

    config = dataclasses.replace(config, run_dir=str(out_dir))
    context = DistContext(rank=0, world_size=1, device=resolve_device(config.train.device))
    with _seeded_global_rngs(config.train.seed, context.device):
        # Set up as train() sets up a run at step 0; the data order depends only on the number
        # of images, the seed and hflip, so file-based datasets are listed, not decoded.
        listing = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                       in_memory=False))
        dataset, batches = open_training_data(listing, config.train.batch_size, context)
        if dataset.num_classes == 0:
            raise UserError(f"{dataset.source}: a dataset without classes; StudioGAN's SAGAN "
                            f"is class-conditional (ProjGAN)")
        class_order = studiogan_class_order(config.data.dataset, list(dataset.class_names))
        gan, _, generator_ema = build_gan(config, dataset.num_classes, context)
        for network, kind in ((gan.generator, "G"), (gan.discriminator, "D"),
                              (generator_ema, "G_ema")):
            if network is not None:
                load_network(network, files[kind], config, class_order)
        latents = LatentSampler(config.model.z_dim, dataset.num_classes, config.train.batch_size,
                                context, seed=config.train.seed + 1)
        _, fixed_z = grid_latents(config, dataset.num_classes, context.device)
        state = ckpt.TrainingState(
            generator=gan.generator, discriminator=gan.discriminator,
            generator_ema=generator_ema, optimizer_g=gan.opt_g, optimizer_d=gan.opt_d,
            scaler_g=gan.scaler_g, scaler_d=gan.scaler_d, latents=latents, data_order=batches)
        provenance = {"files": [str(file.path) for file in files.values()],
                      "best_fid": files["D"].best_fid}
        return _write_run(out_dir, state, context, dict(
            step=step, config=to_dict(config), num_classes=dataset.num_classes,
            class_names=list(dataset.class_names), fixed_z=fixed_z.cpu(), best_score=None,
            best_metric=PROTOCOLS[config.eval.protocol].primary,
            imported_from_studiogan=provenance))


@contextlib.contextmanager
def _seeded_global_rngs(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNGs seeded as train() seeds them at the start of a run (the checkpoint saves
    them), and given back to the caller afterwards as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _write_run(out_dir: Path, state: ckpt.TrainingState, context: DistContext,
               values: dict[str, Any]) -> Path:
    """Write the checkpoint of ``state`` and ``values`` and the run's config.yaml into a hidden
    folder beside ``out_dir``, then rename it to ``out_dir``: the run folder appears whole or
    not at all (a killed import can leave a hidden ``.<name>.*.partial`` folder instead)."""
    ensure_writable_dir(out_dir.parent, "the folder of the run folder")
    staging = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    try:
        staging.mkdir()
        ckpt.save_training_state(ckpt.step_path(staging, values["step"]), state, context,
                                 **values)
        with atomic_output(staging / "config.yaml", "the run config") as tmp_path:
            tmp_path.write_text(yaml.safe_dump(values["config"], sort_keys=False))
        os.rename(staging, out_dir)  # replaces out_dir only when it is an empty folder
    except OSError as error:
        raise UserError(f"{out_dir}: cannot write the run folder ({error.strerror or error})") \
            from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ckpt.step_path(out_dir, values["step"])
