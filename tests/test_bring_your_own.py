"""A real deletion request (issue 11): unlearn a model the user brings, forget listed images, purge D_f."""

from __future__ import annotations

import json

import pytest


def _main(capsys, *argv: str) -> tuple[int, list[str], dict | None]:
    from unlearn.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, captured.err.strip().splitlines(), (json.loads(lines[-1]) if "--json" in argv and code == 0 else None)


@pytest.fixture(scope="module")
def byo(prepared, default_config, tmp_path_factory):
    """`unlearn run --method original --out O`, then realistic on theta0 = O with 30 listed training images."""
    from unlearn.cli import main

    tmp = tmp_path_factory.mktemp("byo")
    cache = tmp / "cache"  # its own cache: purge must not touch the session's
    original = tmp / "O"
    assert main(["run", "--method", "original", "--out", str(original), "--set", f"cache_dir={default_config.cache_dir}"]) == 0
    # 30 images the original was trained on (digits 3 and 5; positions in the loaded data set)
    train = prepared.data.retain_train
    listed = [int(i) for c in (3, 5) for i in train.index[train.labels == c][:15]]
    forget_list = tmp / "forget.txt"
    forget_list.write_text("\n".join(map(str, listed)) + "\n")
    out = tmp / "D"
    common = ["--set", f"cache_dir={cache}", "--set", f"stages.theta0={original}", "--set", f"data.forget_list={forget_list}",
              "--set", "audit.retrain=false", "--set", "unlearn.ft_steps=60"]
    assert main(["run", "--method", "realistic", "--out", str(out), "--json", *common]) == 0
    return tmp, original, out, listed, cache, common


def test_own_model_and_forget_list_give_a_certified_model_without_marker_figures(byo):
    tmp, original, out, listed, cache, common = byo
    metrics = json.loads((out / "metrics.json").read_text())
    assert not [k for k in metrics if k.startswith(("forget_marker", "audit_attack", "audit_null_strength", "audit_valid"))]
    for name in ("mia_auc", "mia_auc_ci_low", "mia_auc_ci_high", "forget_ood_distance", "forget_ood_rate", "ood_delta",
                 "retain_mse", "retain_fid", "feasible", "sample_ratio"):
        assert name in metrics, name
    assert not [k for k in metrics if k.endswith("_vs_retrain")]  # audit.retrain = false
    assert metrics["retrain_samples_estimated"] == 1.0 and "cost_ratio" not in metrics
    # the fallback delta: the null method (fine-tuning alone) falls short of it by the configured fraction
    assert metrics["ood_delta"] == pytest.approx(metrics["audit_null_ood_distance"] / 0.75)
    text = (out / "certificate.md").read_text()
    for needle in ("marker audit: not applicable", "the user's model", "forget.txt", "30 training images", "mia_auc",
                   "no retrain reference", "the model brought as theta0"):
        assert needle in text, needle
    assert "forget_gap" not in text.split("## Verdict")[1].split("## Audit")[0]  # no constraint without retrain


def test_own_model_is_re_audited_from_its_weights(byo, capsys):
    tmp, original, out, listed, cache, common = byo
    metrics = json.loads((out / "metrics.json").read_text())
    code, err, audited = _main(capsys, "audit", "--model", str(out), "--json")
    assert code == 0, err[-5:]
    for key in ("mia_auc", "forget_ood_distance", "retain_mse", "forget_fid", "feasible"):
        assert audited[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key


def test_the_forget_list_is_exactly_d_f(byo):
    from unlearn.config import load_config
    from unlearn.pipeline import load_data

    tmp, original, out, listed, cache, common = byo
    config = load_config(str(out / "config.yaml"))
    data = load_data(config)
    assert sorted(data.forget_train.index.tolist()) == sorted(listed)
    assert data.forget_train.poison is None  # the user's D_f carries no marker
    everywhere = set(data.retain_train.index.tolist()) | set(data.retain_test.index.tolist())
    assert not everywhere & set(listed)


def test_bad_deletion_requests_exit_2_and_write_nothing(byo, tmp_path, capsys):
    tmp, original, out, listed, cache, common = byo
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("3\n99999\n12\n")
    base = ["run", "--method", "realistic", "--out", str(tmp_path / "new"), "--set", f"cache_dir={cache}"]
    cases = [
        ([*base, "--set", f"data.forget_list={empty}"], "names no image"),
        ([*base, "--set", f"data.forget_list={unknown}"], "'99999' is not an index"),
        ([*base, "--set", f"data.forget_list={tmp_path / 'missing.txt'}"], "does not exist"),
        ([*base, "--set", f"stages.theta0={original}", "--set", f"model.pretrained={original}"], "both set"),
        ([*base, "--set", f"stages.theta0={tmp_path / 'nothing'}"], "not found"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, needle in cases:
        code, lines, _ = _main(capsys, *argv)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_purge_removes_every_cached_forget_image(byo, capsys):
    from unlearn.cache import ArtifactCache

    tmp, original, out, listed, cache, common = byo
    text = (out / "certificate.md").read_text()
    digest = text.split("forget-set digest (sha256 of the sorted sample ids): `")[1].split("`")[0]
    store = ArtifactCache(cache)
    kinds = ("stores", "data", "references", "calibration", "stages", "backbones")

    def holding(*names):  # entries that carry the digest (an image store: among the digests of its splits)
        return [(k, key) for k in names for key, meta in store.entries(k) if digest in store.forget_digests(k, key, meta or {})]

    tagged = holding(*kinds)
    assert {k for k, _ in tagged} >= {"stores", "data", "references", "calibration", "backbones"}
    code, err, _ = _main(capsys, "purge", "--forget-digest", digest, "--cache-dir", str(cache), "--model", str(out))
    assert code == 0, err[-5:]
    assert holding("stores", "data", "references", "calibration") == []  # the decoded pixels of D_f too
    assert [k for k, key in tagged if k == "backbones"] and store.entries("backbones")  # weights kept without --weights
    code, _, _ = _main(capsys, "purge", "--forget-digest", digest, "--cache-dir", str(cache), "--weights")
    assert code == 0
    assert not [key for key, meta in store.entries("backbones") if meta.get("forget_digest") == digest]
    certificate = (out / "certificate.md").read_text()
    assert "## Purge of D_f" in certificate and "Still holding D_f" in certificate
    code, lines, _ = _main(capsys, "purge", "--forget-digest", "abc", "--cache-dir", str(cache))
    assert code == 2 and "not a sha256" in lines[0]
