"""Shared fixtures. The default preset's stages are trained once per test session in a temporary cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

warnings.filterwarnings("ignore", message=".*will save all extracted features.*")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    # UNLEARN_TEST_CACHE: a warm cache kept between runs while developing (the session's stages take ~3 min)
    path = os.environ.get("UNLEARN_TEST_CACHE") or tmp_path_factory.mktemp("unlearn-cache")
    os.environ["UNLEARN_CACHE"] = str(path)  # subprocesses (the CLI) share the session's cache
    return str(path)


@pytest.fixture(scope="session")
def default_config(cache_dir):
    from unlearn.config import load_config

    return load_config("digits-ae", [f"cache_dir={cache_dir}"])


@pytest.fixture(scope="session")
def prepared(default_config):
    """The digits-ae stages, backbone and reference features (about 1.5 minutes on 2 cores, once)."""
    from unlearn.pipeline import prepare

    return prepare(default_config, log=lambda _: None)


@pytest.fixture(scope="session")
def method_metrics(prepared):
    """Audited metrics of every registry method and reference model on the default preset, computed once."""
    from unlearn.methods import METHODS
    from unlearn.pipeline import audit_result, evaluate_reference, unlearn

    out = {name: evaluate_reference(prepared, name) for name in ("original", "attack", "retrain")}
    for name, method in METHODS.items():
        if method.reference_stage is None:
            out[name] = audit_result(prepared, unlearn(prepared, name))
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (start-up costs about 10 s)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=150 * 1024**2,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


SMALL_SWEEP_ARGS = [
    "--methods", "realistic,finetune,max_loss", "--trials", "2", "--name", "t-sweep", "--set", "sweep.max_concurrent=2",
    # max_loss searches absurd learning rates: its trials diverge to NaN and must be failed-infeasible
    "--set", "sweep.method_space.max_loss.ga_lr=[1e29,1e30]",
    "--set", "sweep.space.ft_steps=[60,120]",  # shorter trials than the preset's [80, 200]
    "--set", "sweep.confirm_seeds=2",
    # realistic in its feasible region (measured: ga_lr ~0.09 and ft_lr ~0.01 over >= 120 steps), so that
    # the sweep has a model to register
    "--set", "sweep.method_space.realistic={ga_lr: [0.08, 0.1], ft_lr: [0.008, 0.0105], ft_steps: [130, 160]}",
]


def child_runs(uri: str, experiment_name: str) -> list:
    """The trial runs (Tune trials, confirmations included) of a sweep's MLflow experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string="tags.`ray.trial_id` != ''", max_results=1000)


@pytest.fixture(scope="session")
def small_sweep_interruption(ray_session, prepared, default_config, tmp_path_factory) -> dict:
    """The small sweep's first life: a driver process on the session's Ray (no second Ray instance), Ctrl-C'd as
    soon as its first trial is logged. Records what a resume must leave alone: the finished trials' runs and the
    Tune result files. `small_sweep` resumes it, so every test of the small sweep checks a resumed sweep."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri, out = f"sqlite:///{tmp}/mlflow.db", tmp / "out"
    args = [*SMALL_SWEEP_ARGS, "--out", str(out), "--tracking-uri", uri, "--set", f"cache_dir={default_config.cache_dir}"]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    stderr = tmp / "driver.stderr"  # a file, not a pipe: an unread pipe that fills up would block the driver
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "raytasks" / "sweep.py"), "--address", address, *args],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 600  # preparation (cached) and a trial; generous for a loaded machine
        while time.time() < deadline and proc.poll() is None and not child_runs(uri, "t-sweep"):
            time.sleep(0.2)
        if proc.poll() is None:  # still running (a driver that already exited is reported by its exit code)
            os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
        code = proc.wait(timeout=120)
    finished = {r.data.tags["ray.trial_id"]: r.info.run_id for r in child_runs(uri, "t-sweep")}
    result_files = {p: p.stat().st_mtime_ns for p in (out / "ray").glob("*/run_trial_*/result.json")}
    return {"args": args, "uri": uri, "out": out, "exit_code": code, "stderr": stderr.read_text(),
            "finished": finished, "result_files": result_files}


@pytest.fixture(scope="session")
def small_sweep(small_sweep_interruption):
    """A 3 x 2 sweep with its report (realistic, finetune, and max_loss searched at diverging rates), interrupted
    after its first trial and resumed in this process: (driver, tracking URI, out folder)."""
    from raytasks.sweep import parse_args, run_sweep

    first = small_sweep_interruption
    return run_sweep(parse_args([*first["args"], "--resume"])), first["uri"], first["out"]


def pytest_unconfigure(config) -> None:
    import gc

    gc.freeze()  # the interpreter's final collections would walk the session's whole heap (seconds) after the summary
