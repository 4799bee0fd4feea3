"""I2I models behind one interface, built from `ModelConfig`."""

from __future__ import annotations

from unlearn.config import Config
from unlearn.models.base import I2IModel


def build_model(config: Config) -> I2IModel:
    """A freshly initialised model for the configured kind (seeded by the caller)."""
    kind, m, size = config.model.kind, config.model, config.data.image_size
    if kind == "ae":
        from unlearn.models.autoencoder import ConvAutoencoder

        return ConvAutoencoder(size, m.width, m.latent_channels)
    if kind == "vq":
        from unlearn.models.vq import VQInpainter

        return VQInpainter(size, m.width, m.latent_channels, m.codebook_size)
    if kind == "diffusion":
        from unlearn.models.diffusion import DiffusionInpainter

        return DiffusionInpainter(size, m.width, m.diffusion_steps, m.sample_steps)
    raise ValueError(f"unknown model kind {kind!r}")


__all__ = ["I2IModel", "build_model"]
