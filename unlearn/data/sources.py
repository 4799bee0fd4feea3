"""Where the images of a data setup come from, and how each one is decoded.

Real loaders only: scikit-learn's bundled digits, CIFAR-10 python batches in a local folder, and any ImageFolder tree
(ImageNet, Places365). Nothing is downloaded. `list_images` names every image of a setup in store order (its label,
and the item decoding reads) without decoding any; `decode` turns a run of items into uint8 pixels (H, W, 3), one
image at a time (the store's row layout: what a JPEG decoder produces, so writing a row is a plain copy). This module
imports neither torch nor torchvision at module level: decoding runs in worker processes whose start-up must stay cheap
(importing torch takes about 2 s per process on these CPUs).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from unlearn.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the config imports the method registry, which imports this
    from unlearn.config import DataConfig

# torchvision.datasets.folder.IMG_EXTENSIONS (not imported: it would import torch)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Listing:
    """Every image of a data setup, in store order; nothing decoded yet."""

    dataset: str
    root: str | None  # the resolved data root (None for digits)
    items: list[str]  # per image, what `decode` reads: ImageFolder: path under root; CIFAR-10: "<file>:<row>"; digits: "<row>"
    labels: np.ndarray  # int64, one per item
    class_names: list[str]
    fingerprint: str  # sha256 of what was listed (names, sizes, labels): with the image size, the store's key

    @property
    def paths(self) -> list[str] | None:
        """ImageFolder: each image's path relative to the root (names D_f in a forget list)."""
        return self.items if self.dataset == "imagefolder" else None


def expand_class_specs(specs: list[str], names: list[str]) -> list[str]:
    """Class names for specs that are names, indices, or index ranges 'a-b' (inclusive)."""
    out = []
    for spec in specs:
        low, sep, high = spec.partition("-")
        if sep and low.isdigit() and high.isdigit() and spec not in names:
            if int(high) >= len(names) or int(low) > int(high):
                raise ConfigError(f"class range {spec!r} is outside the {len(names)} classes")
            out.extend(names[int(low) : int(high) + 1])
        elif spec in names:
            out.append(spec)
        elif spec.isdigit() and int(spec) < len(names):
            out.append(names[int(spec)])
        else:
            raise ConfigError(f"unknown class {spec!r} (classes: {', '.join(names[:12])}{'...' if len(names) > 12 else ''})")
    return out


def _require_root(cfg: DataConfig) -> Path:
    source, root_text = "data.root", cfg.root
    if not root_text and cfg.root_env:
        root_text, source = os.environ.get(cfg.root_env), f"${cfg.root_env}"
    if not root_text:
        hint = f" or export {cfg.root_env}" if cfg.root_env else ""
        raise ConfigError(f"the {cfg.dataset} data root is not set: pass --set data.root=PATH{hint}")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root not found: {root} ({source})")
    return root.resolve()


def _cap_per_class(labels: np.ndarray, cap: int | None) -> np.ndarray:
    """Positions kept: the first `cap` of each class, in their original order."""
    if cap is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:cap] for c in np.unique(labels)])
    return np.sort(keep)


