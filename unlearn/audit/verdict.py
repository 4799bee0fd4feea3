"""What counts as forgotten: the one feasibility rule used by the CLI, the sweep, Optuna and the report.

A model is feasible when every constraint value is <= 0 (Optuna's convention):
- ood:                forget_ood_distance >= ood_delta (Eq. 3, the final model against theta0 on D_f),
- collapsed:          the outputs did not collapse (after GA, or at the end),
- diverged:           no non-finite loss, gradient or output,
- forget_gap:         forget_gap_vs_retrain <= max_forget_gap (behaves like the retrained model, not noise, grey or a
                      saturated colour painted into the hole); `audit.max_forget_gap` auto: audit.gap_margin x the
                      gap between two retrain references of different seeds (calibrated per setup),
- retain_degradation: retain_degradation <= audit.max_retain_degradation (retain quality kept),
- earlier_requests:   in a chain of deletion requests, no earlier request brought back (regressed_requests = 0;
                      `regressions`).
"""

from __future__ import annotations

import math

from unlearn.audit.catalogue import format_figure, request_figure
from unlearn.config import Config

# Each constraint and the figure it judges (shown beside the verdict in the report), in the order they are reported.
CONSTRAINT_FIGURES = {"ood": "forget_ood_distance", "collapsed": "collapsed", "diverged": "diverged",
                      "forget_gap": "forget_gap_vs_retrain", "retain_degradation": "retain_degradation",
                      "earlier_requests": "regressed_requests"}


