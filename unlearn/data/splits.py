"""Train/test split per class, forget/retain/unseen sets as index lists into the image store, and the poisoning of
the forget set (the '+' drawn into each batch read, never stored)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from unlearn.cache import ArtifactCache
from unlearn.data.masks import inpaint_mask
from unlearn.data.poison import draw_marker, marker_pixels
from unlearn.data.sources import Listing, expand_class_specs, list_images
from unlearn.data.store import ImageStore, MapShards, build_store, open_store, store_key
from unlearn.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the config imports the method registry, which imports this
    from unlearn.config import DataConfig, MarkerConfig, MaskConfig

EVAL_BATCH = 256  # images per evaluation batch at most (outputs, features): what the audit holds at once
EVAL_BATCH_BYTES = 16 * 2**20  # and at most this much of float pixels per batch tensor (21 images at 256 px)


def eval_batch_size(image_shape: tuple[int, ...]) -> int:
    """Images per evaluation batch: EVAL_BATCH, fewer for large images (a 256-px batch of 256 float images would be
    200 MB per tensor, and the model's activations several times that). Measured on a 256-px trial (tiny model, one
    thread): peak private memory 1.81 GB at 64 MB a batch, 1.51 GB at 16 MB."""
    return max(1, min(EVAL_BATCH, EVAL_BATCH_BYTES // (4 * int(np.prod(image_shape)))))


@dataclass(frozen=True)
class Poison:
    """The '+' drawn where the mask hides it: D_f as the attack stage trains on it (paper Algorithm 2). `only`: the
    store positions that carry it (a chain of requests from an attack model: every poisoned image keeps its '+'
    wherever it is trained on); None: every image of the subset."""

    marker: MarkerConfig
    mask: MaskConfig
    only: tuple[int, ...] | None = None

    @functools.cached_property
    def _carriers(self) -> torch.Tensor:  # `only` as a tensor, built once (apply runs on every training batch)
        return torch.tensor(self.only, dtype=torch.int64)

    def apply(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.only is None:
            return draw_marker(images, self.marker, self.mask)
        rows = torch.isin(positions, self._carriers)
        if not bool(rows.any()):
            return images
        images = images.clone()
        images[rows] = draw_marker(images[rows], self.marker, self.mask)
        return images


class ImageSubset:
    """Some images of a store, by position: a view, never a copy of the pixels.

    `read` and `batches` copy out only the rows asked for. With `poison`, what they return carries the '+' (the
    images the model trains on); `clean=True` gives the ground truth."""

    def __init__(self, store: ImageStore, index: Any, poison: Poison | None = None) -> None:
        self.store = store
        self.index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)  # positions in the store (= the loaded data set)
        self.poison = poison
        self.labels = torch.from_numpy(np.asarray(store.labels[self.index.numpy()]))

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"ImageSubset({len(self)} images{', poisoned' if self.poison else ''})"

    def read(self, rows: Any = None, clean: bool = False) -> torch.Tensor:
        """uint8 images (n, 3, H, W) of these rows of the subset (all when None: for small subsets only)."""
        positions = self.index if rows is None else self.index[rows]
        images = self.store.read(positions.numpy())
        return self.poison.apply(images, positions) if self.poison is not None and not clean else images

    def prefetch(self, rows: Any) -> None:
        self.store.prefetch(self.index[rows].numpy())

    def batches(self, batch_size: int | None = None, clean: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, uint8 images) in order, batch by batch (`eval_batch_size` by default); the next batch is read
        ahead while this one is used."""
        batch_size = batch_size or eval_batch_size(self.store.image_shape)
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            if rows.stop < len(self):
                self.prefetch(slice(rows.stop, min(rows.stop + batch_size, len(self))))
            yield rows, self.read(rows, clean)

    def take(self, rows: Any) -> ImageSubset:
        return ImageSubset(self.store, self.index[rows], self.poison)

    def head(self, n: int) -> ImageSubset:
        return self.take(slice(0, n))

    def clean_view(self) -> ImageSubset:
        """The same images without the marker."""
        return ImageSubset(self.store, self.index)

    def sample(self, limit: int | None, seed: int) -> ImageSubset:
        """At most `limit` images, drawn without replacement (seeded) and kept in subset order; all when fewer."""
        if limit is None or len(self) <= limit:
            return self
        rows = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        return self.take(rows)

    @staticmethod
    def concat(*parts: ImageSubset) -> ImageSubset:
        stores = {id(p.store) for p in parts}
        if len(stores) != 1 or any(p.poison != parts[0].poison for p in parts):
            raise ValueError("concat needs subsets of one store, all poisoned alike")
        return ImageSubset(parts[0].store, torch.cat([p.index for p in parts]), parts[0].poison)


