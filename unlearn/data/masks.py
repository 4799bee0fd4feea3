"""Inpainting (centre hole) and outpainting (border frame) masks: 1 marks pixels the model must fill."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the config imports the method registry, which imports this
    from unlearn.config import MaskConfig



def inpaint_mask(image_size: int, cfg: MaskConfig) -> torch.Tensor:
    """A (1, 1, H, W) float mask, 1 inside the region hidden from the model."""
    mask = torch.zeros(1, 1, image_size, image_size)
    if cfg.kind == "centre":
        lo = (image_size - cfg.size) // 2
        mask[..., lo : lo + cfg.size, lo : lo + cfg.size] = 1.0
    else:
        mask[:] = 1.0
        b = cfg.size
        mask[..., b : image_size - b, b : image_size - b] = 0.0
    return mask


def apply_mask(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tau(x): the hidden region is zeroed; models also receive the mask as an input channel."""
    return images * (1.0 - mask)
