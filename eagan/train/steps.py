"""One training iteration of the SAGAN recipe: n_dis discriminator updates, then one generator
update with D frozen, and what they need: the networks with their optimizers and wrappers
(DDP, compile), the step options (losses, precision, layout, augmentation), fresh latents and
the running means of the logged losses."""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from eagan.config import Config
from eagan.data import DeviceBatchSource, LoaderBatchSource
from eagan.nets.augment import DiffAugment
from eagan.nets.factory import build_discriminator, build_generator
from eagan.nets.losses import LOSSES
from eagan.train.distributed import DistContext


@dataclass
class GANModules:
    """The networks, their optimizers and loss scalers, and the wrappers the steps call:
    ``*_update`` for the forward whose gradients are applied (DDP-wrapped under torchrun,
    compiled on request), ``*_forward`` for forwards that update nothing."""

    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    g_update: nn.Module
    d_update: nn.Module
    g_forward: nn.Module
    d_forward: nn.Module


@dataclass(frozen=True)
class StepOptions:
    d_loss: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
    g_loss: Callable[[Tensor], Tensor]
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    channels_last: bool = False
    nonfinite: str = "stop"
    # Weight of the auxiliary classifier's cross-entropy; 0: D has no classifier head.
    class_weight: float = 0.0
    # Applied to every image D sees, real and fake, in D and G steps (train.augment).
    augment: Callable[[Tensor], Tensor] = DiffAugment("")

    def layout(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else images


def discriminator_step(gan: GANModules, options: StepOptions, real: Tensor,
                       real_labels: Tensor | None, z: Tensor, fake_labels: Tensor | None,
                       step: int) -> dict[str, Tensor]:
    """One D update on a real batch and G(z); returns its detached losses by logged name:
    on real, on fake, the total and, with an auxiliary classifier, its loss on real."""
    with options.autocast():
        with torch.no_grad():
            fake = gan.g_forward(z, fake_labels)
        # One D forward over real and fake together: D has no batch norm, and DDP expects a
        # single forward per backward.
        both = options.layout(options.augment(torch.cat([real, fake.to(real.dtype)])))
        both_labels = None if fake_labels is None else torch.cat([real_labels, fake_labels])
        if options.class_weight:
            logits, class_logits = gan.d_update(both, both_labels, classify=True)
        else:
            logits = gan.d_update(both, both_labels)
        loss, loss_real, loss_fake = options.d_loss(*logits.float().split(len(real)))
        losses = {"Loss/D/real": loss_real, "Loss/D/fake": loss_fake}
        if options.class_weight:
            # The classifier learns from real images only: early fakes carry no class yet.
            losses["Loss/D/classifier"] = F.cross_entropy(class_logits[:len(real)].float(),
                                                          real_labels)
            loss = loss + options.class_weight * losses["Loss/D/classifier"]
        losses["Loss/D/total"] = loss
    apply_update(gan.opt_d, gan.scaler_d, loss, options.nonfinite, step, "discriminator")
    return {name: value.detach() for name, value in losses.items()}


def generator_step(gan: GANModules, options: StepOptions, z: Tensor,
                   fake_labels: Tensor | None, step: int) -> dict[str, Tensor]:
    """One G update against a frozen D; returns its detached losses by logged name: the total
    and, with an auxiliary classifier, the cross-entropy of D's classifier on G(z) against the
    requested labels."""
    gan.discriminator.requires_grad_(False)
    try:
        with options.autocast():
            fake = options.layout(options.augment(gan.g_update(z, fake_labels)))
            losses = {}
            if options.class_weight:
                logits, class_logits = gan.d_forward(fake, fake_labels, classify=True)
                losses["Loss/G/classifier"] = F.cross_entropy(class_logits.float(), fake_labels)
            else:
                logits = gan.d_forward(fake, fake_labels)
            loss = options.g_loss(logits.float())
            if options.class_weight:
                loss = loss + options.class_weight * losses["Loss/G/classifier"]
            losses["Loss/G/total"] = loss
        apply_update(gan.opt_g, gan.scaler_g, loss, options.nonfinite, step, "generator")
    finally:
        gan.discriminator.requires_grad_(True)
    return {name: value.detach() for name, value in losses.items()}


def train_iteration(gan: GANModules, options: StepOptions,
                    batches: DeviceBatchSource | LoaderBatchSource, latents: LatentSampler,
                    loss_means: LossMeans, n_dis: int, step: int,
                    lap: Callable[[str], object] | None = None) -> tuple[Tensor, Tensor]:
    """Iteration ``step + 1``: ``n_dis`` D updates, each with a fresh real batch, z and labels,
    then one G update with D frozen; every loss is summed into ``loss_means``. Returns whether
    any D loss was not finite and G's total loss, for check_finite (no device sync here).
    ``lap(phase)``, when given, is called as each phase ends: the throughput benchmark's clock."""
    lap = lap or (lambda phase: None)
    d_bad = torch.zeros((), dtype=torch.bool, device=latents.device)
    for _ in range(n_dis):
        real, real_labels = batches.next()
        z, fake_labels = latents.draw()
        lap("data")
        losses_d = discriminator_step(gan, options, real,
                                      real_labels if latents.num_classes else None, z,
                                      fake_labels, step)
        lap("d_step")
        d_bad |= ~torch.isfinite(losses_d["Loss/D/total"])
        loss_means.add(losses_d)
        lap("bookkeeping")
    z, fake_labels = latents.draw()
    lap("data")
    losses_g = generator_step(gan, options, z, fake_labels, step)
    lap("g_step")
    loss_means.add(losses_g)
    return d_bad, losses_g["Loss/G/total"]


class LossMeans:
    """Named losses summed on the device between log ticks (no sync per step); ``pop`` returns
    each name's mean over the updates that reported it, with one sync, and starts afresh. D
    reports n_dis times per step, so its means cover every D update of the tick."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums[name] + value.float() if name in self.sums \
                else value.float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> dict[str, float]:
        names = list(self.sums)
        sums = torch.stack([self.sums[name] for name in names]).tolist() if names else []
        means = {name: total / self.counts[name] for name, total in zip(names, sums)}
        self.sums, self.counts = {}, {}
        return means


class LatentSampler:
    """Fresh z ~ N(0, I) and uniform labels for every D and G update, from a generator of its
    own so the draws resume exactly. Every rank draws the global batch and keeps its slice, so
    R ranks together see what one process with the whole batch would."""

    def __init__(self, z_dim: int, num_classes: int, batch_size: int, context: DistContext,
                 seed: int) -> None:
        self.z_dim, self.num_classes = z_dim, num_classes
        self.global_batch = batch_size * context.world_size
        self.slice = slice(context.rank * batch_size, (context.rank + 1) * batch_size)
        self.device = context.device
        self.rng = torch.Generator(device=context.device).manual_seed(seed)

    def draw(self) -> tuple[Tensor, Tensor | None]:
        z = torch.randn(self.global_batch, self.z_dim, device=self.device, generator=self.rng)
        labels = None
        if self.num_classes:
            labels = torch.randint(self.num_classes, (self.global_batch,), device=self.device,
                                   generator=self.rng)[self.slice]
        return z[self.slice], labels

    def state_dict(self) -> dict[str, Tensor]:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.rng.set_state(state["rng"])



def build_gan(config: Config, num_classes: int, context: DistContext
              ) -> tuple[GANModules, StepOptions, nn.Module | None]:
    """G and D on the device with their optimizers, loss scalers, DDP and compile wrappers, the
    step options, and the EMA copy of G (None without EMA), as ``config.train`` asks."""
    tc, device = config.train, context.device
    generator = build_generator(config.model, config.data.image_size, num_classes).to(device)
    discriminator = build_discriminator(config.model, config.data.image_size,
                                        num_classes).to(device)
    if tc.sync_batchnorm and context.enabled:
        generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    if tc.channels_last:
        generator.to(memory_format=torch.channels_last)
        discriminator.to(memory_format=torch.channels_last)
    generator_ema = None
    if tc.ema_decay > 0:
        generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    adam = dict(eps=tc.adam_eps, betas=(tc.beta1, tc.beta2), fused=tc.fused_adam or None)
    opt_g = torch.optim.Adam(generator.parameters(), lr=tc.lr_g, **adam)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d, **adam)
    precision = resolve_precision(tc.precision, device)
    scale_fp16 = precision == "fp16"
    scaler_g = torch.amp.GradScaler(device.type, enabled=scale_fp16)
    scaler_d = torch.amp.GradScaler(device.type, enabled=scale_fp16)

    g_update, d_update = generator, discriminator
    if context.enabled:
        g_update = DistributedDataParallel(generator)
        d_update = DistributedDataParallel(discriminator)
    g_forward, d_forward = generator, discriminator
    if tc.compile:
        compile_ = functools.partial(torch.compile, mode=tc.compile_mode)
        g_forward, d_forward = compile_(generator), compile_(discriminator)
        # Without DDP the update and plain forwards are one module: compile it once.
        g_update = g_forward if g_update is generator else compile_(g_update)
        d_update = d_forward if d_update is discriminator else compile_(d_update)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gan = GANModules(generator=generator, discriminator=discriminator, opt_g=opt_g, opt_d=opt_d,
                     scaler_g=scaler_g, scaler_d=scaler_d, g_update=g_update, d_update=d_update,
                     g_forward=g_forward, d_forward=d_forward)
    d_loss_fn, g_loss_fn = LOSSES[tc.loss]
    options = StepOptions(d_loss=d_loss_fn, g_loss=g_loss_fn,
                          autocast=functools.partial(autocast_for, precision, device),
                          channels_last=tc.channels_last, nonfinite=tc.nonfinite,
                          class_weight=tc.aux_loss_weight if config.model.aux_classifier
                          else 0.0, augment=DiffAugment(tc.augment))
    return gan, options, generator_ema



def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: Tensor,
                  nonfinite: str, step: int, name: str) -> None:
    """Backward and optimizer step; with nonfinite='skip' a NaN or inf loss skips the step."""
    optimizer.zero_grad(set_to_none=True)
    if nonfinite == "skip" and not torch.isfinite(loss).item():
        tqdm.write(f"step {step + 1}: the {name} loss is not finite; update skipped")
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes bf16 on a CUDA device with bf16 support and fp32 elsewhere."""
    if precision != "auto":
        return precision
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bf16" if bf16 else "fp32"


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


