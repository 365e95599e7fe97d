"""The one place a config becomes networks: explicit arguments in, Generator and Discriminator
out. Checkpoints store the config, so sampling rebuilds the same generator from it."""
from __future__ import annotations

from eagan.config import ModelConfig
from eagan.errors import UserError
from eagan.nets.models import Discriminator, Generator


def build_generator(model: ModelConfig, image_size: int, num_classes: int) -> Generator:
    try:
        return Generator(image_size=image_size, num_classes=num_classes, z_dim=model.z_dim,
                         base_channels=model.g_base_channels, attention=model.attention,
                         attention_after=model.g_attention_after,
                         memory_size=model.memory_size, heads=model.heads)
    except ValueError as error:
        raise UserError(f"model: cannot build the generator: {error}") from None


def build_discriminator(model: ModelConfig, image_size: int, num_classes: int) -> Discriminator:
    try:
        return Discriminator(image_size=image_size, num_classes=num_classes,
                             base_channels=model.d_base_channels, attention=model.attention,
                             attention_after=model.d_attention_after,
                             memory_size=model.memory_size, heads=model.heads,
                             aux_classifier=model.aux_classifier)
    except ValueError as error:
        raise UserError(f"model: cannot build the discriminator: {error}") from None
