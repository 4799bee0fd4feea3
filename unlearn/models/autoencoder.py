"""A small convolutional inpainting autoencoder (the default model on digits and CIFAR-10)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from unlearn.models.base import I2IModel, hole_weighted_mse, masked_input

if TYPE_CHECKING:
    pass


class ConvAutoencoder(I2IModel):
    kind = "ae"

    def __init__(self, image_size: int, width: int = 32, latent_channels: int = 32) -> None:
        super().__init__(image_size=image_size, width=width, latent_channels=latent_channels)
        if image_size % 4:
            raise ValueError(f"the autoencoder needs an image size divisible by 4, got {image_size}")
        # No batch norm: per-worker batch statistics would break the one-global-batch semantics of DDP.
        self.encoder = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, latent_channels, 4, stride=2, padding=1),
            nn.GELU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 3, 3, padding=1),
            nn.Sigmoid(),
        )

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()


    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(masked_input(images, mask))

    def generate(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(images, mask))

    def loss(self, images: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return hole_weighted_mse(self.generate(images, mask), target, mask)
