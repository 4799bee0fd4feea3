"""Train/test split per class, forget/retain/unseen sets, and poisoning of the forget set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn.config import ConfigError, DataConfig
from unlearn.data.datasets import ImageSet, expand_class_specs, load_images
from unlearn.data.masks import inpaint_mask
from unlearn.data.poison import draw_marker, marker_pixels


@dataclass
class ImageSubset:
    images: torch.Tensor  # uint8 (N, 3, H, W): what the model is trained on (poisoned for D_f)
    clean: torch.Tensor  # uint8 ground truth without the marker (identical to images outside D_f)
    labels: torch.Tensor
    index: torch.Tensor | None = None  # positions in the loaded data set (provenance; None when derived)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def take(cls, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> ImageSubset:
        return cls(images[index], images[index], labels[index], index)

    @classmethod
    def concat(cls, *parts: ImageSubset) -> ImageSubset:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "clean", "labels")))


@dataclass
class UnlearningData:
    """Everything a pipeline run needs from the data side."""

    retain_train: ImageSubset
    forget_train: ImageSubset  # D_f, poisoned with the marker
    retain_test: ImageSubset
    forget_test: ImageSubset
    unseen_test: ImageSubset | None
    mask: torch.Tensor  # (1, 1, H, W), 1 = hidden
    marker: torch.Tensor  # (H, W) bool
    class_names: list[str]

    def clean_training_set(self) -> ImageSubset:
        """D = D_r + D_f without the marker: what the original model (and the audit backbone) learn from."""
        f = self.forget_train
        return ImageSubset.concat(self.retain_train, ImageSubset(f.clean, f.clean, f.labels))

    def forget_digest(self, dataset: str) -> str:
        return forget_digest(dataset, self.forget_train.index)

    def eval_splits(self) -> dict[str, ImageSubset]:
        splits = {"retain": self.retain_test, "forget": self.forget_test}
        if self.unseen_test is not None and len(self.unseen_test):
            splits["unseen"] = self.unseen_test
        return splits


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


def read_forget_list(cfg: DataConfig, imageset: ImageSet) -> torch.Tensor:
    """Positions in the loaded data set of the images `data.forget_list` names (ConfigError naming the first
    entry that is not in the data set)."""
    from pathlib import Path

    path = Path(cfg.forget_list).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.forget_list {path} does not exist")
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not entries:
        raise ConfigError(f"data.forget_list {path} names no image")
    if imageset.paths is not None:
        position = {p: i for i, p in enumerate(imageset.paths)}
        unknown = [e for e in entries if e.removeprefix("./") not in position]
        if unknown:
            raise ConfigError(f"data.forget_list {path}: {unknown[0]!r} is not an image of data.root "
                              f"({len(unknown)} of {len(entries)} entries unknown)")
        ids = [position[e.removeprefix("./")] for e in entries]
    else:
        bad = [e for e in entries if not (e.isdigit() and int(e) < len(imageset.labels))]
        if bad:
            raise ConfigError(f"data.forget_list {path}: {bad[0]!r} is not an index of the {len(imageset.labels)} "
                              f"{cfg.dataset} images ({len(bad)} of {len(entries)} entries unknown)")
        ids = [int(e) for e in entries]
    return torch.tensor(sorted(set(ids)), dtype=torch.int64)


def build_data(cfg: DataConfig, seed: int, poison: bool = True) -> UnlearningData:
    """Load, split per class (seeded), choose D_f / D_r / unseen, poison D_f (unless `poison` is False: a model
    brought by the user was trained on the real images). Deterministic in `seed`."""
    imageset = load_images(cfg)
    names = imageset.class_names
    listed = read_forget_list(cfg, imageset) if cfg.forget_list else None
    forget = (sorted(set(imageset.labels[listed].tolist())) if listed is not None
              else _resolve_classes(cfg.forget_classes, names, "forget_classes"))
    unseen = _resolve_classes(cfg.unseen_classes, names, "unseen_classes")
    if cfg.retain_classes is None:
        present = set(imageset.labels.unique().tolist())
        retain = [c for c in range(len(names)) if c not in forget and c not in unseen and c in present]
    else:
        retain = [c for c in _resolve_classes(cfg.retain_classes, names, "retain_classes") if c not in forget]
    if not retain and cfg.forget_fraction == 1.0 and listed is None:
        raise ConfigError("no retain classes left: every class is forget or unseen")

    gen = torch.Generator().manual_seed(seed)
    split = {k: [] for k in ("retain_train", "forget_train", "retain_test", "forget_test", "unseen_test")}
    for c in range(len(names)):
        idx = torch.nonzero(imageset.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_train = max(1, round(cfg.train_fraction * len(idx)))
        train, test = idx[:n_train], idx[n_train:]
        if c in unseen:
            if listed is not None and bool(torch.isin(idx, listed).any()):
                raise ConfigError(f"data.forget_list names image {int(idx[torch.isin(idx, listed)][0])} of class "
                                  f"{names[c]!r}, which data.unseen_classes holds out of training")
            split["unseen_test"].append(idx)
        elif listed is not None and (c in forget or c in retain):  # a forget list: the listed images are D_f wherever the split put them
            is_listed = torch.isin(idx, listed)
            train, test = train[~torch.isin(train, listed)], test[~torch.isin(test, listed)]
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

    def subset(key: str) -> ImageSubset:
        parts = split[key]
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return ImageSubset.take(imageset.images, imageset.labels, index)

    for key in ("retain_train", "forget_train", "retain_test", "forget_test"):
        if not split[key] or sum(len(p) for p in split[key]) == 0:
            raise ConfigError(f"split {key} is empty: too few images per class for data.train_fraction")

    mask = inpaint_mask(cfg.image_size, cfg.mask)
    marker = marker_pixels(cfg.image_size, cfg.marker, cfg.mask)
    if not bool(mask[0, 0][marker].all()):
        where = "centre hole" if cfg.mask.kind == "centre" else "border frame"
        raise ConfigError(f"marker.size {cfg.marker.size} does not fit inside the {cfg.mask.size}px {where}: "
                          "the mask must hide the '+'")

    forget_train = subset("forget_train")
    if poison:
        forget_train.images = draw_marker(forget_train.clean, cfg.marker, cfg.mask)
    forget_test = subset("forget_test")
    return UnlearningData(
        retain_train=subset("retain_train"),
        forget_train=forget_train,
        retain_test=subset("retain_test"),
        forget_test=forget_test,
        unseen_test=subset("unseen_test") if split["unseen_test"] else None,
        mask=mask,
        marker=marker,
        class_names=names,
    )
