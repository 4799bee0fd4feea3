"""Image sets as uint8 tensors (N, 3, H, W) with integer labels and class names.

Real loaders only: scikit-learn's bundled digits, CIFAR-10 python batches in a local folder, and any
ImageFolder tree (ImageNet, Places365). Nothing is downloaded.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.config import ConfigError, DataConfig


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, (N, 3, H, W)
    labels: torch.Tensor  # int64, (N,)
    class_names: list[str]
    paths: list[str] | None = None  # ImageFolder: each image's path relative to the root (names D_f in a forget list)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images in [0, 1] to `size` and quantise to uint8."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _load_digits(cfg: DataConfig) -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    images = _resize_uint8(gray.repeat(1, 3, 1, 1), cfg.image_size)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images, labels = _cap_per_class(images, labels, cfg.max_per_class)
    return ImageSet(images, labels, [str(i) for i in range(10)])


def _require_root(cfg: DataConfig) -> Path:
    import os

    source = "data.root"
    root_text = cfg.root
    if not root_text and cfg.root_env:
        root_text, source = os.environ.get(cfg.root_env), f"${cfg.root_env}"
    if not root_text:
        hint = f" or export {cfg.root_env}" if cfg.root_env else ""
        raise ConfigError(f"the {cfg.dataset} data root is not set: pass --set data.root=PATH{hint}")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data root not found: {root} ({source})")
    return root


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


def _load_cifar10(cfg: DataConfig) -> ImageSet:
    root = _require_root(cfg)
    # Accept the folder itself or its parent holding the standard `cifar-10-batches-py`.
    if not (root / "data_batch_1").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = sorted(root.glob("data_batch_*")) + sorted(root.glob("test_batch"))
    if not files:
        raise ConfigError(f"no CIFAR-10 python batches (data_batch_*, test_batch) in {root} (data.root)")
    arrays, labels = [], []
    for path in files:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    names = [str(i) for i in range(10)]
    meta = root / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            names = [n.decode() for n in pickle.load(fh, encoding="bytes")[b"label_names"]]
    images = torch.from_numpy(np.concatenate(arrays))
    labels_t = torch.tensor(labels, dtype=torch.int64)
    images, labels_t = _cap_per_class(images, labels_t, cfg.max_per_class)
    if cfg.image_size != 32:
        images = _resize_uint8(images.float() / 255, cfg.image_size)
    return ImageSet(images, labels_t, names)


def _cap_per_class(images: torch.Tensor, labels: torch.Tensor, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if cap is None:
        return images, labels
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:cap] for c in labels.unique()])
    keep = keep.sort().values
    return images[keep], labels[keep]


def _load_imagefolder(cfg: DataConfig) -> ImageSet:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    from torchvision.transforms import functional as TF

    root = _require_root(cfg)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ConfigError(f"no class folders in {root} (data.root)")
    wanted = set(classes)
    if cfg.retain_classes is not None:  # read only the classes the run uses (ImageNet: 200 of 1000)
        wanted = set(expand_class_specs([*cfg.forget_classes, *cfg.unseen_classes, *cfg.retain_classes], classes))
    # Labels index the full sorted folder list, so class specs resolve the same way everywhere.
    class_to_idx = {c: i for i, c in enumerate(classes) if c in wanted}
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    per_class: dict[int, list[str]] = {}
    for path, label in samples:
        per_class.setdefault(label, []).append(path)
    images, labels, relative = [], [], []
    for label, paths in sorted(per_class.items()):
        for path in sorted(paths)[: cfg.max_per_class]:
            relative.append(Path(path).relative_to(root).as_posix())
            with Image.open(path) as img:
                img = TF.center_crop(TF.resize(img.convert("RGB"), cfg.image_size), cfg.image_size)
                images.append(TF.pil_to_tensor(img))
            labels.append(label)
    if not images:
        raise ConfigError(f"no images found under {root} (data.root)")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), classes, relative)


_LOADERS = {"digits": _load_digits, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}


def load_images(cfg: DataConfig) -> ImageSet:
    """Load the configured data set; a missing folder raises ConfigError naming the path."""
    return _LOADERS[cfg.dataset](cfg)
