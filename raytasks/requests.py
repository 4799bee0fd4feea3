"""A chain of deletion requests in the MLflow Model Registry (`unlearn request`): the parent version a request continues
from, the alias it may move, and the new version it registers. The library's part (configs, lineage, the run, the
bundle) is `unlearn.chain`."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from raytasks.registry import ALIAS, _mlflow, _new_version, fetch_bundle, log_model
from raytasks.tracking import connect, resolve_uri
from unlearn.errors import ConfigError

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


def register_request(client: MlflowClient, tracking_uri: str, name: str, bundle: Path, tags: dict[str, str],
                     metrics: dict[str, float], alias: str | None) -> str:
    """Log a request's bundle on a run of the experiment `<name>-requests`, register it as a new version of `name`
    with `tags`, and move `alias` onto it (None: the alias stays where it is); return the version."""
    _mlflow(tracking_uri)
    experiment = f"{name}-requests"
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"request {tags['request_number']}", tags=tags)
    run_id = run.info.run_id
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id)
    version = _new_version(client, name, log_model(client, tracking_uri, run_id, bundle), run_id, tags)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return version




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

    @staticmethod
    def from_args(args: argparse.Namespace) -> RequestTarget | None:
        """The target of `unlearn request`'s arguments; None when nothing is to be registered (a folder, no --name)."""
        if not (args.model.startswith("models:/") or args.name):
            return None
        return RequestTarget(args.model, args.name, args.alias, args.tracking_uri)

    def fetch_parent(self, folder: Path) -> Path:
        """The parent version's bundle, downloaded into `folder`."""
        return fetch_bundle(self.model_uri, self.uri, folder / "parent")

    def next_version(self) -> str:
        """The number the registry will give the next version (for the certificate's re-audit line)."""
        versions = self.client.search_model_versions(f"name='{self.name}'")
        return str(1 + max((int(v.version) for v in versions), default=0))

    def register(self, bundle: Path, tags: dict[str, str], metrics: dict[str, float]) -> str:
        """Register the bundle as a new version; the alias moves onto it only if it is feasible."""
        tags = {"parent_version": self.parent_version or f"folder {self.model_uri}", **tags}
        feasible = metrics.get("feasible") == 1.0
        return register_request(self.client, self.uri, self.name, bundle, tags, metrics, self.alias if feasible else None)
