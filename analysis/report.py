"""`unlearn report --experiment NAME`: the paper's tables and figures from a sweep's MLflow runs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures import distance_plot, image_grid, pareto_plot, tsne_plot
from analysis.runs import SweepRuns, load_sweep
from unlearn.audit.best import confirmed, mean_pm_std
from unlearn.audit.catalogue import METRICS, describe, shown_in
from unlearn.audit.samples import SAMPLES_PER_SPLIT
from unlearn.audit.verdict import CONSTRAINT_FIGURES, describe_constraints, violations

TABLE_METRICS = shown_in("report")  # comparison.csv's figures; report.md shows the objectives and constraints
REFERENCE_ORDER = ("attack", "original", "retrain")


def method_rows(runs: SweepRuns) -> pd.DataFrame:
    """One trial per swept method with a finished trial: its best feasible one (`unlearn.audit.best`), or, when it has
    none, its least-violating one (the smallest constraint value, run id breaking ties): what the method did."""
    best = runs.best_trials()
    frame = runs.metric_frame()
    rest = frame[~frame["method"].isin(set(best["method"]))]
    if rest.empty or "constraint" not in rest:
        return best
    least = rest.sort_values(["constraint", "run_id"], kind="stable").groupby("method", sort=True).head(1)
    return pd.concat([best, least.sort_values("method")], ignore_index=True)


def _verdict(metrics: dict, config) -> str:
    failed = violations(metrics, config)
    return "feasible" if not failed else "infeasible: " + ", ".join(failed)


def comparison_table(runs: SweepRuns) -> pd.DataFrame:
    """Rows: every swept method (`method_rows`), then the references; columns: the verdict and the catalogue's
    report figures.

    A confirmed best trial (sweep.confirm_seeds) shows the mean over its confirmation seeds, with `<figure>_std`
    beside it, `seeds` and `feasible_seeds`."""
    config = runs.config()
    checked = confirmed(runs.confirmation_frame(), TABLE_METRICS).set_index("confirms")
    rows = []
    for _, trial in method_rows(runs).iterrows():
        row = {"model": trial["method"], "verdict": _verdict(trial.to_dict(), config), "run_id": trial["run_id"],
               "feasible": bool(trial.get("feasible", 0) == 1.0), **{m: trial.get(m, math.nan) for m in TABLE_METRICS}}
        trial_id = trial.get("tags.ray.trial_id")
        if trial_id in checked.index:
            row.update(checked.loc[trial_id].drop("method").to_dict())
        rows.append(row)
    refs = runs.references.set_index("tags.reference")
    for name in REFERENCE_ORDER:
        if name in refs.index:
            ref = refs.loc[name]
            metrics = {m: ref.get(f"metrics.{m}", math.nan) for m in METRICS if f"metrics.{m}" in ref}
            rows.append({"model": f"{name} (reference)", "verdict": _verdict(metrics, config), "run_id": ref["run_id"],
                         "feasible": bool(ref.get("metrics.feasible", 0) == 1.0),
                         **{m: ref.get(f"metrics.{m}", math.nan) for m in TABLE_METRICS}})
    return pd.DataFrame(rows)


def table_figures(objectives: list[str]) -> list[str]:
    """The figures of report.md's table: the objectives, then the figures the constraints judge."""
    return [*objectives, *[f for f in CONSTRAINT_FIGURES.values() if f not in objectives and f != "diverged"]]


def markdown_table(table: pd.DataFrame, objectives: list[str]) -> str:
    """report.md's table: the model, its verdict, the objectives and the constraints' figures, three significant
    digits (mean ± std where confirmed); the other figures of the report are in comparison.csv."""
    figures = table_figures(objectives)
    columns = ["model", "verdict", *[f for f in figures if f in table], *[c for c in ("seeds", "feasible_seeds") if c in table]]
    shown = mean_pm_std(table[[c for c in table if c in columns or c.removesuffix("_std") in figures]], figures)
    for count in ("seeds", "feasible_seeds"):  # only confirmed rows have them
        if count in shown:
            shown[count] = [str(int(v)) if pd.notna(v) else "" for v in shown[count]]
    return shown[columns].to_markdown(index=False, floatfmt=".3g")


def sample_table(runs: SweepRuns) -> pd.DataFrame | None:
    """Forget fraction x method (forget_marker_strength of the best trial), for sample-level sweeps."""
    fraction = float(runs.param("data.forget_fraction", "1.0"))
    if fraction >= 1.0:
        return None
    best = runs.best_trials()
    return pd.DataFrame([{"forget_fraction": fraction, **dict(zip(best["method"], best["forget_marker_strength"], strict=True))}])


def _count(value: object) -> str:
    number = float(value) if value is not None else math.nan
    return str(int(number)) if math.isfinite(number) else "?"


