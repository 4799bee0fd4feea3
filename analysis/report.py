"""`unlearn report --experiment NAME`: the paper's tables and figures from a sweep's MLflow runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import distance_plot, image_grid, pareto_plot, tsne_plot
from analysis.runs import SweepRuns, load_sweep
from unlearn.audit.samples import SAMPLES_PER_SPLIT

TABLE_METRICS = [
    "forget_marker", "retain_mse", "forget_mse",
    "retain_fid", "retain_is", "retain_clip", "forget_fid", "forget_is", "forget_clip",
    "retain_fid_vs_retrain", "forget_fid_vs_retrain", "forget_fid_vs_attack", "forget_fid_vs_original",
    "forget_ood_distance", "forget_ood_rate", "sample_ratio", "cost_ratio",
]
REFERENCE_ORDER = ("attack", "original", "retrain")


def comparison_table(runs: SweepRuns) -> pd.DataFrame:
    """Rows: the best trial of every swept method, then the references; columns: the catalogue's figures."""
    best = runs.best_trials()
    rows = []
    for _, trial in best.iterrows():
        rows.append({"model": trial["method"], "run_id": trial["run_id"], "feasible": bool(trial.get("feasible", 0) == 1.0),
                     **{m: trial.get(m, math.nan) for m in TABLE_METRICS}})
    refs = runs.references.set_index("tags.reference")
    for name in REFERENCE_ORDER:
        if name in refs.index:
            ref = refs.loc[name]
            rows.append({"model": f"{name} (reference)", "run_id": ref["run_id"], "feasible": None,
                         **{m: ref.get(f"metrics.{m}", math.nan) for m in TABLE_METRICS}})
    return pd.DataFrame(rows)


def sample_table(runs: SweepRuns) -> pd.DataFrame | None:
    """Forget fraction x method (forget_marker of the best trial), for sample-level sweeps."""
    fraction = float(runs.param("data.forget_fraction", "1.0"))
    if fraction >= 1.0:
        return None
    best = runs.best_trials()
    return pd.DataFrame([{"forget_fraction": fraction, **dict(zip(best["method"], best["forget_marker"], strict=True))}])


def _curves(runs: SweepRuns, run_id: str) -> dict[str, list[tuple[int, float]]]:
    local = runs.artifact(run_id, "curves.json")
    return {} if local is None else {k: [tuple(p) for p in v] for k, v in json.loads(local.read_text()).items()}


def render_report(experiment: str, out: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Write report.md with its PNGs and CSV into `out`, log them on the sweep's parent run, return the path."""
    runs = load_sweep(experiment, tracking_uri)
    out = Path(out or Path("reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(runs.param("seed", "0"))

    table = comparison_table(runs)
    table.to_csv(out / "comparison.csv", index=False)
    shown = table.drop(columns=["run_id"])

    trials = runs.trials.rename(columns=lambda c: c.removeprefix("metrics."))
    trials = trials.assign(method=runs.trials["tags.method"])
    pareto_plot(trials, out / "pareto.png")

    best = runs.best_trials()
    curves = {row["method"]: _curves(runs, row["run_id"]) for _, row in best.iterrows()}
    distance_plot({m: c for m, c in curves.items() if c.get("ga_ood_distance") or c.get("ga_param_distance")} or curves,
                  float(runs.param("unlearn.ood_delta", "nan")), out / "distance.png")

    rows = [(label, runs.image(runs.parent_id, f"grid/{label}.png")) for label in ("masked_input", "ground_truth")]
    refs = runs.references.set_index("tags.reference")
    rows += [(name, runs.image(refs.loc[name, "run_id"], "outputs.png")) for name in REFERENCE_ORDER if name in refs.index]
    rows += [(row["method"], runs.image(row["run_id"], "outputs.png")) for _, row in best.iterrows()]
    image_grid([(label, img) for label, img in rows if img is not None], SAMPLES_PER_SPLIT, out / "grid.png")

    embeddings = {}
    sources = [(f"{row['method']} (unlearned)", row["run_id"]) for _, row in best.iterrows() if row["method"] == "realistic"]
    sources += [(name, refs.loc[name, "run_id"]) for name in ("retrain", "attack") if name in refs.index]
    for label, run_id in sources:
        local = runs.artifact(run_id, "embeddings.npz")
        if local is not None:
            with np.load(local) as npz:
                embeddings[label] = {k: npz[k] for k in npz.files}
    figures = ["grid.png", "pareto.png", "distance.png"]
    if embeddings:
        tsne_plot(embeddings, seed, out / "tsne.png")
        figures.append("tsne.png")

    samples = sample_table(runs)
    swept = [m.strip() for m in runs.param("sweep.methods", "").strip("[]").replace("'", "").split(",") if m.strip()]
    missing = [m for m in swept if m not in set(best["method"])]
    lines = [
        f"# Unlearning report: {experiment}",
        "",
        f"- data set: `{runs.param('data.dataset')}` ({runs.param('data.image_size')}px), forget classes "
        f"{runs.param('data.forget_classes')}, forget fraction {runs.param('data.forget_fraction')}, "
        f"unseen classes {runs.param('data.unseen_classes')}",
        f"- split: {runs.param('data.train_fraction')} of each class for training, the rest for test; "
        f"mask `{runs.param('data.mask.kind')}` of {runs.param('data.mask.size')}px",
        f"- model: `{runs.param('model.kind')}`; seed {seed} (splits, stages, unlearning)",
        f"- FID / IS / CLIP backbone: `{runs.param('audit.backbone')}`",
        f"- OOD threshold delta = {runs.param('unlearn.ood_delta')}; trials: {len(runs.trials)} finished",
        f"- MLflow experiment `{experiment}`, parent run `{runs.parent_id}`",
        "",
        "## Method comparison",
        "",
        "Best trial per method (feasible first: smallest forget_marker + retain degradation), then the reference models.",
        "",
        shown.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    if missing:
        lines += [f"Methods swept without a finished trial (all failed-infeasible): {', '.join(missing)}.", ""]
    if samples is not None:
        lines += ["## Sample-level unlearning (forget_marker)", "", samples.to_markdown(index=False, floatfmt=".3g"), ""]
    lines += [
        "## Outputs", "", "![image grid](grid.png)", "",
        "## Trade-off", "", "![Pareto front](pareto.png)", "",
        "## Decoupling: distance to theta0 and loss against GA step", "", "![distance](distance.png)", "",
    ]
    if "tsne.png" in figures:
        lines += ["## Embeddings", "", "![t-SNE](tsne.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    for name in ["report.md", "comparison.csv", *figures]:
        runs.client.log_artifact(runs.parent_id, str(out / name), "report")
    return report
