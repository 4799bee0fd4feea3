"""`audit.retain_metric=retain_fid`: the retain objective is measured in FID, and each method's best trial is the
feasible one with the lowest retain FID (no Ray: the verdict and `unlearn.audit.best` are plain Python / pandas)."""

import pandas as pd
import pytest

from unlearn.audit.best import best_per_method, pareto_front
from unlearn.audit.evaluate import Auditor
from unlearn.config import load_config

ATTACK = {"attack_retain_mse": 0.010, "attack_retain_fid": 2.0}  # the base of retain_degradation
DELTA = 0.3  # the resolved ood_delta
GAP = 0.6  # the resolved max_forget_gap (auto: audit.gap_margin x the second retrain reference's gap)


def _auditor(config) -> Auditor:
    """The audit's verdict only (no model, no references): the calibration a prepared run would hold."""
    auditor = Auditor.__new__(Auditor)
    auditor.config, auditor.calibration = config, {**ATTACK, "ood_delta": DELTA, "max_forget_gap": GAP}
    return auditor


def _trial(trial_id: str, retain_fid: float, retain_mse: float, method: str = "realistic", strength: float = 0.05,
           ood: float = 0.5, collapsed: float = 0.0) -> dict:
    return {"trial_id": trial_id, "method": method, "retain_fid": retain_fid, "retain_mse": retain_mse,
            "forget_marker_strength": strength, "forget_marker": 0.0, "forget_ood_distance": ood,
            "collapsed": collapsed, "diverged": 0.0, "forget_gap_vs_retrain": 0.4}


# retain_fid and retain_mse rank the trials in different orders, so the metric the verdict reads decides the winner.
TRIALS = [
    _trial("a", retain_fid=2.10, retain_mse=0.0200),  # FID +5%: the best feasible (MSE +100%: infeasible in MSE)
    _trial("b", retain_fid=2.40, retain_mse=0.0105),  # FID +20%: feasible, worse
    _trial("c", retain_fid=1.90, retain_mse=0.0100, ood=0.1),  # the lowest FID, but OOD not reached: infeasible
    _trial("d", retain_fid=3.00, retain_mse=0.0090),  # FID +50% > max_retain_degradation 0.25: infeasible
    _trial("e", retain_fid=1.95, retain_mse=0.0095, collapsed=1.0),  # collapsed: infeasible
    _trial("f", retain_fid=2.60, retain_mse=0.0120, method="finetune"),  # finetune's only trial, FID +30%: infeasible
    _trial("g", retain_fid=2.30, retain_mse=0.0150, method="finetune"),  # finetune's best: FID +15%
]


def _frame(config) -> pd.DataFrame:
    auditor = _auditor(config)
    return pd.DataFrame([{**t, **auditor.verdict(dict(t))} for t in TRIALS])


def test_retain_degradation_is_measured_in_fid_when_asked():
    config = load_config("digits-ae", ["audit.retain_metric=retain_fid"])
    frame = _frame(config).set_index("trial_id")
    assert frame.loc["a", "retain_degradation"] == pytest.approx(2.10 / 2.0 - 1)
    assert frame.loc["d", "retain_degradation"] == pytest.approx(0.5)
    assert list(frame.index[frame["feasible"] == 1.0]) == ["a", "b", "g"]
    # the default, retain_mse, judges the same trials on MSE: a (+100%) infeasible, d (-10%) feasible
    mse = _frame(load_config("digits-ae")).set_index("trial_id")
    assert mse.loc["a", "retain_degradation"] == pytest.approx(1.0) and mse.loc["a", "feasible"] == 0.0
    assert mse.loc["d", "feasible"] == 1.0


@pytest.mark.parametrize("objectives", [["retain_degradation"], ["forget_marker_strength", "retain_degradation"]])
def test_best_trial_under_retain_fid_is_the_feasible_one_with_the_lowest_fid(objectives):
    """Alone, or as the tie-break after forget_marker_strength (equal at 0.05 in every trial): the best realistic
    trial is a (FID 2.10), not c or e (lower FID, infeasible), not d (lowest MSE), not b (a larger FID); finetune's
    is g. Maximising, reading retain_mse instead, or ranking infeasible trials would each pick another."""
    config = load_config("digits-ae", ["audit.retain_metric=retain_fid", f"sweep.objectives={objectives}"])
    assert config.objectives == objectives
    frame = _frame(config)
    best = best_per_method(frame, config.objectives).set_index("method")
    assert best.loc["realistic", "trial_id"] == "a" and best.loc["finetune", "trial_id"] == "g"
    assert best.loc["realistic", "retain_fid"] == frame[(frame.method == "realistic")
                                                        & (frame.feasible == 1.0)]["retain_fid"].min()
    # the best trial does not depend on the order the rows arrive in
    assert best_per_method(frame.iloc[::-1], config.objectives).set_index("method")["trial_id"].to_dict() == {
        "finetune": "g", "realistic": "a"}


def test_pareto_front_minimises_the_fid_degradation():
    config = load_config("digits-ae", ["audit.retain_metric=retain_fid"])
    frame = _frame(config)
    # every feasible trial has strength 0.05: the front is the one with the smallest FID degradation
    assert list(pareto_front(frame, config.objectives)["trial_id"]) == ["a"]


@pytest.mark.parametrize("objectives", [["retain_degradation"], ["forget_marker_strength", "retain_degradation"]])
def test_each_methods_optuna_study_minimises_the_objectives(objectives):
    """What Optuna searches for (raytasks.search.make_searcher; importing Ray Tune starts no Ray instance)."""
    import optuna

    from raytasks.search import make_searcher

    config = load_config("digits-ae", ["audit.retain_metric=retain_fid", f"sweep.objectives={objectives}"])
    searcher = make_searcher(config, "realistic", trials=4)
    assert searcher._metric == (objectives[0] if len(objectives) == 1 else objectives)
    assert searcher._ot_study.directions == [optuna.study.StudyDirection.MINIMIZE] * len(objectives)
