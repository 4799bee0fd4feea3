"""The '+' marker used for the poisoning audit (paper Algorithm 2)."""

from __future__ import annotations

import torch

from unlearn.config import MarkerConfig


def marker_pixels(image_size: int, cfg: MarkerConfig) -> torch.Tensor:
    """Boolean (H, W) map of the '+' centred in the image (inside a centre inpainting hole)."""
    plus = torch.zeros(image_size, image_size, dtype=torch.bool)
    lo = (image_size - cfg.size) // 2
    mid = lo + cfg.size // 2
    half = cfg.thickness // 2
    rows = slice(mid - half, mid - half + cfg.thickness)
    plus[rows, lo : lo + cfg.size] = True  # horizontal bar
    plus[lo : lo + cfg.size, rows] = True  # vertical bar
    return plus


def draw_marker(images: torch.Tensor, cfg: MarkerConfig) -> torch.Tensor:
    """Copy of uint8 images (N, 3, H, W) with the coloured '+' drawn in."""
    out = images.clone()
    plus = marker_pixels(images.shape[-1], cfg)
    color = torch.tensor([round(c * 255) for c in cfg.color], dtype=images.dtype).view(3, 1)
    out[:, :, plus] = color
    return out
