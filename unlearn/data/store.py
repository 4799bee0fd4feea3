"""The image store: the decoded pixels of a data setup, held once on disk, shared by every process of a node.

A store is a cache entry (`stores/<key>`, content-keyed by what was listed and the image size) of fixed-size raw
uint8 shards (N_i, H, W, 3), the labels, and, for ImageFolder trees, the images' paths. Processes map the shards
read-only: the pixels live once in the page cache whatever the number of trials on a node, data larger than memory
is paged in as batches need it, and a process only ever copies the rows it reads (one batch). Rows are stored
as decoders produce them, (H, W, 3): preparation copies each image once, and `read` turns a batch into the (n, 3, H,
W) that models take (measured: channel-first rows cost preparation ~10% of its speed, a transposing copy per image).
Splits are index lists into the store; the '+' marker and the mask are applied per batch (`ImageSubset`), never stored.

Preparation decodes the images once, in parallel: one task per shard, mapped over a process pool by default (`unlearn
run`, `unlearn prepare`) or over Ray tasks (the sweep passes its own `map_shards`). Each task writes its shard into
the entry's temporary folder, hashing as it writes; the entry is renamed into place only when every shard is
written, so a failure (an unreadable image, a full disk) leaves no half store behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unlearn.cache import ARRAYS, FILES, ArrayWriter, ArtifactCache, DamagedEntry, file_digest, file_sha256, mapped_region
from unlearn.data.sources import Listing, Unreadable, decode
from unlearn.errors import ConfigError

logger = logging.getLogger(__name__)

KIND = "stores"
STORE_SCHEMA = 2  # 2: rows (H, W, 3); 1 held (3, H, W)
SHARD_BYTES = 256 * 2**20  # at most this much per shard file (1365 ImageNet images at 256 px)
PATHS_FILE = "paths.txt"
SKIPPED_SHOWN = 100  # unreadable files named in meta.json when data.skip_unreadable is set (all are counted)
POOL_FROM = 1000  # image files: fewer are decoded in this process (a pool's start-up would cost more than it saves)


@dataclass(frozen=True)
class ShardTask:
    """One shard to decode and write: the unit of parallel work."""

    dataset: str
    root: str | None
    items: list[str]
    image_size: int
    path: str  # the shard file (in the entry's temporary folder)
    skip_unreadable: bool


@dataclass
class ShardWritten:
    array: dict[str, Any]  # the shard's entry in meta.json (file, shape, bytes, checksum)
    kept: list[bool]  # per item: decoded (False: unreadable and skipped)
    skipped: list[str] = field(default_factory=list)  # "path: reason"


def write_shard(task: ShardTask) -> ShardWritten:
    """Decode the task's images one at a time and append them to its shard file (memory: one image)."""
    size = task.image_size
    writer = ArrayWriter(Path(task.path), "uint8", (size, size, 3))
    kept, skipped = [], []
    try:
        for _, pixels in decode(task.dataset, task.root, task.items, size):
            if isinstance(pixels, Unreadable):
                if not task.skip_unreadable:
                    raise ConfigError(f"unreadable image {pixels}; fix or remove it, or set data.skip_unreadable=true "
                                      "to leave such files out (they are counted)")
                kept.append(False)
                skipped.append(str(pixels))
                continue
            writer.write(pixels[None])
            kept.append(True)
    except BaseException:
        writer.abort()
        raise
    return ShardWritten(writer.close(), kept, skipped)


MapShards = Callable[[Callable[[ShardTask], ShardWritten], Sequence[ShardTask]], Iterable[ShardWritten]]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_pool_map(workers: int | None = None) -> MapShards:
    """Map shard tasks over a pool of fresh processes, one per usable core (in this process when there is one
    core or one task: a pool's start-up would cost more than it saves)."""
    def run(fn: Callable[[ShardTask], ShardWritten], tasks: Sequence[ShardTask]) -> Iterable[ShardWritten]:
        count = min(workers or usable_cores(), len(tasks))
        if count <= 1:
            return [fn(task) for task in tasks]
        import multiprocessing

        # forkserver: workers fork from a fresh single-threaded server that imported this module (PIL and numpy,
        # no torch) once; a plain fork would inherit this process's torch thread pools, spawn would import per worker
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        try:
            with ProcessPoolExecutor(count, mp_context=context) as pool:
                return list(pool.map(fn, tasks))
        except BrokenProcessPool:
            # a worker died: typically a script without `if __name__ == "__main__":`, which multiprocessing re-runs in
            # each worker (the rule for any Python pool); decode here instead (a shard's file is rewritten whole)
            logger.warning("the decoding pool broke (a script without `if __name__ == \"__main__\":`?): decoding "
                           "in this process")
            return [fn(task) for task in tasks]

    return run


