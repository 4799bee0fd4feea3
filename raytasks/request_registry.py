"""A chain of deletion requests in the MLflow Model Registry (`unlearn request`): the parent version a request continues
from, the alias it may move, and the new version it registers. The library's part (configs, lineage, the run, the
bundle) is `unlearn.chain`."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from raytasks.registry import ALIAS, MODEL_NAME, create_version, fetch_bundle, log_model, use_tracking_uri
from raytasks.tracking import connect, experiment_id, resolve_uri
from unlearn.errors import ConfigError

logger = logging.getLogger(__name__)
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)  # MLflow keeps these for itself


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of models:/NAME/VERSION or models:/NAME@ALIAS (ConfigError for anything else)."""
    if match := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        return match[1], match[2], None
    if match := re.fullmatch(r"models:/([^/@]+)@([^/@]+)", uri):
        return match[1], None, match[2]
    raise ConfigError(f"--model {uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str, dict[str, str]]:
    """(name, version, tags) of the model version a models:/ URI names (ConfigError when it does not resolve)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"--model {uri} does not resolve: {exc.message.splitlines()[0][:200]}") from None
    return name, str(found.version), dict(found.tags)


def check_alias(client: MlflowClient, name: str, alias: str, parent_version: str | None) -> None:
    """The alias a request may move: not one MLflow reserves, and pointing at the parent version (or at nothing yet):
    moving an alias that points elsewhere would drop the requests honoured by the version it points at."""
    from mlflow.exceptions import MlflowException

    if RESERVED_ALIAS.match(alias) or not re.fullmatch(r"[\w-]+", alias):
        raise ConfigError(f"alias {alias!r} cannot be moved (MLflow reserves 'latest' and 'v<number>'; an alias is letters, "
                          "digits, '_' and '-')")
    try:
        current = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return  # no such alias (or no such model) yet
    if current != parent_version:
        raise ConfigError(f"alias {alias!r} of {name} points to version {current}, not to the parent "
                          f"{'version ' + parent_version if parent_version else 'folder'}: moving it would drop the requests "
                          f"version {current} honoured; continue from models:/{name}@{alias}")


class RequestTarget:
    """Where a request's model goes: the parent (a models:/ URI, or a folder that starts a chain under `name`), the
    registered model's name and the alias, all checked before any work."""

    def __init__(self, model: str, name: str | None, alias: str | None, tracking_uri: str | None) -> None:
        self.uri = resolve_uri(tracking_uri)
        self.client = connect(self.uri)
        self.model_uri, self.parent_version = model, None
        if model.startswith("models:/"):
            self.name, self.parent_version, _ = resolve_version(self.client, model)
            from_uri = parse_model_uri(model)[2]
            if name and name != self.name:
                raise ConfigError(f"--name {name}: a request registers under its parent's name {self.name}")
        else:
            self.name, from_uri = name, None
        self.alias = alias or from_uri or ALIAS
        check_alias(self.client, self.name, self.alias, self.parent_version)

    def fetch_parent(self, folder: Path) -> Path:
        """The parent version's bundle, downloaded into `folder`."""
        return fetch_bundle(self.model_uri, self.uri, folder / "parent")

    def start_run(self, number: int) -> tuple[str, str]:
        """A run of the experiment `<name>-requests` for request `number`: (run id, the URI its model will have)."""
        use_tracking_uri(self.uri)
        experiment = experiment_id(self.client, f"{self.name}-requests")  # artifacts beside a sqlite store
        run_id = self.client.create_run(experiment, run_name=f"request {number}").info.run_id
        return run_id, f"runs:/{run_id}/{MODEL_NAME}"

    def register(self, run_id: str, bundle: Path, tags: dict[str, str], metrics: dict[str, float]) -> tuple[str, bool]:
        """Log the bundle on the request's run (its figures as metrics, `tags` as tags), register it as a new version
        with `tags` and the parent version, and move the alias onto it if it is feasible and the alias still points at
        the parent (another request may have moved it meanwhile): (version, whether the alias moved)."""
        tags = {"parent_version": self.parent_version or f"folder {self.model_uri}", **tags}
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.client.log_metric(run_id, key, float(value))
        version = create_version(self.client, self.name, log_model(self.client, self.uri, run_id, bundle), run_id, tags)
        self.client.set_terminated(run_id)  # finished once its model is registered (a failure before: cli marks it FAILED)
        if metrics.get("feasible") != 1.0:
            return version, False
        try:
            check_alias(self.client, self.name, self.alias, self.parent_version)
        except ConfigError as exc:
            logger.warning(f"version {version} registered, alias not moved: {exc}")
            return version, False
        self.client.set_registered_model_alias(self.name, self.alias, version)
        return version, True