def _fingerprint(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return digest.hexdigest()


def _list_digits(cfg: DataConfig) -> Listing:
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(np.int64)
    keep = _cap_per_class(labels, cfg.max_per_class)
    names = [str(i) for i in range(10)]
    return Listing("digits", None, [str(int(i)) for i in keep], labels[keep], names,
                   _fingerprint("digits", keep, labels[keep]))


def _cifar_root(cfg: DataConfig) -> Path:
    root = _require_root(cfg)
    # Accept the folder itself or its parent holding the standard `cifar-10-batches-py`.
    if not (root / "data_batch_1").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    return root


def _list_cifar10(cfg: DataConfig) -> Listing:
    root = _cifar_root(cfg)
    files = sorted(root.glob("data_batch_*")) + sorted(root.glob("test_batch"))
    if not files:
        raise ConfigError(f"no CIFAR-10 python batches (data_batch_*, test_batch) in {root} (data.root)")
    items, labels = [], []
    for path in files:  # one batch file (30 MB) in memory at a time, for its labels
        batch = _cifar_batch(str(path))
        items.extend(f"{path.name}:{row}" for row in range(len(batch[b"labels"])))
        labels.extend(batch[b"labels"])
    _cifar_batch.cache_clear()
    names = [str(i) for i in range(10)]
    meta = root / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            names = [n.decode() for n in pickle.load(fh, encoding="bytes")[b"label_names"]]
    labels_arr = np.asarray(labels, dtype=np.int64)
    keep = _cap_per_class(labels_arr, cfg.max_per_class)
    sizes = [(p.name, p.stat().st_size) for p in files]
    return Listing("cifar10", str(root), [items[i] for i in keep], labels_arr[keep], names,
                   _fingerprint("cifar10", str(root), sizes, keep, labels_arr[keep]))


def _list_imagefolder(cfg: DataConfig) -> Listing:
    root = _require_root(cfg)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"no class folders in {root} (data.root)")
    wanted = set(classes)
    if cfg.retain_classes is not None:  # read only the classes the run uses (ImageNet: 200 of 1000)
        wanted = set(expand_class_specs([*cfg.forget_classes, *cfg.unseen_classes, *cfg.retain_classes], classes))
    items, labels, sizes = [], [], []
    for label, name in enumerate(classes):  # labels index the full sorted folder list: specs resolve the same way
        if name not in wanted:
            continue
        files = []
        for folder, _, names in os.walk(root / name, followlinks=True):
            files.extend(os.path.join(folder, n) for n in names if n.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise ConfigError(f"class folder {root / name} holds no image ({', '.join(IMG_EXTENSIONS)})")
        for path in sorted(files)[: cfg.max_per_class]:
            items.append(Path(path).relative_to(root).as_posix())
            labels.append(label)
            sizes.append(os.stat(path).st_size)
    labels_arr = np.asarray(labels, dtype=np.int64)
    return Listing("imagefolder", str(root), items, labels_arr, classes,
                   _fingerprint("imagefolder", str(root), items, sizes, labels_arr))


_LISTERS = {"digits": _list_digits, "cifar10": _list_cifar10, "imagefolder": _list_imagefolder}


def list_images(cfg: DataConfig) -> Listing:
    """Every image the configured setup reads, in store order; a missing folder raises ConfigError naming it."""
    listing = _LISTERS[cfg.dataset](cfg)
    if not listing.items:
        raise ConfigError(f"no images found under {listing.root} (data.root)")
    return listing


# --- decoding (runs in worker processes) ----------------------------------------------------------------


class Unreadable(Exception):
    """An image file that cannot be decoded (truncated, not an image); carries the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@lru_cache(maxsize=1)
def _digits_float() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images.astype(np.float32) / 16.0)[:, None].repeat(3, axis=1)  # (N, 3, 8, 8)


@lru_cache(maxsize=1)
def _cifar_batch(path: str) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _resize_float(images: np.ndarray, size: int) -> np.ndarray:
    """Float images in [0, 1] (n, 3, h, w) resized to `size` (bilinear, antialiased: torch's interpolate) and
    quantised to uint8."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (tensor.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _to_rgb(image):
    """RGB whatever the file holds: grayscale, 16-bit, palette (with transparency), RGBA and CMYK are converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits instead of clipping
        from PIL import Image

        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((values * (255.0 / max(values.max(), 1.0))).round().astype(np.uint8), mode="L")
    with warnings.catch_warnings():  # "palette images with transparency ... should be converted to RGBA": we convert
        warnings.simplefilter("ignore", UserWarning)
        return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def resize_center_crop(image, size: int):
    """torchvision's `center_crop(resize(image, size), size)` on a PIL image, without importing torch: the shorter
    side scaled to `size` (bilinear, antialiased by PIL), then the centre square."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if image.size == (size, size):  # nothing to crop (crop would copy)
        return image
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _decode_file(path: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(resize_center_crop(_to_rgb(image), size))
    except FileNotFoundError as exc:
        raise Unreadable(path, "file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # truncated data ("image file is truncated"), not an image, a broken header
        raise Unreadable(path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    return pixels


def decode(dataset: str, root: str | None, items: list[str], size: int) -> Iterator[tuple[str, np.ndarray | Unreadable]]:
    """(item, uint8 pixels (size, size, 3)) for each item, in order; an unreadable file yields its `Unreadable`."""
    if dataset == "imagefolder":
        for item in items:
            try:
                yield item, _decode_file(os.path.join(root, item), size)
            except Unreadable as exc:
                yield item, exc
        return
    if dataset == "digits":
        rows = np.asarray([int(i) for i in items], dtype=np.int64)
        pixels = _resize_float(_digits_float()[rows], size)
    else:  # cifar10: items "<file>:<row>", grouped by file in store order
        parts = []
        for file, group in _group_by_file(items):
            data = np.asarray(_cifar_batch(os.path.join(root, file))[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            parts.append(data[group])
        pixels = np.concatenate(parts) if parts else np.zeros((0, 3, 32, 32), np.uint8)
        if size != 32:
            pixels = _resize_float(pixels.astype(np.float32) / 255, size)
    yield from zip(items, pixels.transpose(0, 2, 3, 1), strict=True)  # (3, H, W) arrays -> the store's rows


def _group_by_file(items: list[str]) -> Iterator[tuple[str, list[int]]]:
    current, rows = None, []
    for item in items:
        file, _, row = item.rpartition(":")
        if file != current and rows:
            yield current, rows
            rows = []
        current = file
        rows.append(int(row))
    if rows:
        yield current, rows
