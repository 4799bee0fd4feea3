"""Data-parallel training on an ImageFolder (issue 24): the stages and a trial on two Ray Train workers, each rank
reading only its half of every global batch from the shared image store, matching the one-worker run to 1e-4."""

from __future__ import annotations

import pytest
import torch

from unlearn.config import load_config, with_overrides


@pytest.fixture(scope="module")
def photo_config(tmp_path_factory):
    from analysis.imagefolder import make_imagefolder

    tmp = tmp_path_factory.mktemp("dp")
    root = make_imagefolder(tmp / "photos", classes=4, per_class=16, size=40, workers=1)
    return load_config("digits-ae", [
        f"cache_dir={tmp / 'cache'}", "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
        "data.forget_classes=[0]", "model.width=8", "model.latent_channels=8", "stages.epochs=3", "stages.attack_epochs=3",
        "stages.batch_size=16", "audit.domain_epochs=2", "unlearn.batch_size=16", "unlearn.ga_steps=4",
        "unlearn.ft_steps=12", "unlearn.ood_check_every=2"])


def test_two_workers_train_the_stages_and_a_trial_each_reading_half_of_every_batch(ray_session, photo_config, tmp_path):
    from raytasks.distributed import run_data_parallel, train_stages_data_parallel
    from raytasks.trial_outcome import finish_trial
    from unlearn.pipeline import load_data, prepare, unlearn
    from unlearn.stages import prepare_stages

    config = photo_config
    load_data(config)  # the store and the split, as the sweep prepares them before any worker starts
    train_stages_data_parallel(config, 2, str(tmp_path / "ray"), "stages")
    # the same stages trained in one process, in another cache: the same steps, up to float summation order
    alone = with_overrides(config, {"cache_dir": str(tmp_path / "alone")})
    one = prepare_stages(alone, load_data(alone), torch.device("cpu"))
    two = prepare_stages(config, load_data(config), torch.device("cpu"))
    for name in ("original", "attack", "retrain"):
        assert two[name].reused and not one[name].reused and two[name].samples == one[name].samples
        for a, b in zip(one[name].model.parameters(), two[name].model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    double = run_data_parallel(config, "realistic", 2, str(tmp_path / "ray"), "trial", tmp_path / "artifacts")
    local = prepare(config)
    single, _ = finish_trial(local, unlearn(local, "realistic"), "realistic")
    samples = (config.unlearn.ga_steps + config.unlearn.ft_steps) * config.unlearn.batch_size
    assert double["unlearn_samples"] == single["unlearn_samples"] == samples
    assert single["unlearn_images_read_per_rank"] == samples
    assert double["unlearn_images_read_per_rank"] == samples / 2  # the busiest rank read its half, no more
    for key in ("ga_param_distance", "ga_loss_increase", "ga_grad_max", "retain_mse", "forget_mse", "forget_ood_distance",
                "forget_marker_strength", "forget_gap_vs_retrain", "mia_auc", "retain_fid"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


def test_the_sweeps_ray_tasks_decode_the_same_store_and_name_a_bad_file(ray_session, photo_config, tmp_path, monkeypatch):
    """The sweep decodes with one Ray task per shard (raytasks.preparation.ray_map_shards): the same store as one
    process, and an unreadable image is raised as the ConfigError naming it, not as a Ray task error."""
    import shutil

    import numpy as np

    import unlearn.data.store as store_module
    from raytasks.preparation import ray_map_shards
    from unlearn.cache import ArtifactCache
    from unlearn.data.sources import list_images
    from unlearn.errors import ConfigError

    monkeypatch.setattr(store_module, "POOL_FROM", 1)  # 64 images: parallel as a large set would be
    listing = list_images(photo_config.data)
    one, ray = ArtifactCache(tmp_path / "one"), ArtifactCache(tmp_path / "ray")
    key = store_module.build_store(one, listing, 16, map_shards=store_module.process_pool_map(1), workers=1)
    assert store_module.build_store(ray, listing, 16, map_shards=ray_map_shards, workers=4) == key
    a, b = store_module.ImageStore.open(one, key), store_module.ImageStore.open(ray, key)
    assert len(b.shards) > 1 and np.array_equal(a.read(np.arange(len(a))).numpy(), b.read(np.arange(len(b))).numpy())

    root = tmp_path / "photos"
    shutil.copytree(photo_config.data.root, root)
    (root / "class0001" / "img00002.jpg").write_bytes(b"not a jpeg")
    broken = with_overrides(photo_config, {"data.root": str(root)})
    with pytest.raises(ConfigError, match=r"unreadable image .*class0001/img00002\.jpg"):
        store_module.build_store(ArtifactCache(tmp_path / "broken"), list_images(broken.data), 16,
                                 map_shards=ray_map_shards, workers=4)
    assert not (tmp_path / "broken" / store_module.KIND).exists() or not any((tmp_path / "broken" / store_module.KIND).iterdir())



def test_a_failed_shard_task_stops_the_others_before_the_clean_up(ray_session, tmp_path):
    """When one shard task fails, ray_map_shards raises only once no other task runs (it waits for them): a shard
    written after the build's clean-up would leave a half store's files behind (seen once in the suite)."""
    import time

    from raytasks.preparation import ray_map_shards

    def shard_or_fail(task: tuple[int, str]) -> str:  # nested: Ray pickles it by value (workers lack this module)
        import time
        from pathlib import Path

        index, folder = task
        if index == 0:
            raise ValueError("unreadable image class0001/img00002.jpg")
        time.sleep(3)  # a slow shard: it writes its file after the failure
        (Path(folder) / f"shard-{index}").write_text("written")
        return folder

    with pytest.raises(ValueError, match="unreadable image"):
        ray_map_shards(shard_or_fail, [(i, str(tmp_path)) for i in range(3)])
    raised = time.time()
    time.sleep(4)  # past the slow tasks' writes, had they gone on
    late = [p.name for p in tmp_path.iterdir() if p.stat().st_mtime > raised]
    assert late == []
