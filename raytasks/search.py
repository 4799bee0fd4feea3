"""OptunaSearch with the OOD constraint attached to each Optuna trial before it is told its values.

Optuna 5 reads constraints stored on the trial (`Trial.set_constraint`); a value <= 0 is feasible.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class ConstrainedOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            # forget_ood_distance >= ood_delta and not diverged  <=>  constraint <= 0
            ot_trial.set_constraint("ood", float((result or {}).get("constraint", 1.0)))
        super().on_trial_complete(trial_id, result, error)