@dataclass
class UnlearningData:
    """Everything a pipeline run needs from the data side."""

    retain_train: ImageSubset
    forget_train: ImageSubset  # D_f, poisoned with the marker (unless the model was brought by the user)
    retain_test: ImageSubset
    forget_test: ImageSubset
    unseen_test: ImageSubset | None
    mask: torch.Tensor  # (1, 1, H, W), 1 = hidden
    marker: torch.Tensor  # (H, W) bool
    class_names: list[str]
    # A chain of deletion requests: the images each earlier request removed (oldest first), poisoned where they carried
    # the marker in theta0's training data (their marker is audited then), clean otherwise. In no other subset.
    earlier: list[ImageSubset] = field(default_factory=list)

    @property
    def store(self) -> ImageStore:
        return self.retain_train.store

    def clean_training_set(self) -> ImageSubset:
        """D = D_r + D_f without the marker: what the original model (and the audit backbone) learn from."""
        return ImageSubset.concat(self.retain_train.clean_view(), self.forget_train.clean_view())

    def forget_digest(self, dataset: str) -> str:
        return forget_digest(dataset, self.forget_train.index)

    def held_digests(self, dataset: str) -> list[str]:
        """The forget digests of every request whose images a cache entry built from this split may hold: this one's,
        then the earlier requests' (re-audited here), so that purging any of them finds the entry."""
        return [self.forget_digest(dataset), *(forget_digest(dataset, s.index) for s in self.earlier)]

    def cumulative_digest(self, dataset: str) -> str:
        """The digest of every image removed so far (the earlier requests' and this one's)."""
        return forget_digest(dataset, torch.cat([*(s.index for s in self.earlier), self.forget_train.index]))

    def eval_splits(self) -> dict[str, ImageSubset]:
        splits = {"retain": self.retain_test, "forget": self.forget_test}
        if self.unseen_test is not None and len(self.unseen_test):
            splits["unseen"] = self.unseen_test
        return splits


SUBSETS = ("retain_train", "forget_train", "retain_test", "forget_test", "unseen_test")


def forget_digest(dataset: str, index: torch.Tensor) -> str:
    """sha256 of the sorted forget-sample ids (`<dataset>:<position in the loaded data set>`): names D_f in
    certificates, cache entries and MLflow runs, so that `unlearn purge` finds what holds it."""
    import hashlib

    ids = sorted(f"{dataset}:{int(i)}" for i in index.tolist())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _resolve_classes(requested: list[str], names: list[str], what: str) -> list[int]:
    try:
        return [names.index(name) for name in expand_class_specs(requested, names)]
    except ConfigError as exc:
        raise ConfigError(f"data.{what}: {exc}") from None


def read_forget_list(cfg: DataConfig, paths: list[str] | None, count: int) -> torch.Tensor:
    """Positions in the data set (of `count` images; ImageFolder: named by `paths`) of the images `data.forget_list`
    names (ConfigError naming the first entry that is not in the data set)."""
    where = f"data.forget_list {Path(cfg.forget_list).expanduser()}" if isinstance(cfg.forget_list, str) else "data.forget_list"
    entries = cfg.forget_entries()
    if not entries:
        raise ConfigError(f"{where} names no image")
    return entry_positions(cfg, entries, paths, count, where)


def entry_positions(cfg: DataConfig, entries: list[str], paths: list[str] | None, count: int, where: str) -> torch.Tensor:
    """Sorted positions of a list's entries: relative paths under an ImageFolder root (`paths`), else indices into the
    `count` loaded images (ConfigError naming `where` and the first entry that is not in the data set)."""
    if paths is not None:
        position = {p: i for i, p in enumerate(paths)}
        unknown = [e for e in entries if e not in position]
        if unknown:
            raise ConfigError(f"{where}: {unknown[0]!r} is not an image of data.root "
                              f"({len(unknown)} of {len(entries)} entries unknown)")
        ids = [position[e] for e in entries]
    else:
        bad = [e for e in entries if not (e.isdigit() and int(e) < count)]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not an index of the {count} "
                              f"{cfg.dataset} images ({len(bad)} of {len(entries)} entries unknown)")
        ids = [int(e) for e in entries]
    return torch.tensor(sorted(set(ids)), dtype=torch.int64)


def entries_of(store: ImageStore, index: torch.Tensor) -> list[str]:
    """The forget-list entries naming these positions of the store (the inverse of `entry_positions`)."""
    return entries_of_positions(store.paths(), [int(i) for i in index.tolist()])


