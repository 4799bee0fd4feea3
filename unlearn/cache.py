"""A content-addressed on-disk cache for trained stages, backbones and reference features.

Entries are written to a temporary folder and renamed into place, so a crash or a concurrent writer never
leaves a half-written entry on a local disk, and an existing entry is never overwritten. On a bucket mount
(the cluster's shared cache) a rename is a copy, so a reader can still meet a partial entry: `meta.json`
carries the sha256 of `tensors.pt`, and `get` reports an entry that fails it (or whose files are missing or
truncated) in one line and removes it, so that the caller rebuilds it instead of loading it half. Tensors
load with `weights_only=True`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TENSORS = "tensors.pt"
META = "meta.json"
CHECKSUM = "tensors_sha256"  # in meta.json; entries written before it existed are checked by loading them


class DamagedEntry(Exception):
    """A cache entry whose files are missing, truncated or fail their checksum."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ArtifactCache:
    def __init__(self, root: Path, warn: Callable[[str], None] = _stderr) -> None:
        self.root = Path(root)
        self.warn = warn

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is in place (complete or not: `get` checks it)."""
        return (self.entry(kind, key) / META).is_file()

    def read(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) of an entry, checked; raises DamagedEntry (or FileNotFoundError when absent)."""
        folder = self.entry(kind, key)
        meta = self._meta(folder)
        try:
            payload = (folder / TENSORS).read_bytes()
        except FileNotFoundError as exc:
            raise DamagedEntry(f"{TENSORS} missing") from exc
        expected = meta.get(CHECKSUM)
        if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
            raise DamagedEntry(f"{TENSORS} does not match its checksum ({len(payload)} bytes)")
        try:
            tensors = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unchecked (older) entry: any failure to load is damage
            raise DamagedEntry(f"{TENSORS} does not load: {type(exc).__name__}") from exc
        return tensors, meta

    def get(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(tensors, meta) of a sound entry; None when there is none, or when it was damaged (reported, removed)."""
        if not self.has(kind, key):
            return None
        try:
            return self.read(kind, key)
        except DamagedEntry as exc:
            if not self.entry(kind, key).exists():  # removed by another process while being read: simply absent
                return None
            self.warn(f"cache: damaged entry {self.entry(kind, key)} ({exc}): removed, rebuilding it")
            self.remove(kind, key)
            return None

    def entries(self, kind: str) -> list[tuple[str, dict[str, Any] | None]]:
        """(key, meta) of every entry of `kind`; meta is None where meta.json is damaged."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        out: list[tuple[str, dict[str, Any] | None]] = []
        for path in sorted(folder.glob(f"*/{META}")):
            try:
                out.append((path.parent.name, self._meta(path.parent)))
            except DamagedEntry:
                out.append((path.parent.name, None))
        return out

    def remove(self, kind: str, key: str) -> None:
        """Delete an entry: renamed out of place first, so no reader sees it half-deleted."""
        target = self.entry(kind, key)
        if not target.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix=f".rm-{key}-", dir=target.parent))
        try:
            os.rename(target, doomed / key)
        except FileNotFoundError:  # another process removed it first
            pass
        shutil.rmtree(doomed, ignore_errors=True)

    def save(self, kind: str, key: str, tensors: dict[str, Any], meta: dict[str, Any]) -> Path:
        target = self.entry(kind, key)
        if self.has(kind, key):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        payload = buffer.getvalue()
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            (tmp / TENSORS).write_bytes(payload)
            meta = {**meta, CHECKSUM: hashlib.sha256(payload).hexdigest()}
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))  # written last: marks complete
            for attempt in range(10):
                try:
                    os.rename(tmp, target)
                    break
                except OSError as exc:
                    # another writer put the key in place first: its entry is as good as this one, unless a remover
                    # (purge, a damaged-entry clean-up) took it away in between: then the key is free again, retry
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or attempt == 9:
                        raise
                    if self.has(kind, key):
                        break
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _meta(folder: Path) -> dict[str, Any]:
        try:
            meta = json.loads((folder / META).read_text())
        except FileNotFoundError as exc:
            raise DamagedEntry(f"{META} missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamagedEntry(f"{META} is not valid JSON (truncated?)") from exc
        if not isinstance(meta, dict):
            raise DamagedEntry(f"{META} is not a JSON object")
        return meta
