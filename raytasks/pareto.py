"""Pareto front and best-configuration selection over sweep results (pure pandas)."""

from __future__ import annotations

import numpy as np
import pandas as pd

OBJECTIVES = ("forget_marker", "retain_degradation")


def pareto_front(frame: pd.DataFrame, objectives: tuple[str, ...] = OBJECTIVES) -> pd.DataFrame:
    """Feasible rows not dominated on the (minimised) objectives."""
    feasible = frame[(frame.get("feasible", 1.0) == 1.0)].dropna(subset=list(objectives))
    values = feasible[list(objectives)].to_numpy()
    keep = np.array([not ((values <= row).all(axis=1) & (values < row).any(axis=1)).any() for row in values], dtype=bool)
    return feasible.loc[keep].sort_values(list(objectives))


def best_per_method(frame: pd.DataFrame) -> pd.DataFrame:
    """The feasible trial with the smallest forget_marker + retain_degradation, per method."""
    feasible = frame[frame.get("feasible", 1.0) == 1.0].copy()
    if feasible.empty:
        return feasible
    feasible["score"] = feasible["forget_marker"] + feasible["retain_degradation"].clip(lower=0)
    return feasible.sort_values(["score", "forget_marker"]).groupby("method", sort=False).head(1).sort_values("method")
