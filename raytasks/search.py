"""What one method's Tune experiment searches: its space, first point, trial resources, and the Optuna
searcher with the feasibility constraint attached to each Optuna trial before it is told its values.

Optuna 5 reads constraints stored on the trial (`Trial.set_constraint`); a value <= 0 is feasible.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from unlearn.config import Config
from unlearn.methods import METHODS


class ConstrainedOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            # the largest of unlearn.audit.verdict's constraint values: feasible <=> <= 0
            ot_trial.set_constraint("feasibility", float((result or {}).get("constraint", 1.0)))
        super().on_trial_complete(trial_id, result, error)


def search_space(config: Config, method: str) -> dict[str, Any]:
    from ray import tune

    space = {}
    for hp in METHODS[method].hyperparameters:
        low, high = config.sweep.range_of(method, hp)
        space[hp] = tune.randint(int(low), int(high) + 1) if hp.endswith("_steps") else tune.loguniform(low, high)
    return space


def first_point(config: Config, method: str) -> dict[str, Any]:
    """The config's own values, clipped into the search ranges: the first point of every method."""
    values = config.unlearn.model_dump(by_alias=True)
    out = {}
    for hp in METHODS[method].hyperparameters:
        low, high = config.sweep.range_of(method, hp)
        v = min(max(values[hp], low), high)
        out[hp] = int(v) if hp.endswith("_steps") else float(v)
    return out


def trial_resources(workers: int, use_gpu: bool) -> dict[str, float]:
    if workers > 1:
        return {"CPU": 0.01}  # the Ray Train workers hold the real resources
    return {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}


def make_searcher(config: Config, method: str, trials: int):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=max(2, trials // 3))
    points = [first_point(config, method)] if config.sweep.start_from_defaults else None
    objectives = list(config.objectives)
    metric, mode = (objectives, ["min"] * len(objectives)) if len(objectives) > 1 else (objectives[0], "min")
    return ConstrainedOptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points)
