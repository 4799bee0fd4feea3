"""Pareto front and each method's best trial over sweep results (pure pandas): the one definition of "best",
beside the feasibility rule it builds on.

Only feasible trials count (see `unlearn.audit.verdict`: OOD reached, not collapsed, not diverged, forget
outputs near the retrained model's, retain quality kept). Among them a method's best trial is the one with
the smallest first objective (`sweep.objectives`, rounded to 0.01 so that noise-level differences do not
decide), ties broken by the next objectives in order, then by trial id (so the order rows arrive in never decides).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def feasible_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["feasible"] == 1.0] if "feasible" in frame else frame.iloc[0:0]


def pareto_front(frame: pd.DataFrame, objectives: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """Feasible rows not dominated on the (minimised) objectives."""
    objectives = list(objectives)
    feasible = feasible_rows(frame).dropna(subset=objectives)
    values = feasible[objectives].to_numpy()
    keep = np.array([not ((values <= row).all(axis=1) & (values < row).any(axis=1)).any() for row in values], dtype=bool)
    return feasible.loc[keep].sort_values(objectives)


def best_per_method(frame: pd.DataFrame, objectives: tuple[str, ...] | list[str]) -> pd.DataFrame:
    """One row per method that has a feasible trial: its best one (see the module docstring)."""
    if not set(objectives) <= set(frame.columns):  # e.g. only failed trials, which report no objective
        return frame.iloc[0:0]
    feasible = feasible_rows(frame).dropna(subset=list(objectives)).copy()
    if feasible.empty:
        return feasible
    keys = [f"_rank{i}" for i in range(len(objectives))]
    for i, (key, name) in enumerate(zip(keys, objectives, strict=True)):
        feasible[key] = feasible[name].round(2) if i == 0 else feasible[name]
    # trial_id last: ties resolve the same whatever order the rows come in (completion order in the searcher,
    # Tune's result order in the driver), so the confirmed trial is the delivered one
    order = [*keys, "trial_id"] if "trial_id" in feasible else keys
    best = feasible.sort_values(order, kind="stable").groupby("method", sort=False).head(1)
    return best.drop(columns=keys).sort_values("method")


def confirmed(confirmations: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per confirmed trial (`confirms` = the search trial's id): `seeds`, `feasible_seeds`, and the mean
    and `<name>_std` of each figure over the confirmation runs (the fresh unlearning seeds)."""
    if confirmations.empty:
        return pd.DataFrame(columns=["method", "confirms", "seeds", "feasible_seeds"])
    rows = []
    for (method, trial), runs in confirmations.groupby(["method", "confirms"], sort=True):
        failed = runs["failed"] == 1.0 if "failed" in runs else pd.Series(False, index=runs.index)
        group = runs[~failed]  # a failed run reports the worst objectives sanitise() gives it, not a measurement
        row = {"method": method, "confirms": trial, "seeds": len(group), "failed_seeds": int(failed.sum()),
               "feasible_seeds": int((group["feasible"] == 1.0).sum()) if "feasible" in group else 0}
        for name in names:
            if name in group:
                values = pd.to_numeric(group[name], errors="coerce")
                row[name], row[f"{name}_std"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def mean_pm_std(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """`names` shown as "mean ± std" strings (for markdown tables of confirmed rows), three significant digits."""
    shown = frame.copy()
    for name in names:
        if name in shown and f"{name}_std" in shown:
            shown[name] = [f"{m:.3g} ± {s:.2g}" if np.isfinite(s) else f"{m:.3g}"
                           for m, s in zip(shown[name], shown[f"{name}_std"], strict=True)]
            shown = shown.drop(columns=[f"{name}_std"])
    return shown