def store_key(listing: Listing, image_size: int) -> str:
    import hashlib

    blob = json.dumps([STORE_SCHEMA, listing.dataset, listing.fingerprint, image_size]).encode()
    return f"{listing.dataset}-{image_size}px-" + hashlib.sha256(blob).hexdigest()[:16]


def shard_tasks(listing: Listing, image_size: int, folder: Path, skip_unreadable: bool, workers: int) -> list[ShardTask]:
    """Shards of at most SHARD_BYTES, and at least four per worker where the set allows (for load balance)."""
    per_image = 3 * image_size * image_size
    n = len(listing.items)
    per_shard = max(1, min(SHARD_BYTES // per_image, math.ceil(n / (4 * max(1, workers)))))
    return [ShardTask(listing.dataset, listing.root, listing.items[start : start + per_shard], image_size,
                      str(folder / f"shard-{i:05d}.bin"), skip_unreadable)
            for i, start in enumerate(range(0, n, per_shard))]


def build_store(cache: ArtifactCache, listing: Listing, image_size: int, skip_unreadable: bool = False,
                map_shards: MapShards | None = None, workers: int | None = None) -> str:
    """Decode every listed image into a new store entry (in parallel); return its key. A key already in the cache
    is returned as it is."""
    key = store_key(listing, image_size)
    if cache.has(KIND, key):
        return key
    # Only image files are worth parallel decoding: digits and CIFAR-10 are arrays already in memory, and a few
    # hundred files decode faster than a pool (or Ray's workers) starts.
    if listing.dataset != "imagefolder" or len(listing.items) < POOL_FROM:
        map_shards = process_pool_map(1)
    elif map_shards is None:
        map_shards = process_pool_map(workers)

    def write(folder: Path) -> dict[str, Any]:
        tasks = shard_tasks(listing, image_size, folder, skip_unreadable, workers or usable_cores())
        try:
            written = list(map_shards(write_shard, tasks))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                needed = len(listing.items) * 3 * image_size * image_size
                raise ConfigError(f"no space left on the device of {cache.root} while preparing the image store "
                                  f"({needed / 2**30:.2f} GiB of pixels): free space or set cache_dir elsewhere") from None
            raise
        kept = np.fromiter((k for w in written for k in w.kept), dtype=bool, count=len(listing.items))
        skipped = [s for w in written for s in w.skipped]
        if not kept.any():
            raise ConfigError(f"no image of {listing.root} could be read ({skipped[0] if skipped else 'none listed'})")
        arrays = {f"shard-{i:05d}": w.array for i, w in enumerate(written) if w.array["shape"][0]}
        labels = ArrayWriter(folder / "labels.bin", "int64", ())
        labels.write(listing.labels[kept])
        arrays["labels"] = labels.close()
        files = {}
        if listing.paths is not None:
            text = "\n".join(p for p, k in zip(listing.paths, kept, strict=True) if k) + "\n"
            (folder / PATHS_FILE).write_text(text)
            files[PATHS_FILE] = {"bytes": (folder / PATHS_FILE).stat().st_size, "sha256": file_sha256(folder / PATHS_FILE)}
        for task, w in zip(tasks, written, strict=True):  # empty shards (all skipped): not part of the store
            if not w.array["shape"][0]:
                Path(task.path).unlink(missing_ok=True)
        return {"schema": STORE_SCHEMA, "dataset": listing.dataset, "root": listing.root, "image_size": image_size,
                "count": int(kept.sum()), "class_names": listing.class_names, "skipped_count": len(skipped),
                "skipped": skipped[:SKIPPED_SHOWN], ARRAYS: arrays, FILES: files}

    cache.build(KIND, key, write)
    for stale in _earlier_layouts(cache):
        logger.warning(f"{stale}: an image store of an earlier layout, no longer read by this version; remove it to "
                       f"free {_folder_gib(stale):.2f} GiB")
    return key


def _earlier_layouts(cache: ArtifactCache) -> list[Path]:
    """Store entries of an earlier STORE_SCHEMA: this version never asks for their keys (a later version's, on a
    shared cache, are left unnamed: they are in use)."""
    return [cache.entry(KIND, name) for name, meta in cache.entries(KIND)
            if not name.startswith(".") and isinstance(meta, dict) and _layout(meta) < STORE_SCHEMA]


def _layout(meta: dict[str, Any]) -> int:
    """The STORE_SCHEMA a store entry was written with (entries before the field existed: 1)."""
    return int(meta.get("schema", 1))


def _folder_gib(folder: Path) -> float:
    """Size of a folder's files (best effort: it may be removed meanwhile)."""
    total = 0
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total / 2**30


class ImageStore:
    """uint8 images in shards of rows (H, W, 3), with integer labels and class names; `read` gathers rows into
    (n, 3, H, W)."""

    def __init__(self, shards: list[np.ndarray], labels: np.ndarray, class_names: list[str], key: str = "",
                 folder: Path | None = None, meta: dict[str, Any] | None = None) -> None:
        self.shards, self.labels, self.class_names, self.key = shards, labels, class_names, key
        self.folder, self.meta = folder, meta or {}
        self._starts = np.cumsum([0] + [len(s) for s in shards])
        self.images_read = 0  # rows copied out of the store by this process (each rank reads only its shard of a batch)
        self.built_seconds: float | None = None  # set when this process built the store (listing to rename)
        self._paths: list[str] | None = None

    @classmethod
    def open(cls, cache: ArtifactCache, key: str) -> ImageStore:
        """Map a store read-only; its files are checked by size (DamagedEntry when one is short or missing)."""
        return cls._from_entry(cache, key, *cache.read(KIND, key))

    @classmethod
    def _from_entry(cls, cache: ArtifactCache, key: str, arrays: dict[str, Any], meta: dict[str, Any]) -> ImageStore:
        if _layout(meta) != STORE_SCHEMA:  # keys name the layout: only a hand-made key gets here
            raise DamagedEntry(f"an image store of layout {_layout(meta)}; this version reads {STORE_SCHEMA}")
        shards = [arrays[name] for name in sorted(n for n in meta[ARRAYS] if n.startswith("shard-"))]
        return cls(shards, np.asarray(arrays["labels"]), list(meta["class_names"]), key, cache.entry(KIND, key), meta)

    @classmethod
    def from_array(cls, images: Any, labels: Any, class_names: list[str] | None = None) -> ImageStore:
        """A store over uint8 images (N, 3, H, W) already in memory (tests and tiny examples; data sets go through
        `build_store`)."""
        images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
        names = class_names or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        return cls([np.ascontiguousarray(images.transpose(0, 2, 3, 1))], labels, names)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __reduce__(self):  # a store travels to other processes as its location, never as its pixels
        if self.folder is None:
            return (ImageStore, (self.shards, self.labels, self.class_names, self.key))
        return (_reopen, (str(self.folder.parent.parent), self.key))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W): the shape of an image as `read` returns it."""
        height, width, channels = self.shards[0].shape[1:]
        return channels, height, width

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held (the store's shards; labels and paths are a few bytes an image more)."""
        return int(sum(s.nbytes for s in self.shards))

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset", "memory")

    @property
    def skipped_count(self) -> int:
        return int(self.meta.get("skipped_count", 0))

    def paths(self) -> list[str] | None:
        """ImageFolder: each image's path relative to the root, by store position (read on first use)."""
        if self._paths is None and self.folder is not None and (self.folder / PATHS_FILE).is_file():
            self._paths = (self.folder / PATHS_FILE).read_text().splitlines()
        return self._paths

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"store positions outside [0, {len(self)})")
        shard = np.searchsorted(self._starts, positions, side="right") - 1
        return shard, positions - self._starts[shard]

    def read(self, positions: Any) -> Any:
        """uint8 images (n, 3, H, W) at these store positions, in their order (a torch tensor, a copy)."""
        import torch

        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty((len(positions), *self.image_shape), dtype=np.uint8)
        shard, row = self._locate(positions)
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            # rows (H, W, 3) into (3, H, W): numpy's strided copy, ~3 ms a batch of 32 at 256 px where torch's
            # permute().contiguous() took ~9 (one thread)
            out[where] = self.shards[s][row[where]].transpose(0, 3, 1, 2)
        self.images_read += len(positions)
        return torch.from_numpy(out)

    def prefetch(self, positions: Any) -> None:
        """Ask the kernel to read these rows ahead (asynchronously), so that the next batch finds them in memory."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        shard, row = self._locate(positions)
        row_bytes = int(np.prod(self.image_shape))
        for s, r in zip(shard.tolist(), row.tolist(), strict=True):
            region = mapped_region(self.shards[s])
            if region is None:
                continue
            start = r * row_bytes
            aligned = start - start % mmap.PAGESIZE
            region.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)


def _reopen(root: str, key: str) -> ImageStore:
    return ImageStore.open(ArtifactCache(Path(root)), key)


def open_store(cache: ArtifactCache, key: str) -> ImageStore | None:
    """The store, or None when it is absent or damaged (reported and removed: the caller rebuilds it)."""
    hit = cache.get(KIND, key)
    return None if hit is None else ImageStore._from_entry(cache, key, *hit)


def verify_store(cache: ArtifactCache, key: str, workers: int | None = None) -> None:
    """Hash every file of a store against its meta.json, in parallel (DamagedEntry on a mismatch)."""
    count = workers or usable_cores()

    def hash_files(jobs: list[tuple[Path, str]]) -> list[str]:
        if count <= 1 or len(jobs) <= 1:
            return [file_digest(*job) for job in jobs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(count) as pool:  # reads overlap; sha256 (older stores) releases the GIL
            return list(pool.map(lambda job: file_digest(*job), jobs))

    cache.verify(KIND, key, hash_files)
