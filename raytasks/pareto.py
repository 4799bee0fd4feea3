"""Pareto front and each method's best trial over sweep results (pure pandas): the one definition of "best".

Only feasible trials count (see `unlearn.audit.verdict`: OOD reached, not collapsed, not diverged, forget
outputs near the retrained model's, retain quality kept). Among them a method's best trial is the one with
the smallest first objective (`sweep.objectives`, rounded to 0.01 so that noise-level differences do not
decide), ties broken by the next objectives in order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_OBJECTIVES = ("forget_marker_strength", "retain_degradation")


def feasible_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["feasible"] == 1.0] if "feasible" in frame else frame.iloc[0:0]


def pareto_front(frame: pd.DataFrame, objectives: tuple[str, ...] | list[str] = DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """Feasible rows not dominated on the (minimised) objectives."""
    objectives = list(objectives)
    feasible = feasible_rows(frame).dropna(subset=objectives)
    values = feasible[objectives].to_numpy()
    keep = np.array([not ((values <= row).all(axis=1) & (values < row).any(axis=1)).any() for row in values], dtype=bool)
    return feasible.loc[keep].sort_values(objectives)


def best_per_method(frame: pd.DataFrame, objectives: tuple[str, ...] | list[str] = DEFAULT_OBJECTIVES) -> pd.DataFrame:
    """One row per method that has a feasible trial: its best one (see the module docstring)."""
    feasible = feasible_rows(frame).dropna(subset=list(objectives)).copy()
    if feasible.empty:
        return feasible
    keys = [f"_rank{i}" for i in range(len(objectives))]
    for i, (key, name) in enumerate(zip(keys, objectives, strict=True)):
        feasible[key] = feasible[name].round(2) if i == 0 else feasible[name]
    best = feasible.sort_values(keys, kind="stable").groupby("method", sort=False).head(1)
    return best.drop(columns=keys).sort_values("method")
