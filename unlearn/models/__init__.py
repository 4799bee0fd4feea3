"""I2I models behind one interface, built from `ModelConfig` through the model-kind registry.

Adding a model: a subclass of `I2IModel` (its `kind`, its constructor's arguments passed to `I2IModel.__init__` and
named after `image_size` and the `model.*` keys) and one `MODEL_KINDS.register` line below (`ModelConfig.kind`
accepts the registered kinds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unlearn.models.base import MODEL_KINDS, I2IModel
from unlearn.models.io import CONFIG_FILE, RUN_MODEL_FOLDER, WEIGHTS_FILE, load_provenance, run_model_folder

if TYPE_CHECKING:
    from unlearn.config import Config


def _autoencoder() -> type[I2IModel]:
    from unlearn.models.autoencoder import ConvAutoencoder

    return ConvAutoencoder


def _vq() -> type[I2IModel]:
    from unlearn.models.vq import VQInpainter

    return VQInpainter


def _diffusion() -> type[I2IModel]:
    from unlearn.models.diffusion import DiffusionInpainter

    return DiffusionInpainter


# Imported on first use: the VQ and diffusion models import diffusers, which takes seconds.
MODEL_KINDS.register("ae", _autoencoder)
MODEL_KINDS.register("vq", _vq)
MODEL_KINDS.register("diffusion", _diffusion)


def build_model(config: Config) -> I2IModel:
    """A freshly initialised model for the configured kind (seeded by the caller)."""
    return MODEL_KINDS[config.model.kind].from_config(config)


__all__ = ["CONFIG_FILE", "MODEL_KINDS", "RUN_MODEL_FOLDER", "WEIGHTS_FILE", "I2IModel", "build_model", "load_provenance",
           "run_model_folder"]