def chain_positions(cfg: DataConfig, paths: list[str] | None, count: int,
                    listed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A chain's earlier requests (positions, oldest first) and the poisoned images; ConfigError when this request
    names an image an earlier one removed, or is only partly poisoned."""
    earlier = [entry_positions(cfg, request, paths, count, f"data.forgotten (request {j})")
               for j, request in enumerate(cfg.forgotten, 1)]
    for j, removed in enumerate(earlier, 1):
        if bool(torch.isin(listed, removed).any()):
            again = int(listed[torch.isin(listed, removed)][0])
            raise ConfigError(f"data.forget_list names image {entries_of_positions(paths, [again])[0]!r}, which request {j} "
                              f"already removed ({int(torch.isin(listed, removed).sum())} such images); "
                              "take them out of the list")
    poisoned = None
    if cfg.poisoned is not None:
        poisoned = entry_positions(cfg, cfg.poisoned, paths, count, "data.poisoned")
        inside = int(torch.isin(listed, poisoned).sum())
        if 0 < inside < len(listed):
            raise ConfigError(f"data.forget_list: {inside} of its {len(listed)} images carry the marker (data.poisoned) "
                              "and the others not; a request is audited by its marker only when all of it does")
    return earlier, poisoned


def entries_of_positions(paths: list[str] | None, positions: list[int]) -> list[str]:
    return [paths[i] if paths is not None else str(i) for i in positions]


def check_selection(cfg: DataConfig, listing: Listing) -> None:
    """The classes and the forget list the config names exist in the listing: checked before any image is decoded
    (a typo must not cost an ImageNet decode)."""
    if cfg.forget_list:
        read_forget_list(cfg, listing.paths, len(listing.items))
    else:
        _resolve_classes(cfg.forget_classes, listing.class_names, "forget_classes")
    _resolve_classes(cfg.unseen_classes, listing.class_names, "unseen_classes")
    if cfg.retain_classes is not None:
        _resolve_classes(cfg.retain_classes, listing.class_names, "retain_classes")


def prepare_store(cfg: DataConfig, cache: ArtifactCache, map_shards: MapShards | None = None,
                  workers: int | None = None) -> ImageStore:
    """The store of this setup's images: opened from the cache, or decoded once (in parallel) into it."""
    import time

    started = time.perf_counter()
    listing = list_images(cfg)
    check_selection(cfg, listing)
    for _ in range(2):  # a damaged store is removed by open_store, then rebuilt once
        built = not cache.has("stores", store_key(listing, cfg.image_size))
        key = build_store(cache, listing, cfg.image_size, cfg.skip_unreadable, map_shards, workers)
        if (store := open_store(cache, key)) is not None:
            store.built_seconds = time.perf_counter() - started if built else None
            return store
    raise RuntimeError(f"the image store {cache.entry('stores', key)} was damaged again right after it was rebuilt")


def build_data(cfg: DataConfig, seed: int, cache: ArtifactCache | Path | str, poison: bool = True,
               map_shards: MapShards | None = None) -> UnlearningData:
    """The store (prepared once), then the split: per class (seeded), D_f / D_r / unseen as index lists, D_f
    poisoned unless `poison` is False (a model brought by the user was trained on the real images). Deterministic
    in `seed`."""
    cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(Path(cache))
    return split_store(cfg, seed, prepare_store(cfg, cache, map_shards), poison)


def split_store(cfg: DataConfig, seed: int, store: ImageStore, poison: bool = True) -> UnlearningData:
    """Split a store's images into the subsets of one unlearning setup (index lists; nothing is copied)."""
    names = store.class_names
    labels = torch.from_numpy(np.array(store.labels))
    listed = read_forget_list(cfg, store.paths(), len(store)) if cfg.forget_list else None
    earlier, poisoned = chain_positions(cfg, store.paths(), len(store), listed) if listed is not None else ([], None)
    removed = torch.cat([listed, *earlier]) if listed is not None else None  # in no retain subset
    # images theta0 was trained on (removed or poisoned): none may be in a class held out of training
    trained = torch.cat([removed, *([poisoned] if poisoned is not None else [])]) if removed is not None else None
    forget = (sorted(set(labels[listed].tolist())) if listed is not None
              else _resolve_classes(cfg.forget_classes, names, "forget_classes"))
    unseen = _resolve_classes(cfg.unseen_classes, names, "unseen_classes")
    if cfg.retain_classes is None:
        present = set(labels.unique().tolist())
        retain = [c for c in range(len(names)) if c not in forget and c not in unseen and c in present]
    else:
        retain = [c for c in _resolve_classes(cfg.retain_classes, names, "retain_classes") if c not in forget]
    if not retain and cfg.forget_fraction == 1.0 and listed is None:
        raise ConfigError("no retain classes left: every class is forget or unseen")

    gen = torch.Generator().manual_seed(seed)
    split: dict[str, list[torch.Tensor]] = {k: [] for k in SUBSETS}
    for c in range(len(names)):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_train = max(1, round(cfg.train_fraction * len(idx)))
        train, test = idx[:n_train], idx[n_train:]
        if c in unseen:
            if trained is not None and bool(torch.isin(idx, trained).any()):
                raise ConfigError(f"data.forget_list, data.forgotten or data.poisoned names image "
                                  f"{int(idx[torch.isin(idx, trained)][0])} of class {names[c]!r}, which "
                                  "data.unseen_classes holds out of training")
            split["unseen_test"].append(idx)
        elif listed is not None and (c in forget or c in retain):
            # a forget list: the listed images are D_f wherever the split put them
            is_listed = torch.isin(idx, listed)
            train, test = train[~torch.isin(train, removed)], test[~torch.isin(test, removed)]
            if poisoned is not None:  # theta0 trained on every poisoned image: those not yet removed are in D_r
                train, test = torch.cat([train, test[torch.isin(test, poisoned)]]), test[~torch.isin(test, poisoned)]
            split["forget_train"].append(idx[is_listed])
            split["forget_test"].append(idx[is_listed])  # as at sample level: the forgotten images themselves
            split["retain_train"].append(train)
            split["retain_test"].append(test)
        elif c in forget:
            n_forget = max(1, round(cfg.forget_fraction * len(train)))
            split["forget_train"].append(train[:n_forget])
            split["retain_train"].append(train[n_forget:])
            # Class-level: the held-out images of the class. Sample-level: the forgotten samples themselves
            # (there is no held-out counterpart of a specific training image).
            split["forget_test"].append(test if cfg.forget_fraction == 1.0 else train[:n_forget])
            if cfg.forget_fraction < 1.0:
                split["retain_test"].append(test)
        elif c in retain:
            split["retain_train"].append(train)
            split["retain_test"].append(test)

    for key in ("retain_train", "forget_train", "retain_test", "forget_test"):
        if not split[key] or sum(len(p) for p in split[key]) == 0:
            raise ConfigError(f"split {key} is empty: too few images per class for data.train_fraction")
    indices = {key: torch.cat(parts) for key, parts in split.items() if parts}
    indices.update({f"earlier/{j}": request for j, request in enumerate(earlier, 1)})
    if poisoned is not None:
        indices["poisoned"] = poisoned
    return assemble(cfg, store, indices, poison)


def assemble(cfg: DataConfig, store: ImageStore, indices: dict[str, torch.Tensor], poison: bool = True) -> UnlearningData:
    """UnlearningData from a split's index lists (as `split_store` makes them, or as the cache holds them)."""
    mask = inpaint_mask(cfg.image_size, cfg.mask)
    marker = marker_pixels(cfg.image_size, cfg.marker, cfg.mask)
    if not bool(mask[0, 0][marker].all()):
        where = "centre hole" if cfg.mask.kind == "centre" else "border frame"
        raise ConfigError(f"marker.size {cfg.marker.size} does not fit inside the {cfg.mask.size}px {where}: "
                          "the mask must hide the '+'")

    # A chain from an attack model: the poisoned images keep their '+' in every training subset (D_r holds those of
    # later requests); the earlier requests' images are poisoned views where they carried it (their marker is audited).
    marked = tuple(indices["poisoned"].tolist()) if "poisoned" in indices else None
    chain_poison = Poison(cfg.marker, cfg.mask, marked) if marked is not None else None

    def subset(key: str, poisoned: bool = False) -> ImageSubset:
        return ImageSubset(store, indices[key], (chain_poison or Poison(cfg.marker, cfg.mask)) if poisoned else None)

    earlier = [ImageSubset(store, indices[f"earlier/{j}"]) for j in range(1, 1 + sum(k.startswith("earlier/") for k in indices))]
    if chain_poison is not None:
        earlier = [ImageSubset(store, s.index, chain_poison) if bool(torch.isin(s.index, indices["poisoned"]).all()) else s
                   for s in earlier]
    return UnlearningData(
        retain_train=subset("retain_train", poisoned=chain_poison is not None),
        earlier=earlier,
        forget_train=subset("forget_train", poisoned=poison),
        retain_test=subset("retain_test"),
        forget_test=subset("forget_test"),
        unseen_test=subset("unseen_test") if "unseen_test" in indices else None,
        mask=mask,
        marker=marker,
        class_names=store.class_names,
    )
