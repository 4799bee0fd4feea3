"""Guarantee bookkeeping of the gradient-ascent phase (paper Sec. 3).

For T ascent steps theta <- theta + lr g_t with ||g_t|| in [G_min, G_max], first-order analysis of a
convex loss gives T lr G_min^2 <= L(theta_T) - L(theta_0) <= T lr G_max^2. Networks are not convex, so
we report the measured increase next to the bounds instead of assuming it lies between them.
"""

from __future__ import annotations

from unlearn.methods.loop import PhaseRecord


def ga_guarantees(record: PhaseRecord | None, lr: float, loss_before: float, loss_after: float) -> dict[str, float]:
    if record is None or record.steps_run == 0:
        return {}
    g_min, g_max = min(record.grad_norms), max(record.grad_norms)
    steps = record.steps_run
    increase = loss_after - loss_before
    lower, upper = steps * lr * g_min**2, steps * lr * g_max**2
    return {
        "ga_steps": float(steps),
        "ga_lr": lr,
        "ga_grad_min": g_min,
        "ga_grad_max": g_max,
        "ga_loss_increase": increase,
        "ga_bound_lower": lower,
        "ga_bound_upper": upper,
        "ga_within_bounds": float(lower <= increase <= upper),
        "ga_param_distance": record.param_distance[-1],
    }
