"""What a finished trial hands back: sanitised metrics for Tune/Optuna and artifact files for MLflow.

Optuna leaves a trial RUNNING when its final metric is NaN or missing, so every objective reported here is
finite: a diverged or failed trial gets the worst objective values and `failed = 1` (failed-infeasible).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from unlearn.audit.samples import save_png
from unlearn.pipeline import Prepared, UnlearnResult, audit_result

OBJECTIVES = ("forget_marker", "retain_degradation")
WORST = {"forget_marker": 1.0, "retain_degradation": 1e6}


def sanitise(metrics: dict[str, float], attack_retain: float, retain_metric: str) -> dict[str, float]:
    """Finite metrics plus the sweep's objectives, constraint and status."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if retain_metric in out and attack_retain > 0:
        out["retain_degradation"] = out[retain_metric] / attack_retain - 1.0
    failed = bool(out.get("diverged", 0.0)) or any(k not in out for k in (*OBJECTIVES, "forget_ood_distance"))
    if failed:
        out.update(WORST)
    out["failed"] = float(failed)
    # Optuna constraint convention: feasible when <= 0.
    out["constraint"] = 1.0 if failed else out["ood_delta"] - out["forget_ood_distance"]
    out["feasible"] = float(out["constraint"] <= 0)
    return out


def finish_trial(prepared: Prepared, result: UnlearnResult, attack_metrics: dict[str, float], folder: Path | None = None) -> tuple[dict, Path]:
    """Audit the unlearned model, sanitise, and write outputs.png + curves.json into `folder`."""
    retain_metric = prepared.config.sweep.retain_metric
    folder = Path(folder or tempfile.mkdtemp(prefix="trial-"))
    try:
        raw = audit_result(prepared, result)
    except Exception as exc:  # a diverged model can break the audit (e.g. FID of non-finite features)
        raw = {**result.metrics, "diverged": 1.0, "ood_delta": prepared.config.unlearn.ood_delta}
        (folder / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    metrics = sanitise(raw, attack_metrics.get(retain_metric, math.nan), retain_metric)
    curves = {name: [[int(s), float(v)] for s, v in points if math.isfinite(v)] for name, points in result.curves.items()}
    (folder / "curves.json").write_text(json.dumps(curves))
    if not metrics["failed"]:
        save_png(prepared.auditor.output_row(result.model), folder / "outputs.png")
        prepared.auditor.save_embeddings(result.model, folder / "embeddings.npz")
    return metrics, folder
