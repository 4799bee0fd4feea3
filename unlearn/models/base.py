"""The one interface every image-to-image model implements (autoencoder, VQ, diffusion).

Models receive the full image and the mask and hide the masked region themselves, so no method can leak
the ground truth of the hole into the input by accident.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import torch
from torch import nn


class I2IModel(nn.Module, abc.ABC):
    """Inpainting/outpainting model: fill the masked region of an image from its context."""

    @abc.abstractmethod
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder E (trained alone by `i2i_sota` and `random_encoder`)."""

    @abc.abstractmethod
    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not in the encoder."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E(tau(x)): features of the masked input, (N, ...)."""

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss (N,) for learning to produce `target` from tau(images)."""

    @abc.abstractmethod
    def generate(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw model output for tau(images), (N, 3, H, W) in [0, 1]."""

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inpainted image: known context kept, the masked region filled by the model."""
        return images * (1 - mask) + self.generate(images, mask) * mask


def masked_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tau(x) with the mask as a fourth channel: the conditioning every model consumes."""
    mask = mask.expand(images.shape[0], 1, *images.shape[-2:])
    return torch.cat([images * (1 - mask), mask], dim=1)


def hole_weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the hidden region plus a tenth of the context MSE.

    The hole is a small share of the pixels; weighting it keeps capacity on the part that is inpainted.
    """
    sq = (pred - target).pow(2)
    hole = (sq * mask).sum(dim=(1, 2, 3)) / (mask.sum() * sq.shape[1]).clamp_min(1)
    context = (sq * (1 - mask)).sum(dim=(1, 2, 3)) / ((1 - mask).sum() * sq.shape[1]).clamp_min(1)
    return hole + 0.1 * context
