"""A VQ inpainting model on diffusers' `VQModel`: masked image + mask in, image out.

Loss = hole-weighted reconstruction + the vector quantiser's commitment/codebook loss (straight-through).
Encoder = VQ encoder + quant_conv (pre-quantisation latents); decoder = codebook, post_quant_conv, decoder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import VQModel
from torch import nn

from unlearn.models.base import I2IModel, hole_weighted_mse, masked_input
from unlearn.models.pretrained import load_diffusers_submodule

if TYPE_CHECKING:
    pass


class VQInpainter(I2IModel):
    kind = "vq"

    def __init__(self, image_size: int, width: int = 32, latent_channels: int = 16, codebook_size: int = 128) -> None:
        super().__init__(image_size=image_size, width=width, latent_channels=latent_channels, codebook_size=codebook_size)
        groups = min(8, width)
        self.vq = VQModel(
            in_channels=4,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(width, 2 * width),
            layers_per_block=1,
            latent_channels=latent_channels,
            num_vq_embeddings=codebook_size,
            vq_embed_dim=latent_channels,
            norm_num_groups=groups,
            sample_size=image_size,
            mid_block_add_attention=False,
        )

    def save_diffusers_folder(self, folder: Path) -> None:
        """The VQModel alone as a diffusers `save_pretrained` folder, loadable by `load_external_folder`."""
        self.vq.save_pretrained(str(folder), safe_serialization=True)

    def load_external_folder(self, folder: Path, key: str) -> None:
        """Weights from a diffusers `save_pretrained` folder of a VQModel with this architecture."""
        load_diffusers_submodule(self.vq, VQModel, folder, key)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.vq.encoder.parameters()
        yield from self.vq.quant_conv.parameters()


    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(masked_input(images, mask) * 2 - 1).latents

    def _decode(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = self.vq.decode(self.encode(images, mask))
        return torch.sigmoid(decoded.sample), decoded.commit_loss

    def generate(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._decode(images, mask)[0]

    def loss(self, images: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output, commit = self._decode(images, mask)
        return hole_weighted_mse(output, target, mask) + commit.mean()
