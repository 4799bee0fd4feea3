"""Fixed sample rows for image grids: the same retain and forget images for every model of a run.

A row is one uint8 (H, W*n, 3) array; reports stack rows (masked input, ground truth, one per model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unlearn.data import UnlearningData, apply_mask, to_float

SAMPLES_PER_SPLIT = 6


def grid_images(data: UnlearningData, per_split: int = SAMPLES_PER_SPLIT) -> torch.Tensor:
    """The first `per_split` retain-test and forget-test images (float, (2k, 3, H, W))."""
    return torch.cat([to_float(data.retain_test.head(per_split).read()), to_float(data.forget_test.head(per_split).read())])


def to_row(images: torch.Tensor, pad: int = 1) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> one (H, n*(W+pad), 3) uint8 strip with white separators."""
    images = torch.nn.functional.pad(images.clamp(0, 1), (0, pad), value=1.0)
    strip = torch.cat(list(images), dim=2)  # (3, H, n*(W+pad))
    return (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def reference_rows(data: UnlearningData) -> dict[str, np.ndarray]:
    """The masked inputs and the clean ground truth of the grid samples."""
    images = grid_images(data)
    k = SAMPLES_PER_SPLIT
    truth = torch.cat([to_float(data.retain_test.head(k).read(clean=True)), to_float(data.forget_test.head(k).read(clean=True))])
    return {"masked_input": to_row(apply_mask(images, data.mask)), "ground_truth": to_row(truth)}


def save_png(row: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(row).save(path)
    return path
