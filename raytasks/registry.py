"""Unlearned models in MLflow: logged on their trial's run (pyfunc from code, no pickle), registered under the
sweep's name with the alias `unlearned`, and fetched back (runs:/ or models:/ URIs) for `unlearn audit`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mlflow.tracking import MlflowClient

from unlearn.errors import ConfigError

ALIAS = "unlearned"
MODEL_NAME = "model"  # the logged model's name on its run: runs:/<run id>/model
URI_TAG = "unlearned_model_uri"  # on the run: the logged model (a resumed sweep logs nothing twice)
CODE = Path(__file__).with_name("mlflow_model.py")


def use_tracking_uri(tracking_uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    # Registry lookups and runs:/ URIs of logged models read the global URI, not a client's.
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def log_model(client: MlflowClient, tracking_uri: str, run_id: str, bundle: Path) -> str:
    """Log `bundle` (a folder written by `unlearn.export`) as the run's model; return its model URI."""
    run = client.get_run(run_id)
    if URI_TAG in run.data.tags:
        return run.data.tags[URI_TAG]
    mlflow = use_tracking_uri(tracking_uri)
    from mlflow import pyfunc

    import unlearn

    # Attached to the finished run without reopening it (its status and end time stay as they were).
    logged = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run_id, experiment_id=run.info.experiment_id)
    with warnings.catch_warnings():
        # MLflow asks for type hints on predict (they would impose an input schema on an image array); its check
        # resets the warning filters (simplefilter "once"), so only a showwarning hook can keep it off the output.
        shown = warnings.showwarning
        warnings.showwarning = lambda message, *rest, **kw: None if "type hint" in str(message) else shown(message, *rest, **kw)
        info = pyfunc.log_model(
            name=MODEL_NAME, python_model=str(CODE), artifacts={"bundle": str(bundle)}, model_id=logged.model_id,
            code_paths=[str(Path(unlearn.__file__).parent)],  # the library travels with the model
            pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "torchvision", "torchmetrics", "scikit-learn",
                              "safetensors", "diffusers", "pydantic", "pyyaml", "numpy"],
        )
    if (bundle / "certificate.md").is_file():
        client.log_model_artifact(info.model_id, str(bundle / "certificate.md"))
    client.set_tag(run_id, URI_TAG, info.model_uri)
    return info.model_uri


def register(client: MlflowClient, tracking_uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register the model under `name` (once per trial: found again by its `trial_id` tag) with alias `unlearned`."""
    use_tracking_uri(tracking_uri)
    found = client.search_model_versions(f"name='{name}' and tags.trial_id='{tags['trial_id']}'")
    version = found[0].version if found else create_version(client, name, model_uri, run_id, tags)
    client.set_registered_model_alias(name, ALIAS, version)
    return str(version)


def create_version(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Unlearned models, each with its certificate")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # a tracking server checks a models:/ source against its logged model (sqlite stores do not): name it
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    return str(client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id).version)


def fetch_bundle(model_uri: str, tracking_uri: str, destination: Path) -> Path:
    """Download a runs:/ or models:/ model into `destination`; return its bundle folder (ConfigError if none)."""
    mlflow = use_tracking_uri(tracking_uri)
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(destination)))
    except MlflowException as exc:
        raise ConfigError(f"--model {model_uri}: {exc.message.splitlines()[0][:200]} (tracking URI {tracking_uri})") from None
    # the bundle: the folder with config.yaml and the saved model (the sweep names it bundle/, a request its --out name)
    bundles = sorted((p.parent for p in local.rglob("config.yaml") if (p.parent / "model" / "config.json").is_file()),
                     key=lambda p: (len(p.parts), str(p)))
    if not bundles:
        raise ConfigError(f"--model {model_uri} is not an unlearned model logged by a sweep (no bundle/config.yaml)")
    return bundles[0]
