"""The metric catalogue: one set of names for JSON output, MLflow and reports (DESIGN section 5)."""

from __future__ import annotations

REFERENCES = ("retrain", "attack", "original")

PER_SPLIT = {
    "mse": "masked-region MSE against the clean ground truth",
    "fid": "FID of the outputs against the ground truth (backbone features)",
    "is": "Inception Score of the outputs (backbone logits)",
    "clip": "mean cosine similarity of output and ground-truth embeddings",
    **{f"fid_vs_{ref}": f"FID between these outputs and the {ref} model's outputs on the same inputs" for ref in REFERENCES},
}

GLOBAL = {
    "forget_marker": "share of forget-test outputs in which the '+' is detected",
    "marker_threshold": "detector threshold (at most 5% of the original model's forget outputs trip it)",
    "forget_ood_distance": "Eq. 3: RMS distance in the hole between outputs and theta0's on D_f",
    "forget_ood_rate": "share of forget-test samples flagged OOD by kNN on encoder features",
    "ood_delta": "the OOD threshold delta",
    "ood_reached": "1 if the distance to theta0 reached delta (after GA for GA methods)",
    "ga_steps": "GA steps run (T, fewer after an early stop)",
    "ga_lr": "GA learning rate",
    "ga_grad_min": "smallest applied GA gradient norm",
    "ga_grad_max": "largest applied GA gradient norm",
    "ga_loss_increase": "L(theta_T; D_f) - L(theta_0; D_f)",
    "ga_bound_lower": "T lr G_min^2",
    "ga_bound_upper": "T lr G_max^2 (epsilon of the guarantee)",
    "ga_within_bounds": "1 if the measured increase lies within the bounds",
    "ga_param_distance": "||theta_T - theta_0|| after GA",
    "ga_ood_distance": "Eq. 3 distance right after GA",
    "unlearn_seconds": "wall time of the unlearning procedure (stage training time for references)",
    "retrain_seconds": "wall time of training the retrain stage",
    "cost_ratio": "unlearn_seconds / retrain_seconds",
    "unlearn_samples": "training samples processed by the procedure",
    "retrain_samples": "training samples processed to train the retrain stage",
    "sample_ratio": "unlearn_samples / retrain_samples",
    "diverged": "1 if a loss or gradient became non-finite",
}


def split_metric(split: str, name: str) -> str:
    return f"{split}_{name}"


def describe(name: str) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    split, _, rest = name.partition("_")
    return f"{split}: {PER_SPLIT.get(rest, rest)}"
