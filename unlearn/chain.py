"""Deletion requests over time: a chain of unlearned versions, each certified, none undone by the next.

Request k starts from the model that honoured requests 1..k-1 (theta0 = that version), forgets its own images
(`data.forget_list`, inline), and trains and is tested on the data set less every image the chain removed
(`data.forgotten`). Where the chain started from an attack model, the images it was poisoned on keep their '+' in
every training subset (`data.poisoned`), so that each request's marker can be audited. The audit re-checks every
earlier request (`unlearn.audit.requests`); one that the new model brings back makes it infeasible.

What a later request needs travels in the bundle (never in a file the user must keep):

    DIR/lineage.json   the poisoned images and every request so far: its number, images, forget digest, cumulative
                       digest, date, method, verdict, the figures it was certified with, its registered version
    DIR/theta0/        the parent model (an `unlearn run --out` layout), so that `unlearn audit` re-creates the
                       request's references from the bundle alone

This module is the library's part (configs, lineage, the run, the bundle); the registry's part is
`raytasks.request_registry`, and the command `unlearn request` joins them.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

from unlearn.config import Config, read_list, with_overrides
from unlearn.errors import ConfigError
from unlearn.lineage import CERTIFIED, THETA0, Lineage, Request

# What a request takes from its parent and lineage: the data set and its split (a request may not reshuffle which images
# are trained on and which are held out), the model (theta0's architecture) and theta0. `--set` may change the rest:
# the unlearning settings, the audit, the retrain reference's budget, the cache, the device.
DERIVED = ("seed", "data", "model", "stages.theta0")


def read_entries(path: str | Path) -> list[str]:
    """A request's forget-list file's entries (ConfigError: missing or empty)."""
    entries = read_list(path, "--forget-list")
    if not entries:
        raise ConfigError(f"--forget-list {path} names no image")
    return entries


def parent_lineage(folder: Path, config: Config) -> Lineage:
    """The lineage of a saved model: its lineage.json, or for a bundle without one (a chain of one) what its config and
    metrics say: a reference model (attack, original) has forgotten nothing; an unlearned model is request 1. The
    poisoned images: those of its chain, else its D_f when it trained the attack stage itself."""
    if (found := Lineage.load(folder)) is not None:
        return found
    from unlearn.data.splits import entries_of
    from unlearn.methods import REFERENCE_MODELS
    from unlearn.pipeline import load_data

    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    data = load_data(config)
    forget = entries_of(data.store, data.forget_train.index)
    poisoned = config.data.poisoned if config.stages.theta0 else (forget if config.has_marker else None)
    lineage = Lineage(config.data.dataset, poisoned)
    method = str(metrics.get("method", ""))
    if method and method not in REFERENCE_MODELS:
        lineage.requests.append(Request(1, forget, data.forget_digest(config.data.dataset),
                                        data.cumulative_digest(config.data.dataset), "before the chain", method,
                                        metrics.get("feasible") == 1.0, _certified(metrics)))
    return lineage


def _certified(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in CERTIFIED if isinstance(metrics.get(k), (int, float))}


def request_config(parent: Path, parent_config: Config, lineage: Lineage, entries: list[str],
                   overrides: dict[str, Any] | None = None) -> Config:
    """The config of the next request: the parent's, theta0 = the parent model, this request's images inline, every
    earlier request's images removed, the chain's poisoned images kept poisoned. `overrides` (dotted keys): anything
    but what the lineage decides (`DERIVED`, and everything under it)."""
    if clash := [k for k in (overrides or {}) if k in (*DERIVED, "stages") or k.startswith(tuple(f"{d}." for d in DERIVED))]:
        raise ConfigError(f"--set {clash[0]}: a request takes it from its parent (the data set, its split, the model and "
                          "theta0 are the chain's)")
    return with_overrides(parent_config, {
        "stages.theta0": str(parent.resolve()), "model.pretrained": None, "data.forget_list": entries,
        "data.forgotten": [r.entries for r in lineage.requests], "data.poisoned": lineage.poisoned, **(overrides or {})})


def run_request(config: Config, lineage: Lineage, method: str) -> tuple[Any, Any, dict[str, float]]:
    """Prepare, unlearn with `method`, audit (every earlier request re-checked and judged): (prepared, model,
    metrics)."""
    from unlearn.pipeline import run_model

    prepared, model, metrics = run_model(config, method)
    return prepared, model, prepared.auditor.verdict(metrics, lineage.certified())


def next_lineage(lineage: Lineage, prepared: Any, method: str, metrics: dict[str, float]) -> Lineage:
    """The lineage with this request appended (its figures as certified now)."""
    from unlearn.data.splits import entries_of

    dataset, data = prepared.config.data.dataset, prepared.data
    request = Request(len(lineage.requests) + 1, entries_of(data.store, data.forget_train.index),
                      data.forget_digest(dataset), data.cumulative_digest(dataset),
                      datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), method,
                      metrics.get("feasible") == 1.0, _certified(metrics))
    return Lineage(lineage.dataset, lineage.poisoned, [*lineage.requests, request])


def finish_request(out: Path, prepared: Any, model: Any, method: str, metrics: dict[str, float], lineage: Lineage,
                   location: str | None = None) -> Lineage:
    """Write the request's bundle into `out` (its certificate beside the retrain and theta0 references) and return
    the lineage with this request appended."""
    from unlearn.pipeline import evaluate_reference

    chain = next_lineage(lineage, prepared, method, metrics)
    references = {name: evaluate_reference(prepared, name) for name in ("retrain", "attack") if name in prepared.stages}
    write_request_bundle(out, prepared, model, method, metrics, references, chain, location)
    return chain


def registry_tags(bundle: Path, request: Request, metrics: dict[str, float]) -> dict[str, str]:
    """The tags of a request's registered version (the registry adds the parent version)."""
    import hashlib

    from unlearn.audit.catalogue import shown_in
    from unlearn.export import weights_digest

    return {"request_number": str(request.number), "forget_digest": request.forget_digest,
            "cumulative_digest": request.cumulative_digest, "method": request.method,
            "weights_sha256": weights_digest(bundle),
            "config_sha256": hashlib.sha256((bundle / "config.yaml").read_bytes()).hexdigest(),
            **{k: f"{metrics[k]:.6g}" for k in shown_in("registry") if k in metrics}}


