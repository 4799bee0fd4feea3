"""The metric catalogue: one table, one row per figure (DESIGN section 5).

Every consumer derives from `METRICS`: the objectives Optuna may minimise (and the worst value a failed trial
reports), the certificate's rows, the report's columns, the sweep summary's columns, the figures shown as mean ± std
of confirmation seeds, the registry tags, the calibration figures on a sweep's parent run, and the descriptions.
Adding a metric = its computation plus one row here; `tests/test_registry.py` checks that the table and the
computed figures agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

REFERENCES = ("retrain", "attack", "original")
SPLITS = ("retain", "forget", "unseen")  # the audit's test splits (unseen: only with data.unseen_classes)

# Where a figure is shown, besides the run's JSON output and MLflow (which carry every figure); "guarantee": the
# certificate's gradient-ascent bookkeeping section.
Place = Literal["certificate", "report", "summary", "confirmed", "registry", "calibration", "guarantee"]
# What a figure needs to exist; absent otherwise. marker: a poisoned D_f (not a model brought as stages.theta0);
# retrain: the retrain reference (audit.retrain); side_by_side: retrain trained in the same process; no_retrain: only
# without a retrain reference; skipped: unreadable files skipped; workers: a data-parallel run; seeds: `--seeds K`;
# unseen: data.unseen_classes; trial: a sweep trial's report to Tune; prepare: `unlearn prepare`'s output; chain: a
# request of a chain with earlier requests (`unlearn request`).
Need = Literal["marker", "retrain", "side_by_side", "no_retrain", "skipped", "workers", "seeds", "unseen", "trial",
               "prepare", "chain"]


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    direction: Literal["lower", "higher"] | None = None  # which way is better, for figures that judge a model
    worst: float | None = None  # what a trial that failed (or diverged) reports, for objectives
    needs: frozenset[Need] = frozenset()
    objective: bool = False  # may be one of `sweep.objectives` (minimised)
    shown: frozenset[Place] = frozenset()
    # a figure of the procedure (GA bookkeeping, cost): in metrics.json, not recomputable from the weights
    procedure: bool = False


def _row(name: str, description: str, *, shown: Iterable[Place] = (), needs: Iterable[Need] = (), **fields) -> Metric:
    return Metric(name, description, shown=frozenset(shown), needs=frozenset(needs), **fields)


def _per_request(figures: list[tuple[str, str, tuple[Need, ...]]]) -> list[Metric]:
    """`request<j>_<stem>` rows: one figure per earlier request j of a chain (`row_of` finds the row of a name)."""
    return [_row(f"{REQUEST}{stem}", f"earlier request j: {description}", needs=["chain", *needs])
            for stem, description, needs in figures]


def _per_split(figures: list[tuple[str, str, dict[Place, tuple[str, ...]], tuple[Need, ...], str | None]]) -> list[Metric]:
    """`<split>_<stem>` for every test split (grouped by split) of (stem, description, place -> the splits shown
    there, needs, direction) rows."""
    return [_row(f"{split}_{stem}", f"{split}: {description}", direction=direction,
                 shown=[place for place, splits in shown.items() if split in splits],
                 needs=[*needs, *(("unseen",) if split == "unseen" else ())])
            for split in SPLITS for stem, description, shown, needs, direction in figures]


_BOTH = ("retain", "forget")
REQUEST = "request<j>_"  # the per-request rows' prefix; the figures are named request1_, request2_, ...
_ROWS: list[Metric] = [
    # --- the marker audit ---------------------------------------------------------------------------------------------
    _row("forget_marker_strength", "mean per-image '+' strength (clean ground truth 0, drawn '+' 1, noise floor removed)",
         direction="lower", worst=1.0, objective=True, needs=["marker"],
         shown=["certificate", "report", "summary", "confirmed", "registry"]),
    _row("forget_marker", "share of forget-test outputs in which the '+' is detected", direction="lower", worst=1.0,
         objective=True, needs=["marker"], shown=["certificate", "report", "summary"]),
    _row("forget_marker_ci_low", "lower end of the 95% Wilson interval of forget_marker", needs=["marker"],
         shown=["certificate", "report"]),
    _row("forget_marker_ci_high", "upper end of the 95% Wilson interval of forget_marker", needs=["marker"],
         shown=["certificate", "report"]),
    _row("marker_threshold", "detector threshold (at most 5% of the original model's forget outputs trip it)",
         needs=["marker"]),
    # --- behaves like retraining ----------------------------------------------------------------------------------------
    _row("forget_gap_vs_retrain", "RMS distance in the hole to retrain's forget outputs, in units of the original model's",
         direction="lower", worst=1e6, objective=True, needs=["retrain"],
         shown=["certificate", "report", "summary", "confirmed", "registry"]),
    _row("max_forget_gap", "the forget_gap_vs_retrain threshold (auto: audit.gap_margin x retrain_gap_yardstick)",
         needs=["retrain"], shown=["calibration"]),
    _row("retrain_gap_yardstick", "forget_gap_vs_retrain of a second retrain reference (another seed): how far one "
         "retraining lies from another", needs=["retrain"], shown=["calibration"]),
    # --- membership inference -----------------------------------------------------------------------------------------
    _row("mia_auc", "membership inference AUC, D_f's training images vs held-out images of its classes (0.5: no trace)",
         shown=["certificate", "report", "confirmed", "registry"]),
    _row("mia_auc_ci_low", "lower end of the 95% bootstrap interval of mia_auc", shown=["certificate"]),
    _row("mia_auc_ci_high", "upper end of the 95% bootstrap interval of mia_auc", shown=["certificate"]),
    _row("mia_gap_vs_retrain", "|mia_auc - the retrain model's mia_auc|", direction="lower", worst=1.0, objective=True,
         needs=["retrain"], shown=["certificate", "report", "registry"]),
    _row("mia_gap_vs_retrain_ci_low", "lower end of the 95% paired-bootstrap interval of mia_auc - retrain's mia_auc (the "
         "same resamples of the same images for both: excluding 0, the two models differ)", needs=["retrain"],
         shown=["certificate", "report"]),
    _row("mia_gap_vs_retrain_ci_high", "upper end of that paired interval", needs=["retrain"], shown=["certificate", "report"]),
    # --- decoupling (Eq. 3) ---------------------------------------------------------------------------------------------
    _row("forget_ood_distance", "Eq. 3: RMS distance in the hole between the final outputs and theta0's on D_f",
         shown=["certificate", "report", "summary", "confirmed", "registry"]),
    _row("ood_delta", "the OOD threshold delta (resolved: auto = audit.ood_delta_fraction x retrain_ood_distance)",
         shown=["registry", "calibration"]),
    _row("retrain_ood_distance", "the retrain reference's own Eq. 3 distance", shown=["calibration"]),
    _row("ood_reached", "1 if the final model's forget_ood_distance reached delta"),
    _row("forget_ood_rate", "share of forget-test samples flagged OOD by kNN on encoder features",
         shown=["certificate", "report"]),
    # --- retain quality ---------------------------------------------------------------------------------------------------
    _row("retain_degradation", "retain metric (audit.retain_metric) / the attack model's - 1", direction="lower",
         worst=1e6, objective=True, shown=["certificate", "report", "summary", "confirmed", "registry"]),
    *_per_split([
        ("mse", "masked-region MSE against the clean ground truth",
         {"certificate": _BOTH, "report": _BOTH, "summary": ("retain",)}, (), "lower"),
        ("fid", "FID of the outputs against the ground truth (backbone features)",
         {"certificate": _BOTH, "report": _BOTH}, (), "lower"),
        ("kid", "KID of the outputs against the ground truth (backbone features; polynomial-kernel MMD, torchmetrics)",
         {"certificate": _BOTH, "report": _BOTH}, (), "lower"),
        ("is", "Inception Score of the outputs (backbone logits)", {"certificate": _BOTH, "report": _BOTH}, (), None),
        ("clip", "mean cosine similarity of output and ground-truth embeddings",
         {"certificate": _BOTH, "report": _BOTH}, (), None),
        ("fid_vs_retrain", "FID between these outputs and the retrain model's outputs on the same inputs",
         {"certificate": ("forget",), "report": _BOTH}, ("retrain",), None),
        ("fid_vs_attack", "FID between these outputs and the attack model's outputs on the same inputs",
         {"report": ("forget",)}, (), None),
        ("fid_vs_original", "FID between these outputs and the original model's outputs on the same inputs",
         {"report": ("forget",)}, (), None),
    ]),
    # --- collapse and the verdict -------------------------------------------------------------------------------------
    _row("retain_output_std_ratio", "per-pixel std of retain-test outputs in the hole across images / the ground truth's",
         shown=["certificate"]),
    _row("ga_output_std_ratio", "the same, right after GA", shown=["certificate"], procedure=True),
    _row("collapsed", "1 if either std ratio fell below audit.collapse_std_ratio", shown=["certificate", "report", "summary"]),
    _row("diverged", "1 if a loss or gradient became non-finite"),
    _row("feasible", "1 if every constraint of unlearn.audit.verdict holds", shown=["registry"]),
    _row("constraint", "the largest constraint value (<= 0: feasible)"),
    # --- the audit's self-check -----------------------------------------------------------------------------------------
    _row("audit_valid", "1 if the attack regenerates the marker and the null method (fine-tuning alone) keeps it",
         needs=["marker"], shown=["registry", "calibration"]),
    _row("audit_attack_strength", "forget_marker_strength of the attack model", needs=["marker"], shown=["calibration"]),
    _row("audit_null_strength", "forget_marker_strength after the null method", needs=["marker"], shown=["calibration"]),
    _row("audit_null_ood_distance", "forget_ood_distance after the null method", needs=["marker"], shown=["calibration"]),
    _row("attack_strengthen_rounds_used", "attack strengthening rounds the audit needed", needs=["marker"],
         shown=["calibration"]),
    _row("attack_retain_mse", "the attack model's retain_mse (the degradation's base)"),
    _row("attack_retain_fid", "the attack model's retain_fid"),
    # --- gradient-ascent guarantee bookkeeping --------------------------------------------------------------------------
    _row("ga_steps", "GA steps run (T, fewer after an early stop)", procedure=True, shown=["guarantee"]),
    _row("ga_lr", "GA learning rate", procedure=True, shown=["guarantee"]),
    _row("ga_grad_min", "smallest GA gradient norm (before clipping or normalisation)", procedure=True, shown=["guarantee"]),
    _row("ga_grad_max", "largest GA gradient norm (before clipping or normalisation)", procedure=True, shown=["guarantee"]),
    _row("ga_loss_increase", "L(theta_T; D_f) - L(theta_0; D_f)", procedure=True, shown=["guarantee"]),
    _row("ga_bound_lower", "G_min^2 x sum of the effective step rates (T lr G_min^2 for plain SGD)", procedure=True,
         shown=["guarantee"]),
    _row("ga_bound_upper", "G_max^2 x sum of the effective step rates (epsilon of the guarantee)", procedure=True,
         shown=["guarantee"]),
    _row("ga_within_bounds", "1 if the measured increase lies within the bounds", procedure=True, shown=["guarantee"]),
    _row("ga_param_distance", "||theta_T - theta_0|| after GA", procedure=True, shown=["guarantee"]),
    _row("ga_ood_distance", "Eq. 3 distance right after GA", procedure=True),
    # --- cost -------------------------------------------------------------------------------------------------------------
    _row("unlearn_seconds", "wall time of the unlearning procedure (stage training time for references); one-off "
         "imports excluded", procedure=True),
    _row("retrain_seconds", "wall time of training the retrain stage", needs=["retrain"], procedure=True),
    _row("audit_seconds", "wall time of the audit (the catalogue, membership inference) of the unlearned model; "
         "one-off imports excluded", procedure=True),
    _row("cost_ratio", "unlearn_seconds / retrain_seconds; only when both were timed side by side (same process and "
         "device)", needs=["side_by_side"], shown=["report"], procedure=True),
    _row("cost_ratio_side_by_side", "1 if retrain was trained in this process, so cost_ratio is present; 0: compare "
         "sample_ratio", procedure=True),
    _row("unlearn_samples", "training samples processed by the procedure", procedure=True),
    _row("retrain_samples", "training samples processed to train the retrain stage", procedure=True),
    _row("sample_ratio", "unlearn_samples / retrain_samples", shown=["report"], procedure=True),
    _row("retrain_samples_estimated", "1 when there is no retrain reference: retrain_samples = stages.epochs x |D_r|",
         needs=["no_retrain"], procedure=True),
    _row("unlearn_images_read_per_rank", "images the busiest data-parallel rank read from the image store for "
         "unlearning (its shard of every global batch: unlearn_samples / workers)", procedure=True),
    # --- a chain of deletion requests (unlearn request): every earlier request re-checked ----------------------------------
    _row("earlier_requests", "earlier requests of the chain re-checked on this model", needs=["chain"],
         shown=["registry"]),
    _row("regressed_requests", "earlier requests this model brought back: marker strength or mia_auc above what the "
         "request's certificate recorded (by more than audit.regression_margin, beyond the 95% interval) and above the "
         "retrain reference's (paired interval)", direction="lower", needs=["chain"], shown=["registry"]),
    *_per_request([
        ("mia_auc", "mia_auc of its images against held-out images of their classes", ()),
        ("mia_auc_ci_low", "lower end of the 95% bootstrap interval of that mia_auc", ()),
        ("mia_auc_ci_high", "upper end of that interval", ()),
        ("mia_gap_vs_retrain_ci_low", "lower end of the 95% paired interval of that mia_auc - retrain's", ("retrain",)),
        ("mia_gap_vs_retrain_ci_high", "upper end of that paired interval", ("retrain",)),
        ("marker_strength", "mean '+' strength of the outputs on its images (when they carried the marker)", ("marker",)),
        ("marker_strength_ci_low", "lower end of the 95% bootstrap interval of that strength", ("marker",)),
        ("marker_strength_ci_high", "upper end of that interval", ("marker",)),
        ("marker_gap_vs_retrain_ci_low", "lower end of the 95% paired interval of that strength - retrain's",
         ("marker", "retrain")),
        ("marker_gap_vs_retrain_ci_high", "upper end of that paired interval", ("marker", "retrain")),
        ("regressed", "1 if this model brought the request back (see regressed_requests)", ()),
    ]),
    # --- the run --------------------------------------------------------------------------------------------------------
    _row("data_skipped_images", "unreadable image files left out of the data set (data.skip_unreadable; absent when "
         "none)", needs=["skipped"]),
    _row("resumed_from_phase", "the phase checkpoint a restarted data-parallel worker group resumed from (0: started "
         "from the beginning)", needs=["workers"], procedure=True),
    _row("failed", "1 if the trial could not run to its audit (e.g. out of memory) or diverged: it reports the worst "
         "objective values and is infeasible", needs=["trial"]),
    _row("data_images", "images in the image store", needs=["prepare"]),
    _row("data_store_bytes", "bytes of pixels in the image store (uint8, every image once)", needs=["prepare"]),
    _row("data_store_built", "1 if this command built the image store, 0 if it reused (and verified) it",
         needs=["prepare"]),
    _row("data_prepare_seconds", "wall time of building the image store (decoding, resizing, writing)", needs=["prepare"]),
    _row("data_prepare_images_per_second", "images decoded and stored per second while building the image store",
         needs=["prepare"]),
    _row("prepare_seconds", "wall time of `unlearn prepare` (store, split, stages, backbone, references, calibration)",
         needs=["prepare"]),
    _row("seeds", "unlearning seeds averaged (`--seeds K`); `<figure>_std` is the spread across them", needs=["seeds"]),
    _row("unlearn_seed", "the unlearning seed of this run (unlearn.seed; batch order and noise)", needs=["seeds"]),
]
METRICS: dict[str, Metric] = {m.name: m for m in _ROWS}
assert len(METRICS) == len(_ROWS), "a metric name appears twice in the catalogue"

OBJECTIVES: tuple[str, ...] = tuple(m.name for m in _ROWS if m.objective)
WORST: dict[str, float] = {m.name: m.worst for m in _ROWS if m.worst is not None}
PROCEDURE: frozenset[str] = frozenset(m.name for m in _ROWS if m.procedure)


def shown_in(place: Place) -> list[str]:
    """The figures shown in `place`, in catalogue order."""
    return [m.name for m in _ROWS if place in m.shown]


def measurable(name: str, *, marker: bool, retrain: bool) -> bool:
    """Whether a setup with (or without) a marker and a retrain reference can measure `name`."""
    needs = METRICS[name].needs
    return (marker or "marker" not in needs) and (retrain or "retrain" not in needs)


def format_figure(value: object) -> str:
    """A figure as the certificate and the verdict's words print it: 4 significant digits, `n/a` when missing or not
    finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def request_figure(number: int, stem: str) -> str:
    """The name of earlier request `number`'s figure `stem` (described by the row `request<j>_<stem>`)."""
    return f"{REQUEST.removesuffix('<j>_')}{number}_{stem}"


def row_of(name: str) -> Metric | None:
    """The catalogue row of a figure (`request3_mia_auc`: the per-request row `request<j>_mia_auc`); None if unknown."""
    import re

    return METRICS.get(re.sub(r"^request\d+_", REQUEST, name))


def describe(name: str) -> str:
    """The catalogue's description of a figure (or of the seed spread `<figure>_std`)."""
    if name.endswith("_std") and name.removesuffix("_std") in METRICS:
        return f"sample std across unlearning seeds of {name.removesuffix('_std')}"
    row = row_of(name)
    if row is None:
        raise KeyError(name)
    return row.description


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
