"""Honour a deletion request beyond the certified model: remove what the cache holds of D_f.

Every cache entry that holds forget images or was computed from them carries the forget digest (the sha256 that
certificates print) in its meta.json, or, for an image store that serves many splits, as a tag beside it. The image
store (the decoded pixels: it holds D_f's images with the rest of the data set, and is decoded again from data.root
by the next run that needs it), the split, the reference outputs and the calibration are removed; the weights
trained on D_f (original and attack stages, the domain backbone) only when asked, since they are what the next
unlearning run of another request starts from.
"""

from __future__ import annotations

import re
from pathlib import Path

from unlearn.cache import ArtifactCache
from unlearn.errors import ConfigError

HOLDS_FORGET_DATA = ("stores", "data", "references", "calibration")
TRAINED_ON_FORGET = ("stages", "backbones")


def check_digest(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ConfigError(f"--forget-digest {digest!r} is not a sha256 (64 hex digits, as certificate.md prints it)")
    return digest


def purge_cache(root: Path, digest: str, weights: bool) -> tuple[list[str], list[str]]:
    """(removed, remaining) cache entries tagged with `digest` under `root`."""
    cache = ArtifactCache(root)
    removed, remaining = [], []
    for kind in (*HOLDS_FORGET_DATA, *TRAINED_ON_FORGET):
        for key, meta in cache.entries(kind):
            if meta is None:
                remaining.append(f"{cache.entry(kind, key)} (meta.json damaged: cannot tell whether it holds this D_f; "
                                 "delete it by hand)")
                continue
            digests = cache.forget_digests(kind, key, meta)
            # a stage trained on D_r alone says so (`trained_on`; retrain stages written before that flag: by name)
            trained_on_retain = meta.get("trained_on") == "D_r" or meta.get("stage") == "retrain"
            if not digests and kind not in ("calibration", "stores") and not trained_on_retain:
                remaining.append(f"{cache.entry(kind, key)} (written before forget digests were recorded: may hold "
                                 "this D_f; delete it by hand if so)")
                continue
            if digest not in digests:
                continue
            where = str(cache.entry(kind, key))
            if kind in TRAINED_ON_FORGET and not weights:
                remaining.append(f"{where} (weights trained on D_f; remove with --weights)")
                continue
            cache.remove(kind, key)
            removed.append(where)
    return removed, remaining


def append_to_certificate(folder: Path, digest: str, removed: list[str], remaining: list[str], when: str) -> Path:
    """Add what was purged, and what still holds D_f, to a saved model's certificate."""
    path = Path(folder).expanduser() / "certificate.md"
    if not path.is_file():
        raise ConfigError(f"--model {folder} has no certificate.md (not a folder written by `unlearn run --out`)")
    lines = ["", f"## Purge of D_f ({when}, forget digest `{digest}`)", "", "Removed:",
             *([f"- {r}" for r in removed] or ["- nothing (no entry carried this digest)"]), "", "Still holding D_f:",
             *[f"- {r}" for r in remaining], "- the original data set itself (outside this tool)", ""]
    with path.open("a") as handle:
        handle.write("\n".join(lines))
    return path
