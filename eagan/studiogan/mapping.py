"""StudioGAN's resnet SAGAN onto EAGAN's networks: what the config must say, the class order,
the structure checks (architecture, attention placement, layout and widths, z_dim, classes) and
the tensor-by-tensor renaming."""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from eagan.config import Config
from eagan.errors import UserError
from eagan.nets.models import TOPOLOGIES, Topology
from eagan.studiogan.files import KINDS, StudioGANFile

# StudioGAN's 64-px widths before its commit fd598a5 (2020-11-10), in units of g_conv_dim and
# d_conv_dim (src/models/resnet.py at 9289cca); only the width fields are used.
_LAYOUT_BEFORE_FD598A5 = Topology(g_in=(16, 16, 8, 4), g_out=(16, 8, 4, 2),
                                  d_out=(2, 4, 8, 16, 16),
                                  d_downsample=(True, True, True, True, False),
                                  g_attention_after=3, d_attention_after=1)
# Our module names -> StudioGAN's: top level per network, inside residual and attention blocks,
# and the spectral-norm tensors.
_TOP = {"G": {"linear": "linear0", "bn_out": "bn4", "conv_out": "conv2d5"},
        "D": {"linear": "linear1"}}
_BLOCK = {"shortcut": "conv2d0", "conv1": "conv2d1", "conv2": "conv2d2", "embed_gain": "embed0",
          "embed_bias": "embed1"}
_ATTENTION = {"theta": "conv1x1_theta", "phi": "conv1x1_phi", "g": "conv1x1_g",
              "o": "conv1x1_attn", "gamma": "sigma"}
_SPECTRAL = {"parametrizations.weight.original": "weight_orig",
             "parametrizations.weight.0._u": "weight_u", "parametrizations.weight.0._v": "weight_v"}
MAX_LISTED_KEYS = 3


def check_config(config: Config, files: dict[str, StudioGANFile]) -> None:
    """What the config must say for the files to be held exactly."""
    if not config.model.conditional:
        raise UserError("model.conditional: StudioGAN's SAGAN is class-conditional (ProjGAN); "
                        "the config's run is unconditional")
    if config.model.aux_classifier:
        raise UserError("model.aux_classifier: StudioGAN's SAGAN discriminator has no "
                        "classifier head; set it to false")
    if "G_ema" in files and not config.train.ema_decay:
        raise UserError(f"{files['G_ema'].path}: an EMA generator, but the config keeps none "
                        f"(train.ema_decay is 0): set train.ema_decay to StudioGAN's "
                        f"ema_decay to import it")
    if "G_ema" not in files and config.train.ema_decay:
        raise UserError(f"train.ema_decay is {config.train.ema_decay} but no G_ema file was "
                        f"given: pass StudioGAN's model=G_ema-... file, or set "
                        f"train.ema_decay: 0 (StudioGAN's SAGAN configs have ema: false)")


def studiogan_class_order(dataset: str, class_names: list[str]) -> Tensor:
    """For each of our classes, the index StudioGAN gave it: torchvision's CIFAR-10 labels are
    ours; ImageFolder numbered the classes of other datasets by sorted folder name."""
    if dataset == "cifar10":
        return torch.arange(len(class_names))
    if dataset in ("tiny_imagenet", "folder"):
        rank = {name: index for index, name in enumerate(sorted(class_names))}
        return torch.tensor([rank[name] for name in class_names])
    raise UserError(f"data.dataset: StudioGAN had no {dataset!r} dataset, so its class order "
                    f"is unknown; import with cifar10, tiny_imagenet or folder")


def load_network(network: nn.Module, file: StudioGANFile, config: Config,
                 class_order: Tensor) -> None:
    """Check that ``file`` holds exactly ``network`` and load it, every tensor renamed and
    copied (class rows reordered); a UserError names what does not fit."""
    _check_structure(network, file, config)
    net = "G" if file.kind == "G_ema" else file.kind
    attention_after = network.attention_after if _has_attention(network) else None
    ours = network.state_dict()
    names = {name: _studiogan_name(name, net, attention_after) for name in ours}
    expected = set(names.values())
    missing = [key for key in names.values() if key not in file.state]
    unexpected = [key for key in file.state if key not in expected]
    if missing or unexpected:
        listed = [f"{len(missing)} missing ({', '.join(missing[:MAX_LISTED_KEYS])}"
                  f"{', ...' if len(missing) > MAX_LISTED_KEYS else ''})"] if missing else []
        listed += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:MAX_LISTED_KEYS])}"
                   f"{', ...' if len(unexpected) > MAX_LISTED_KEYS else ''})"] if unexpected \
            else []
        raise UserError(f"{file.path}: not StudioGAN's resnet SAGAN {KINDS[file.kind]} for "
                        f"this config: keys " + "; ".join(listed))
    # The class rows: each embedding's weight and the u of its spectral norm.
    embeddings = {f"{name}.{tensor}" for name, module in network.named_modules()
                  if isinstance(module, nn.Embedding)
                  for tensor in ("parametrizations.weight.original",
                                 "parametrizations.weight.0._u")}
    mapped = {}
    for name, theirs in names.items():
        value, target = file.state[theirs], ours[name]
        if value.shape == (1,) and target.dim() == 0:  # StudioGAN's gate sigma is a 1-vector
            value = value.reshape(())
        if value.shape != target.shape or value.dtype != target.dtype:
            raise UserError(f"{file.path}: {theirs} is {value.dtype} {tuple(value.shape)}, "
                            f"EAGAN's {name} is {target.dtype} {tuple(target.shape)}")
        mapped[name] = value[class_order] if name in embeddings else value
    network.load_state_dict(mapped)


