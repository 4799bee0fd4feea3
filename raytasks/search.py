"""What the sweep's one Tune experiment searches: each method's space, first point and Optuna study (with the
feasibility constraint attached to each Optuna trial before it is told its values), and `SweepSearch`, which runs
every method's search and confirmation as one stream of trials.

Optuna 5 reads constraints stored on the trial (`Trial.set_constraint`); a value <= 0 is feasible.
"""

from __future__ import annotations

import pickle
from typing import Any

import pandas as pd
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raytasks.tracking import reported
from unlearn.audit.best import best_per_method
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
        low, high = config.sweep.range_of(method, hp.name)
        if hp.kind is int:
            space[hp.name] = tune.randint(int(low), int(high) + 1)  # randint's upper end is exclusive
        else:
            space[hp.name] = tune.loguniform(low, high) if hp.scale == "log" else tune.uniform(low, high)
    return space


def first_point(config: Config, method: str) -> dict[str, Any]:
    """The config's own values, clipped into the search ranges: the first point of every method."""
    values = METHODS[method].values(config.unlearn)
    out = {}
    for hp in METHODS[method].hyperparameters:
        low, high = config.sweep.range_of(method, hp.name)
        out[hp.name] = hp.cast(min(max(values[hp.name], low), high))
    return out


def make_searcher(config: Config, method: str, trials: int) -> ConstrainedOptunaSearch:
    """One method's Optuna study over its own space (seeded TPE; the config's values first)."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=max(2, trials // 3))
    points = [first_point(config, method)] if config.sweep.start_from_defaults else None
    objectives = list(config.objectives)
    metric, mode = (objectives, ["min"] * len(objectives)) if len(objectives) > 1 else (objectives[0], "min")
    space = OptunaSearch.convert_search_space(search_space(config, method))
    return ConstrainedOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler,
                                   points_to_evaluate=points)


# Keys of a suggested trial config that are not unlearning hyperparameters.
METHOD_KEY, CONFIRMS_KEY, SEED_KEY = "method", "confirms", "seed"


class SweepSearch(Searcher):
    """Every method's search and confirmation as one stream of Tune trials, so that no slot idles while another
    method still has work.

    Each method keeps its own Optuna study (`searchers[method]`). A free slot goes to the method with the fewest
    trials started; once all `trials` of a method have completed, its best configuration (`best_per_method`, the
    one definition of "best") is queued on unlearning seeds 1..`confirm_seeds` (the search ran seed 0). A
    suggestion is `{"method": m, **hyperparameters}`, a confirmation adds `"confirms": <trial id>, "seed": s`.
    The whole state pickles into Tune's experiment checkpoint, so `--resume` continues where it stopped.
    """

    def __init__(self, searchers: dict[str, ConstrainedOptunaSearch], trials: int, confirm_seeds: int,
                 objectives: list[str]) -> None:
        super().__init__()
        self.searchers, self.trials, self.confirm_seeds, self.objectives = searchers, trials, confirm_seeds, objectives
        self.points: dict[str, dict[str, Any]] = {}  # trial id -> what it was given
        self.rows: dict[str, list[dict[str, Any]]] = {m: [] for m in searchers}  # completed search trials
        self.queue: list[dict[str, Any]] = []  # confirmations not yet started
        self.open: set[str] = set()  # trials started and not completed

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # each method's study already has its space, metric and mode

    def _started(self, method: str) -> int:
        return sum(1 for p in self.points.values() if p[METHOD_KEY] == method and CONFIRMS_KEY not in p)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        point: dict[str, Any] | None = self.queue.pop(0) if self.queue else None
        if point is None:
            for method in sorted((m for m in self.searchers if self._started(m) < self.trials), key=self._started):
                point = {METHOD_KEY: method, **self.searchers[method].suggest(trial_id)}
                break
        if point is None:  # nothing to start now: finished once every trial has completed
            return Searcher.FINISHED if not self.open else None
        self.points[trial_id] = point
        self.open.add(trial_id)
        return dict(point)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        point = self.points.get(trial_id)
        if point is not None and CONFIRMS_KEY not in point:
            self.searchers[point[METHOD_KEY]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        point = self.points.get(trial_id)
        if point is None or trial_id not in self.open or not (error or reported(result)):
            return  # an unfinished trial that an interrupted experiment ended stays open: --resume runs it
        self.open.discard(trial_id)
        if CONFIRMS_KEY in point:
            return
        method = point[METHOD_KEY]
        self.searchers[method].on_trial_complete(trial_id, result, error)
        figures = {} if error or not result else {k: v for k, v in result.items() if k not in ("config", METHOD_KEY)}
        # the searched values last: a figure of the same name (ga_steps: the steps run, fewer after an early stop)
        # must not stand in for the configuration that is confirmed
        self.rows[method].append({**figures, **point, "trial_id": trial_id, "feasible": figures.get("feasible", 0.0)})
        if len(self.rows[method]) == self.trials and self.confirm_seeds:
            self.queue += confirmation_points(pd.DataFrame(self.rows[method]), self.objectives, self.confirm_seeds)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__.copy(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def confirmation_points(rows: pd.DataFrame, objectives: list[str], seeds: int) -> list[dict[str, Any]]:
    """The confirmation trials of each method's best configuration among `rows` (none without a feasible trial)."""
    points = []
    for row in best_per_method(rows, objectives).to_dict("records"):
        params = {hp.name: hp.cast(row[hp.name]) for hp in METHODS[row[METHOD_KEY]].hyperparameters if hp.name in row}
        points += [{METHOD_KEY: row[METHOD_KEY], CONFIRMS_KEY: str(row["trial_id"]), **params, SEED_KEY: seed}
                   for seed in range(1, seeds + 1)]
    return points
