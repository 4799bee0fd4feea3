"""One line per finished trial on stderr (Tune's own table is off: `verbose=0`): method, n/N, objectives,
verdict, and the method's best so far by the sweep's one definition of "best" (`unlearn.audit.best`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from ray import tune

from raytasks.tracking import reported
from unlearn.audit.best import best_per_method
from unlearn.audit.verdict import violations
from unlearn.config import Config

logger = logging.getLogger(__name__)


def _figures(result: dict, objectives: list[str]) -> str:
    return " ".join(f"{name} {result[name]:.4g}" for name in objectives if isinstance(result.get(name), (int, float)))


def _verdict(result: dict, config: Config | None, failed: bool) -> str:
    if failed or result.get("failed"):
        return "failed-infeasible"
    if result.get("feasible") == 1.0:
        return "feasible"
    return f"infeasible ({', '.join(violations(result, config))})" if config is not None else "infeasible"


def trial_line(trials: list, trial, trials_per_method: int, confirm_seeds: int, objectives: list[str], failed: bool,
               sweep_config: Config | None = None) -> str:
    """`sweep_config` names the violated constraints of an infeasible trial."""
    config, result = trial.config, {} if failed else (trial.last_result or {})
    method = config["method"]
    # the trial itself may not carry its final status yet while callbacks run
    ended = [t for t in trials if t.config.get("method") == method and (t is trial or t.status in ("TERMINATED", "ERROR"))]
    verdict = _verdict(result, sweep_config, failed)
    if "confirms" in config:
        n = sum(1 for t in ended if t.config.get("confirms") == config["confirms"])
        return (f"{method} confirm {n}/{confirm_seeds} of {config['confirms']} (seed {config['seed']}): "
                f"{_figures(result, objectives)} {verdict}")
    searched = [t for t in ended if "confirms" not in t.config]
    rows = pd.DataFrame([{"method": method, "trial_id": t.trial_id, **(t.last_result or {})} for t in searched
                         if (t is trial and not failed) or (t is not trial and t.status == "TERMINATED")])
    best = best_per_method(rows, objectives) if "feasible" in rows else rows.iloc[0:0]
    best_text = (f"best so far {best.iloc[0]['trial_id']}: {_figures(best.iloc[0].to_dict(), objectives)}" if len(best)
                 else "no feasible trial yet")
    return (f"{method} {len(searched)}/{trials_per_method} trial {trial.trial_id}: "
            f"{_figures(result, objectives)} {verdict}; {best_text}")


def _last_error_line(trial) -> str:
    """The exception line of the trial's error file (an ActorDiedError when its node was lost)."""
    try:
        lines = [line for line in Path(trial.error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "no error file"
    return next((line.strip()[:160] for line in reversed(lines) if "Error" in line or "Exception" in line),
                lines[-1][:160] if lines else "")


class ProgressCallback(tune.Callback):
    """Prints a line per finished trial and counts the most trials in flight at once (`peak_in_flight`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.peak_in_flight = 0
        self.retried: dict[str, int] = {}  # trial id -> times rerun after its process or node died

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.retried[trial.trial_id] = self.retried.get(trial.trial_id, 0) + 1
        # a multi-worker trial's Ray Train run restores its last committed phase checkpoint (same name and storage)
        start = "from its last phase checkpoint" if self.config.unlearn.workers > 1 else "from scratch"
        logger.warning(f"{trial.config.get('method')} trial {trial.trial_id} failed ({_last_error_line(trial)}): "
                       f"rerun {self.retried[trial.trial_id]}/{self.config.sweep.trial_retries} {start}")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING" or t is trial)
        self.peak_in_flight = max(self.peak_in_flight, running)

    def _print(self, trials: list, trial, failed: bool) -> None:
        c = self.config.sweep
        logger.info(trial_line(trials, trial, c.trials, c.confirm_seeds, list(self.config.objectives), failed, self.config))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if reported(trial.last_result):  # not a trial an interrupted experiment ended unfinished
            self._print(trials, trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials, trial, failed=True)
