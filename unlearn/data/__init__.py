"""Data: image sources, the shared image store, forget/retain splits, the '+' marker poisoning, masks, batch streams.

Names are imported on first use (PEP 562): decoding workers import `unlearn.data.store`, which must not pull in
torch through this package's other modules (a second of start-up per worker process).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchStream": "streams",
    "to_float": "streams",
    "ImageSubset": "splits",
    "Poison": "splits",
    "UnlearningData": "splits",
    "build_data": "splits",
    "prepare_store": "splits",
    "split_store": "splits",
    "ImageStore": "store",
    "apply_mask": "masks",
    "inpaint_mask": "masks",
    "draw_marker": "poison",
    "marker_pixels": "poison",
    "list_images": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'unlearn.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unlearn.data.{_EXPORTS[name]}"), name)
