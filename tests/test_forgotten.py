"""What "forgotten" means (issue 9): marker strength, forget fidelity, calibrated OOD threshold, collapse, an
audit that checks itself, and the one definition of a method's best trial."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import Replay

from unlearn.audit.evaluate import model_outputs
from unlearn.audit.marker import marker_score, marker_strength
from unlearn.audit.verdict import violations
from unlearn.config import load_config, with_overrides
from unlearn.models.base import I2IModel

# A realistic configuration that the default sweep's search space contains and that removes the marker on
# digits without collapsing the decoder (docs/audit.md).
TUNED = {"unlearn.ga_steps": 9, "unlearn.ga_lr": 0.1, "unlearn.ft_steps": 150, "unlearn.ft_lr": 0.01}


class FilledHole(I2IModel):
    """Wraps a model and paints the hole with a fixed fill: grey, red, or noise (seeded)."""

    def __init__(self, inner: I2IModel, fill: str) -> None:
        super().__init__()
        self.inner, self.fill = inner, fill

    def encoder_parameters(self):
        return self.inner.encoder_parameters()


    def encode(self, images, mask):
        return self.inner.encode(images, mask)

    def loss(self, images, mask, target):
        return self.inner.loss(images, mask, target)

    def generate(self, images, mask):
        n, _, h, w = images.shape
        if self.fill == "grey":
            return torch.full((n, 3, h, w), 0.5)
        if self.fill == "red":
            return torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(n, 3, h, w).clone()
        return torch.rand((n, 3, h, w), generator=torch.Generator().manual_seed(0))


def _forget_truth(prepared):
    """forget-test's clean and poisoned ground truth, float."""
    from unlearn.data import draw_marker, to_float

    clean = prepared.auditor.splits["forget"].read()
    return to_float(clean), to_float(draw_marker(clean, prepared.config.data.marker, prepared.config.data.mask))


def _forget_strength(prepared, outputs):
    clean, poisoned = _forget_truth(prepared)
    return marker_strength(outputs, clean, poisoned, prepared.data.marker, prepared.auditor.mask,
                           prepared.config.data.marker.color)


