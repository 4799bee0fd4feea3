"""Guarantee bookkeeping of the gradient-ascent phase (paper Sec. 3).

Each ascent step is theta <- theta + r_t g_t, with g_t the gradient and r_t the effective rate (lr for plain
SGD, lr / ||g_t|| for normalised steps, less when clipped). First-order analysis of a convex loss gives
G_min^2 sum_t r_t <= L(theta_T) - L(theta_0) <= G_max^2 sum_t r_t, which is T lr G_min^2 .. T lr G_max^2 for
plain SGD (the paper's form). Networks are not convex, so we report the measured increase next to the
bounds instead of assuming it lies between them.
"""

from __future__ import annotations

from unlearn.methods.loop import PhaseRecord


def ga_guarantees(record: PhaseRecord | None, lr: float, loss_before: float, loss_after: float) -> dict[str, float]:
    if record is None or record.steps_run == 0:
        return {}
    g_min, g_max = min(record.grad_norms), max(record.grad_norms)
    rate_sum = sum(record.rates)
    increase = loss_after - loss_before
    lower, upper = rate_sum * g_min**2, rate_sum * g_max**2
    return {
        "ga_steps": float(record.steps_run),
        "ga_lr": lr,
        "ga_grad_min": g_min,
        "ga_grad_max": g_max,
        "ga_loss_increase": increase,
        "ga_bound_lower": lower,
        "ga_bound_upper": upper,
        "ga_within_bounds": float(lower <= increase <= upper),
        "ga_param_distance": record.param_distance[-1],
    }
