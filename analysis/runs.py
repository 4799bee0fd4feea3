"""Reading a sweep back from MLflow (through the client API, never the database) into pandas."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from raytasks.tracking import resolve_uri
from unlearn.audit.best import best_per_method
from unlearn.audit.verdict import violation_counts
from unlearn.config import Config, validate_config
from unlearn.errors import ConfigError

# One "Downloading artifacts" progress bar per artifact (22 for the default sweep) is noise in the sweep's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class SweepRuns:
    client: MlflowClient
    experiment: str
    parent: pd.Series  # the most recent parent run of the experiment
    trials: pd.DataFrame  # one row per finished trial: params.*, metrics.*, tags.*
    references: pd.DataFrame  # original / attack / retrain rows
    confirmations: pd.DataFrame | None = None  # runs tagged `confirm` (nested under the trial they confirm)
    _config: Config | None = None

    @property
    def parent_id(self) -> str:
        return self.parent["run_id"]

    def param(self, name: str, default: str = "?") -> str:
        return str(self.parent.get(f"params.{name}", default))

    def artifact_bytes(self, run_id: str, path: str) -> bytes | None:
        """One artifact's content: None if the run has none at that path; a failing download raises (a report that
        silently drops a row would look complete). Downloaded into a temporary folder that is removed again."""
        parent = str(Path(path).parent) if Path(path).parent != Path(".") else None
        if path not in {a.path for a in self.client.list_artifacts(run_id, parent)}:
            return None
        with tempfile.TemporaryDirectory(prefix="artifact-") as folder:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=folder,
                                                        tracking_uri=self.client.tracking_uri)
            return Path(local).read_bytes()

    def image(self, run_id: str, path: str) -> np.ndarray | None:
        from PIL import Image

        content = self.artifact_bytes(run_id, path)
        return None if content is None else np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))

    def config(self) -> Config:
        """The sweep's resolved config, as logged on the parent run."""
        import json

        if self._config is not None:
            return self._config
        content = self.artifact_bytes(self.parent_id, "config.json")
        if content is None:
            raise ConfigError(f"sweep {self.experiment!r}: the parent run has no config.json")
        self._config = validate_config(json.loads(content))
        return self._config

    def metric_frame(self) -> pd.DataFrame:
        """Finished trials with plain metric names and a `method` column."""
        frame = self.trials.rename(columns=lambda c: c.removeprefix("metrics.")).copy()
        frame["method"] = self.trials["tags.method"]
        return frame

    def confirmation_frame(self) -> pd.DataFrame:
        """Confirmation runs with plain metric names, `method` and `confirms` (the confirmed trial's id)."""
        if self.confirmations is None or self.confirmations.empty:
            return pd.DataFrame(columns=["method", "confirms", "feasible"])
        frame = self.confirmations.rename(columns=lambda c: c.removeprefix("metrics.")).copy()
        frame["method"], frame["confirms"] = self.confirmations["tags.method"], self.confirmations["tags.confirm"]
        return frame

    def best_trials(self) -> pd.DataFrame:
        """Per method with a feasible trial: its best one (unlearn.audit.best.best_per_method, the one definition)."""
        return best_per_method(self.metric_frame(), self.config().objectives)

    def infeasible_methods(self) -> dict[str, dict[str, int]]:
        """Methods with finished trials but none feasible: how often each constraint was violated."""
        frame, config = self.metric_frame(), self.config()
        best = set(self.best_trials()["method"])
        out: dict[str, dict[str, int]] = {}
        for method, group in frame.groupby("method"):
            if method in best:
                continue
            out[str(method)] = violation_counts(group.to_dict("records"), config)
        return out


def load_sweep(experiment: str, tracking_uri: str | None = None) -> SweepRuns:
    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment named {experiment!r} at {uri}")
    mlflow.set_tracking_uri(uri)  # mlflow.search_runs reads the global URI
    runs = mlflow.search_runs([exp.experiment_id], output_format="pandas")
    if runs.empty or "tags.role" not in runs:
        raise ConfigError(f"experiment {experiment!r} has no sweep (no parent run)")
    parents = runs[runs["tags.role"] == "parent"].sort_values("start_time")
    if parents.empty:
        raise ConfigError(f"experiment {experiment!r} has no sweep (no parent run)")
    parent = parents.iloc[-1]
    children = runs[_column(runs, "tags.mlflow.parentRunId") == parent["run_id"]]
    trials = children[_column(children, "tags.ray.trial_id").notna() & (children["status"] == "FINISHED")
                      & _column(children, "metrics.forget_ood_distance").notna()]  # audited, marker or not
    if trials.empty:
        raise ConfigError(f"experiment {experiment!r} has no finished trial")
    references = children[_column(children, "tags.reference").notna()]
    confirmations = runs[_column(runs, "tags.confirm").notna()
                         & _column(runs, "tags.mlflow.parentRunId").isin(set(trials["run_id"]))
                         & (runs["status"] == "FINISHED")]
    return SweepRuns(client, experiment, parent, trials, references, confirmations)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column, or all-missing when no run has that tag or metric."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index, dtype=object)
