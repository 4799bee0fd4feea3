"""A generated ImageFolder of real-photo JPEGs, for benchmarks and tests that must not download a data set.

Each image is a random crop of one of scikit-learn's two bundled photographs (`load_sample_images`: a temple and a
flower, 427 x 640), scaled, flipped and tinted per class, saved as a JPEG of the requested size: real photographic
content (edges, texture, JPEG artefacts) in the on-disk layout of ImageNet and Places365 (`root/<class>/<file>`).

    python analysis/imagefolder.py DIR --classes 40 --per-class 250 --size 256
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(image) for image in load_sample_images().images]


def _write_class(root: str, label: int, per_class: int, size: int, seed: int, quality: int) -> int:
    from PIL import Image

    photos = _photos()
    rng = np.random.default_rng([seed, label])
    tint = rng.uniform(0.75, 1.25, size=3)  # a class-specific colour cast: classes differ in their statistics
    folder = Path(root) / f"class{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        photo = photos[(label + i) % len(photos)]
        h, w, _ = photo.shape
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top : top + side, left : left + side].astype(np.float32) * tint
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        image.save(folder / f"img{i:05d}.jpg", quality=quality)
    return per_class


def make_imagefolder(root: str | Path, classes: int, per_class: int, size: int = 256, seed: int = 0,
                     quality: int = 90, workers: int | None = None) -> Path:
    """Write `classes` x `per_class` JPEGs of `size` px under `root` (one process per usable core)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    workers = workers or len(os.sched_getaffinity(0))
    if workers == 1 or classes == 1:
        for label in range(classes):
            _write_class(str(root), label, per_class, size, seed, quality)
        return root
    with ProcessPoolExecutor(min(workers, classes)) as pool:
        list(pool.map(_write_class, [str(root)] * classes, range(classes), [per_class] * classes, [size] * classes,
                      [seed] * classes, [quality] * classes))
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imagefolder", description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=40)
    p.add_argument("--per-class", type=int, default=250)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.classes, args.per_class, args.size) < 1:
        print("imagefolder: error: --classes, --per-class and --size must be positive", file=sys.stderr)
        return 2
    make_imagefolder(args.root, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes * args.per_class} images to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
