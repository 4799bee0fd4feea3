"""MLflow tracking of a sweep: one experiment, a parent run, nested child runs per trial and per reference.

All writes happen in the sweep's driver process (one writer: safe with sqlite), and every child run is
found again by its tags before it is created, so `--resume` never duplicates a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune

from unlearn.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
# What a trial's or reference's folder uploads to its run (the rest of a checkpoint stays in Ray storage).
UPLOADED = ("outputs.png", "embeddings.npz", "curves.json", "error.txt")  # curves.json: the report's distance plot


def reported(result: dict | None) -> bool:
    """Whether a Tune result is one the trial reported (Tune fills in `training_iteration` on each report). At the
    end of an interrupted experiment (Ctrl-C) Tune ends the trials still running, and those not yet started, with
    their default result (pid, timestamp) or none: they are unfinished, not results, and `--resume` runs them."""
    return bool(result) and "training_iteration" in result


def resolve_uri(uri: str | None) -> str:
    """Flag, then $MLFLOW_TRACKING_URI, then ./mlflow.db; sqlite paths are made absolute (workers chdir)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def reachable(uri: str) -> bool:
    """Whether a tracking server answers its health check (a file store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3)
        return True
    except urllib.error.HTTPError as exc:  # an answer: a 4xx says the server is there (the call that follows says
        return exc.code < 500              # what is wrong); a 5xx is a server not serving yet (starting, overloaded)
    except (urllib.error.URLError, ConnectionError, TimeoutError):  # refused, unknown host, timed out: away
        return False


# What a write to a tracking server that went away raises (MLflow wraps the connection error after its retries).
TRACKING_ERRORS = (MlflowException, OSError)


def connect(uri: str) -> MlflowClient:
    """A client that has proven it can reach the store, or ConfigError naming the URI."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"MLflow tracking URI {uri}: folder {folder} does not exist")
    if not reachable(uri):
        raise ConfigError(f"MLflow tracking URI {uri} is unreachable (no answer at {uri.rstrip('/')}/health)")
    # MLflow's sqlite store raises SQLAlchemy's errors for a file that is no database
    from sqlalchemy.exc import SQLAlchemyError

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except (*TRACKING_ERRORS, SQLAlchemyError) as exc:  # a store MLflow cannot open, a server's refusal, OS errors
        raise ConfigError(f"MLflow tracking URI {uri} is unusable: {str(exc).splitlines()[0][:200]}") from None
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        experiment = found.experiment_id
    else:
        # A sqlite store keeps artifacts beside the database (MLflow's default, ./mlruns, is the caller's folder).
        uri = client.tracking_uri
        root = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() if uri.startswith("sqlite:///") else None
        experiment = client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    # The MLflow UI opens it in the model-training view (runs with their logged models).
    client.set_experiment_tag(experiment, "mlflow.experimentKind", "custom_model_development")
    return experiment


def find_run(client: MlflowClient, experiment: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i : i + _BATCH])


def log_curves(client: MlflowClient, run_id: str, curves: dict[str, list[list[float]]]) -> None:
    now = int(time.time() * 1000)
    items = [Metric(f"curve/{name}", float(v), now, int(step))
             for name, points in curves.items() for step, v in points if math.isfinite(v)]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i : i + _BATCH])


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def start_parent(client: MlflowClient, experiment: str, sweep: str, config: dict[str, Any], resume_run: str | None) -> str:
    if resume_run is not None:
        client.update_run(resume_run, status="RUNNING")
        return resume_run
    run = client.create_run(experiment, run_name=sweep, tags={"sweep": sweep, "role": "parent"})
    flat = _flatten(config)
    log_params(client, run.info.run_id, flat)
    client.log_dict(run.info.run_id, config, "config.json")
    return run.info.run_id


