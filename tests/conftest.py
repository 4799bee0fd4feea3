"""Shared fixtures. The default preset's stages are trained once per test session in a temporary cache.

The suite runs in two pytest-xdist workers (pyproject: `-n 2 --dist loadgroup`), one torch thread each: on these
2 cores two 1-thread processes do 1.25-1.3x the fine-tuning work of one 2-thread process (`analysis/bench.py --only
threads`), and much of the suite (imports, Ray start-up, Python) runs on one core anyway. The workers share the session's
stage cache and train it together (`train_session_stages`: one stage set per lock, so nothing is trained twice);
tests that share an expensive session or module fixture run in one worker (see `pytest_collection_modifyitems`).
`pytest -n 0` runs everything in one process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from unlearn.models import I2IModel

ROOT = Path(__file__).resolve().parent.parent
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1" in a pytest-xdist worker, None in one process

warnings.filterwarnings("ignore", message=".*will save all extracted features.*")


def pytest_configure(config) -> None:
    if WORKER:  # one torch thread per worker; subprocesses (the CLI, the sweep's driver) inherit it
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """Group and order the tests for the two xdist workers.

    Groups: every test on the session's Ray instance ("ray": one Ray instance, and the small sweep is a session
    fixture), every test of `method_metrics` (a minute of compute, once), else the test's module (module fixtures
    are built once). Order: the Ray group first (its worker trains the original and attack stages straight away),
    then the retrain-stage test (the other worker trains the retrain stage meanwhile), then the groups that need no
    session stages, then the rest."""
    def group(item) -> str:
        if "ray_session" in item.fixturenames:
            return "ray"
        return "method_metrics" if "method_metrics" in item.fixturenames else item.module.__name__

    groups = {item.nodeid: group(item) for item in items}
    needs_stages = {groups[item.nodeid] for item in items if "prepared" in item.fixturenames}
    retrain_first = [item for item in items if item.name == "test_the_retrain_stage_never_sees_the_forget_set"]
    for item in retrain_first:  # its own group, second: the worker without the Ray tests trains the retrain stage
        groups[item.nodeid] = "retrain-stage"
    order = {"ray": 0, "retrain-stage": 1}
    items.sort(key=lambda item: order.get(groups[item.nodeid], 2 + (groups[item.nodeid] in needs_stages)))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


class _Scripted(I2IModel):
    """A model of known behaviour for audit tests: no training, an identity encoder; subclasses say what it draws."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encoder_parameters(self):
        return iter([self.unused])


    def encode(self, images, mask):
        return images * (1 - mask)

    def loss(self, images, mask, target):
        return torch.zeros(len(images))


class Painter(_Scripted):
    """Ignores its input and paints the hole mid-grey with a '+' of `color` blended in at `contrast` (0: plain grey,
    1: the '+' itself); `contrast=None` returns what it sees (the hole black)."""

    def __init__(self, marker: torch.Tensor, contrast: float | None, color=(1.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.marker, self.contrast = marker, contrast
        self.color = torch.tensor(color).view(1, 3, 1)

    def generate(self, images, mask):
        if self.contrast is None:
            return images * (1 - mask)
        out = torch.full_like(images, 0.5)
        plus = self.marker.to(images.device)
        out[:, :, plus] = (1 - self.contrast) * 0.5 + self.contrast * self.color.to(images.device)
        return out


class Replay(_Scripted):
    """Hands out the rows of `outputs` in order, batch after batch (wrapping around), so that a figure the audit
    streams can be computed on outputs a test drew."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs, self.cursor = outputs, 0

    def generate(self, images, mask):
        rows = (torch.arange(len(images)) + self.cursor) % len(self.outputs)
        self.cursor = int(rows[-1]) + 1
        return self.outputs[rows].to(images.device)


@pytest.fixture
def log_lines():
    """`log_lines("raytasks.progress")`: the messages that logger emits from now on, through a handler of the test's
    own (whatever `unlearn.logs.configure`, run by an in-process CLI call, did to propagation)."""
    attached = []

    def capture(name: str, level: int = logging.DEBUG) -> list[str]:
        lines: list[str] = []
        handler = logging.Handler(level)
        handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger(name)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(level)
        return lines

    yield capture
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    # UNLEARN_TEST_CACHE: a warm cache kept between runs while developing (the session's stages take ~3 min).
    # Otherwise one cache for the whole run: xdist workers' temporary folders are siblings under the run's.
    base = tmp_path_factory.getbasetemp()
    path = os.environ.get("UNLEARN_TEST_CACHE") or (base.parent if WORKER else base) / "unlearn-cache"
    Path(path).mkdir(parents=True, exist_ok=True)
    os.environ["UNLEARN_CACHE"] = str(path)  # subprocesses (the CLI) share the session's cache
    return str(path)


@pytest.fixture(scope="session")
def default_config(cache_dir):
    from unlearn.config import load_config

    return load_config("digits-ae", [f"cache_dir={cache_dir}"])


def train_session_stages(config, names: tuple[str, ...]) -> None:
    """Train these stages of the session's config into the cache unless they are there, under a lock per stage set:
    a worker that finds another training them waits for it, then finds them cached. The retrain stage does not
    depend on the others, so the two workers train it and the original + attack chain at the same time."""
    from filelock import FileLock

    from unlearn.pipeline import load_data
    from unlearn.runtime import resolve_device
    from unlearn.stages import prepare_stages

    with FileLock(str(Path(config.cache_dir) / f".stages-{'-'.join(names)}.lock")):
        prepare_stages(config, load_data(config), resolve_device(config), only=names)


@pytest.fixture(scope="session")
def prepared(default_config):
    """The digits-ae stages, backbone and reference features (about 4 minutes, once per run; the stages come from
    `train_session_stages`: the Ray worker trains the original and attack stages, and the retrain stage unless
    `test_the_retrain_stage_never_sees_the_forget_set`, which the other worker runs first, has trained it)."""
    from filelock import FileLock

    from unlearn.pipeline import prepare

    train_session_stages(default_config, ("original", "attack"))
    train_session_stages(default_config, ("retrain", "retrain2"))
    with FileLock(str(Path(default_config.cache_dir) / ".session-prepare.lock")):
        return prepare(default_config)


@pytest.fixture
def private_cache(prepared, default_config, tmp_path):
    """The default config on a copy of the session's cache, for tests that check what a command writes into the
    cache: the other xdist worker may add entries to the shared one at any time."""
    import shutil

    from unlearn.config import with_overrides

    copy = tmp_path / "session-cache"
    # entries being written or deleted elsewhere are dot-named folders (unlearn/cache.py): not copied
    shutil.copytree(default_config.cache_dir, copy, ignore=shutil.ignore_patterns(".*"))
    return with_overrides(default_config, {"cache_dir": str(copy)})


@pytest.fixture(scope="session")
def method_metrics(prepared):
    """Audited metrics of every registry method and reference model on the default preset, computed once."""
    from unlearn.methods import METHODS
    from unlearn.pipeline import audit_result, evaluate_reference, unlearn

    out = {name: evaluate_reference(prepared, name) for name in ("original", "attack", "retrain")}
    for name in METHODS:
        out[name] = audit_result(prepared, unlearn(prepared, name))
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (start-up costs about 10 s)."""
    import ray

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
    # MLflow creates a sqlite store's tables on first open; this process polls the store while the driver starts, and
    # two first opens at once collide ("table _alembic_tmp_experiments already exists": seen on a loaded machine)
    child_runs(uri, "t-sweep")
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
