"""Shared fixtures. The default preset's stages are trained once per test session in a temporary cache."""

from __future__ import annotations

import os
import warnings

import pytest

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


@pytest.fixture(scope="session")
def small_sweep(ray_session, prepared, default_config, tmp_path_factory):
    """A 3 x 2 sweep with its report: realistic, finetune, and max_loss searched at diverging rates."""
    from raytasks.sweep import parse_args, run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    args = parse_args([
        "--methods", "realistic,finetune,max_loss", "--trials", "2", "--name", "t-sweep", "--out", str(tmp / "out"),
        "--tracking-uri", uri, "--set", f"cache_dir={default_config.cache_dir}", "--set", "sweep.max_concurrent=2",
        # max_loss searches absurd learning rates: its trials diverge to NaN and must be failed-infeasible
        "--set", "sweep.method_space.max_loss.ga_lr=[1e29,1e30]",
        "--set", "sweep.space.ft_steps=[60,120]",  # shorter trials than the preset's [80, 200]
        "--set", "sweep.confirm_seeds=2",
        # realistic in its feasible region (measured: ga_lr ~0.09 and ft_lr ~0.01 over >= 120 steps), so that
        # the sweep has a model to register
        "--set", "sweep.method_space.realistic={ga_lr: [0.08, 0.1], ft_lr: [0.008, 0.0105], ft_steps: [130, 160]}",
    ])
    return run_sweep(args), uri, tmp / "out"


def pytest_unconfigure(config) -> None:
    import gc

    gc.freeze()  # the interpreter's final collections would walk the session's whole heap (seconds) after the summary
