"""The image store (issue 24): decoded once, in parallel, held once, read row by row; bad files named; no half store."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

from unlearn.cache import ArtifactCache
from unlearn.config import DataConfig, MarkerConfig, MaskConfig
from unlearn.data import BatchStream, build_data
from unlearn.data.sources import list_images
from unlearn.data.store import KIND, ImageStore, build_store, open_store, process_pool_map, verify_store
from unlearn.errors import ConfigError

SIZE = 16


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A small ImageFolder of real-photo JPEGs (patches of scikit-learn's sample photographs), 4 classes x 12."""
    from analysis.imagefolder import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("photos") / "root", classes=4, per_class=12, size=40, workers=1)


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), image_size=SIZE, forget_classes=["0"],
                      mask=MaskConfig(size=6), marker=MarkerConfig(size=5), **kw)


def _leftovers(cache_root) -> list[str]:
    """Temporary or half-written folders anywhere in a cache (dot-named: unlearn/cache.py)."""
    return [str(p) for p in cache_root.rglob(".*")]


def test_the_store_holds_torchvisions_pixels_once_and_reads_only_the_rows_asked(photos, tmp_path):
    """Each image decoded as torchvision's `center_crop(resize(img, s), s)` would (an independent oracle), held once
    (the store's files are the pixels plus a few bytes an image), read back row by row in the order asked."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    cache = ArtifactCache(tmp_path)
    data = build_data(_cfg(photos), 0, cache)
    store = data.store
    paths = store.paths()
    assert len(store) == 48 and len(paths) == 48
    for position in (0, 17, 47):
        with Image.open(photos / paths[position]) as img:
            expected = TF.pil_to_tensor(TF.center_crop(TF.resize(img.convert("RGB"), SIZE), SIZE))
        assert torch.equal(store.read([position])[0], expected)
    entry = cache.entry(KIND, store.key)
    pixel_bytes = 48 * 3 * SIZE * SIZE
    files = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and p.name != "meta.json")
    assert pixel_bytes <= files <= pixel_bytes + 48 * (8 + 40)  # labels (int64) and paths beside the pixels
    before = store.images_read
    rows = store.read([5, 3, 5])
    assert store.images_read - before == 3 and torch.equal(rows[0], rows[2])
    assert torch.equal(rows[1], store.read([3])[0])


def test_images_already_at_the_store_size_are_stored_as_decoded_and_an_earlier_layouts_store_is_named(photos, tmp_path,
                                                                                                      log_lines):
    """No resize and no crop (the files are 40 px, the store too): still torchvision's pixels. A store written by an
    earlier layout (an older STORE_SCHEMA) is never read again: building a store names it, with its size, for removal;
    one of a later layout (a newer version on a shared cache) is neither read nor named."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    stale = tmp_path / KIND / "imagefolder-16px-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text(json.dumps({"schema": 1}))
    (stale / "shard-00000.bin").write_bytes(bytes(2**20))
    later = tmp_path / KIND / "imagefolder-16px-fedcba9876543210"
    later.mkdir()
    (later / "meta.json").write_text(json.dumps({"schema": 99}))
    lines = log_lines("unlearn.data.store")
    cfg = DataConfig(dataset="imagefolder", root=str(photos), image_size=40, forget_classes=["0"],
                     mask=MaskConfig(size=6), marker=MarkerConfig(size=5))
    store = build_data(cfg, 0, ArtifactCache(tmp_path)).store
    for position in (0, 29):
        with Image.open(photos / store.paths()[position]) as img:
            expected = TF.pil_to_tensor(TF.center_crop(TF.resize(img.convert("RGB"), 40), 40))
        assert torch.equal(store.read([position])[0], expected)
    assert store.read([0, 29]).is_contiguous() and store.image_shape == (3, 40, 40)
    assert [line for line in lines if str(stale) in line and "earlier layout" in line and "0.00 GiB" in line]
    assert not [line for line in lines if str(later) in line]
    assert stale.is_dir() and later.is_dir()  # named, not removed: another version may still be reading it


