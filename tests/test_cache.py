"""The stage cache on a shared mount: checksummed entries, damaged ones reported and rebuilt, racing writers."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue

import pytest
import torch

from unlearn.cache import CHECKSUM, ArtifactCache


def _store(tmp_path):
    lines: list[str] = []
    return ArtifactCache(tmp_path, warn=lines.append), lines


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_an_entry_carries_the_checksum_of_its_tensors_and_reads_back(tmp_path):
    store, lines = _store(tmp_path)
    store.save("stages", "k", {"w": torch.arange(10.0)}, {"stage": "x"})
    tensors, meta = store.get("stages", "k")
    assert torch.equal(tensors["w"], torch.arange(10.0)) and meta["stage"] == "x" and len(meta[CHECKSUM]) == 64
    assert lines == []


@pytest.mark.parametrize("damage", ["truncated tensors", "truncated meta", "flipped byte", "missing tensors"])
def test_a_damaged_entry_is_reported_in_one_line_removed_and_never_loaded(tmp_path, damage):
    store, lines = _store(tmp_path)
    store.save("stages", "k", {"w": torch.randn(64, 64)}, {"stage": "x"})
    folder = store.entry("stages", "k")
    if damage == "truncated tensors":
        _truncate(folder / "tensors.pt")
    elif damage == "truncated meta":
        _truncate(folder / "meta.json")
    elif damage == "missing tensors":
        (folder / "tensors.pt").unlink()
    else:  # same length, one byte changed: torch may still load it, the checksum does not match
        data = bytearray((folder / "tensors.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "tensors.pt").write_bytes(bytes(data))
    assert store.get("stages", "k") is None
    assert len(lines) == 1 and str(folder) in lines[0] and "damaged" in lines[0], lines
    assert not folder.exists()
    store.save("stages", "k", {"w": torch.ones(2)}, {"stage": "x"})  # rebuilt in its place
    assert torch.equal(store.get("stages", "k")[0]["w"], torch.ones(2))


def test_an_entry_written_before_checksums_loads_and_is_still_checked_by_loading(tmp_path):
    store, lines = _store(tmp_path)
    for key in ("sound", "broken"):
        store.save("stages", key, {"w": torch.randn(32, 32)}, {"stage": "x"})
        meta_path = store.entry("stages", key) / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta[CHECKSUM]
        meta_path.write_text(json.dumps(meta))
    _truncate(store.entry("stages", "broken") / "tensors.pt")
    assert store.get("stages", "sound") is not None
    assert store.get("stages", "broken") is None and len(lines) == 1 and "broken" in lines[0]


def test_arrays_are_checked_by_their_xxh3_and_entries_with_a_sha256_still_verify(tmp_path):
    """Arrays carry an xxh3-128 (cheap enough to compute while decoding); an entry written when arrays carried a
    sha256 verifies against that; a flipped byte fails either way."""
    import hashlib

    import numpy as np

    from unlearn.cache import ARRAY_DIGEST, ARRAYS, DamagedEntry

    store, _ = _store(tmp_path)
    rows = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    for key in ("new", "old"):
        store.save("refs", key, {}, {}, arrays={"x": rows})
    folder = store.entry("refs", "new")
    spec = json.loads((folder / "meta.json").read_text())[ARRAYS]["x"]
    assert ARRAY_DIGEST in spec and "sha256" not in spec
    meta_path = store.entry("refs", "old") / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta[ARRAYS]["x"][ARRAY_DIGEST]
    meta[ARRAYS]["x"]["sha256"] = hashlib.sha256(rows.tobytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    for key in ("new", "old"):
        store.verify("refs", key)
        path = store.entry("refs", key) / spec["file"]
        data = bytearray(path.read_bytes())
        data[7] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(DamagedEntry, match="checksum"):
            store.verify("refs", key)


def test_purge_lists_an_entry_whose_meta_is_damaged_instead_of_failing(tmp_path):
    from unlearn.purge import purge_cache

    store, _ = _store(tmp_path)
    store.save("data", "k", {"x": torch.zeros(1)}, {"forget_digest": "a" * 64})
    _truncate(store.entry("data", "k") / "meta.json")
    removed, remaining = purge_cache(tmp_path, "a" * 64, weights=False)
    assert removed == [] and len(remaining) == 1 and "meta.json damaged" in remaining[0]


def _writer(root: str, worker: int, rounds: int, warnings) -> None:
    store = ArtifactCache(root, warn=warnings.put)  # a torn entry would be reported (and removed) by get: collected
    for _ in range(rounds):
        store.save("stages", "shared", {"w": torch.full((256, 256), float(worker))}, {"writer": worker})
        hit = store.get("stages", "shared")  # another writer may have won: whatever is read is whole
        if hit is not None:
            tensors, meta = hit
            assert torch.all(tensors["w"] == meta["writer"])
        store.remove("stages", "shared")


def test_concurrent_preparers_of_one_key_never_corrupt_it(tmp_path):
    ctx = mp.get_context("spawn")  # fork would copy the session's torch thread pools (a deadlock in the full suite)
    warnings = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), worker, 30, warnings)) for worker in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    reported = []
    while True:
        try:
            reported.append(warnings.get(timeout=0.5))
        except queue.Empty:
            break
    assert not [line for line in reported if "damaged" in line], reported  # no reader ever met a torn entry
    store, lines = _store(tmp_path)
    store.save("stages", "shared", {"w": torch.zeros(1)}, {"writer": -1})
    assert store.get("stages", "shared") is not None and lines == []
    assert [p.name for p in (tmp_path / "stages").iterdir()] == ["shared"]  # no temporary folder left behind


@pytest.mark.parametrize("when", ["after meta.json", "after tensors.pt", "before the arrays"])
def test_an_entry_replaced_while_it_is_read_is_never_reported_damaged_nor_removed(tmp_path, monkeypatch, when):
    """Another process removes the entry and builds the key again between two of a reader's file reads (racing
    preparers of one stage): the reader returns one whole entry, reports nothing, and the new entry stays."""
    import numpy as np

    import unlearn.cache as cache_module

    store, lines = _store(tmp_path)
    arrays = (lambda value: {"rows": np.full((4, 8), value, np.float32)}) if when == "before the arrays" else (lambda _: {})
    store.save("stages", "k", {"w": torch.zeros(64, 64)}, {"writer": 0}, arrays=arrays(0))
    real_read = cache_module._read_bytes
    swapped = []

    def read_then_replace(name, dir_fd):
        payload = real_read(name, dir_fd)
        if not swapped and name == (cache_module.META if when == "after meta.json" else cache_module.TENSORS):
            # "before the arrays": the tensors are read, the arrays (mapped after them) are the next entry's
            swapped.append(name)
            other = ArtifactCache(tmp_path)
            other.remove("stages", "k")
            other.save("stages", "k", {"w": torch.ones(64, 64)}, {"writer": 1}, arrays=arrays(1))
        return payload

    monkeypatch.setattr(cache_module, "_read_bytes", read_then_replace)
    tensors, meta = store.get("stages", "k")
    assert swapped and torch.all(tensors["w"] == meta["writer"])  # one entry's meta with its own tensors
    if arrays(0):
        assert np.all(tensors["rows"] == meta["writer"])
    assert lines == []
    monkeypatch.setattr(cache_module, "_read_bytes", real_read)
    tensors, meta = store.get("stages", "k")
    assert meta["writer"] == 1 and torch.all(tensors["w"] == 1)


def test_a_damaged_entry_replaced_before_its_clean_up_leaves_the_new_one_in_place(tmp_path):
    from unlearn.cache import DamagedEntry

    store, lines = _store(tmp_path)
    store.save("stages", "k", {"w": torch.zeros(8)}, {"writer": 0})
    _truncate(store.entry("stages", "k") / "tensors.pt")
    with pytest.raises(DamagedEntry) as damaged:
        store.read("stages", "k")
    store.remove("stages", "k")
    store.save("stages", "k", {"w": torch.ones(8)}, {"writer": 1})  # another process rebuilt it meanwhile
    store.discard_damaged("stages", "k", damaged.value)
    assert lines == [] and store.get("stages", "k")[1]["writer"] == 1
    # the same guard at the removal itself (the key rebuilt between the check and the rename): put back
    assert store.remove("stages", "k", only=damaged.value.folder_id) is False
    assert store.get("stages", "k")[1]["writer"] == 1


def test_verify_of_an_entry_removed_meanwhile_is_absence_not_damage(tmp_path):
    from unlearn.cache import file_digest

    store, lines = _store(tmp_path)
    store.save("refs", "k", {}, {}, arrays={"x": torch.zeros(4, 4).numpy()})
    hashed = []

    def remove_then_hash(jobs):
        store.remove("refs", "k")  # another process purges it while this one hashes
        hashed.extend(jobs)
        return [file_digest(*job) for job in jobs]

    with pytest.raises(FileNotFoundError):
        store.verify("refs", "k", remove_then_hash)
    assert hashed and lines == []


def test_a_damaged_cached_stage_is_retrained_to_the_same_weights(tmp_path, log_lines):
    from unlearn.config import load_config
    from unlearn.pipeline import load_data
    from unlearn.stages import prepare_stages

    config = load_config("digits-ae", [f"cache_dir={tmp_path}", "stages.epochs=1", "stages.attack_epochs=1", "device=cpu"])
    data = load_data(config)
    only = ("original", "retrain")  # the attack stage adds nothing here but training time
    first = prepare_stages(config, data, torch.device("cpu"), only=only)
    folder = config.resolved_cache_dir() / "stages" / first["original"].key
    _truncate(folder / "tensors.pt")
    _truncate(config.resolved_cache_dir() / "stages" / first["retrain"].key / "meta.json")
    warnings = log_lines("unlearn.cache", logging.WARNING)  # whatever an earlier test did to logging's handlers
    again = prepare_stages(config, load_data(config), torch.device("cpu"), only=only)
    damaged = [line for line in warnings if "damaged entry" in line]
    assert len(damaged) == 2 and any(str(folder) in line for line in damaged), warnings
    assert not again["original"].reused and not again["retrain"].reused
    for name in ("original", "retrain"):
        for key, value in first[name].model.state_dict().items():
            assert torch.equal(value, again[name].model.state_dict()[key]), (name, key)
    assert ArtifactCache(tmp_path).get("stages", first["original"].key) is not None


def test_a_save_whose_key_was_taken_and_removed_meanwhile_retries_and_a_real_failure_raises(tmp_path, monkeypatch):
    """The race the concurrent test above met once (in ~20 full runs): this writer's rename finds another writer's
    entry in place (ENOTEMPTY), and a remover takes that entry away before this writer checks for it. The key is free
    again: the save retries instead of failing. Any other rename error is a real failure."""
    import errno

    from unlearn import cache as cache_module

    store, _ = _store(tmp_path)
    real_rename, calls = os.rename, []

    def rename(src, dst, fail_with=errno.ENOTEMPTY):
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(fail_with, os.strerror(fail_with))
        return real_rename(src, dst)

    monkeypatch.setattr(cache_module.os, "rename", rename)
    store.save("stages", "k", {"w": torch.ones(1)}, {})
    assert len(calls) == 2 and store.get("stages", "k") is not None
    calls.clear()
    monkeypatch.setattr(cache_module.os, "rename", lambda src, dst: rename(src, dst, errno.EACCES))
    with pytest.raises(PermissionError):
        store.save("stages", "other", {"w": torch.ones(1)}, {})
    assert not store.has("stages", "other") and [p.name for p in (tmp_path / "stages").iterdir()] == ["k"]


def test_a_sound_entry_that_does_not_load_is_raised_with_its_path_and_kept(tmp_path, monkeypatch):
    """Damage is a checksum mismatch. An entry whose bytes match but which this torch cannot load (another version
    wrote it, say) is not damage: it is raised with its path, and kept (deleting it would retrain it on every run)."""
    store, lines = _store(tmp_path)
    store.save("stages", "k", {"w": torch.ones(3)}, {"stage": "x"})

    def unreadable(*args, **kwargs):
        raise RuntimeError("unsupported format version")

    monkeypatch.setattr(torch, "load", unreadable)
    with pytest.raises(RuntimeError, match=f"cache entry {store.entry('stages', 'k')} matches its checksum but does not load"):
        store.get("stages", "k")
    assert store.has("stages", "k") and lines == []
