"""A conditional diffusion inpainting model on diffusers' `UNet2DModel`.

The UNet sees [x_t, tau(x), mask] (7 channels) and predicts the noise; training (and GA) use the
noise-prediction loss of a DDPM schedule, evaluation samples with DDIM from a fixed seed so audits are
deterministic. Encoder = conv_in, time embedding, down blocks and mid block; decoder = the up path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from unlearn.models.base import I2IModel, masked_input
from unlearn.models.pretrained import load_diffusers_submodule

if TYPE_CHECKING:
    pass

SAMPLE_SEED = 1234


class DiffusionInpainter(I2IModel):
    kind = "diffusion"

    def __init__(self, image_size: int, width: int = 32, diffusion_steps: int = 100, sample_steps: int = 10) -> None:
        super().__init__(image_size=image_size, width=width, diffusion_steps=diffusion_steps, sample_steps=sample_steps)
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=7,
            out_channels=3,
            block_out_channels=(width, 2 * width),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            norm_num_groups=min(8, width),
            add_attention=False,
        )
        # The cosine schedule reaches pure noise at t = T for any T; the default linear betas assume T = 1000.
        self.train_schedule = DDPMScheduler(num_train_timesteps=diffusion_steps, beta_schedule="squaredcos_cap_v2")
        self.sample_schedule = DDIMScheduler(num_train_timesteps=diffusion_steps, beta_schedule="squaredcos_cap_v2")
        self.sample_steps = sample_steps

    def save_diffusers_folder(self, folder: Path) -> None:
        """The UNet alone as a diffusers `save_pretrained` folder, loadable by `load_external_folder`."""
        self.unet.save_pretrained(str(folder), safe_serialization=True)

    def load_external_folder(self, folder: Path, key: str) -> None:
        """Weights from a diffusers `save_pretrained` folder of a UNet2DModel with this architecture."""
        load_diffusers_submodule(self.unet, UNet2DModel, folder, key)

    def _encoder_modules(self) -> list[nn.Module]:
        u = self.unet
        return [u.conv_in, u.time_embedding, u.down_blocks, u.mid_block]

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        for module in self._encoder_modules():
            yield from module.parameters()


    def _condition(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_input(images, mask) * 2 - 1  # tau(x) and the mask, in [-1, 1]

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Down path + mid block at t = 0 with the masked image in the x_t channels."""
        u = self.unet
        cond = self._condition(images, mask)
        t = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        emb = u.time_embedding(u.time_proj(t).to(cond.dtype))
        sample = u.conv_in(torch.cat([cond[:, :3], cond], dim=1))
        for block in u.down_blocks:
            sample, _ = block(hidden_states=sample, temb=emb)
        return u.mid_block(sample, emb)

    def loss(self, images: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample noise-prediction MSE (hole-weighted) at a random timestep."""
        x0 = target * 2 - 1
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.train_schedule.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.train_schedule.add_noise(x0, noise, t)
        pred = self.unet(torch.cat([noisy, self._condition(images, mask)], dim=1), t).sample
        sq = (pred - noise).pow(2)
        hole = (sq * mask).sum(dim=(1, 2, 3)) / (mask.sum() * 3).clamp_min(1)
        return hole + 0.1 * sq.mean(dim=(1, 2, 3))

    @torch.no_grad()
    def generate(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
        cond = self._condition(images, mask)
        x = torch.randn(images.shape[0], 3, *images.shape[-2:], generator=gen).to(images.device, cond.dtype)
        schedule = self.sample_schedule
        schedule.set_timesteps(self.sample_steps, device=images.device)
        for t in schedule.timesteps:
            eps = self.unet(torch.cat([x, cond], dim=1), t).sample
            x = schedule.step(eps, t, x).prev_sample
        return ((x + 1) / 2).clamp(0, 1)
