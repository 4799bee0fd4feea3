"""The lineage of a chain of deletion requests (`unlearn.chain`), as a request's bundle carries it in lineage.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unlearn.errors import ConfigError

LINEAGE = "lineage.json"
THETA0 = "theta0"
SCHEMA = 1
# What a request's certificate recorded of its own images: the regression check's base (unlearn.audit.verdict)
CERTIFIED = ("forget_marker_strength", "mia_auc", "mia_auc_ci_low", "mia_auc_ci_high")


@dataclass
class Request:
    number: int
    entries: list[str]
    forget_digest: str
    cumulative_digest: str
    date: str
    method: str
    feasible: bool
    figures: dict[str, float]  # CERTIFIED figures, as the request's own audit measured them
    version: str | None = None  # its registered version, once known


@dataclass
class Lineage:
    dataset: str
    poisoned: list[str] | None = None
    requests: list[Request] = field(default_factory=list)

    def save(self, folder: Path) -> Path:
        path = folder / LINEAGE
        path.write_text(json.dumps({"schema": SCHEMA, **asdict(self)}, indent=1) + "\n")
        return path

    @staticmethod
    def load(folder: Path) -> Lineage | None:
        path = folder / LINEAGE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            if raw.get("schema") != SCHEMA:
                raise ConfigError(f"{path}: lineage schema {raw.get('schema')!r}, this version reads {SCHEMA}")
            return Lineage(raw["dataset"], raw["poisoned"], [Request(**r) for r in raw["requests"]])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a lineage this version can read: {exc}") from None

    def certified(self) -> list[dict[str, float]]:
        return [r.figures for r in self.requests]
