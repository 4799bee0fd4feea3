import os

import pytest

from unlearn import stages as stages_module
from unlearn.pipeline import prepare


def _snapshot(root):
    return {p: os.stat(p).st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_second_prepare_trains_nothing_and_touches_no_file(prepared, private_cache, monkeypatch):
    root = private_cache.resolved_cache_dir()
    before = _snapshot(root)
    assert before, "the session fixture should have filled the cache"

    def fail(*_args, **_kwargs):
        raise AssertionError("a cached stage was retrained")

    for name in ("_train_original", "_train_attack", "train_retrain"):
        monkeypatch.setattr(stages_module, name, fail)
    again = prepare(private_cache)
    assert all(stage.reused for stage in again.stages.values())
    assert {k: s.key for k, s in again.stages.items()} == {k: s.key for k, s in prepared.stages.items()}
    assert _snapshot(root) == before


def test_the_retrain_stage_never_sees_the_forget_set(default_config):
    """The retrain references (retrain, and retrain2 of another seed: the forget gap's yardstick) are trained on D_r
    alone: their cache entries carry no forget digest (so `unlearn purge --weights` keeps them, while it removes the
    original and attack stages), and each processed exactly stages.epochs x ceil(|D_r| / batch) full batches. Runs
    first in the worker without the Ray tests (conftest), so the session's retrain stages train there while the
    other worker trains the original and attack stages."""
    import math

    from conftest import train_session_stages

    from unlearn.cache import ArtifactCache
    from unlearn.pipeline import load_data
    from unlearn.stages import stage_keys

    train_session_stages(default_config, ("retrain", "retrain2"))
    cache, keys = ArtifactCache(default_config.resolved_cache_dir()), stage_keys(default_config)
    stages, retain = default_config.stages, len(load_data(default_config).retain_train)
    weights = {}
    for name in ("retrain", "retrain2"):
        tensors, meta = cache.get("stages", keys[name])
        assert meta["stage"] == name and "forget_digest" not in meta and meta["trained_on"] == "D_r"
        assert meta["samples"] == stages.epochs * math.ceil(retain / stages.batch_size) * stages.batch_size
        weights[name] = tensors
    assert any(not (weights["retrain"][k] == weights["retrain2"][k]).all() for k in weights["retrain"])  # another seed


def test_stage_keys_follow_their_inputs(default_config):
    from unlearn.config import with_overrides
    from unlearn.stages import stage_keys

    base = stage_keys(default_config)
    attack_changed = stage_keys(with_overrides(default_config, {"stages.attack_lr": 5e-4}))
    assert attack_changed["original"] == base["original"] and attack_changed["retrain"] == base["retrain"]
    assert attack_changed["attack"] != base["attack"]
    unlearn_changed = stage_keys(with_overrides(default_config, {"unlearn.ga_steps": 3}))
    assert unlearn_changed == base


def test_checkpoints_load_with_weights_only(prepared, default_config):
    import torch

    folder = default_config.resolved_cache_dir() / "stages" / prepared.stages["attack"].key
    state = torch.load(folder / "tensors.pt", weights_only=True)
    assert set(state) == set(prepared.stages["attack"].model.state_dict())


def test_invalid_run_leaves_cache_untouched(private_cache, tmp_path, capsys):
    """Errors found before any work write nothing: a bad value (config validation), and a missing theta0, which
    prepare() finds only after parsing the config, on an empty cache where the data split would be the first
    thing written."""
    from unlearn.cli import main

    root = private_cache.resolved_cache_dir()
    before = _snapshot(root)
    code = main(["run", "--method", "realistic", "--set", f"cache_dir={root}", "--set", "unlearn.ga_lr=-1"])
    assert code == 2
    assert _snapshot(root) == before
    empty = tmp_path / "cache"
    code = main(["run", "--method", "realistic", "--set", f"cache_dir={empty}", "--set", f"stages.theta0={tmp_path}/none.pt",
                 "--set", "audit.retrain=false"])
    assert code == 2 and "none.pt not found" in capsys.readouterr().err
    assert not empty.exists() or not any(p.is_file() for p in empty.rglob("*"))


def test_corrupt_pretrained_path_is_a_config_error(tmp_path):
    from unlearn.config import load_config
    from unlearn.errors import ConfigError

    cfg = load_config("digits-ae", [f"cache_dir={tmp_path}", f"model.pretrained={tmp_path / 'missing.pt'}"])
    with pytest.raises(ConfigError, match="missing.pt"):
        prepare(cfg)


def test_purge_with_weights_removes_the_stages_trained_on_the_forget_set_and_keeps_retrain(private_cache, prepared, capsys):
    """`unlearn purge --weights` on the session's stages: original and attack (trained on D_f) go, retrain and
    retrain2 (D_r alone) stay; without --weights every stage stays and is listed as still holding D_f."""
    from unlearn.cache import ArtifactCache
    from unlearn.cli import main
    from unlearn.stages import stage_keys

    digest = prepared.data.forget_digest(private_cache.data.dataset)
    cache, keys = ArtifactCache(private_cache.cache_dir), stage_keys(private_cache)
    stages = {name: keys[name] for name in ("original", "attack", "retrain", "retrain2")}

    def present():
        return {name for name, key in stages.items() if cache.entry("stages", key).is_dir()}

    assert present() == set(stages)
    assert main(["purge", "--forget-digest", digest, "--cache-dir", str(private_cache.cache_dir)]) == 0
    printed = capsys.readouterr().out
    assert present() == set(stages) and printed.count("weights trained on D_f; remove with --weights") >= 2
    assert main(["purge", "--forget-digest", digest, "--cache-dir", str(private_cache.cache_dir), "--weights"]) == 0
    assert present() == {"retrain", "retrain2"}