def _studiogan_name(name: str, net: str, attention_after: int | None) -> str:
    """StudioGAN's name for our state-dict entry ``name`` of network ``net`` ("G" or "D"),
    whose attention block (if any) follows residual block ``attention_after``."""
    for ours, theirs in _SPECTRAL.items():
        if name.endswith(ours):
            name = name[:-len(ours)] + theirs
    head, _, rest = name.partition(".")
    if head == "blocks":  # StudioGAN's list of blocks holds the attention block in its place
        number, _, rest = rest.partition(".")
        index = int(number) + (attention_after is not None and int(number) >= attention_after)
        return f"blocks.{index}.0." + ".".join(_BLOCK.get(part, part) for part in rest.split("."))
    if head == "attention":
        return f"blocks.{attention_after}.0." + ".".join(
            _ATTENTION.get(part, part) for part in rest.split("."))
    return ".".join([_TOP[net].get(head, head)] + ([rest] if rest else []))


def _has_attention(network: nn.Module) -> bool:
    return not isinstance(network.attention, nn.Identity)


def _check_structure(network: nn.Module, file: StudioGANFile, config: Config) -> None:
    """Name the first way the file's network differs from ours: the architecture, the
    attention, the image size, the layout and widths, z_dim, the classes. Anything these miss
    still fails the key and shape checks of _load."""
    state, path, what = file.state, file.path, KINDS[file.kind]
    net = "G" if file.kind == "G_ema" else file.kind
    if "shared.weight" in state:
        raise UserError(f"{path}: a BigGAN generator (StudioGAN's big_resnet, with a shared "
                        f"class embedding); only StudioGAN's resnet SAGAN can be imported")
    indices = sorted({int(match[1]) for key in state
                      if (match := re.match(r"blocks\.(\d+)\.", key))})
    is_attention = [f"blocks.{index}.0.sigma" in state for index in indices]
    attention_at = [is_attention[:position].count(False)
                    for position, flag in enumerate(is_attention) if flag]
    if len(attention_at) > 1:
        raise UserError(f"{path}: the {what} has {len(attention_at)} attention blocks; EAGAN's "
                        f"networks have one")
    if attention_at and config.model.attention != "self":
        raise UserError(f"{path}: the {what} has SAGAN self-attention; the config's "
                        f"model.attention is {config.model.attention!r} (use 'self')")
    ours_at = network.attention_after if _has_attention(network) else None
    if (attention_at[0] if attention_at else None) != ours_at:
        theirs = f"after block {attention_at[0]}" if attention_at else "absent"
        ours = f"after block {ours_at}" if ours_at else "absent"
        raise UserError(f"{path}: the {what}'s attention is {theirs}, the config's is {ours} "
                        f"(model.{net.lower()}_attention_after)")

    widths = []
    for index in (index for index, flag in zip(indices, is_attention) if not flag):
        weight = state.get(f"blocks.{index}.0.conv2d1.weight_orig")
        if weight is None or weight.dim() != 4:
            return  # not a resnet block: the key check names what is there
        widths.append((weight.shape[1], weight.shape[0]))
    size = config.data.image_size
    if len(widths) != len(network.blocks):
        raise UserError(f"{path}: the {what} has {len(widths)} residual blocks, EAGAN's at "
                        f"{size} px (data.image_size) has {len(network.blocks)}")
    unit_key = f"{net.lower()}_base_channels"
    layouts = [(TOPOLOGIES[size], True)]
    if size == 64:
        layouts.append((_LAYOUT_BEFORE_FD598A5, False))
    for topology, representable in layouts:
        file_unit = widths[-1][1] // _layout_widths(topology, net, 1)[-1][1]
        if widths != _layout_widths(topology, net, file_unit):
            continue
        if not representable:
            raise UserError(f"{path}: StudioGAN's 64-px layout from before its commit fd598a5 "
                            f"(2020-11-10; {what} block widths {_text(widths)}), which EAGAN's "
                            f"networks cannot represent: they have StudioGAN's later layout")
        if file_unit != getattr(config.model, unit_key):
            raise UserError(f"{path}: the {what}'s width unit (StudioGAN's "
                            f"{net.lower()}_conv_dim) is {file_unit}; the config's "
                            f"model.{unit_key} is {getattr(config.model, unit_key)}")
        break
    else:
        raise UserError(f"{path}: {what} block widths {_text(widths)} are no StudioGAN resnet "
                        f"layout at {size} px")
    z_dim = state.get("linear0.weight_orig")
    if net == "G" and z_dim is not None and z_dim.shape[1:] != (config.model.z_dim,):
        raise UserError(f"{path}: the {what} takes z of {tuple(z_dim.shape[1:])} dimensions; "
                        f"the config's model.z_dim is {config.model.z_dim}")
    rows = {value.shape[0] for name, value in state.items()
            if re.search(r"(embed[01]|embedding)\.weight_orig$", name)}
    classes = network.num_classes
    if rows and rows != {classes}:
        raise UserError(f"{path}: the {what} was trained on {min(rows)} classes; the config's "
                        f"dataset has {classes}")


def _layout_widths(topology: Topology, net: str, unit: int) -> list[tuple[int, int]]:
    """(in, out) channels of each residual block of ``net`` ("G" or "D") in ``topology`` with
    width unit ``unit`` (StudioGAN's g_conv_dim or d_conv_dim); D starts from RGB."""
    if net == "G":
        return [(unit * c_in, unit * c_out) for c_in, c_out in zip(topology.g_in, topology.g_out)]
    outs = [unit * c_out for c_out in topology.d_out]
    return list(zip([3] + outs[:-1], outs))


def _text(widths: list[tuple[int, int]]) -> str:
    return ", ".join(f"{c_in}->{c_out}" for c_in, c_out in widths)
