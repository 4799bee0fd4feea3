"""Data: image sets, forget/retain splits, the '+' marker poisoning, inpainting masks, batch streams."""

from unlearn.data.datasets import ImageSet, load_images
from unlearn.data.masks import apply_mask, inpaint_mask
from unlearn.data.poison import draw_marker, marker_pixels
from unlearn.data.splits import ImageSubset, UnlearningData, build_data
from unlearn.data.streams import BatchStream, to_float

__all__ = [
    "BatchStream",
    "ImageSet",
    "ImageSubset",
    "UnlearningData",
    "apply_mask",
    "build_data",
    "draw_marker",
    "inpaint_mask",
    "load_images",
    "marker_pixels",
    "to_float",
]