def test_strength_sees_a_faint_plus_that_the_rate_misses(prepared):
    a = prepared.auditor
    retrain = model_outputs(prepared.stages["retrain"].model, a.splits["forget"], a.mask, prepared.device, "fp32")
    clean, poisoned = _forget_truth(prepared)
    plus = prepared.data.marker
    faint = retrain.clone()
    faint[:, :, plus] = 0.9 * retrain[:, :, plus] + 0.1 * poisoned[:, :, plus]  # a '+' at 10% contrast
    figures = a.marker_figures(Replay(faint))  # through the audit's own stream, as a model that drew `faint`
    assert figures["forget_marker"] == 0.0
    assert 0.05 <= figures["forget_marker_strength"] <= 0.15
    assert a.marker_figures(prepared.stages["retrain"].model)["forget_marker_strength"] <= 0.05
    # the endpoints of the scale: the clean ground truth 0, the poisoned ground truth 1
    assert float(_forget_strength(prepared, clean).max()) == 0.0
    assert float(_forget_strength(prepared, poisoned).min()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fill", ["grey", "red", "noise"])
def test_fills_of_the_hole_have_no_strength_and_are_not_forgetting(prepared, fill):
    model = FilledHole(prepared.stages["attack"].model, fill)
    metrics = prepared.auditor.evaluate(model)
    assert metrics["forget_marker_strength"] <= 0.02
    # what makes them not count: far from what the retrained model draws there, so never feasible
    assert metrics["forget_gap_vs_retrain"] > metrics["max_forget_gap"]
    assert metrics["feasible"] == 0.0


def test_references_strength_gap_and_collapse(method_metrics):
    attack, retrain, original = method_metrics["attack"], method_metrics["retrain"], method_metrics["original"]
    assert attack["forget_marker_strength"] >= 0.8
    assert retrain["forget_marker_strength"] <= 0.05
    assert retrain["forget_gap_vs_retrain"] == pytest.approx(0.0, abs=1e-6)
    assert retrain["forget_fid_vs_retrain"] == pytest.approx(0.0, abs=1e-6)  # its own outputs: no distance
    assert original["forget_gap_vs_retrain"] == pytest.approx(1.0, abs=1e-6)
    assert attack["forget_gap_vs_retrain"] > 1.0  # the '+' it draws is not what retrain draws
    for name in ("original", "attack", "retrain", "realistic", "finetune"):
        assert method_metrics[name]["collapsed"] == 0.0, name
    lo, hi = attack["forget_marker_ci_low"], attack["forget_marker_ci_high"]
    assert lo <= attack["forget_marker"] <= hi and hi - lo > 0


def test_calibrated_delta_keeps_retrain_feasible_and_the_null_method_out(prepared, method_metrics):
    """delta is audit.ood_delta_fraction x the retrain model's Eq. 3 distance, recomputed here from the models'
    outputs on the Eq. 3 subset (mean over images of the RMS difference in the hole), not read from the audit."""
    c, a = prepared.auditor.calibration, prepared.auditor
    assert prepared.config.unlearn.ood_delta == "auto"
    hole = a.mask[0, 0].bool()
    theta0, retrained = (model_outputs(prepared.stages[name].model, a.ood_set, a.mask, prepared.device, "fp32")[:, :, hole]
                         for name in ("attack", "retrain"))
    distance = float((retrained - theta0).pow(2).mean(dim=(1, 2)).sqrt().mean())
    assert c["retrain_ood_distance"] == pytest.approx(distance, rel=1e-5)
    assert c["ood_delta"] == pytest.approx(prepared.config.audit.ood_delta_fraction * distance, rel=1e-5)
    retrain = method_metrics["retrain"]
    assert retrain["ood_delta"] == c["ood_delta"] and retrain["ood_reached"] == 1.0
    # the null method (finetune at the preset's budget) = the `finetune` method at the defaults
    finetune = method_metrics["finetune"]
    assert finetune["forget_ood_distance"] == pytest.approx(c["audit_null_ood_distance"], rel=1e-6)
    assert finetune["ood_reached"] == 0.0 and finetune["feasible"] == 0.0
    # the final model's distance decides, not GA's: realistic at the preset's defaults crosses delta during GA
    # (measured 0.70 against 0.255) and fine-tuning brings it back below (0.175): not reached
    realistic = method_metrics["realistic"]
    assert realistic["ga_ood_distance"] >= realistic["ood_delta"] > realistic["forget_ood_distance"]
    assert realistic["ood_reached"] == 0.0 and "ood" in violations(realistic, prepared.config)
    assert method_metrics["max_loss"]["ood_reached"] == 1.0  # GA alone ends beyond delta


def test_the_digits_audit_is_valid(prepared, method_metrics):
    c = prepared.auditor.calibration
    assert c["audit_valid"] == 1.0
    assert c["audit_null_strength"] >= 0.5 and c["audit_attack_strength"] >= 0.8
    assert method_metrics["finetune"]["forget_marker_strength"] == pytest.approx(c["audit_null_strength"], rel=1e-6)
    assert all(m["audit_valid"] == 1.0 for m in method_metrics.values())


def test_ga_distance_climbs_step_by_step(prepared):
    from unlearn.pipeline import unlearn

    result = unlearn(prepared, "realistic")
    curve = [d for _, d in result.curves["ga_ood_distance"]]
    delta = prepared.auditor.ood_delta
    assert len(curve) == prepared.config.unlearn.ga_steps  # checked at every step
    below = [d for d in curve if d < delta]
    assert len(below) >= 3, curve  # rises over at least 3 checks before it crosses delta
    assert all(b > a for a, b in zip(below, below[1:], strict=False)), curve
    # normalised steps: every step moves the parameters by exactly ga_lr (measured on the weights themselves), so
    # all together by at most T x ga_lr
    import copy

    from unlearn.data import BatchStream
    from unlearn.methods import METHODS
    from unlearn.methods.loop import StepContext, run_phases

    u = prepared.config.unlearn
    model = copy.deepcopy(prepared.stages["attack"].model)
    after = [[p.detach().clone() for p in model.parameters()]]
    ga = METHODS["realistic"].phases(u)[0]
    stream = BatchStream(prepared.data.forget_train, u.batch_size, seed=1)
    run_phases(model, [ga], {"forget": stream}, StepContext(model=model, mask=prepared.data.mask), u.clip_norm,
               on_step=lambda *_: after.append([p.detach().clone() for p in model.parameters()]))
    steps = [sum(float((b - a).pow(2).sum()) for a, b in zip(before, now, strict=True)) ** 0.5
             for before, now in zip(after, after[1:], strict=False)]
    assert len(steps) == u.ga_steps and steps == pytest.approx([u.ga_lr] * u.ga_steps, rel=1e-4)
    moved = result.history.phase("ga").param_distance
    assert moved[-1] <= u.ga_steps * u.ga_lr * (1 + 1e-4) and moved[-1] > 0.5 * u.ga_steps * u.ga_lr


def test_tuned_realistic_forgets_like_retrain_without_collapse(prepared, method_metrics):
    from unlearn.pipeline import audit_result, unlearn

    settings = with_overrides(prepared.config, TUNED).unlearn
    m = audit_result(prepared, unlearn(prepared, "realistic", settings))
    attack, retrain = method_metrics["attack"], method_metrics["retrain"]
    assert m["forget_marker_strength"] <= retrain["forget_marker_strength"] + 0.05
    assert m["retain_mse"] <= 1.25 * attack["retain_mse"]
    assert m["collapsed"] == 0.0 and m["ga_output_std_ratio"] >= prepared.config.audit.collapse_std_ratio
    assert m["feasible"] == 1.0


def test_ga_that_kills_the_decoder_is_collapsed_whatever_finetuning_does(prepared):
    from unlearn.pipeline import audit_result, unlearn

    # the old default: plain SGD at lr 5 saturates the sigmoid decoder in two steps
    settings = with_overrides(prepared.config, {"unlearn.ga_step": "sgd", "unlearn.ga_lr": 5.0, "unlearn.ga_steps": 20}).unlearn
    m = audit_result(prepared, unlearn(prepared, "realistic", settings))
    assert m["ga_output_std_ratio"] < prepared.config.audit.collapse_std_ratio
    assert m["retain_output_std_ratio"] > 0.5  # fine-tuning restored the outputs ...
    assert m["collapsed"] == 1.0 and m["feasible"] == 0.0  # ... and it still does not count


def test_a_method_best_is_never_a_hole_painter(prepared):
    """A trial that keeps retain quality but paints grey or red into the forget holes (what noisy_label does):
    its forget figures are audited for real, its retain figures are the retrain model's. It wins on strength, yet
    only the forget-gap rule stops it, and it is never a method's best."""
    from raytasks.trial_outcome import sanitise
    from unlearn.audit.best import best_per_method
    from unlearn.audit.verdict import violations

    objectives = prepared.config.sweep.objectives
    genuine = prepared.auditor.evaluate(prepared.stages["retrain"].model)
    rows = [{"method": "genuine", "trial_id": "retrain-like", **sanitise(genuine, objectives)}]
    for fill in ("grey", "red"):
        painted = prepared.auditor.evaluate(FilledHole(prepared.stages["attack"].model, fill))
        forget = {k: v for k, v in painted.items() if k.startswith("forget_")}
        row = prepared.auditor.verdict({**genuine, **forget})
        assert row["forget_marker_strength"] <= 0.02 and row["retain_degradation"] <= 0.0
        assert violations(row, prepared.config) == ["forget_gap"]
        rows.append({"method": "painter", "trial_id": fill, **sanitise(row, objectives)})
    frame = pd.DataFrame(rows)
    assert list(best_per_method(frame, objectives)["method"]) == ["genuine"]
    mixed = pd.concat([frame, frame[frame["method"] == "genuine"].assign(method="painter", trial_id="ok")])
    assert best_per_method(mixed, objectives).set_index("method").loc["painter", "trial_id"] == "ok"


def test_reference_cache_has_a_schema_version(prepared, private_cache, monkeypatch, log_lines):
    from unlearn.audit import evaluate

    assert prepared.auditor.key.startswith(f"refs-v{evaluate.REFERENCE_SCHEMA}-")
    monkeypatch.setattr(evaluate, "REFERENCE_SCHEMA", evaluate.REFERENCE_SCHEMA + 1)
    messages = log_lines("unlearn.audit.evaluate")
    stages = prepared.stages
    # a private copy of the cache without entries of the bumped schema (an earlier run of this test, on a kept
    # UNLEARN_TEST_CACHE, wrote one)
    import shutil

    for entry in (private_cache.resolved_cache_dir() / "references").glob(f"refs-v{evaluate.REFERENCE_SCHEMA}-*"):
        shutil.rmtree(entry)
    auditor = evaluate.Auditor(private_cache, prepared.data, {k: s.model for k, s in stages.items()},
                               {k: s.key for k, s in stages.items()}, prepared.device)
    assert "reference features: computed" in messages and auditor.key != prepared.auditor.key


def test_marker_score_is_linear_and_strength_floors_noise():
    torch.manual_seed(0)
    marker = torch.zeros(8, 8, dtype=torch.bool)
    marker[4, 2:7] = True
    marker[2:7, 4] = True
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:8, 1:8] = 1
    clean = torch.full((4, 3, 8, 8), 0.3)
    poisoned = clean.clone()
    poisoned[:, :, marker] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    noise = torch.rand(4, 3, 8, 8)
    assert float(marker_strength(noise, clean, poisoned, marker, mask, (1, 0, 0)).mean()) <= 0.02
    half = 0.5 * clean + 0.5 * poisoned
    assert marker_strength(half, clean, poisoned, marker, mask, (1, 0, 0)) == pytest.approx(torch.full((4,), 0.5), abs=1e-5)
    score = marker_score(half, marker, mask, (1, 0, 0))
    assert score == pytest.approx(0.5 * marker_score(poisoned, marker, mask, (1, 0, 0)), abs=1e-5)


