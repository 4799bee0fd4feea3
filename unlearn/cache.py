"""A content-addressed on-disk cache for image stores, trained stages, backbones and reference features.

An entry is a folder: `tensors.pt` (small tensors, loaded whole), raw arrays (`*.bin`: large per-image data, mapped
read-only so that every process of a node shares one copy through the page cache), other files, and `meta.json`,
written last, which lists each file with its size and checksum (sha256; xxh3-128 for arrays). Entries are built in a
temporary folder and renamed into place, so a crash, a full disk or a concurrent writer never leaves a half-written
entry on a local disk, and an existing entry is never overwritten. On a bucket mount (the cluster's shared cache) a
rename is a copy, so a reader can still meet a partial entry: `tensors.pt` is checked against its sha256 at every
read; arrays, which can hold tens of gigabytes, are checked by size at every open (a truncated or half-copied file)
and by checksum in `verify` (`unlearn prepare`, and the sweep's preparation). `get` reports a damaged entry in one
line and removes it, so that the caller rebuilds it instead of loading it half. Tensors load with
`weights_only=True`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

TENSORS = "tensors.pt"
META = "meta.json"
CHECKSUM = "tensors_sha256"  # in meta.json; entries written before it existed are checked by loading them
ARRAYS = "arrays"  # in meta.json: name -> {file, dtype, shape, bytes, ARRAY_DIGEST (older entries: sha256)}
FILES = "files"  # in meta.json: other files -> {bytes, sha256}
# Arrays hold the gigabytes, so their checksum must cost little next to decoding an image: xxh3-128 runs at ~60 GB/s
# here, sha256 at 1.8 GB/s (110 us of CPU per 256-px image, on the cores that decode). It guards against accidental
# damage (a half copy, a flipped bit), which is all a cache needs; nothing here defends against tampering.
ARRAY_DIGEST = "xxh3_128"
ENTRY_ID = "entry_id"  # in meta.json: a random id per build, telling a rebuilt entry from the one it replaced
DIGESTS = "forget-digests"  # a folder of empty files named by the forget digests of the D_f an entry holds


class DamagedEntry(Exception):
    """A cache entry whose files are missing, truncated or fail their checksum. `folder_id` names the entry found
    damaged (`_folder_id`), so that a clean-up never removes another process's entry put in its place since."""

    def __init__(self, message: str, folder_id: tuple[int, int, str] | None = None) -> None:
        super().__init__(message)
        self.folder_id = folder_id


def new_digest(kind: str) -> Any:
    """A running checksum of this kind (`sha256` or ARRAY_DIGEST)."""
    if kind == ARRAY_DIGEST:
        import xxhash

        return xxhash.xxh3_128()
    return hashlib.new(kind)


def file_digest(path: Path, kind: str = "sha256") -> str:
    digest = new_digest(kind)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def _expected_digest(spec: dict[str, Any]) -> tuple[str, str]:
    """(kind, hex digest) a file's meta.json entry states."""
    kind = ARRAY_DIGEST if ARRAY_DIGEST in spec else "sha256"
    return kind, spec[kind]


