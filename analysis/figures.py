"""Matplotlib figures of a sweep (headless, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from unlearn.audit.best import pareto_front  # noqa: E402


def pareto_plot(trials: pd.DataFrame, objectives: list[str], path: Path, confirmed: pd.DataFrame | None = None) -> Path:
    """All trials in (retain_degradation, forget_marker_strength), feasible filled, the front joined by a line;
    confirmed best configurations as their mean ± std over the confirmation seeds. Without marker figures (a model
    brought by the user) the first objective that is not the retain degradation takes the y axis."""
    x, y = "retain_degradation", "forget_marker_strength"
    if y not in trials:
        y = next((o for o in objectives if o != x and o in trials), "forget_ood_distance")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, group in trials.groupby("method"):
        feasible = group["feasible"] == 1.0
        sc = ax.scatter(group.loc[feasible, x], group.loc[feasible, y], label=method, s=30)
        ax.scatter(group.loc[~feasible, x], group.loc[~feasible, y], s=30, facecolors="none", edgecolors=sc.get_facecolor())
    front = pareto_front(trials, objectives).sort_values(x) if {x, y} <= set(objectives) else trials.iloc[0:0]
    if len(front):
        ax.plot(front[x], front[y], "k--", lw=1, label="Pareto front")
    for i, row in enumerate((confirmed if confirmed is not None else pd.DataFrame()).to_dict("records")):
        if {x, y, f"{x}_std", f"{y}_std"} <= set(row):
            ax.errorbar(row[x], row[y], xerr=row[f"{x}_std"], yerr=row[f"{y}_std"], fmt="k+", ms=10, capsize=3,
                        label=f"confirmed mean ± std ({int(row['seeds'])} seeds)" if i == 0 else None)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("retain degradation (retain metric / attack's - 1)")
    ax.set_ylabel("forget_marker_strength (0 clean, 1 drawn '+')" if y == "forget_marker_strength" else y)
    ax.set_title("Sweep trials (hollow: infeasible)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


INFEASIBLE_GREY = "0.6"  # the GA curves of methods without a feasible trial: context, not a result


def distance_plot(curves: dict[str, dict[str, list[tuple[int, float]]]], ood_delta: float, path: Path,
                  infeasible: dict[str, list[dict[str, list[tuple[int, float]]]]] | None = None) -> Path:
    """Per method: Eq. 3 distance to theta0 and GA loss against GA step, with the OOD threshold. `curves` are the
    best trials'; `infeasible` holds, for each method without a feasible trial, all its trials' curves, drawn in
    grey, so that a sweep in which GA never reached the threshold shows why instead of empty panels."""
    fig, (ax_d, ax_p, ax_l) = plt.subplots(1, 3, figsize=(14, 4))

    def draw(series: dict[str, list[tuple[int, float]]], label: str | None, eq3_points: dict | None = None, **style) -> None:
        for ax, name, sign in ((ax_d, "ga_ood_distance", 1), (ax_p, "ga_param_distance", 1), (ax_l, "ga_loss", -1)):
            if series.get(name):  # the objective is -L: the loss panel plots L(theta; D_f)
                steps, values = zip(*series[name], strict=True)
                ax.plot(steps, [sign * v for v in values], label=label, **style, **((eq3_points or {}) if ax is ax_d else {}))

    for label, series in curves.items():
        draw(series, label, eq3_points={"marker": "o", "ms": 3})  # Eq. 3 is measured every ood_check_every steps
    for method, trials in (infeasible or {}).items():
        for i, series in enumerate(trials):
            draw(series, f"{method}: {len(trials)} trial(s), none feasible" if i == 0 else None,
                 color=INFEASIBLE_GREY, lw=1)
    ax_d.axhline(ood_delta, color="red", ls="--", lw=1, label=f"OOD threshold delta={ood_delta:g}")
    ax_d.set(xlabel="GA step", ylabel="d(f_theta, f_theta0) on D_f", title="Output distance to theta0 (Eq. 3)")
    ax_p.set(xlabel="GA step", ylabel="||theta - theta0||", title="Parameter distance to theta0")
    ax_l.set(xlabel="GA step", ylabel="L(theta; D_f) (batch)", title="Forget loss during ascent")
    for ax in (ax_d, ax_p, ax_l):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # no method ran gradient ascent (or none finished): say so instead of an empty frame
            ax.text(0.5, 0.5, "no GA curve", transform=ax.transAxes, ha="center", va="center", color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(rows: list[tuple[str, np.ndarray]], per_split: int, path: Path) -> Path:
    """Rows = masked input, ground truth, models; columns = retain samples then forget samples."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 0.95 * len(rows) + 0.6))
    axes = np.atleast_1d(axes)
    for ax, (label, row) in zip(axes, rows, strict=True):
        ax.imshow(row, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    width = rows[0][1].shape[1]
    axes[0].set_title(f"retain-test (left {per_split})  |  forget-test (right {per_split})", fontsize=10)
    for ax in axes:
        ax.axvline(width / 2 - 0.5, color="yellow", lw=1.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tsne_plot(embeddings: dict[str, dict[str, np.ndarray]], seed: int, path: Path) -> Path:
    """t-SNE of output embeddings: retain vs forget, for the unlearned and the reference models."""
    from sklearn.manifold import TSNE

    points, labels = [], []
    for model, splits in embeddings.items():
        for split, feats in splits.items():
            points.append(feats)
            labels.extend([(model, split)] * len(feats))
    data = np.concatenate(points)
    perplexity = float(min(30, max(5, len(data) // 10)))
    coords = TSNE(n_components=2, random_state=seed, perplexity=perplexity, init="pca").fit_transform(data)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    markers = {"retain": "o", "forget": "^"}
    models = list(embeddings)
    colors = plt.get_cmap("tab10")
    for i, model in enumerate(models):
        for split in ("retain", "forget"):
            idx = [j for j, lab in enumerate(labels) if lab == (model, split)]
            if idx:
                ax.scatter(coords[idx, 0], coords[idx, 1], s=12 if split == "retain" else 28, marker=markers[split],
                           color=colors(i), alpha=0.35 if split == "retain" else 0.9, label=f"{model} / {split}")
    ax.set_title("t-SNE of output embeddings (circles: retain, triangles: forget)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