def test_border_marker_is_drawn_where_the_frame_hides_it(tmp_path):
    from unlearn.data import build_data

    cfg = load_config("digits-ae", ["data.mask.kind=border", "data.mask.size=3", "data.marker.size=3"]).data
    data = build_data(cfg, 0, tmp_path)
    assert bool(data.mask[0, 0][data.marker].all())  # every '+' pixel is hidden from the model
    changed = (data.forget_train.read() != data.forget_train.read(clean=True)).any(1).any(0)
    assert bool(changed[data.marker].any()) and not bool(changed[~data.marker].any())


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("unlearn.ood_delta=0", "ood_delta must be > 0"),
        ("unlearn.ood_delta=-0.1", "ood_delta must be > 0"),
        ("stages.attack_strengthen_rounds=-1", "attack_strengthen_rounds"),
        ("sweep.objectives=[forget_marker_strength,cheese]", "unknown objective 'cheese'"),
    ],
)
def test_bad_calibration_input_exits_2(override, needle, capsys, tmp_path):
    from unlearn.cli import main

    code = main(["run", "--method", "realistic", "--set", override, "--set", f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not any(tmp_path.iterdir())  # nothing was prepared


def test_fine_tuning_that_removes_the_marker_makes_the_audit_invalid_until_strengthened(default_config):
    """A weak backdoor (2 attack epochs): the null method removes it, so the audit says it cannot decide;
    strengthening rounds make it survive the null method and the audit valid again."""
    from unlearn.pipeline import audit_warnings, prepare

    weak = with_overrides(default_config, {"stages.attack_epochs": 2})
    prepared = prepare(weak)
    c = prepared.auditor.calibration
    assert c["audit_valid"] == 0.0 and c["audit_null_strength"] < 0.5
    assert any("audit not valid" in line for line in audit_warnings(prepared))
    metrics = prepared.auditor.evaluate(prepared.stages["retrain"].model)
    assert metrics["audit_valid"] == 0.0

    strong = prepare(with_overrides(weak, {"stages.attack_strengthen_rounds": 3}))
    c = strong.auditor.calibration
    assert c["audit_valid"] == 1.0, c
    assert 1 <= c["attack_strengthen_rounds_used"] <= 3
    assert strong.stages["attack"].key.endswith(f"-s{int(c['attack_strengthen_rounds_used'])}")
    assert not math.isnan(c["audit_null_strength"]) and c["audit_null_strength"] >= 0.5
