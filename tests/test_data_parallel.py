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
    from raytasks.outcome import finish_trial
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
    local = prepare(config, log=lambda _: None)
    single, _ = finish_trial(local, unlearn(local, "realistic"), "realistic")
    samples = (config.unlearn.ga_steps + config.unlearn.ft_steps) * config.unlearn.batch_size
    assert double["unlearn_samples"] == single["unlearn_samples"] == samples
    assert single["unlearn_images_read_per_rank"] == samples
    assert double["unlearn_images_read_per_rank"] == samples / 2  # the busiest rank read its half, no more
    for key in ("ga_param_distance", "ga_loss_increase", "ga_grad_max", "retain_mse", "forget_mse", "forget_ood_distance",
                "forget_marker_strength", "forget_gap_vs_retrain", "mia_auc", "retain_fid"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
