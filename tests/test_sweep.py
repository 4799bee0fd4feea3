"""The distributed sweep (issue 3): Tune + Optuna + MLflow, Ray Train with two workers, bad input."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import child_runs as _child_runs
from PIL import Image

from raytasks.sweep import main


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_sweep_logs_parent_children_and_keeps_optuna_consistent(small_sweep):
    driver, uri, out = small_sweep
    client = _client(uri)
    exp = client.get_experiment_by_name("t-sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    refs = {r.data.tags["reference"] for r in children if "reference" in r.data.tags}
    assert refs == {"original", "attack", "retrain"}
    trials = [r for r in children if "ray.trial_id" in r.data.tags]
    assert len(trials) == 6 and len({r.data.tags["ray.trial_id"] for r in trials}) == 6
    realistic = [r for r in trials if r.data.tags["method"] == "realistic"]
    for run in realistic:
        assert {"ga_lr", "ga_steps", "ft_lr", "ft_steps"} <= set(run.data.params)
        assert run.info.status == "FINISHED" and "forget_marker" in run.data.metrics
    history = client.get_metric_history(realistic[0].info.run_id, "curve/ga_param_distance")
    assert len(history) == int(realistic[0].data.params["ga_steps"])  # one point per GA step
    # a trial run holds its images, embeddings and curves; the checkpoint's weights stay in Ray storage
    assert {a.path for a in client.list_artifacts(realistic[0].info.run_id)} == {"outputs.png", "embeddings.npz", "curves.json"}
    diverged = [r for r in trials if r.data.tags["method"] == "max_loss"]
    assert diverged and all(r.data.tags["status_detail"] == "failed-infeasible" and r.info.status == "FAILED"
                            for r in diverged)
    # failed-infeasible because the runs diverged (ga_lr 1e29), not for any other missing figure
    assert all(r.data.metrics["diverged"] == 1.0 for r in diverged)
    assert all(r.data.metrics["failed"] == 0.0 and r.data.metrics["diverged"] == 0.0 for r in trials if r not in diverged)
    # Optuna saw every trial finish: nothing left RUNNING, and every trial carries the OOD constraint
    import optuna

    for method, searcher in driver.searchers.items():
        study = searcher._ot_study
        assert [t.state for t in study.trials].count(optuna.trial.TrialState.RUNNING) == 0, method
        assert len(study.trials) == 2
    # every Optuna trial carries the feasibility constraint the trial reported, and it agrees with `feasible`
    for method, searcher in driver.searchers.items():
        logged = {r.data.params.get("ga_lr", r.data.params.get("ft_lr")): r for r in trials if r.data.tags["method"] == method}
        for t in searcher._ot_study.trials:
            assert "constraints:feasibility" in t.system_attrs, method
            value = t.system_attrs["constraints:feasibility"]
            run = next((r for k, r in logged.items() if k is not None and float(k) == pytest.approx(
                t.params.get("ga_lr", t.params.get("ft_lr")))), None)
            assert run is not None
            assert value == pytest.approx(run.data.metrics["constraint"])
            assert (value <= 0) == (run.data.metrics["feasible"] == 1.0)
    assert all(t.system_attrs["constraints:feasibility"] > 0 for t in driver.searchers["max_loss"]._ot_study.trials)
    # the Pareto front holds exactly the non-dominated feasible trials
    import pandas as pd

    trials_csv = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    front = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str})
    feasible = trials_csv[trials_csv["feasible"] == 1.0]
    objectives = ["forget_marker_strength", "retain_degradation"]
    assert set(front["trial_id"]) <= set(feasible["trial_id"])  # no infeasible trial on the front
    for _, row in feasible.iterrows():
        dominated = ((feasible[objectives] <= row[objectives]).all(axis=1)
                     & (feasible[objectives] < row[objectives]).any(axis=1)).any()
        assert (row["trial_id"] in set(front["trial_id"])) == (not dominated)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
        (["--set", "sweep.space.ft_lr=[0.01,0.01]"], "empty range"),
        (["--resume", "--name", "never-ran"], "nothing to resume"),
        (["--workers", "64"], "can hold at most"),
        (["--set", "sweep.gpus_per_trial=2"], "above 1"),
        (["--workers", "2", "--set", "sweep.gpus_per_trial=0.5"], "whole GPUs"),
        (["--set", "sweep.cpus_per_trial=64"], "more than any node has"),
        (["--methods", "realistic,realistic"], "repeats a method"),
        (["--methods", "retrain"], "reference model"),
    ],
)
def test_bad_sweep_input_exits_2_before_any_trial(ray_session, extra, needle, tmp_path, capsys):
    code = main(["--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                 "--set", f"cache_dir={tmp_path}/c", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert needle in err[-1] and err[-1].startswith("sweep: error:")
    # refused before any work: nothing prepared (no cache written), no sweep state, no MLflow run, no Ray storage
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "out" / "sweep.json").exists() and not (tmp_path / "out" / "ray").exists()
    if (tmp_path / "m.db").exists():
        client = _client(f"sqlite:///{tmp_path}/m.db")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5)


def _kill_a_train_worker_after_a_committed_phase(storage: Path, stop, killed: list) -> None:
    """Watches the sweep's Ray storage until Ray Train has committed a phase checkpoint (its checkpoint manager's
    snapshot is written once every rank reported it), then SIGKILLs one Ray Train worker; records the committed
    phase (`phase_done`, 1 = GA) it killed after."""
    from ray._private.state import actors

    deadline = time.time() + 600
    while time.time() < deadline and not stop.is_set():
        snapshots = list(storage.glob("*-train/checkpoint_manager_snapshot.json")) if storage.exists() else []
        try:
            latest = json.loads(snapshots[0].read_text())["latest_checkpoint_result"] if snapshots else None
        except ValueError:  # caught while Ray Train writes it
            latest = None
        if latest is not None:
            phase = latest.get("metrics", {}).get("phase_done")
            if phase is None:  # the final result (no phase checkpoint): too late to kill
                return
            workers = [a for a in actors().values()
                       if a.get("State") == "ALIVE" and "RayTrainWorker" in a.get("ActorClassName", "")]
            if len(workers) == 2:
                os.kill(int(workers[-1]["Pid"]), signal.SIGKILL)
                killed.append(phase)
                return
        time.sleep(0.05)


def test_two_worker_trial_through_tune_resumes_from_its_phase_checkpoint_and_matches_one_worker(
        ray_session, prepared, default_config, tmp_path):
    """A `--workers 2` sweep trial (Tune -> Ray Train, gloo): one worker is killed once GA's phase checkpoint is
    stored; the worker group restarts from that checkpoint (resumed_from_phase 1, fine-tuning only), the trial
    finishes once, is logged once, and its figures equal the in-process one-worker run of the same
    hyperparameters (one global batch semantics, tolerance 1e-4).
    The same sweep runs on a weak backdoor (2 attack epochs) that plain fine-tuning removes: it still runs, and its
    parent run and report say that this audit cannot decide (one sweep for both: each costs ~30 s of Ray start-up)."""
    import threading

    from raytasks.sweep import parse_args, run_sweep
    from raytasks.trial_outcome import finish_trial
    from unlearn.config import with_overrides
    from unlearn.pipeline import prepare, unlearn

    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_train_worker_after_a_committed_phase, args=(out / "ray", stop, killed))
    watcher.start()
    try:
        driver = run_sweep(parse_args([
            "--methods", "realistic", "--trials", "1", "--workers", "2", "--name", "two", "--out", str(out),
            "--tracking-uri", uri, "--set", f"cache_dir={default_config.cache_dir}",
            "--set", "sweep.confirm_seeds=0", "--set", "stages.attack_epochs=2",
            # fine-tuning lasts seconds, so that the kill lands after GA's checkpoint and before the trial ends
            "--set", "sweep.method_space.realistic={ga_steps: [3, 5], ga_lr: [0.08, 0.1], ft_steps: [80, 90]}"]))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no Ray Train worker was killed: the trial ended before a phase checkpoint was seen"
    runs = _child_runs(uri, "two")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    double = runs[0].data.metrics
    # restarted from the checkpoint committed before the kill (GA's, unless the machine was slow to notice), not
    # from scratch
    assert double["resumed_from_phase"] == killed[0] >= 1

    parent = _client(uri).get_run(driver.parent)
    assert parent.data.tags["audit_valid"] == "0" and parent.data.metrics["audit_valid"] == 0.0
    assert "audit not valid" in parent.data.tags["audit_notes"]
    text = driver.report_path.read_text()
    assert "**marker audit: NOT VALID: this audit cannot decide" in text and "audit not valid" in text
    # realistic had no feasible trial: the distance plot shows its GA curves in grey instead of empty panels (a
    # grey line crosses most pixel columns of each panel: measured 283/281/310 of 513; empty panels 85/47/53,
    # from anti-aliased text)
    from analysis.figures import INFEASIBLE_GREY

    grey = tuple([round(255 * float(INFEASIBLE_GREY))] * 3)
    with Image.open(driver.report_path.parent / "distance.png") as img:
        pixels = np.abs(np.asarray(img.convert("RGB"), dtype=int) - np.array(grey)).max(axis=2) <= 2
    for panel in np.array_split(pixels, 3, axis=1):
        assert panel.any(axis=0).sum() >= 200

    params = {k: float(v) for k, v in runs[0].data.params.items() if k in ("ga_steps", "ga_lr", "ft_steps", "ft_lr")}
    config = with_overrides(default_config, {"stages.attack_epochs": 2,
                                             **{f"unlearn.{k}": int(v) if k.endswith("steps") else v for k, v in params.items()}})
    local = prepare(config)
    single, _ = finish_trial(local, unlearn(local, "realistic"), "realistic")
    assert single["resumed_from_phase"] == 0.0
    for key in ("ga_param_distance", "ga_loss_increase", "ga_grad_max", "retain_mse", "forget_mse", "forget_ood_distance",
                "forget_marker_strength", "forget_gap_vs_retrain", "mia_auc"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    assert double["forget_marker"] == single["forget_marker"]
    assert double["unlearn_samples"] == single["unlearn_samples"]


def test_interrupted_sweep_resumes_without_rerun_or_duplicates(small_sweep_interruption, small_sweep):
    """The small sweep was Ctrl-C'd (a driver process on the session's Ray) after its first trial, then resumed:
    it stopped with exit 130 while trials were left, and the resume ran every trial once (no duplicate run), never
    re-ran or re-logged one that had finished, and logged the reference models once."""
    first = small_sweep_interruption
    driver, uri, out = small_sweep
    assert first["exit_code"] == 130, first["stderr"][-2000:]
    assert 1 <= len(first["finished"]) < 6, "the Ctrl-C should land after the first trial and before the last"
    runs = _child_runs(uri, "t-sweep")
    searched = [r for r in runs if "confirm" not in r.data.tags]
    ids = [r.data.tags["ray.trial_id"] for r in searched]
    assert len(ids) == 6 and len(set(ids)) == 6  # every trial once, no duplicates
    for trial_id, run_id in first["finished"].items():  # finished trials were not re-run or re-logged
        assert {r.info.run_id for r in runs if r.data.tags["ray.trial_id"] == trial_id} == {run_id}
    for path, mtime in first["result_files"].items():
        if path.stat().st_size and '"done": true' in path.read_text():
            assert path.stat().st_mtime_ns == mtime
    client = _client(uri)
    exp = client.get_experiment_by_name("t-sweep")
    references = client.search_runs([exp.experiment_id], filter_string="tags.reference != ''", max_results=100)
    assert sorted(r.data.tags["reference"] for r in references) == ["attack", "original", "retrain"]


def test_sweep_registers_the_best_feasible_realistic_model_that_audits_to_its_figures(small_sweep, prepared, capsys, tmp_path):
    """The deliverable of a sweep: one registered version (alias `unlearned`) of the best feasible realistic trial,
    each method's best logged as a model, other trials' weights dropped, and the audit reproducing the figures."""
    import pandas as pd

    from unlearn.cli import main as unlearn_main

    driver, uri, out = small_sweep
    client = _client(uri)
    versions = client.search_model_versions("name='t-sweep'")
    assert len(versions) == 1
    version = client.get_model_version_by_alias("t-sweep", "unlearned")
    best = pd.read_csv(out / "best.csv", dtype={"trial_id": str})
    realistic = best[best["method"] == "realistic"]
    assert len(realistic) == 1, "the small sweep's realistic range should hold a feasible trial"
    assert version.tags["trial_id"] == str(realistic["trial_id"].iloc[0])
    run = client.get_run(version.run_id)
    assert run.data.metrics["feasible"] == 1.0 and run.data.tags["method"] == "realistic"
    assert {"forget_digest", "weights_sha256", "config_sha256", "forget_marker_strength", "mia_auc"} <= set(version.tags)
    assert client.get_experiment_by_name("t-sweep").tags["mlflow.experimentKind"] == "custom_model_development"
    # each method's best carries a model; with keep_weights=best no other trial keeps weights in Ray storage
    for row in best.to_dict("records"):
        logged = client.search_runs([run.info.experiment_id], filter_string=f"tags.`ray.trial_id` = '{row['trial_id']}'")
        assert logged[0].data.tags["unlearned_model_uri"].startswith("models:/")
    kept = {p.parent.parent.name.split("_")[2] for p in (out / "ray").glob("*/run_trial_*/checkpoint_*/bundle")}
    assert kept == {str(t) for t in best["trial_id"]}

    from raytasks.registry import fetch_bundle  # the run's URI names the same model as the registry's

    bundle = fetch_bundle(f"runs:/{version.run_id}/model", uri, tmp_path)
    assert {"config.yaml", "model", "certificate.md"} <= {p.name for p in bundle.iterdir()}
    # the tags' values, recomputed here: what `sha256sum` prints for the files, and D_f's digest from its positions
    import hashlib

    assert version.tags["weights_sha256"] == hashlib.sha256((bundle / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert version.tags["config_sha256"] == hashlib.sha256((bundle / "config.yaml").read_bytes()).hexdigest()
    ids = sorted(f"digits:{int(i)}" for i in prepared.data.forget_train.index)
    assert version.tags["forget_digest"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()
    for figure in ("forget_marker_strength", "mia_auc"):
        assert float(version.tags[figure]) == pytest.approx(run.data.metrics[figure], rel=1e-5), figure
    code = unlearn_main(["audit", "--model", "models:/t-sweep@unlearned", "--tracking-uri", uri, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    audited = json.loads(captured.out.strip().splitlines()[-1])
    for key in ("forget_marker_strength", "retain_mse", "forget_gap_vs_retrain", "mia_auc", "forget_fid", "feasible"):
        assert audited[key] == pytest.approx(run.data.metrics[key], rel=1e-6, abs=1e-9), key


def test_resumed_finished_sweep_registers_and_logs_nothing_twice(small_sweep, default_config):
    from raytasks.sweep import parse_args, run_sweep

    driver, uri, out = small_sweep
    client = _client(uri)
    before = {r.info.run_id for r in _child_runs(uri, "t-sweep")}
    run_sweep(parse_args(["--name", "t-sweep", "--out", str(out), "--tracking-uri", uri, "--resume", "--no-report",
                          "--methods", "realistic,finetune,max_loss", "--trials", "2",
                          "--set", f"cache_dir={default_config.cache_dir}"]))
    assert {r.info.run_id for r in _child_runs(uri, "t-sweep")} == before
    assert len(client.search_model_versions("name='t-sweep'")) == 1


@pytest.mark.parametrize(("model", "needle"), [
    ("models:/no-such-model@unlearned", "not found"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "not found"),
])
def test_audit_of_a_missing_uri_exits_2(small_sweep, model, needle, capsys):
    from unlearn.cli import main as unlearn_main

    _, uri, _ = small_sweep
    assert unlearn_main(["audit", "--model", model, "--tracking-uri", uri]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("unlearn: error:")


def test_purge_removes_the_sweeps_forget_images_and_keeps_the_certified_model(small_sweep, tmp_path, capsys):
    """Runs last on the small sweep: afterwards no MLflow artifact and no file in its Ray storage shows D_f."""
    from unlearn.cli import main as unlearn_main

    driver, uri, out = small_sweep
    client = _client(uri)
    parent = client.get_run(driver.parent)
    digest = parent.data.tags["forget_digest"]
    runs = client.search_runs([parent.info.experiment_id], filter_string="tags.sweep = 't-sweep'", max_results=1000)
    assert any("confirm" in r.data.tags for r in runs)  # confirmation runs (nested under trials) are purged too
    before = {r.info.run_id: {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs}
    assert "grid" in before[parent.info.run_id] and any("outputs.png" in v for v in before.values())
    figures = {r.info.run_id: (r.data.metrics, r.data.params) for r in runs}
    code = unlearn_main(["purge", "--forget-digest", digest, "--tracking-uri", uri, "--cache-dir", str(tmp_path / "empty")])
    printed = capsys.readouterr().out
    assert code == 0 and "removed  MLflow t-sweep/" in printed and "the certified model" in printed
    for run in runs:
        left = {a.path for a in client.list_artifacts(run.info.run_id)}
        left |= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert not left & {"grid", "outputs.png", "embeddings.npz", "report/grid.png", "report/tsne.png"}, run.info.run_id
    assert not [p for name in ("grid.png", "tsne.png") for p in (out / "report").glob(name)]
    assert not [p for name in ("outputs.png", "embeddings.npz") for p in (out / "ray").rglob(name)]
    assert client.get_model_version_by_alias("t-sweep", "unlearned").run_id  # the registered model stays
    for run_id, (metrics, params) in figures.items():  # what shows no image stays: every metric and parameter
        after = client.get_run(run_id).data
        assert (after.metrics, after.params) == (metrics, params), run_id
    from analysis.report import render_report  # a report of the purged sweep renders, without any image strip

    text = render_report("t-sweep", tmp_path / "after", tracking_uri=uri).read_text()
    assert "Grid rows: none (no image logged: masked_input, ground_truth" in text and "grid.png" not in text
    assert not (tmp_path / "after" / "grid.png").exists()


def test_resume_with_other_methods_or_trials_exits_2(small_sweep, default_config, capsys):
    """The restored experiment runs the methods and trials it was started with: asking for others is an error."""
    _, uri, out = small_sweep
    code = main(["--name", "t-sweep", "--out", str(out), "--tracking-uri", uri, "--resume", "--no-report",
                 "--trials", "5", "--set", f"cache_dir={default_config.cache_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "was started with --methods realistic,finetune,max_loss --trials 2" in err[-1]


def test_confirmed_csv_is_the_mean_and_std_of_each_best_trials_confirmation_runs(small_sweep):
    """summary/confirmed.csv: one row per confirmed best trial, its figures the mean and std over the confirmation
    runs MLflow holds under that trial (tag `confirm`), `seeds` their count."""
    import pandas as pd

    driver, uri, out = small_sweep
    table = pd.read_csv(out / "confirmed.csv", dtype={"confirms": str})
    best = pd.read_csv(out / "best.csv", dtype={"trial_id": str})
    assert not table.empty and set(table["confirms"]) == set(best["trial_id"])  # every method's best, nothing else
    confirmations = [r for r in _child_runs(uri, "t-sweep") if "confirm" in r.data.tags]
    for row in table.to_dict("records"):
        runs = [r for r in confirmations if r.data.tags["confirm"] == row["confirms"]]
        assert len(runs) == row["seeds"] == 2 and {r.data.tags["method"] for r in runs} == {row["method"]}
        for name in ("forget_marker_strength", "retain_degradation", "mia_auc"):
            values = np.array([r.data.metrics[name] for r in runs])
            assert row[name] == pytest.approx(values.mean(), rel=1e-9)
            assert row[f"{name}_std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)
        assert row["feasible_seeds"] == sum(r.data.metrics["feasible"] == 1.0 for r in runs)


def test_a_tracking_outage_at_the_end_waits_then_stops_with_exit_130(monkeypatch, capsys):
    """A finished trial whose logging fails while the server does not answer: the driver waits for it (one line),
    logs once it answers; past the wait it stops with SweepInterrupted (exit 130, nothing closed: --resume logs
    it). A server that answers but refuses the write is a bug, raised at once, never waited on."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    import raytasks.driver as driver_module
    from raytasks import tracking
    from raytasks.driver import SweepDriver, SweepInterrupted

    calls = []

    class Logger:
        def __init__(self, failures):
            self.failures = failures

        def log(self, trial_id, *args):
            calls.append(trial_id)
            if len(calls) <= self.failures:
                raise MlflowException("connection refused")

    monkeypatch.setattr(driver_module, "TRACKING_POLL_S", 0.0)
    up = {"answers": False}
    monkeypatch.setattr(tracking, "reachable", lambda uri: up["answers"])
    driver = SimpleNamespace(uri="http://tracking:5000", name="s", trial_logger=Logger(failures=3))
    SweepDriver._log_when_reachable(driver, "t1", {}, {}, None, False)  # back after three refusals: logged on the fourth
    assert calls == ["t1"] * 4
    assert capsys.readouterr().err.count("unreachable: waiting") == 1
    calls.clear()
    monkeypatch.setattr(driver_module, "TRACKING_WAIT_S", 0.0)
    driver.trial_logger = Logger(failures=10**9)
    with pytest.raises(SweepInterrupted, match="--resume --name s"):
        SweepDriver._log_when_reachable(driver, "t2", {}, {}, None, False)
    up["answers"] = True  # it answers, and still refuses: not an outage
    calls.clear()
    with pytest.raises(MlflowException):
        SweepDriver._log_when_reachable(driver, "t3", {}, {}, None, False)
    assert calls == ["t3"]
    import raytasks.sweep

    def interrupted(args):
        raise SweepInterrupted("tracking server unreachable")

    monkeypatch.setattr(raytasks.sweep, "run_sweep", interrupted)
    assert main(["--methods", "realistic"]) == 130


