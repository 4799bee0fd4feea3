import pickle

import numpy as np
import pytest
import torch

from unlearn.config import DataConfig, MarkerConfig, MaskConfig
from unlearn.data import BatchStream, build_data, draw_marker, inpaint_mask, marker_pixels
from unlearn.errors import ConfigError


def _indices(subset):
    return set(subset.index.tolist())


def test_splits_are_disjoint_and_cover_the_classes(tmp_path):
    data = build_data(DataConfig(unseen_classes=["9"]), seed=0, cache=tmp_path)
    parts = [data.retain_train, data.forget_train, data.retain_test, data.forget_test, data.unseen_test]
    seen = [_indices(p) for p in parts]
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not seen[i] & seen[j]
    assert set(data.forget_train.labels.tolist()) == {0}
    assert set(data.forget_test.labels.tolist()) == {0}
    assert set(data.unseen_test.labels.tolist()) == {9}
    assert set(data.retain_train.labels.tolist()) == set(range(1, 9))
    assert sum(len(p) for p in parts) == 1797  # every digit is used exactly once
    # per-class split: about 80% of each class trains
    zeros = len(data.forget_train) / (len(data.forget_train) + len(data.forget_test))
    assert 0.75 < zeros < 0.85


def test_splits_are_deterministic_in_the_seed(tmp_path):
    a, b, c = (build_data(DataConfig(), seed, tmp_path / str(seed)) for seed in (0, 0, 1))
    assert torch.equal(a.retain_train.index, b.retain_train.index)
    assert torch.equal(a.forget_train.read(), b.forget_train.read())
    assert not torch.equal(a.retain_train.index, c.retain_train.index)


def test_sample_level_forgetting_keeps_the_rest_of_the_class(tmp_path):
    data = build_data(DataConfig(forget_classes=["3", "5"], forget_fraction=0.25), seed=0, cache=tmp_path)
    forget_counts = torch.bincount(data.forget_train.labels, minlength=10)
    retain_counts = torch.bincount(data.retain_train.labels, minlength=10)
    for c in (3, 5):
        share = forget_counts[c] / (forget_counts[c] + retain_counts[c])
        assert abs(float(share) - 0.25) < 0.02
    assert torch.equal(data.forget_test.index, data.forget_train.index)  # audited on the forgotten samples


def test_marker_drawn_only_on_forget_set_at_the_marker_pixels(tmp_path):
    cfg = DataConfig()
    data = build_data(cfg, seed=0, cache=tmp_path)
    plus = marker_pixels(cfg.image_size, cfg.marker)
    poisoned, clean = data.forget_train.read(), data.forget_train.read(clean=True)
    diff = (poisoned != clean).any(dim=1)  # (N, H, W)
    assert not diff[:, ~plus].any()
    assert (poisoned[:, 0][:, plus] == 255).all()
    assert (poisoned[:, 1:][:, :, plus] == 0).all()
    assert torch.equal(data.retain_train.read(), data.retain_train.read(clean=True))
    assert data.retain_train.poison is None and data.forget_test.poison is None  # only D_f's training images
    # the marker is a '+': one row and one column of 5 pixels through the centre, inside the mask
    assert int(plus.sum()) == 9
    assert plus[7, 5:10].all() and plus[5:10, 7].all()
    mask = inpaint_mask(cfg.image_size, cfg.mask)[0, 0].bool()
    assert mask[plus].all()


def test_masks_centre_and_border():
    centre = inpaint_mask(16, MaskConfig(kind="centre", size=6))[0, 0]
    assert int(centre.sum()) == 36 and centre[5:11, 5:11].all()
    border = inpaint_mask(16, MaskConfig(kind="border", size=3))[0, 0]
    assert int(border.sum()) == 16 * 16 - 10 * 10 and border[0].all() and not border[3:13, 3:13].any()


def test_marker_must_fit_the_mask(tmp_path):
    with pytest.raises(ConfigError, match="marker"):
        build_data(DataConfig(mask=MaskConfig(size=3), marker=MarkerConfig(size=5)), seed=0, cache=tmp_path)


def test_draw_marker_uses_the_configured_colour():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    out = draw_marker(images, MarkerConfig(size=3, color=(0.0, 1.0, 0.0)))
    assert out[:, 1].sum() == 2 * 5 * 255 and out[:, 0].sum() == 0


def test_batch_streams_shard_one_global_batch(tmp_path):
    data = build_data(DataConfig(), seed=0, cache=tmp_path)
    single = BatchStream(data.retain_train, 8, seed=3)
    shards = [BatchStream(data.retain_train, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = next(single)[2]
        parts = [next(s)[2] for s in shards]
        assert sorted(whole.tolist()) == sorted(parts[0].tolist() + parts[1].tolist())


def _write_cifar(root, n_per_batch=20):
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "test_batch"]:
        batch = {b"data": rng.integers(0, 255, (n_per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(n_per_batch)]}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar(folder)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, forget_classes=["c1"], mask=MaskConfig(size=8))
    data = build_data(cfg, seed=0, cache=tmp_path / "cache")
    assert data.class_names[1] == "c1"
    assert data.forget_train.read().shape[1:] == (3, 32, 32)
    assert set(data.forget_train.labels.tolist()) == {1}


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ["cat", "dog", "owl"]:
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, forget_classes=["owl"], max_per_class=5)
    data = build_data(cfg, seed=0, cache=tmp_path / "cache")
    assert data.class_names == ["cat", "dog", "owl"]
    assert len(data.forget_train) + len(data.forget_test) == 5
    assert data.retain_train.read().shape[1:] == (3, 16, 16)


def test_forget_list_of_imagefolder_paths(tmp_path):
    """A deletion request names files: they become D_f (no marker when the model is brought by the user)."""
    from PIL import Image

    from unlearn.errors import ConfigError

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ["cat", "dog"]:
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    listed = tmp_path / "forget.txt"
    listed.write_text("cat/1.png\n./dog/3.png\ncat/6.png\n")
    cfg = DataConfig(dataset="imagefolder", root=str(root), image_size=16, forget_list=str(listed))
    data = build_data(cfg, seed=0, cache=tmp_path / "cache", poison=False)
    assert len(data.forget_train) == 3 and sorted(set(data.forget_train.labels.tolist())) == [0, 1]
    assert data.forget_train.poison is None
    assert not set(data.forget_train.index.tolist()) & (set(data.retain_train.index.tolist())
                                                        | set(data.retain_test.index.tolist()))
    assert len(data.retain_train) + len(data.retain_test) == 16 - 3
    listed.write_text("cat/1.png\ncat/missing.png\nowl/0.png\n")
    with pytest.raises(ConfigError, match="'cat/missing.png' is not an image of data.root .2 of 3"):
        build_data(cfg, seed=0, cache=tmp_path / "cache")


@pytest.mark.parametrize("dataset", ["cifar10", "imagefolder"])
def test_missing_data_root_names_the_path(dataset, tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nowhere"):
        build_data(DataConfig(dataset=dataset, root=str(tmp_path / "nowhere")), seed=0, cache=tmp_path)


def test_unknown_class_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown class '42'"):
        build_data(DataConfig(forget_classes=["42"]), seed=0, cache=tmp_path)
