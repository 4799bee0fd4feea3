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
    "forget_marker_ci_low": "lower end of the 95% Wilson interval of forget_marker",
    "forget_marker_ci_high": "upper end of the 95% Wilson interval of forget_marker",
    "forget_marker_strength": "mean per-image '+' strength (clean ground truth 0, drawn '+' 1, noise floor removed)",
    "marker_threshold": "detector threshold (at most 5% of the original model's forget outputs trip it)",
    "forget_gap_vs_retrain": "RMS distance in the hole to retrain's forget outputs, in units of the original model's",
    "forget_ood_distance": "Eq. 3: RMS distance in the hole between the final outputs and theta0's on D_f",
    "mia_auc": "membership inference AUC, D_f's training images vs held-out images of its classes (0.5: no trace)",
    "mia_auc_ci_low": "lower end of the 95% bootstrap interval of mia_auc",
    "mia_auc_ci_high": "upper end of the 95% bootstrap interval of mia_auc",
    "mia_gap_vs_retrain": "|mia_auc - the retrain model's mia_auc|",
    "mia_gap_vs_retrain_ci_low": "lower end of the 95% paired-bootstrap interval of mia_auc - retrain's mia_auc (the same "
                                 "resamples of the same images for both: excluding 0, the two models differ)",
    "mia_gap_vs_retrain_ci_high": "upper end of that paired interval",
    "max_forget_gap": "the forget_gap_vs_retrain threshold (auto: audit.gap_margin x retrain_gap_yardstick)",
    "retrain_gap_yardstick": "forget_gap_vs_retrain of a second retrain reference (another seed): how far one "
                             "retraining lies from another",
    "forget_ood_rate": "share of forget-test samples flagged OOD by kNN on encoder features",
    "ood_delta": "the OOD threshold delta (resolved: auto = audit.ood_delta_fraction x retrain_ood_distance)",
    "retrain_ood_distance": "the retrain reference's own Eq. 3 distance",
    "ood_reached": "1 if the final model's forget_ood_distance reached delta",
    "retain_output_std_ratio": "per-pixel std of retain-test outputs in the hole across images / the ground truth's",
    "ga_output_std_ratio": "the same, right after GA",
    "collapsed": "1 if either std ratio fell below audit.collapse_std_ratio",
    "retain_degradation": "retain metric / the attack model's - 1",
    "feasible": "1 if every constraint of unlearn.audit.verdict holds",
    "constraint": "the largest constraint value (<= 0: feasible)",
    "audit_valid": "1 if the attack regenerates the marker and the null method (fine-tuning alone) keeps it",
    "audit_attack_strength": "forget_marker_strength of the attack model",
    "audit_null_strength": "forget_marker_strength after the null method",
    "audit_null_ood_distance": "forget_ood_distance after the null method",
    "attack_strengthen_rounds_used": "attack strengthening rounds the audit needed",
    "attack_retain_mse": "the attack model's retain_mse (the degradation's base)",
    "attack_retain_fid": "the attack model's retain_fid",
    "ga_steps": "GA steps run (T, fewer after an early stop)",
    "ga_lr": "GA learning rate",
    "ga_grad_min": "smallest GA gradient norm (before clipping or normalisation)",
    "ga_grad_max": "largest GA gradient norm (before clipping or normalisation)",
    "ga_loss_increase": "L(theta_T; D_f) - L(theta_0; D_f)",
    "ga_bound_lower": "G_min^2 x sum of the effective step rates (T lr G_min^2 for plain SGD)",
    "ga_bound_upper": "G_max^2 x sum of the effective step rates (epsilon of the guarantee)",
    "ga_within_bounds": "1 if the measured increase lies within the bounds",
    "ga_param_distance": "||theta_T - theta_0|| after GA",
    "ga_ood_distance": "Eq. 3 distance right after GA",
    "unlearn_seconds": "wall time of the unlearning procedure (stage training time for references); one-off imports excluded",
    "retrain_seconds": "wall time of training the retrain stage",
    "audit_seconds": "wall time of the audit (the catalogue, membership inference) of the unlearned model; one-off imports excluded",
    "cost_ratio": "unlearn_seconds / retrain_seconds; only when both were timed side by side (same process and device)",
    "cost_ratio_side_by_side": "1 if retrain was trained in this process, so cost_ratio is present; 0: compare sample_ratio",
    "unlearn_samples": "training samples processed by the procedure",
    "retrain_samples": "training samples processed to train the retrain stage",
    "sample_ratio": "unlearn_samples / retrain_samples",
    "retrain_samples_estimated": "1 when there is no retrain reference: retrain_samples = stages.epochs x |D_r|",
    "diverged": "1 if a loss or gradient became non-finite",
    "unlearn_images_read_per_rank": "images the busiest data-parallel rank read from the image store for unlearning "
                                    "(its shard of every global batch: unlearn_samples / workers)",
    "data_skipped_images": "unreadable image files left out of the data set (data.skip_unreadable; absent when none)",
    "resumed_from_phase": "the phase checkpoint a restarted data-parallel worker group resumed from (0: started from the beginning)",
    "seeds": "unlearning seeds averaged (`--seeds K`); `<figure>_std` is the spread across them",
    "unlearn_seed": "the unlearning seed of this run (unlearn.seed; batch order and noise)",
}


def split_metric(split: str, name: str) -> str:
    return f"{split}_{name}"


def describe(name: str) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    split, _, rest = name.partition("_")
    return f"{split}: {PER_SPLIT.get(rest, rest)}"


def seed_summary(runs: list[dict[str, float]]) -> dict[str, float]:
    """Means over unlearning seeds, with `<name>_std` (sample std) beside each figure that varies by seed.

    Figures that are identical in every run (thresholds, calibration, references) keep their value without
    a `_std`; a figure missing from some run is averaged over the runs that have it.
    """
    import statistics

    out: dict[str, float] = {"seeds": float(len(runs))}
    names = [k for k in runs[0] if isinstance(runs[0][k], (int, float)) and k != "unlearn_seed"]
    names += [k for r in runs[1:] for k in r if k not in names and k != "unlearn_seed" and isinstance(r[k], (int, float))]
    for name in names:
        values = [float(r[name]) for r in runs if name in r]
        out[name] = statistics.fmean(values)
        if len(values) > 1 and len(set(values)) > 1:
            out[f"{name}_std"] = statistics.stdev(values)
    return out


def nearest_to_mean(runs: list[dict[str, float]], summary: dict[str, float], names: list[str]) -> int:
    """Index of the run whose `names` figures lie nearest the mean (each in units of its std)."""

    def distance(run: dict[str, float]) -> float:
        return sum(abs(run.get(n, summary[n]) - summary[n]) / summary[f"{n}_std"]
                   for n in names if n in summary and summary.get(f"{n}_std", 0) > 0)

    return min(range(len(runs)), key=lambda i: distance(runs[i]))