def log_child(
    client: MlflowClient,
    experiment: str,
    parent: str,
    identity: dict[str, str],
    params: dict[str, Any],
    metrics: dict[str, Any],
    artifacts: Path | None,
    failed: bool = False,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a nested run once per `identity` (tags that name it across --resume).

    A finished run is kept; a run left RUNNING by an interrupted sweep, or a failed one that has since
    succeeded, is replaced (soft-deleted) so that the experiment shows exactly one run per identity.
    """
    existing = find_run(client, experiment, identity)
    if existing is not None:
        status = client.get_run(existing).info.status
        if status == "FINISHED" or (status == "FAILED" and failed):
            return existing
        client.delete_run(existing)
    all_tags = {**identity, **(tags or {})}
    name = all_tags.get("trial_name") or all_tags.get("reference") or "run"
    run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent, **all_tags})
    run_id = run.info.run_id
    log_params(client, run_id, params)
    log_metrics(client, run_id, metrics)
    if artifacts is not None and artifacts.is_dir():
        curves_path = artifacts / "curves.json"
        if curves_path.is_file():
            log_curves(client, run_id, json.loads(curves_path.read_text()))
        for name in UPLOADED:  # never the checkpoint's weights (kept in Ray storage for the best trials)
            if (artifacts / name).is_file():
                client.log_artifact(run_id, str(artifacts / name))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return run_id


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_trial(client: MlflowClient, experiment: str, parent: str, sweep: str, method: str, workers: int, trial_id: str,
              params: dict, metrics: dict, artifacts: str | None, failed: bool = False,
              tags: dict[str, str] | None = None) -> str:
    """One trial as a nested run, tagged so that it is found (not duplicated) on --resume."""
    failed = failed or bool(metrics.get("failed", 0.0))
    status = "failed-infeasible" if failed else ("feasible" if metrics.get("feasible") else "infeasible")
    identity = {"sweep": sweep, "method": method, "ray.trial_id": trial_id}
    return log_child(client, experiment, parent, identity, {**params, "method": method, "workers": workers}, metrics,
                     Path(artifacts) if artifacts else None, failed=failed,
                     tags={"trial_name": f"{method}-{trial_id}", "status_detail": status, **(tags or {})})


class MLflowTrialLogger:
    """Logs finished trials (driver side, one writer): search trials nested under the sweep's parent run,
    confirmation trials (config key `confirms`) under the trial they confirm, tagged `confirm=<trial id>`.

    It holds only plain data, so Tune can pickle it into the experiment state for `--resume`.
    """

    def __init__(self, uri: str, experiment: str, parent: str, sweep: str, workers: int) -> None:
        self.experiment, self.parent, self.sweep, self.workers, self.uri = experiment, parent, sweep, workers, uri
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log(self, trial_id: str, config: dict, metrics: dict, artifacts: str | None, failed: bool = False) -> str:
        params = dict(config)
        method, confirms = params.pop("method"), params.pop("confirms", None)
        parent, tags = self.parent, ({"node_id": metrics["node_id"]} if isinstance(metrics.get("node_id"), str) else {})
        if confirms is not None:
            confirmed = find_run(self.client, self.experiment, {"sweep": self.sweep, "method": method, "ray.trial_id": confirms})
            parent, tags = confirmed or self.parent, {**tags, "confirm": confirms}
        return log_trial(self.client, self.experiment, parent, self.sweep, method, self.workers, trial_id, params,
                         metrics, artifacts, failed, tags)


class TrialLoggingCallback(tune.Callback):
    """Logs each trial as it ends, so MLflow shows the sweep while it runs.

    A tracking server that stops answering does not stop the sweep: the trials that end meanwhile are held here
    (said in one line) and logged as soon as it answers again; the driver logs whatever is still missing at the
    end (`log_child` finds what is already there, so nothing is logged twice)."""

    def __init__(self, logger: MLflowTrialLogger, say: Callable[[str], None] | None = None) -> None:
        self.logger = logger
        self.say = say or logging.getLogger(__name__).warning
        self.pending: dict[str, tuple] = {}  # trial id -> the arguments of its logger.log call

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if not reported(trial.last_result):  # ended unfinished by an interrupted experiment: --resume runs it
            return
        ckpt = trial.checkpoint
        self._log(trial.trial_id, trial.config, trial.last_result or {}, ckpt.path if ckpt else None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        # the trial raised (a bug, not a diverged model): its run gets Tune's error.txt, the traceback
        folder = str(Path(trial.error_file).parent) if trial.error_file else None
        self._log(trial.trial_id, trial.config, {"failed": 1.0, "feasible": 0.0}, folder, True)

    def _log(self, trial_id: str, *args) -> None:
        self.pending[trial_id] = args
        if len(self.pending) > 1 and not reachable(self.logger.uri):  # still away: do not wait on it per trial
            self.say(f"tracking server {self.logger.uri} still unreachable: "
                     f"{len(self.pending)} trial(s) wait to be logged")
            return
        for waiting, arguments in list(self.pending.items()):
            try:
                self.logger.log(waiting, *arguments)
            except TRACKING_ERRORS as exc:
                if reachable(self.logger.uri):  # the server answers and refuses the write: a real error
                    raise
                self.say(f"tracking server {self.logger.uri} unreachable ({type(exc).__name__}): "
                         f"{len(self.pending)} trial(s) wait to be logged; the sweep goes on")
                return
            del self.pending[waiting]


# What a sweep logged that shows D_f: the parent's reference grids, each run's output strip and embeddings.
FORGET_ARTIFACTS = ("grid", "outputs.png", "embeddings.npz", "report/grid.png", "report/tsne.png")
REPORT_IMAGES = ("grid.png", "tsne.png")  # in the local report folder: forget-test inputs and their embeddings


def purge_runs(client: MlflowClient, digest: str) -> tuple[list[str], list[str]]:
    """(removed, remaining): delete the forget images and embeddings of every sweep whose parent run carries
    `forget_digest = digest` (the runs' metrics, parameters and logged models stay), and those files in the
    sweep's Ray storage when it is a local folder."""
    import shutil

    import mlflow
    from mlflow.entities import ViewType
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(client.tracking_uri)  # mlflow-artifacts:/ locations resolve against this server
    removed, remaining = [], []
    for experiment in client.search_experiments(view_type=ViewType.ALL):
        parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.forget_digest = '{digest}'",
                                     run_view_type=ViewType.ALL, max_results=1000)
        for parent in parents:
            # every run of that sweep: references, trials, and the confirmation runs nested under trials
            members = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=10000,
                                         filter_string=f"tags.sweep = '{parent.data.tags.get('sweep', '')}'")
            for run in [parent, *[m for m in members if m.info.run_id != parent.info.run_id]]:
                present = {a.path for a in client.list_artifacts(run.info.run_id)}
                present |= {a.path for a in client.list_artifacts(run.info.run_id, "report")} if "report" in present else set()
                repo = get_artifact_repository(run.info.artifact_uri)
                for name in FORGET_ARTIFACTS:
                    if name in present:
                        repo.delete_artifacts(name)
                        removed.append(f"MLflow {experiment.name}/{run.info.run_id}/{name}")
                if "unlearned_model_uri" in run.data.tags:
                    remaining.append(f"MLflow {experiment.name}/{run.info.run_id}: the certified model "
                                     f"{run.data.tags['unlearned_model_uri']} (no D_f image; kept)")
            report = Path(parent.data.tags.get("report_dir", ""))
            if parent.data.tags.get("report_dir") and report.is_dir():
                for name in REPORT_IMAGES:
                    if (report / name).is_file():
                        (report / name).unlink()
                        removed.append(str(report / name))
            storage = Path(parent.data.tags.get("ray_storage", ""))
            if parent.data.tags.get("ray_storage") and storage.is_dir():
                for path in sorted(p for name in FORGET_ARTIFACTS[1:] for p in storage.rglob(name)):
                    path.unlink()
                    removed.append(str(path))
                for grid in sorted(storage.rglob("grid")):
                    shutil.rmtree(grid, ignore_errors=True)
            elif parent.data.tags.get("ray_storage"):
                remaining.append(f"Ray storage {storage} of sweep {experiment.name} (not a local folder: remove its "
                                 "outputs.png and embeddings.npz there)")
    return removed, remaining