def _curves(runs: SweepRuns, run_id: str) -> dict[str, list[tuple[int, float]]]:
    content = runs.artifact_bytes(run_id, "curves.json")
    return {} if content is None else {k: [tuple(p) for p in v] for k, v in json.loads(content).items()}


def render_report(experiment: str, out: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """Write report.md with its PNGs and CSV into `out`, log them on the sweep's parent run, return the path."""
    runs = load_sweep(experiment, tracking_uri)
    out = Path(out or Path("reports") / experiment)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    table.to_csv(out / "comparison.csv", index=False)
    figures = _plots(runs, out)
    grid_rows, grid_missing = _grid(runs, table, out)
    figures = ["grid.png"] * bool(grid_rows) + figures
    report = out / "report.md"
    report.write_text(_markdown(runs, table, figures, grid_rows, grid_missing))
    for name in ["report.md", "comparison.csv", *figures]:
        runs.client.log_artifact(runs.parent_id, str(out / name), "report")
    return report


def _attack(runs: SweepRuns) -> pd.Series:
    refs = runs.references.set_index("tags.reference")
    return refs.loc["attack"] if "attack" in refs.index else pd.Series(dtype=object)


def _plots(runs: SweepRuns, out: Path) -> list[str]:
    """pareto.png, distance.png and (when embeddings were logged) tsne.png; the names of those written."""
    config = runs.config()
    trials = runs.trials.rename(columns=lambda c: c.removeprefix("metrics."))
    trials = trials.assign(method=runs.trials["tags.method"])
    pareto_plot(trials, list(config.objectives), out / "pareto.png",
                confirmed(runs.confirmation_frame(), list(dict.fromkeys([*shown_in("confirmed"), *config.objectives]))))

    best = runs.best_trials()
    ood_delta = float(_attack(runs).get("metrics.ood_delta", math.nan))
    curves = {row["method"]: _curves(runs, row["run_id"]) for _, row in best.iterrows()}
    frame = runs.metric_frame()
    without_feasible = {method: [_curves(runs, run_id) for run_id in frame.loc[frame["method"] == method, "run_id"]]
                        for method in runs.infeasible_methods()}
    distance_plot(curves, ood_delta, out / "distance.png", without_feasible)

    refs = runs.references.set_index("tags.reference")
    embeddings = {}
    sources = [(f"{row['method']} (unlearned)", row["run_id"]) for _, row in best.iterrows() if row["method"] == "realistic"]
    sources += [(name, refs.loc[name, "run_id"]) for name in ("retrain", "attack") if name in refs.index]
    for label, run_id in sources:
        content = runs.artifact_bytes(run_id, "embeddings.npz")
        if content is not None:
            with np.load(io.BytesIO(content)) as npz:
                embeddings[label] = {k: npz[k] for k in npz.files}
    if not embeddings:
        return ["pareto.png", "distance.png"]
    tsne_plot(embeddings, int(runs.param("seed", "0")), out / "tsne.png")
    return ["pareto.png", "distance.png", "tsne.png"]


def _grid(runs: SweepRuns, table: pd.DataFrame, out: Path) -> tuple[list[str], list[str]]:
    """grid.png: the inputs, the ground truth, the references' and every table row's outputs (a method without a
    feasible trial: its least-violating trial, labelled infeasible). Returns the rows drawn and those with no image."""
    refs = runs.references.set_index("tags.reference")
    rows = [(label, runs.image(runs.parent_id, f"grid/{label}.png")) for label in ("masked_input", "ground_truth")]
    rows += [(name, runs.image(refs.loc[name, "run_id"], "outputs.png")) for name in REFERENCE_ORDER if name in refs.index]
    rows += [(row["model"] + ("" if row["feasible"] else " (infeasible)"), runs.image(row["run_id"], "outputs.png"))
             for _, row in table.iterrows() if not row["model"].endswith(" (reference)")]
    grid_rows = [label for label, img in rows if img is not None]
    grid_missing = [label for label, img in rows if img is None]  # e.g. removed by `unlearn purge`
    if grid_rows:
        image_grid([(label, img) for label, img in rows if img is not None], SAMPLES_PER_SPLIT, out / "grid.png")
    else:  # every strip was purged: no grid, and an old one must not stand in for it
        (out / "grid.png").unlink(missing_ok=True)
    return grid_rows, grid_missing


def _marker_line(runs: SweepRuns) -> str:
    attack, config = _attack(runs), runs.config()
    if pd.isna(attack.get("metrics.audit_valid", math.nan)):
        return "- marker audit: not applicable (theta0 was brought by the user; D_f carries no marker)"
    valid = float(attack.get("metrics.audit_valid", 0.0)) == 1.0
    notes = str(runs.parent.get("tags.audit_notes", "none"))
    return (f"- **marker audit: {'valid' if valid else 'NOT VALID: this audit cannot decide whether the marker was unlearned'}** "
            f"(attack model strength {float(attack.get('metrics.audit_attack_strength', math.nan)):.3f}, null method = "
            f"fine-tuning on D_r alone {float(attack.get('metrics.audit_null_strength', math.nan)):.3f}; both must be >= "
            f"{config.audit.min_marker_strength:g}; strengthening rounds used "
            f"{_count(attack.get('metrics.attack_strengthen_rounds_used'))}){'' if notes == 'none' else '. ' + notes}")


def _setup_lines(runs: SweepRuns) -> list[str]:
    """What was run: data, split, model, backbone, the marker audit's validity, the thresholds."""
    config, attack = runs.config(), _attack(runs)
    ood_delta = float(attack.get("metrics.ood_delta", math.nan))
    calibration = {name: float(attack[f"metrics.{name}"]) for name in shown_in("calibration")
                   if pd.notna(attack.get(f"metrics.{name}", math.nan))}
    return [
        f"- data set: `{runs.param('data.dataset')}` ({runs.param('data.image_size')}px), forget classes "
        f"{runs.param('data.forget_classes')}, forget fraction {runs.param('data.forget_fraction')}, "
        f"unseen classes {runs.param('data.unseen_classes')}",
        f"- split: {runs.param('data.train_fraction')} of each class for training, the rest for test; "
        f"mask `{runs.param('data.mask.kind')}` of {runs.param('data.mask.size')}px",
        f"- model: `{runs.param('model.kind')}`; seed {int(runs.param('seed', '0'))} (splits, stages, unlearning)",
        f"- FID / IS / CLIP backbone: `{runs.param('audit.backbone')}`",
        _marker_line(runs),
        f"- OOD threshold delta = {ood_delta:.4g} (`unlearn.ood_delta` = {config.unlearn.ood_delta}; the retrain "
        f"reference's own distance {float(attack.get('metrics.retrain_ood_distance', math.nan)):.4g}); trials: "
        f"{len(runs.trials)} finished",
        "- feasible = " + "; ".join(describe_constraints(calibration, config).values())
        + f"; objectives: {', '.join(config.objectives)}",
        f"- MLflow experiment `{runs.experiment}`, parent run `{runs.parent_id}`",
    ]


def _markdown(runs: SweepRuns, table: pd.DataFrame, figures: list[str], grid_rows: list[str],
              grid_missing: list[str]) -> str:
    config = runs.config()
    swept, infeasible = list(config.sweep.methods), runs.infeasible_methods()
    missing = [m for m in swept if m not in set(table["model"])]
    lines = [
        f"# Unlearning report: {runs.experiment}", "", *_setup_lines(runs), "",
        "## Method comparison", "",
        f"Each method's best feasible trial (smallest {config.objectives[0]}, rounded to 0.01, then "
        f"{', '.join([*config.objectives[1:], 'trial id'])}); a method without one shows its least-violating trial "
        "(the smallest constraint value), marked infeasible with what it violates; then the reference models. "
        "Objectives and the constraints' figures, three significant digits; the report's other figures are in "
        "`comparison.csv`."
        + (" A confirmed row shows the mean ± std over its fresh unlearning seeds (`seeds`, `feasible_seeds`; the "
           "search trial itself ran seed 0)." if "seeds" in table else ""),
        "",
        markdown_table(table, list(config.objectives)),
        "",
        *[f"- `{name}`: {describe(name)}" for name in table_figures(list(config.objectives)) if name in table],
        "",
    ]
    if infeasible:
        lines += ["Methods without a feasible trial (violated constraints, counted over their finished trials): "
                  + "; ".join(f"{m} ({', '.join(f'{k} x{v}' for k, v in c.items())})" for m, c in infeasible.items()) + ".", ""]
    if missing:
        lines += [f"Methods swept without a finished trial (all failed-infeasible): {', '.join(missing)}.", ""]
    if (samples := sample_table(runs)) is not None:
        lines += ["## Sample-level unlearning (forget_marker_strength)", "", samples.to_markdown(index=False, floatfmt=".3g"), ""]
    lines += [
        "## Outputs", "", *(["![image grid](grid.png)", ""] if grid_rows else []),
        f"Grid rows: {', '.join(grid_rows) or 'none'}"
        + (f" (no image logged: {', '.join(grid_missing)})" if grid_missing else "") + ".", "",
        "## Trade-off", "", "![Pareto front](pareto.png)", "",
        "## Decoupling: distance to theta0 and loss against GA step", "",
        "Each method's best feasible trial; in grey, every trial of a method without a feasible one (the OOD verdict "
        "judges the final model, after fine-tuning, not the end of GA).", "", "![distance](distance.png)", "",
    ]
    if "tsne.png" in figures:
        lines += ["## Embeddings", "", "![t-SNE](tsne.png)", ""]
    return "\n".join(lines)
