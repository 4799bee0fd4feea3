"""OptunaSearch with the OOD constraint attached to each Optuna trial before it is told its values."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


def constraint_of(trial) -> tuple[float]:
    """Optuna constraints_func: <= 0 is feasible (forget_ood_distance >= ood_delta, not diverged)."""
    return (trial.user_attrs.get("constraint", 1.0),)


class ConstrainedOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            value = (result or {}).get("constraint", 1.0)
            ot_trial.set_user_attr("constraint", float(value))
        super().on_trial_complete(trial_id, result, error)
