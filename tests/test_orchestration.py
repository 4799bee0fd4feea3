"""Orchestration without starting Ray (issue 12): one search stream for every method, trial resources and GPU
sharing, the warm prepare memo, progress lines."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from raytasks.resources import plan_trials
from raytasks.search import SweepSearch, make_searcher
from unlearn.config import load_config, with_overrides
from unlearn.errors import ConfigError

GIB = 1024**3


@pytest.fixture
def config(tmp_path):
    return load_config("digits-ae", [f"cache_dir={tmp_path}"])


def _search(config, methods, trials, seeds):
    return SweepSearch({m: make_searcher(config, m, trials) for m in methods}, trials, seeds, list(config.objectives))


def _result(feasible: float, strength: float, degradation: float) -> dict:
    return {"feasible": feasible, "forget_marker_strength": strength, "retain_degradation": degradation,
            "constraint": -0.1 if feasible else 0.5, "failed": 0.0, "training_iteration": 1}  # as Tune fills it in


def test_one_stream_interleaves_methods_then_confirms_each_best_and_finishes(config):
    search = _search(config, ["realistic", "finetune"], trials=2, seeds=2)
    first = [search.suggest(f"t{i}") for i in range(3)]
    # a free slot goes to the method with the fewest trials started: no method waits for another to finish
    assert [p["method"] for p in first] == ["realistic", "finetune", "realistic"]
    assert set(first[0]) == {"method", "ga_steps", "ga_lr", "ft_steps", "ft_lr"}
    assert first[0]["ga_lr"] == pytest.approx(config.unlearn.ga_lr)  # the config's own values come first
    search.on_trial_complete("t0", _result(1.0, 0.05, 0.1))
    search.on_trial_complete("t2", _result(1.0, 0.01, 0.2))  # realistic's best: the smaller strength
    # realistic's trials are all done: its confirmations go first, then finetune's last trial
    confirm = [search.suggest(f"c{i}") for i in range(2)]
    assert [(p["method"], p["confirms"], p["seed"]) for p in confirm] == [("realistic", "t2", 1), ("realistic", "t2", 2)]
    assert search.suggest("t3")["method"] == "finetune"
    assert {k: confirm[0][k] for k in ("ga_lr", "ft_steps")} == {k: first[2][k] for k in ("ga_lr", "ft_steps")}
    assert search.suggest("x") is None  # finetune's trials still run: wait, do not finish
    # the state pickles into Tune's experiment checkpoint and continues from there (--resume)
    path = config.resolved_cache_dir() / "searcher.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    search.save(str(path))
    restored = _search(config, ["realistic", "finetune"], trials=2, seeds=2)
    restored.restore(str(path))
    for name in ("t1", "t3"):
        restored.on_trial_complete(name, _result(0.0, 0.9, 0.1))  # finetune: nothing feasible, nothing to confirm
    restored.on_trial_complete("c0", _result(1.0, 0.02, 0.1))
    restored.on_trial_complete("c1", _result(1.0, 0.03, 0.1))
    assert restored.suggest("y") == SweepSearch.FINISHED
    # each method kept its own Optuna study, told every result with its feasibility constraint
    study = restored.searchers["realistic"]._ot_study
    assert len(study.trials) == 2 and all("constraints:feasibility" in t.system_attrs for t in study.trials)
    assert len(restored.searchers["finetune"]._ot_study.trials) == 2


def test_trials_an_interrupted_experiment_ends_unfinished_stay_open_for_resume(config, tmp_path, capsys):
    """Ctrl-C: Tune ends the trials still running with their default result (no `training_iteration`) and the ones
    not started with none, through the same on_trial_complete hooks. Neither is a result: the searcher keeps them
    open (--resume runs them), Optuna is not told, nothing is logged or printed."""
    from raytasks.progress import ProgressCallback
    from raytasks.tracking import TrialLoggingCallback

    search = _search(config, ["realistic"], trials=2, seeds=0)
    search.suggest("t0"), search.suggest("t1")
    default_result = {"trial_id": "t0", "pid": 6637, "timestamp": 1795850106, "date": "2026-11-28_07-15-06"}
    search.on_trial_complete("t0", default_result)
    search.on_trial_complete("t1", None)
    assert search.open == {"t0", "t1"} and search.rows["realistic"] == []
    assert search.suggest("x") is None  # not finished: both still count as running
    assert [t.state.name for t in search.searchers["realistic"]._ot_study.trials] == ["RUNNING", "RUNNING"]
    search.on_trial_complete("t0", _result(1.0, 0.05, 0.1))  # the resumed run reports
    assert search.open == {"t1"} and len(search.rows["realistic"]) == 1

    logged: list[str] = []
    logger = SimpleNamespace(uri="sqlite:///unused", log=lambda trial_id, *args: logged.append(trial_id))
    stopped = SimpleNamespace(trial_id="t0", status="RUNNING", config={"method": "realistic"}, checkpoint=None,
                              last_result=default_result)
    TrialLoggingCallback(logger).on_trial_complete(0, [stopped], stopped)
    ProgressCallback(config).on_trial_complete(0, [stopped], stopped)
    assert logged == [] and capsys.readouterr().err == ""
    stopped.last_result = _result(1.0, 0.05, 0.1)
    TrialLoggingCallback(logger).on_trial_complete(0, [stopped], stopped)
    assert logged == ["t0"]


def test_a_failed_search_trial_counts_and_is_never_confirmed(config):
    search = _search(config, ["finetune"], trials=1, seeds=3)
    search.suggest("t0")
    search.on_trial_complete("t0", None, error=True)
    assert search.suggest("t1") == SweepSearch.FINISHED


def test_one_worker_trials_share_a_gpu_as_memory_and_cpus_allow(config):
    gpu_node = [{"CPU": 16.0, "GPU": 1.0}]
    # 1 GiB per trial on 40 GiB free: memory allows 36, the 16 CPUs allow 16
    plan = plan_trials(config, 1, True, {"CPU": 16.0, "GPU": 1.0}, gpu_node, 1 * GIB, 40 * GIB)
    assert plan.trials_per_gpu == 16 and plan.resources == {"CPU": 1.0, "GPU": 0.0625} and plan.concurrency == 16
    # 10 GiB per trial: memory allows 3
    plan = plan_trials(config, 1, True, {"CPU": 16.0, "GPU": 1.0}, gpu_node, 10 * GIB, 40 * GIB)
    assert plan.trials_per_gpu == 3 and plan.resources["GPU"] == pytest.approx(0.3333) and plan.concurrency == 3
    # not measured (a driver without a GPU): whole GPUs
    plan = plan_trials(config, 1, True, {"CPU": 16.0, "GPU": 2.0}, [{"CPU": 8.0, "GPU": 1.0}], None, None)
    assert plan.resources == {"CPU": 1.0, "GPU": 1.0} and plan.concurrency == 2
    shared = with_overrides(config, {"sweep.gpus_per_trial": 0.25, "sweep.cpus_per_trial": 2})
    plan = plan_trials(shared, 1, True, {"CPU": 16.0, "GPU": 1.0}, gpu_node, None, None)
    assert plan.resources == {"CPU": 2.0, "GPU": 0.25} and plan.concurrency == 4
    # CPU: one slot per cpus_per_trial; multi-worker trials: the Ray Train workers hold the resources
    assert plan_trials(shared, 1, False, {"CPU": 8.0}, [{"CPU": 8.0}], None, None).concurrency == 4
    plan = plan_trials(config, 2, True, {"CPU": 16.0, "GPU": 4.0}, [{"CPU": 16.0, "GPU": 4.0}], None, None)
    assert plan.resources == {"CPU": 0.01} and plan.concurrency == 2


@pytest.mark.parametrize(("overrides", "workers", "needle"), [
    ({"sweep.gpus_per_trial": 2}, 1, "above 1"),
    ({"sweep.gpus_per_trial": 0.5}, 2, "whole GPUs"),
    ({"sweep.cpus_per_trial": 32}, 1, "more than any node has"),
    ({}, 8, "can hold at most"),
])
def test_trial_resources_no_node_can_hold_are_config_errors(config, overrides, workers, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_trials(with_overrides(config, overrides), workers, True, {"CPU": 16.0, "GPU": 1.0},
                    [{"CPU": 16.0, "GPU": 1.0}], None, None)


def test_prepare_warm_loads_once_per_setup_and_hands_back_the_trials_config(prepared, default_config):
    from unlearn import pipeline

    first = pipeline.prepare_warm(default_config)
    tuned = with_overrides(default_config, {"unlearn.ga_lr": 0.07, "unlearn.ft_steps": 11, "unlearn.seed": 3})
    second = pipeline.prepare_warm(tuned)
    assert second.data is first.data and second.auditor is first.auditor  # nothing reloaded
    assert second.config.unlearn.ga_lr == 0.07 and second.config.unlearn.seed == 3
    other = pipeline.prepare_warm(with_overrides(default_config, {"audit.max_forget_gap": 0.5}))
    assert other.auditor is not first.auditor  # another setup is prepared afresh
    pipeline._WARM.clear()


def test_progress_line_names_method_count_verdict_and_best_so_far(config):
    from raytasks.progress import trial_line

    def trial(tid, status, result, **cfg):
        return SimpleNamespace(trial_id=tid, status=status, last_result=result, config={"method": "realistic", **cfg})

    done = trial("aaa", "TERMINATED", _result(1.0, 0.02, 0.1))
    now = trial("bbb", "RUNNING", _result(0.0, 0.5, 0.1))
    line = trial_line([done, now], now, 8, 3, list(config.objectives), failed=False)
    assert line.startswith("realistic 2/8 trial bbb: forget_marker_strength 0.5 retain_degradation 0.1 infeasible")
    named = trial_line([done, now], now, 8, 3, list(config.objectives), failed=False, sweep_config=config)
    assert "infeasible (ood, " in named  # the violated constraints, by name
    assert line.endswith("best so far aaa: forget_marker_strength 0.02 retain_degradation 0.1")
    confirm = trial("ccc", "RUNNING", _result(1.0, 0.03, 0.1), confirms="aaa", seed=2)
    assert "confirm 1/3 of aaa (seed 2)" in trial_line([done, now, confirm], confirm, 8, 3, list(config.objectives), False)
    assert "failed-infeasible" in trial_line([done, now], now, 8, 3, list(config.objectives), failed=True)


@pytest.mark.parametrize(("workers", "start"), [(1, "from scratch"), (2, "from its last phase checkpoint")])
def test_a_rerun_after_a_lost_process_is_counted_and_says_where_it_starts(config, workers, start, tmp_path, log_lines):
    from raytasks.progress import ProgressCallback

    (tmp_path / "error.txt").write_text("Traceback ...\nray.exceptions.ActorDiedError: The actor died unexpectedly\n")
    trial = SimpleNamespace(trial_id="t1", config={"method": "realistic"}, error_file=str(tmp_path / "error.txt"))
    progress = ProgressCallback(with_overrides(config, {"unlearn.workers": workers}))
    lines = log_lines("raytasks.progress")
    progress.on_trial_recover(0, [trial], trial)
    progress.on_trial_recover(0, [trial], trial)
    assert progress.retried == {"t1": 2}
    line = lines[-1]
    assert line == (f"realistic trial t1 failed (ray.exceptions.ActorDiedError: The actor died unexpectedly): "
                    f"rerun 2/{config.sweep.trial_retries} {start}")


def test_searcher_state_pickles(config):
    search = _search(config, ["realistic"], trials=1, seeds=0)
    search.suggest("t0")
    assert pickle.loads(pickle.dumps(search)).points["t0"]["method"] == "realistic"


def test_an_audit_bug_surfaces_and_only_a_diverged_model_is_failed_infeasible(prepared, monkeypatch):
    """outcome.finish_trial catches no audit failure: a bug in a metric surfaces (with its traceback) on a finite
    model; a model whose outputs are not finite is diverged and reported failed-infeasible without an audit."""

    from raytasks import trial_outcome as outcome
    from unlearn.pipeline import unlearn

    result = unlearn(prepared, "finetune", prepared.config.unlearn.model_copy(update={"ft_steps": 2}))

    def broken_metric(model):
        raise RuntimeError("a bug in a metric")

    monkeypatch.setattr(prepared.auditor, "evaluate", broken_metric)
    with pytest.raises(RuntimeError, match="a bug in a metric"):  # finite outputs: a bug, not a diverged model
        outcome.finish_trial(prepared, result, "finetune")
    monkeypatch.setattr(prepared.auditor, "outputs_finite", lambda model: False)  # as a diverged model's
    metrics, folder = outcome.finish_trial(prepared, result, "finetune")  # the broken metric is never reached
    assert metrics["failed"] == 1.0 and metrics["feasible"] == 0.0 and metrics["diverged"] == 1.0
    assert not (folder / "error.txt").exists() and not (folder / "outputs.png").exists()
    # an objective missing on a finite model is a bug too, not a failure: sanitise names it
    with pytest.raises(ValueError, match="no finite forget_marker_strength"):
        outcome.sanitise({"diverged": 0.0, "retain_degradation": 0.1, "forget_ood_distance": 0.3},
                         ["forget_marker_strength", "retain_degradation"])


def test_a_trial_reports_its_artifacts_and_leaves_no_folder_behind(prepared, monkeypatch):
    """run_trial hands its artifacts to tune.report (which copies them into the run's storage) and removes its
    folder: a sweep's trials used to leave ~0.6 MB each in /tmp for good."""
    import dataclasses
    from pathlib import Path

    import ray
    import torch
    from ray import tune

    import unlearn.pipeline
    from raytasks.search import METHOD_KEY
    from raytasks.trial import run_trial

    reported = {}

    def report(metrics, checkpoint):
        folder = Path(checkpoint.path)
        reported.update(metrics=metrics, folder=folder, files={p.name for p in folder.iterdir()})

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-1"))
    monkeypatch.setattr(unlearn.pipeline, "prepare_warm", lambda config: dataclasses.replace(prepared, config=config))
    spec = {"config": prepared.config.model_dump(mode="json", by_alias=True), "threads": torch.get_num_threads(),
            "workers": 1}
    run_trial({METHOD_KEY: "finetune", "ft_steps": 2}, spec)
    assert {"outputs.png", "curves.json"} <= reported["files"]
    assert reported["metrics"]["node_id"] == "node-1" and "feasible" in reported["metrics"]
    assert not reported["folder"].exists()

    # out of GPU memory half-way through the audit: the failed trial reports its error alone, not the curves written
    # before (the report would draw them as a finished trial's)
    import raytasks.trial

    def runs_out(prepared, result, method, folder):
        (folder / "curves.json").write_text("{}")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(raytasks.trial, "finish_trial", runs_out)
    run_trial({METHOD_KEY: "finetune", "ft_steps": 2}, spec)
    assert reported["files"] == {"error.txt"} and reported["metrics"]["failed"] == 1.0
    assert not reported["folder"].exists()


def test_best_per_method_is_the_feasible_trial_with_the_smallest_rounded_first_objective():
    """The one definition of "best": only feasible trials, the first objective rounded to 0.01 (noise does not
    decide), ties broken by the next objective; a method without a feasible trial has no best."""
    import pandas as pd

    from unlearn.audit.best import best_per_method

    frame = pd.DataFrame([
        {"method": "a", "trial_id": "infeasible-but-lowest", "feasible": 0.0, "forget_marker_strength": 0.0,
         "retain_degradation": 0.0},
        {"method": "a", "trial_id": "noise-level-lower", "feasible": 1.0, "forget_marker_strength": 0.011,
         "retain_degradation": 0.3},
        {"method": "a", "trial_id": "best", "feasible": 1.0, "forget_marker_strength": 0.014, "retain_degradation": 0.1},
        {"method": "a", "trial_id": "worse", "feasible": 1.0, "forget_marker_strength": 0.2, "retain_degradation": 0.0},
        {"method": "b", "trial_id": "only-infeasible", "feasible": 0.0, "forget_marker_strength": 0.0, "retain_degradation": 0.0},
    ])
    best = best_per_method(frame, ["forget_marker_strength", "retain_degradation"])
    assert list(best["method"]) == ["a"] and list(best["trial_id"]) == ["best"]
