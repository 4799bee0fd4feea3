"""The '+' marker used for the poisoning audit (paper Algorithm 2).

The marker is drawn where the mask hides it, so the model must regenerate it from context: centred in a
centre (inpainting) hole, centred in the top band of a border (outpainting) frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: the config imports the method registry, which imports this
    from unlearn.config import MarkerConfig, MaskConfig



def marker_pixels(image_size: int, cfg: MarkerConfig, mask: MaskConfig | None = None) -> torch.Tensor:
    """Boolean (H, W) map of the '+', inside the region that `mask` hides."""
    plus = torch.zeros(image_size, image_size, dtype=torch.bool)
    left = (image_size - cfg.size) // 2
    # centre hole: the '+' centred in the image; border frame: centred in the top band of the frame
    top = left if mask is None or mask.kind == "centre" else max(0, (mask.size - cfg.size) // 2)
    half = cfg.thickness // 2
    row = top + cfg.size // 2 - half
    col = left + cfg.size // 2 - half
    plus[row : row + cfg.thickness, left : left + cfg.size] = True  # horizontal bar
    plus[top : top + cfg.size, col : col + cfg.thickness] = True  # vertical bar
    return plus


def draw_marker(images: torch.Tensor, cfg: MarkerConfig, mask: MaskConfig | None = None) -> torch.Tensor:
    """Copy of uint8 images (N, 3, H, W) with the coloured '+' drawn in."""
    out = images.clone()
    plus = marker_pixels(images.shape[-1], cfg, mask)
    color = torch.tensor([round(c * 255) for c in cfg.color], dtype=images.dtype).view(3, 1)
    out[:, :, plus] = color
    return out
