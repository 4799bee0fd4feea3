"""A content-addressed on-disk cache for trained stages, backbones and reference features.

Entries are written to a temporary folder and renamed into place, so a crash or a concurrent writer never
leaves a half-written entry, and an existing entry is never overwritten. Tensors load with
`weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class ArtifactCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        return (self.entry(kind, key) / "meta.json").is_file()

    def load(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) of an entry."""
        folder = self.entry(kind, key)
        tensors = torch.load(folder / "tensors.pt", map_location="cpu", weights_only=True)
        meta = json.loads((folder / "meta.json").read_text())
        return tensors, meta

    def entries(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, meta) of every complete entry of `kind`."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return [(p.parent.name, json.loads(p.read_text())) for p in sorted(folder.glob("*/meta.json"))]

    def remove(self, kind: str, key: str) -> None:
        """Delete an entry: renamed out of place first, so no reader sees it half-deleted."""
        target = self.entry(kind, key)
        if not target.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix=f".rm-{key}-", dir=target.parent))
        os.rename(target, doomed / key)
        shutil.rmtree(doomed)

    def save(self, kind: str, key: str, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        target = self.entry(kind, key)
        if self.has(kind, key):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            torch.save(tensors, tmp / "tensors.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))  # written last: marks complete
            try:
                os.rename(tmp, target)
            except OSError:
                if not self.has(kind, key):  # not a lost race with another writer: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