def constraint_values(metrics: dict[str, float], config: Config) -> dict[str, float]:
    """Each constraint's value (<= 0: satisfied); a figure that is missing counts as violated (1.0)."""

    def excess(name: str, limit: float | None) -> float | None:
        if limit is None:
            return None
        value = metrics.get(name, math.nan)
        return value - limit if math.isfinite(value) and math.isfinite(limit) else 1.0

    values: dict[str, float | None] = {
        "ood": (metrics["ood_delta"] - metrics["forget_ood_distance"]
                if math.isfinite(metrics.get("ood_delta", math.nan))
                and math.isfinite(metrics.get("forget_ood_distance", math.nan))
                else 1.0),
        "collapsed": metrics.get("collapsed", 1.0) - 0.5,
        "diverged": metrics.get("diverged", 0.0) - 0.5,
        "forget_gap": excess("forget_gap_vs_retrain", forget_gap_limit(metrics, config)),
        "retain_degradation": excess("retain_degradation", config.audit.max_retain_degradation),
        # only judged where a chain's regressions were assessed (the figure is there)
        "earlier_requests": metrics["regressed_requests"] - 0.5 if "regressed_requests" in metrics else None,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def forget_gap_limit(metrics: dict[str, float], config: Config) -> float | None:
    """The forget-gap threshold: the calibrated one that `metrics` carry (auto: audit.gap_margin x
    retrain_gap_yardstick), else the configured number; NaN when auto is not calibrated (violated, as a missing
    figure is); None: no constraint (no retrain reference, or audit.max_forget_gap null)."""
    limit = config.audit.max_forget_gap
    if not config.audit.retrain or limit is None:
        return None
    if "max_forget_gap" in metrics:
        return float(metrics["max_forget_gap"])
    return math.nan if limit == "auto" else float(limit)


def violations(metrics: dict[str, float], config: Config) -> list[str]:
    """Names of the violated constraints, in CONSTRAINT_FIGURES order (empty: feasible)."""
    return [k for k, v in constraint_values(metrics, config).items() if not v <= 0]


def assess(metrics: dict[str, float], calibration: dict[str, float], ood_delta: float, config: Config,
           certified: list[dict[str, float]] | None = None) -> dict[str, float]:
    """`metrics` with the calibration figures, the figures judged against it (retain_degradation: the retain
    metric against the attack model's; ood_reached: against ood_delta; collapsed also right after GA; in a chain, with
    `certified`, each earlier request: `regressions`) and the verdict (`judge`)."""
    out = {**metrics, **calibration}
    # Collapse right after GA stands whatever fine-tuning did afterwards (the end state is judged by the audit).
    if out.get("ga_output_std_ratio", math.inf) < config.audit.collapse_std_ratio:
        out["collapsed"] = 1.0
    attack_retain = calibration.get(f"attack_{config.audit.retain_metric}")
    if attack_retain and config.audit.retain_metric in out:
        out["retain_degradation"] = out[config.audit.retain_metric] / attack_retain - 1.0
    if "forget_ood_distance" in out and math.isfinite(ood_delta):
        out["ood_delta"] = ood_delta
        out["ood_reached"] = float(out["forget_ood_distance"] >= ood_delta)
    if certified is not None:
        out.update(regressions(out, certified, config.audit.regression_margin))
    out.update(judge(out, config))
    return out


def regressions(metrics: dict[str, float], certified: list[dict[str, float]], margin: float) -> dict[str, float]:
    """Which earlier requests this model brought back: request j regressed when its marker strength or its mia_auc
    rose by more than `margin` above the figure its own certificate recorded (the lower end of the 95% interval
    above it: not noise) and, with a retrain reference, above retraining's level (the paired interval excludes 0).
    `certified[j - 1]`: request j's figures as certified (its forget_marker_strength, mia_auc). Returns
    `request<j>_regressed` per request and `regressed_requests` (their count: the verdict's constraint)."""
    out: dict[str, float] = {}
    for number, recorded in enumerate(certified, 1):
        regressed = False
        for stem, certified_name, gap in (("marker_strength", "forget_marker_strength", "marker_gap_vs_retrain_ci_low"),
                                          ("mia_auc", "mia_auc", "mia_gap_vs_retrain_ci_low")):
            low = metrics.get(request_figure(number, f"{stem}_ci_low"))
            if low is None or recorded.get(certified_name) is None:
                continue
            beyond_retrain = metrics.get(request_figure(number, gap), math.inf) > 0
            regressed |= bool(low > recorded[certified_name] + margin and beyond_retrain)
        out[request_figure(number, "regressed")] = float(regressed)
    out["regressed_requests"] = float(sum(out.values()))
    return out


def judge(metrics: dict[str, float], config: Config) -> dict[str, float]:
    """`feasible` (1/0) and `constraint` (the largest constraint value) for a metrics dict."""
    values = constraint_values(metrics, config)
    return {"feasible": float(all(v <= 0 for v in values.values())), "constraint": max(values.values())}


def violation_counts(rows: list[dict[str, float]], config: Config) -> dict[str, int]:
    """How often each constraint was violated over `rows` (trials); a failed trial counts as `failed`."""
    counts: dict[str, int] = {}
    for row in rows:
        for name in ["failed"] if row.get("failed") == 1.0 else violations(row, config):
            counts[name] = counts.get(name, 0) + 1
    return counts


def describe_constraints(figures: dict[str, float], config: Config) -> dict[str, str]:
    """Each constraint this setup judges, as its threshold reads (`figures`: a run's metrics or the calibration:
    ood_delta, max_forget_gap, retrain_gap_yardstick), in CONSTRAINT_FIGURES order: the certificate's and the
    report's words for the verdict."""

    fmt = format_figure
    texts = {"ood": f"forget_ood_distance >= ood_delta = {fmt(figures.get('ood_delta', math.nan))}",
             "collapsed": f"outputs' std ratio >= {config.audit.collapse_std_ratio:g} (after GA and at the end)",
             "diverged": "no non-finite loss, gradient or output"}
    if (limit := forget_gap_limit(figures, config)) is not None:
        gap = fmt(limit)
        if config.audit.max_forget_gap == "auto" and "retrain_gap_yardstick" in figures:
            gap += (f" (auto: audit.gap_margin {config.audit.gap_margin:g} x retrain_gap_yardstick "
                    f"{fmt(figures['retrain_gap_yardstick'])}, the gap of a second retraining to the first)")
        texts["forget_gap"] = f"forget_gap_vs_retrain <= {gap}"
    if config.audit.max_retain_degradation is not None:
        texts["retain_degradation"] = f"retain_degradation <= {config.audit.max_retain_degradation:g}"
    if "regressed_requests" in figures:
        texts["earlier_requests"] = (f"no earlier request brought back (regressed_requests = 0: marker strength and mia_auc "
                                     f"within audit.regression_margin {config.audit.regression_margin:g} of what each "
                                     "request's certificate recorded, or at the retrain reference's level)")
    return texts