def test_a_split_entry_is_index_lists_and_two_setups_share_one_store(photos, tmp_path):
    from unlearn.config import load_config
    from unlearn.pipeline import load_data

    common = [f"cache_dir={tmp_path}", "data.dataset=imagefolder", f"data.root={photos}", f"data.image_size={SIZE}"]
    a = load_data(load_config("digits-ae", [*common, "data.forget_classes=[0]"]))
    b = load_data(load_config("digits-ae", [*common, "data.forget_classes=[1]"]))
    assert a.store.key == b.store.key and len(list((tmp_path / KIND).iterdir())) == 1
    for split in (tmp_path / "data").iterdir():
        assert (split / "tensors.pt").stat().st_size < 48 * 8 * 4 + 4096  # index lists (and a mask), no pixels
    digests = {p.name for p in (tmp_path / KIND / a.store.key / "forget-digests").iterdir()}
    assert digests == {a.forget_digest("imagefolder"), b.forget_digest("imagefolder")}  # purge finds the store


def test_parallel_preparation_writes_the_same_store_as_one_process(photos, tmp_path):
    listing = list_images(_cfg(photos))
    inline, pooled = ArtifactCache(tmp_path / "one"), ArtifactCache(tmp_path / "pool")
    key = build_store(inline, listing, SIZE, map_shards=process_pool_map(1), workers=1)
    assert build_store(pooled, listing, SIZE, map_shards=process_pool_map(2), workers=2) == key  # content-keyed
    one, two = ImageStore.open(inline, key), ImageStore.open(pooled, key)
    assert len(two.shards) > 1  # really split into shards for the two workers
    assert torch.equal(one.read(np.arange(48)), two.read(np.arange(48)))
    assert _leftovers(tmp_path) == []


def test_each_rank_reads_only_its_shard_of_every_global_batch(photos, tmp_path):
    data = build_data(_cfg(photos), 0, tmp_path)
    single = BatchStream(data.retain_train, 8, seed=3)
    ranks = [BatchStream(data.retain_train, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = next(single)[0]
        parts = [next(s)[0] for s in ranks]
        assert torch.equal(torch.cat([parts[0], parts[1]]).sort(0).values, whole.sort(0).values)
    assert single.images_read == 40 and [s.images_read for s in ranks] == [20, 20]


def test_the_marker_is_drawn_per_batch_and_never_stored(tmp_path):
    data = build_data(DataConfig(), 0, tmp_path)
    stream = BatchStream(data.forget_train, 16, seed=0)
    images, clean, _ = next(stream)
    plus = data.marker
    assert bool((images[:, 0][:, plus] == 1.0).all()) and not torch.equal(images, clean)
    assert torch.equal(images[:, :, ~plus], clean[:, :, ~plus])
    stored = data.store.read(data.forget_train.index[:16].numpy())
    assert not bool((stored[:, 0][:, plus] == 255).all())  # the store holds the clean digits


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_an_unreadable_image_is_named_before_anything_is_stored(photos, tmp_path, damage):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(photos, root)
    bad = root / "class0002" / "img00003.jpg"
    data = bad.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    else:
        bad.write_text("not a picture\n")
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"unreadable image .*class0002/img00003\.jpg.*skip_unreadable") as err:
        build_data(_cfg(root), 0, cache)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / KIND).exists() or not any((tmp_path / "cache" / KIND).iterdir())
    # with data.skip_unreadable the file is left out and counted
    data = build_data(_cfg(root, skip_unreadable=True), 0, cache)
    assert len(data.store) == 47 and data.store.skipped_count == 1
    assert "class0002/img00003.jpg" not in data.store.paths()
    assert "img00003.jpg" in data.store.meta["skipped"][0]


