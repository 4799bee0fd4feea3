"""Results you can repeat (issue 10): membership inference, unlearning seeds with their spread, honest cost."""

from __future__ import annotations

import json

import pytest
import torch


def test_membership_auc_separates_and_brackets():
    from unlearn.audit.mia import membership_auc

    gen = torch.Generator().manual_seed(0)
    low_error, high_error = torch.rand(200, generator=gen) * 0.1, 0.2 + torch.rand(200, generator=gen) * 0.1
    auc, lo, hi = membership_auc(low_error, high_error)
    assert auc == 1.0 and lo == pytest.approx(1.0)  # members fill their holes better: perfectly told apart
    same = torch.rand(400, generator=gen)
    auc, lo, hi = membership_auc(same[:200], same[200:])
    assert lo < auc < hi and lo < 0.5 < hi  # same distribution: chance, inside its interval
    assert membership_auc(high_error, low_error)[0] == 0.0


def test_membership_sets_are_held_out_images_of_the_forget_classes(prepared):
    data = prepared.data
    members, nonmembers = prepared.auditor.mia_members, prepared.auditor.mia_nonmembers
    assert len(members) == len(data.forget_train) and torch.equal(members.read(), data.forget_train.read(clean=True))  # no '+'
    assert len(nonmembers) == len(data.forget_test)
    assert set(nonmembers.labels.tolist()) == set(data.forget_train.labels.tolist())


def test_digits_membership_inference_tells_the_original_from_retrain(method_metrics):
    """The original model saw D_f, retrain never did. Measured: original 0.64 [0.53, 0.76], retrain 0.47 [0.37, 0.57]."""
    original, retrain = method_metrics["original"], method_metrics["retrain"]
    assert original["mia_auc"] >= retrain["mia_auc"] + 0.05
    assert abs(retrain["mia_auc"] - 0.5) <= 0.1
    assert retrain["mia_gap_vs_retrain"] == pytest.approx(0.0, abs=1e-6)
    for name in ("realistic", "finetune", "original"):
        m = method_metrics[name]
        assert m["mia_auc_ci_low"] <= m["mia_auc"] <= m["mia_auc_ci_high"]
        assert m["mia_gap_vs_retrain"] == pytest.approx(abs(m["mia_auc"] - retrain["mia_auc"]))


def test_cost_ratio_only_when_timed_side_by_side(method_metrics, prepared):
    """The session's stages were trained in this process or reused from its cache: the ratio follows that."""
    realistic = method_metrics["realistic"]
    assert realistic["sample_ratio"] == pytest.approx(realistic["unlearn_samples"] / realistic["retrain_samples"])
    side_by_side = not prepared.stages["retrain"].reused
    assert realistic["cost_ratio_side_by_side"] == float(side_by_side)
    assert ("cost_ratio" in realistic) == side_by_side


def _snapshot(root):
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_seeds_give_means_with_std_and_retrain_no_stage(private_cache, capsys, tmp_path):
    from unlearn.cli import main

    common = ["--set", f"cache_dir={private_cache.cache_dir}", "--set", "unlearn.ft_steps=40"]  # short: seeds are under test
    main(["run", "--method", "finetune", "--json", *common])  # warms the calibration of this fine-tuning budget
    capsys.readouterr()
    before = _snapshot(private_cache.resolved_cache_dir())
    out = tmp_path / "seeds"
    code = main(["run", "--method", "realistic", "--seeds", "3", "--json", "--out", str(out), *common])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["seeds"] == 3
    for name in ("forget_marker_strength", "retain_mse", "forget_ood_distance", "mia_auc", "ga_param_distance"):
        assert f"{name}_std" in summary and summary[f"{name}_std"] > 0, name  # batch order differs per seed
    assert "ood_delta_std" not in summary  # calibration is shared, not seeded
    assert _snapshot(private_cache.resolved_cache_dir()) == before  # no stage, reference or calibration rewritten
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["unlearn_seed"] in (0.0, 1.0, 2.0) and "unlearn_seed_std" not in summary
    from unlearn.config import load_config

    assert load_config(str(out / "config.yaml")).unlearn.seed == int(saved["unlearn_seed"])
    assert "Spread over 3 unlearning seeds" in (out / "certificate.md").read_text()
    # one seed alone reproduces the saved run (seeded on CPU)
    code = main(["run", "--method", "realistic", "--json", *common, "--set", f"unlearn.seed={int(saved['unlearn_seed'])}"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["forget_marker_strength"] == saved["forget_marker_strength"]
    assert again["retain_mse"] == saved["retain_mse"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["--method", "realistic", "--seeds", "0"], "--seeds must be at least 1"),
    (["--method", "retrain", "--seeds", "2"], "reference model"),
])
def test_bad_seeds_exit_2(argv, needle, capsys):
    from unlearn.cli import main

    assert main(["run", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_gradient_ascent_runs_in_fp32_under_bf16(prepared, monkeypatch):
    """bf16 autocast covers fine-tuning only: GA follows a gradient of ~0.01 at a minimum (issue 10)."""
    import dataclasses

    import unlearn.methods.loop as loop
    from unlearn.pipeline import unlearn

    used = []
    real = loop.autocast

    def recording(device, precision):
        used.append(precision)
        return real(device, precision)

    monkeypatch.setattr(loop, "autocast", recording)
    bf16 = dataclasses.replace(prepared, config=prepared.config.model_copy(update={"precision": "bf16"}))
    settings = prepared.config.unlearn.model_copy(update={"ga_steps": 3, "ft_steps": 2})
    unlearn(bf16, "realistic", settings)
    assert used == ["fp32"] * 3 + ["bf16"] * 2


def test_vectorised_bootstrap_auc_equals_scikit_learns_with_ties():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from unlearn.audit.mia import ranked_auc

    rows = np.random.default_rng(0).integers(0, 5, size=(50, 30)).astype(float)  # many ties
    labels = np.r_[np.ones(12), np.zeros(18)]
    expected = [roc_auc_score(labels, row) for row in rows]
    assert ranked_auc(rows, 12) == pytest.approx(expected, abs=1e-12)