class ArrayWriter:
    """Appends rows of one dtype to a raw array file, hashing as it writes (no second pass over the bytes).

    Rows are gathered into page-aligned chunks that a writer thread hashes and writes while the caller produces the
    next rows (decoding an image, running a model): os.write releases the GIL, and the checksum (ARRAY_DIGEST)
    holds it for ~0.1 ms per chunk. Where the file system
    allows it the file is opened with O_DIRECT: a bulk write of tens of gigabytes then costs the CPU almost nothing
    (measured here: 2 GB in 0.2-0.3 s of system time, against 3.6-5 s through the page cache) and does not flush
    the page cache that trials read from. Write errors (a full disk) are raised by the next `write` or by `close`."""

    CHUNK = 8 * 2**20  # bytes per write: a multiple of every block size O_DIRECT asks for
    ALIGN = 4096

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...]) -> None:
        import queue
        import threading

        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._hash = new_digest(ARRAY_DIGEST)
        self._fd, self._direct = _open_for_writing(self.path)
        self._written = 0  # bytes handed to the writer thread (the file's final size)
        self._error: BaseException | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(3):
            # anonymous maps are page-aligned, as O_DIRECT needs; private, so that the huge-page advice applies (a
            # shared anonymous map is shmem, which ignores it): an O_DIRECT write pins its buffer's pages, 4 of 2 MB
            # per chunk instead of 2048 of 4 kB (measured: 2 GB written with 0.03 s of system time against 0.13-0.15).
            # Advice only: a kernel without transparent huge pages refuses it (EINVAL), and the write is the same.
            chunk = mmap.mmap(-1, self.CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(AttributeError, OSError):
                chunk.madvise(mmap.MADV_HUGEPAGE)
            self._free.put(chunk)
        self._full: queue.Queue = queue.Queue(maxsize=2)
        self._chunk, self._filled = self._free.get(), 0
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._full.get()) is not None:
            chunk, size = item
            try:
                if self._error is None:
                    view = memoryview(chunk)
                    self._hash.update(view[:size])
                    length = -(-size // self.ALIGN) * self.ALIGN if self._direct else size
                    done = 0
                    while done < length:
                        done += _write(self._fd, view[done:length])
            except BaseException as exc:  # noqa: BLE001 - handed to the producer, which raises it
                self._error = exc
            finally:
                self._free.put(chunk)

    def _hand_over(self) -> None:
        if self._error is not None:
            raise self._error
        self._full.put((self._chunk, self._filled))
        self._chunk, self._filled = self._free.get(), 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        nbytes = len(rows) * self.dtype.itemsize * math.prod(self.row_shape)
        if self._filled + nbytes < self.CHUNK:
            # rows that fit the chunk are copied into it in one pass, whatever their strides: no contiguous
            # intermediate copy
            space = np.frombuffer(self._chunk, self.dtype, len(rows) * math.prod(self.row_shape), self._filled)
            np.copyto(space.reshape(rows.shape), rows, casting="unsafe")
            self._filled += nbytes
            self._written += nbytes
            self.rows += len(rows)
            return
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        data = memoryview(rows).cast("B")
        start = 0
        while start < len(data):
            take = min(len(data) - start, self.CHUNK - self._filled)
            self._chunk[self._filled : self._filled + take] = data[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.CHUNK:
                self._hand_over()
        self._written += len(data)
        self.rows += len(rows)

    def close(self) -> dict[str, Any]:
        """Write what is left, trim the alignment padding, close; the array's entry for meta.json."""
        if self._filled:
            self._hand_over()
        self._full.put(None)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            os.ftruncate(self._fd, self._written)
        finally:
            os.close(self._fd)
        return {"file": self.path.name, "dtype": self.dtype.str, "shape": [self.rows, *self.row_shape],
                "bytes": self._written, ARRAY_DIGEST: self._hash.hexdigest()}

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._full.put(None)
        self._thread.join()
        os.close(self._fd)


_write = os.write  # the one system call that writes array bytes (a test makes it fail as a full disk would)


def _open_for_writing(path: Path) -> tuple[int, bool]:
    """A new file, with O_DIRECT where the file system supports it (not tmpfs, not most FUSE mounts)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def map_array(path: Path | str, dtype: str, shape: Iterable[int], dir_fd: int | None = None) -> np.ndarray:
    """A read-only array over a raw file (`path` relative to `dir_fd` when given), memory-mapped (pages shared with
    every process mapping it)."""
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(shape, dtype=dtype)
    fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    try:
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)  # the map keeps the file
    return np.frombuffer(mapped, dtype=dtype).reshape(shape)


def _folder_id(fd: int, meta: dict[str, Any] | None) -> tuple[int, int, str]:
    """Which entry an open folder is: its inode and the entry id its meta.json names. While a reader holds the
    folder open its inode cannot be reused; after that a rebuilt entry may reuse it, but carries a new id (an entry
    without one, older or with a damaged meta.json, has "")."""
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino, str(meta.get(ENTRY_ID, "")) if isinstance(meta, dict) else ""


def _current_id(folder: Path) -> tuple[int, int, str] | None:
    """Which entry is at `folder` now; None when none is."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        try:
            meta = ArtifactCache._meta(fd)
        except DamagedEntry:
            meta = None
        return _folder_id(fd, meta)
    finally:
        os.close(fd)


def mapped_region(array: np.ndarray) -> mmap.mmap | None:
    """The mmap behind an array made by `map_array` (for read-ahead advice), else None."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base if isinstance(base, mmap.mmap) else None


class ArtifactCache:
    def __init__(self, root: Path, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.warn = warn or logger.warning

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is in place (complete or not: `get` checks it)."""
        return (self.entry(kind, key) / META).is_file()

    def read(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) of an entry, checked; its arrays are in `tensors` too, as read-only memory-mapped numpy
        arrays (checked by size). Raises DamagedEntry (or FileNotFoundError when absent).

        Every file is read through one handle on the entry's folder: another process may remove the entry and build
        the key again while this one reads (a stage's racing preparers), and reading by path would then pair one
        entry's meta.json with the other's tensors.pt, a false checksum failure that removed a sound entry. A
        failure met in a folder that is no longer the key's is read again from what is there now."""
        return self._in_folder(self.entry(kind, key), self._read_at)

    def _in_folder(self, folder: Path, check: Callable[[int, dict[str, Any]], Any]) -> Any:
        """`check(fd, meta)` on the folder opened once (meta: its meta.json, read through `fd`). A damaged or missing
        file met in a folder that is no longer the key's (removed or replaced meanwhile) is checked again on what is
        there now, at most twice; FileNotFoundError when the key is absent."""
        for attempt in range(3):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # FileNotFoundError: absent (or removed meanwhile)
            meta: dict[str, Any] | None = None
            try:
                meta = self._meta(fd)
                return check(fd, meta)
            except (DamagedEntry, FileNotFoundError) as exc:
                read_id = _folder_id(fd, meta)
                if attempt < 2 and _current_id(folder) != read_id:
                    continue  # replaced or removed while read: not damage
                if isinstance(exc, DamagedEntry):
                    raise DamagedEntry(str(exc), read_id) from exc
                raise DamagedEntry(f"{Path(exc.filename or '?').name} missing", read_id) from exc
            finally:
                os.close(fd)
        raise AssertionError("unreachable")

    def _read_at(self, fd: int, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors: dict[str, Any] = {}
        if CHECKSUM in meta or _exists(TENSORS, fd) or not (meta.get(ARRAYS) or meta.get(FILES)):
            tensors.update(self._tensors(fd, meta))
        for name, spec in (meta.get(FILES) or {}).items():
            self._check_size(name, spec["bytes"], fd)
        for name, spec in (meta.get(ARRAYS) or {}).items():
            self._check_size(spec["file"], spec["bytes"], fd)
            tensors[name] = map_array(spec["file"], spec["dtype"], spec["shape"], dir_fd=fd)
        return tensors, meta

    def _tensors(self, fd: int, meta: dict[str, Any]) -> dict[str, Any]:
        try:
            payload = _read_bytes(TENSORS, fd)
        except FileNotFoundError as exc:
            raise DamagedEntry(f"{TENSORS} missing") from exc
        expected = meta.get(CHECKSUM)
        if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
            raise DamagedEntry(f"{TENSORS} does not match its checksum ({len(payload)} bytes)")
        import torch  # here, not at module level: decoding workers import this module and never load tensors

        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:
            if expected is None:  # an entry written before checksums: a failed load is the only sign of damage
                raise DamagedEntry(f"{TENSORS} does not load: {type(exc).__name__}") from exc
            # its bytes are the ones written: not damage (a torch that cannot read what another wrote, say), and
            # removing it would only rebuild it on every run
            raise RuntimeError(f"cache entry {_path_of(fd)} matches its checksum but does not load "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); remove it by hand if it "
                               "should be rebuilt") from exc

    @staticmethod
    def _check_size(name: str, expected: int, fd: int) -> None:
        try:
            size = os.stat(name, dir_fd=fd).st_size
        except FileNotFoundError as exc:
            raise DamagedEntry(f"{name} missing") from exc
        if size != expected:
            raise DamagedEntry(f"{name} has {size} bytes, {expected} expected (truncated or half-copied)")

    def verify(self, kind: str, key: str, hash_files: Callable[[list[tuple[Path, str]]], list[str]] | None = None
               ) -> None:
        """Check every file of an entry against its checksum (arrays included); DamagedEntry on a mismatch.
        `hash_files` maps (path, digest kind) pairs to hex digests, and may do so in parallel (default: one after
        another)."""
        folder = self.entry(kind, key)

        def check(fd: int, meta: dict[str, Any]) -> None:
            specs = [(s["file"], s) for s in (meta.get(ARRAYS) or {}).values()]
            specs += list((meta.get(FILES) or {}).items())
            for name, spec in specs:
                self._check_size(name, spec["bytes"], fd)
            # hashed by path (hash_files may hand them to threads): a folder replaced meanwhile fails and is read again
            jobs = [(folder / name, _expected_digest(spec)[0]) for name, spec in specs]
            digests = hash_files(jobs) if hash_files is not None else [file_digest(*job) for job in jobs]
            for (name, spec), digest in zip(specs, digests, strict=True):
                if digest != _expected_digest(spec)[1]:
                    raise DamagedEntry(f"{name} does not match its checksum")
            if CHECKSUM in meta:
                self._tensors(fd, meta)

        self._in_folder(folder, check)

    def get(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(tensors, meta) of a sound entry; None when there is none, or when it was damaged (reported, removed)."""
        if not self.has(kind, key):
            return None
        try:
            return self.read(kind, key)
        except FileNotFoundError:  # removed by another process since `has`
            return None
        except DamagedEntry as exc:
            self.discard_damaged(kind, key, exc)
            return None

    def discard_damaged(self, kind: str, key: str, exc: Exception) -> None:
        """Report a damaged entry in one line and remove it, unless another process removed it meanwhile or put
        another entry in its place (then the damaged one is not there to remove)."""
        damaged = exc.folder_id if isinstance(exc, DamagedEntry) else None
        now = _current_id(self.entry(kind, key))
        if now is None or damaged not in (None, now):
            return
        if self.remove(kind, key, only=damaged):
            self.warn(f"cache: damaged entry {self.entry(kind, key)} ({exc}): removed, rebuilding it")

    def entries(self, kind: str) -> list[tuple[str, dict[str, Any] | None]]:
        """(key, meta) of every entry of `kind`; meta is None where meta.json is damaged."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        out: list[tuple[str, dict[str, Any] | None]] = []
        for path in sorted(folder.glob(f"*/{META}")):
            try:
                out.append((path.parent.name, self._in_folder(path.parent, lambda _, meta: meta)))
            except DamagedEntry:
                out.append((path.parent.name, None))
            except FileNotFoundError:  # removed meanwhile
                continue
        return out

    def add_forget_digest(self, kind: str, key: str, digest: str) -> None:
        """Record that an entry holds (or was computed from) the D_f named by `digest`, beside what its meta.json
        says: an image store serves many splits, each with its own D_f. An empty file: atomic, and never rewrites
        the entry's checked files."""
        folder = self.entry(kind, key) / DIGESTS
        folder.mkdir(exist_ok=True)
        (folder / digest).touch()

    def forget_digests(self, kind: str, key: str, meta: dict[str, Any]) -> set[str]:
        """Every forget digest an entry carries (its meta's, and those added since)."""
        digests = {meta["forget_digest"]} if meta.get("forget_digest") else set()
        folder = self.entry(kind, key) / DIGESTS
        return digests | ({p.name for p in folder.iterdir()} if folder.is_dir() else set())

    def remove(self, kind: str, key: str, only: tuple[int, int, str] | None = None) -> bool:
        """Delete an entry: renamed out of place first, so no reader sees it half-deleted. With `only` (an entry's
        `_folder_id`), a different entry found there (another process rebuilt the key meanwhile) is put back. Whether
        an entry was removed."""
        target = self.entry(kind, key)
        if not target.exists():
            return False
        doomed = Path(tempfile.mkdtemp(prefix=f".rm-{key}-", dir=target.parent))
        removed = True
        try:
            os.rename(target, doomed / key)
        except FileNotFoundError:  # another process removed it first
            removed = False
        else:
            if only is not None and _current_id(doomed / key) != only:
                with contextlib.suppress(OSError):  # the key taken again meanwhile: this one goes (a rebuild, no loss)
                    os.rename(doomed / key, target)
                    removed = False
        shutil.rmtree(doomed, ignore_errors=True)
        return removed

    def save(self, kind: str, key: str, tensors: dict[str, Any], meta: dict[str, Any],
             arrays: dict[str, np.ndarray] | None = None) -> Path:
        """An entry of small tensors (and, optionally, arrays written as raw files)."""
        import torch

        def write(folder: Path) -> dict[str, Any]:
            buffer = io.BytesIO()
            torch.save(tensors, buffer)
            payload = buffer.getvalue()
            (folder / TENSORS).write_bytes(payload)
            written = {}
            for name, array in (arrays or {}).items():
                array = np.asarray(array)
                writer = ArrayWriter(folder / array_file(name), array.dtype.str, array.shape[1:])
                writer.write(array)
                written[name] = writer.close()
            return {**meta, CHECKSUM: hashlib.sha256(payload).hexdigest(), **({ARRAYS: written} if written else {})}

        return self.build(kind, key, write)

    def build(self, kind: str, key: str, write: Callable[[Path], dict[str, Any]]) -> Path:
        """Create an entry: `write(folder)` fills a temporary folder and returns the entry's meta (with ARRAYS and
        FILES listing what it wrote); meta.json is written last and the folder renamed into place. If the key is
        taken meanwhile, the other writer's entry stands. Whatever `write` raises leaves nothing behind."""
        target = self.entry(kind, key)
        if self.has(kind, key):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
        try:
            meta = {**write(tmp), ENTRY_ID: uuid.uuid4().hex}
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
    def _meta(fd: int) -> dict[str, Any]:
        try:
            meta = json.loads(_read_bytes(META, fd))
        except FileNotFoundError as exc:
            raise DamagedEntry(f"{META} missing") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamagedEntry(f"{META} is not valid JSON (truncated?)") from exc
        if not isinstance(meta, dict):
            raise DamagedEntry(f"{META} is not a JSON object")
        return meta


def _read_bytes(name: str, dir_fd: int) -> bytes:
    with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=dir_fd)) as handle:
        return handle.read()


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _path_of(fd: int) -> str:
    """The path of an open folder, for messages (Linux names it; elsewhere the descriptor)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<folder fd {fd}>"


def array_file(name: str) -> str:
    """The file name of an array of an entry (names may hold '/', as reference keys do)."""
    return name.replace("/", "__") + ".bin"