def test_grayscale_rgba_cmyk_and_palette_images_are_converted(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for mode in ("L", "RGBA", "CMYK", "P", "I;16"):
            img = Image.fromarray(rgb).convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
            if mode == "P":
                img.info["transparency"] = 0
            img.save(tmp_path / cls / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=SIZE, forget_classes=["a"],
                     mask=MaskConfig(size=6), marker=MarkerConfig(size=5))
    store = build_data(cfg, 0, tmp_path / "cache").store
    assert len(store) == 10 and store.read(np.arange(10)).shape == (10, 3, SIZE, SIZE)
    gray = store.read([store.paths().index("a/I16.png")])[0]
    assert int(gray.max()) > 200  # 16-bit grayscale scaled to 8 bits, not clipped to white


def test_an_empty_class_folder_is_named(photos, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(photos, root)
    (root / "class9999").mkdir()
    with pytest.raises(ConfigError, match="class folder .*class9999 holds no image"):
        build_data(_cfg(root), 0, tmp_path / "cache")


def test_a_disk_that_fills_while_preparing_leaves_no_half_store(photos, tmp_path, monkeypatch):
    """The third write of the shard fails with ENOSPC: one line naming the cache, no store entry, no temporary
    folder; the next run (disk free again) builds the store in full."""
    import unlearn.cache as cache_module

    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(cache_module.ArrayWriter, "CHUNK", 4096 * 2)  # several writes for 48 small images
    monkeypatch.setattr(cache_module, "_write", full_disk)
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(ConfigError, match=f"no space left on the device of {tmp_path / 'cache'}"):
        build_data(_cfg(photos), 0, cache)
    assert len(calls) >= 3 and _leftovers(tmp_path / "cache") == []
    assert not any((tmp_path / "cache" / KIND).iterdir())
    monkeypatch.setattr(cache_module, "_write", real_write)
    assert len(build_data(_cfg(photos), 0, cache).store) == 48


def test_a_damaged_store_is_reported_removed_and_rebuilt(photos, tmp_path):
    """A truncated shard (a half copy) is caught at open; a flipped byte (same size) by the full verification
    `unlearn prepare` runs; either way the store is removed and built again, and the pixels come back the same."""
    from unlearn.cache import DamagedEntry
    from unlearn.config import load_config
    from unlearn.pipeline import load_data

    lines: list[str] = []
    config = load_config("digits-ae", [f"cache_dir={tmp_path}", "data.dataset=imagefolder", f"data.root={photos}",
                                       f"data.image_size={SIZE}", "data.forget_classes=[0]"])
    first = load_data(config)
    pixels = first.retain_train.read()
    shard = next((tmp_path / KIND / first.store.key).glob("shard-*.bin"))
    cache = ArtifactCache(tmp_path, warn=lines.append)
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 2]))
    assert open_store(cache, first.store.key) is None and "damaged" in lines[0] and "truncated" in lines[0]
    again = load_data(config)  # the split is still cached; its store is rebuilt
    assert torch.equal(again.retain_train.read(), pixels)
    shard = next((tmp_path / KIND / again.store.key).glob("shard-*.bin"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert open_store(cache, again.store.key) is not None  # the size is right: only hashing finds it
    with pytest.raises(DamagedEntry, match="checksum"):
        verify_store(cache, again.store.key)
    verified = load_data(config, verify=True)
    assert torch.equal(verified.retain_train.read(), pixels)
    verify_store(cache, verified.store.key)


def test_unlearn_prepare_data_only_reports_the_store_and_bad_input_exits_2(photos, tmp_path, capsys):
    from unlearn.cli import main

    args = ["prepare", "--data-only", "--json", "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "data.dataset=imagefolder",
            "--set", f"data.root={photos}", "--set", f"data.image_size={SIZE}", "--set", "data.forget_classes=[0]"]
    assert main(args) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["data_images"] == 48 and built["data_store_built"] == 1.0 and built["data_prepare_images_per_second"] > 0
    assert built["data_store_bytes"] == 48 * 3 * SIZE * SIZE
    from unlearn.audit.catalogue import METRICS

    assert {k for k, v in built.items() if isinstance(v, float)} <= set(METRICS)  # every figure has its catalogue row
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["data_store_built"] == 0.0 and again["store"] == built["store"]  # reused (and verified)
    (photos.parent / "broken").mkdir(exist_ok=True)
    assert main([*args, "--set", f"data.root={photos.parent / 'broken'}"]) == 2
    assert "no class folders in" in capsys.readouterr().err



def _slow_shard_or_bad_file(task: tuple[int, str]) -> int:
    """A shard task of the pool test below (module level: the pool's workers import it): the first fails at once,
    the others take a while, then write their file."""
    import time
    from pathlib import Path

    index, folder = task
    if index == 0:
        raise ConfigError("unreadable image class0000/img00000.jpg")
    time.sleep(0.5)
    (Path(folder) / f"shard-{index:05d}").write_text("written")
    return index


def test_a_bad_file_stops_the_pools_pending_shards(tmp_path):
    """The process pool reports an unreadable file without decoding the shards still waiting (at ImageNet's scale,
    every other shard of the set): of 16 shard tasks whose first fails at once, only those already started or queued
    for a worker finish (Executor.map cancels the rest); all 15 would if the pool ran every task to the end."""
    with pytest.raises(ConfigError, match="unreadable image"):
        process_pool_map(2)(_slow_shard_or_bad_file, [(i, str(tmp_path)) for i in range(16)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) < 8, written  # measured: 4-5 (the other worker's task and the ones queued for the workers)
