"""What a finished trial hands back: sanitised metrics for Tune/Optuna and artifact files for MLflow.

Feasibility and the retain degradation come from the library (`unlearn.audit.verdict`), the worst objective values
from the metric table (`unlearn.audit.catalogue`). This module makes the report safe for Optuna, which leaves a
trial RUNNING when its final metric is NaN or missing: every objective reported here is finite, a diverged trial or
one that could not run to its audit gets the worst objective values, `failed = 1` and `feasible = 0`
(failed-infeasible), and an objective missing on a finite model is raised as the bug it is.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from unlearn.audit.catalogue import WORST
from unlearn.audit.samples import save_png
from unlearn.audit.verdict import CONSTRAINT_FIGURES
from unlearn.export import save_run
from unlearn.pipeline import Prepared, UnlearnResult, audit_result


def sanitise(metrics: dict[str, float], objectives: list[str], failed: bool = False) -> dict[str, float]:
    """Finite metrics with every objective present. A diverged run, or one that `failed` (it could not run to its
    audit), is infeasible with the worst objectives. An objective (or forget_ood_distance) missing or not finite on
    a model that neither diverged nor failed is a bug in the audit: ValueError naming it, never buried among the
    failures."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    failed = failed or bool(out.get("diverged", 0.0))
    if not failed and (absent := [k for k in (*objectives, CONSTRAINT_FIGURES["ood"]) if k not in out]):
        shown = {k: metrics.get(k, "missing") for k in absent}
        raise ValueError(f"the audit of a finite model gave no finite {', '.join(absent)} ({shown})")
    if failed:
        out.update({k: WORST[k] for k in objectives})
        out.update(feasible=0.0, constraint=max(1.0, out.get("constraint", 1.0)))
    out["failed"] = float(failed)
    return out


WEIGHTS_FOLDER = "bundle"  # in the trial's checkpoint: weights, config.yaml, metrics.json (never uploaded per trial)


def failed_trial(prepared: Prepared, reason: str, folder: Path | None = None) -> tuple[dict, Path]:
    """A trial that could not run to its audit (e.g. out of GPU memory): failed-infeasible, the reason in error.txt."""
    folder = Path(folder or tempfile.mkdtemp(prefix="trial-"))
    (folder / "error.txt").write_text(reason.rstrip() + "\n")
    return sanitise({}, prepared.config.objectives, failed=True), folder


def finish_trial(prepared: Prepared, result: UnlearnResult, method: str, folder: Path | None = None) -> tuple[dict, Path]:
    """Audit the unlearned model, sanitise, write outputs.png + curves.json into `folder`, and the weights
    (into `folder/bundle`) when `sweep.keep_weights` says this trial may be selected."""
    folder = Path(folder or tempfile.mkdtemp(prefix="trial-"))
    # A diverged model (the run's record, its weights or its outputs not finite) is reported without an audit; any
    # error of the audit itself is a bug or a resource failure and surfaces as the trial's error, with its traceback.
    raw = audit_result(prepared, result)
    metrics = sanitise(raw, prepared.config.objectives)
    curves = {name: [[int(s), float(v)] for s, v in points if math.isfinite(v)] for name, points in result.curves.items()}
    (folder / "curves.json").write_text(json.dumps(curves))
    if not metrics["failed"]:
        save_png(prepared.auditor.output_row(result.model), folder / "outputs.png")
        prepared.auditor.save_embeddings(result.model, folder / "embeddings.npz")
    keep = prepared.config.sweep.keep_weights
    if not metrics["failed"] and (keep == "all" or metrics.get("feasible") == 1.0):  # "best" is always feasible
        save_run(folder / WEIGHTS_FOLDER, prepared.config, result.model, method, raw)
    return metrics, folder