def write_request_bundle(folder: Path, prepared: Any, model: Any, method: str, metrics: dict[str, float],
                         references: dict[str, dict[str, float]], lineage: Lineage, location: str | None = None) -> Path:
    """The bundle of `unlearn run --out`, plus theta0/ (the parent model) and lineage.json (this request appended);
    the certificate lists the whole chain."""
    from unlearn.export import save_run, write_certificate
    from unlearn.models.io import RUN_MODEL_FOLDER

    save_run(folder, prepared.config, model, method, metrics)
    parent_model = Path(prepared.config.stages.theta0) / RUN_MODEL_FOLDER
    shutil.copytree(parent_model, folder / THETA0 / RUN_MODEL_FOLDER)
    lineage.save(folder)
    write_certificate(folder, prepared.data, {k: s.key for k, s in prepared.stages.items()}, method, metrics, references,
                      location=location, chain=chain_lines(lineage, metrics))
    return folder


def chain_lines(lineage: Lineage, metrics: dict[str, float]) -> list[str]:
    """The certificate's chain: each request's digest, date, method and verdict, and the figures every earlier
    request has on this model (its own are the certificate's main figures)."""
    from unlearn.audit.catalogue import format_figure as fmt
    from unlearn.audit.catalogue import request_figure as fig

    lines = ["## The chain of deletion requests", "",
             "| request | version | date | method | verdict then | images | forget digest | cumulative digest |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    *earlier, this = lineage.requests
    lines += [f"| {r.number}{' (this one)' if r is this else ''} | {r.version or '-'} | {r.date} | {r.method} | "
              f"{'feasible' if r.feasible else 'NOT feasible'} | {len(r.entries)} | `{r.forget_digest}` | "
              f"`{r.cumulative_digest}` |" for r in lineage.requests]
    if earlier:
        lines += ["", "Every earlier request re-checked on this model (certified: what its own certificate recorded; the "
                  "paired intervals are against this request's retrain reference, trained without every request's images):",
                  "", "| request | marker strength (certified) | 95% interval | vs retrain (paired) | mia_auc (certified) | "
                  "95% interval | vs retrain (paired) | brought back |", "| --- " * 8 + "|"]
        def pair(n: int, stem: str) -> str:
            return f"[{fmt(metrics.get(fig(n, stem + '_ci_low')))}, {fmt(metrics.get(fig(n, stem + '_ci_high')))}]"

        for r in earlier:
            n = r.number

            lines.append(f"| {n} | {fmt(metrics.get(fig(n, 'marker_strength')))} "
                         f"({fmt(r.figures.get('forget_marker_strength'))}) | {pair(n, 'marker_strength')} | "
                         f"{pair(n, 'marker_gap_vs_retrain')} | {fmt(metrics.get(fig(n, 'mia_auc')))} "
                         f"({fmt(r.figures.get('mia_auc'))}) | {pair(n, 'mia_auc')} | {pair(n, 'mia_gap_vs_retrain')} | "
                         f"{'**YES**' if metrics.get(fig(n, 'regressed')) == 1.0 else 'no'} |")
    return [*lines, ""]