def test_a_sweep_of_a_brought_model_without_retrain_registers_the_selected_method(ray_session, prepared, default_config,
                                                                                   tmp_path, capsys):
    """End to end: theta0 = a model the user brings, D_f = a forget list, audit.retrain=false, sweep.select=finetune.
    No retrain or marker figure anywhere; the registered version, if any, is finetune's best feasible trial (never
    realistic's), and the printed line says which."""
    import pandas as pd

    from raytasks.sweep import parse_args, run_sweep
    from unlearn.cli import main as unlearn_main

    original = tmp_path / "O"
    assert unlearn_main(["run", "--method", "original", "--out", str(original),
                         "--set", f"cache_dir={default_config.cache_dir}"]) == 0
    train = prepared.data.retain_train
    forget_list = tmp_path / "forget.txt"
    forget_list.write_text("\n".join(str(int(i)) for i in train.index[train.labels == 4][:20]) + "\n")
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    capsys.readouterr()
    run_sweep(parse_args(["--methods", "realistic,finetune", "--trials", "1", "--name", "t-byo", "--out", str(out),
                          "--tracking-uri", uri, "--no-report", "--set", f"cache_dir={default_config.cache_dir}",
                          "--set", f"stages.theta0={original}", "--set", f"data.forget_list={forget_list}",
                          "--set", "audit.retrain=false", "--set", "sweep.confirm_seeds=0", "--set", "sweep.select=finetune",
                          "--set", "sweep.max_concurrent=2", "--set", "sweep.space.ft_steps=[60,80]"]))
    printed = capsys.readouterr().out
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("t-byo").experiment_id], max_results=100)
    assert "retrain" not in {r.data.tags.get("reference") for r in runs}
    trials = [r for r in runs if "ray.trial_id" in r.data.tags]
    assert len(trials) == 2
    for run in trials:
        assert not [k for k in run.data.metrics if k.endswith("_vs_retrain") or k.startswith("forget_marker")], run.data.tags
        assert run.data.metrics["failed"] == 0.0
    best = pd.read_csv(out / "best.csv", dtype={"trial_id": str})
    versions = client.search_model_versions("name='t-byo'")
    if "finetune" in set(best["method"]):
        assert len(versions) == 1 and client.get_run(versions[0].run_id).data.tags["method"] == "finetune"
        assert versions[0].tags["trial_id"] == best.loc[best["method"] == "finetune", "trial_id"].iloc[0]
    else:
        assert versions == [] and "nothing registered: finetune (sweep.select) has no feasible trial" in printed
