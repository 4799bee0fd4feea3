"""The report (issue 4): tables equal the MLflow metrics, the figures are real plots, clear errors."""

import pandas as pd
import pytest
from PIL import Image

from unlearn.cli import main


def test_report_has_every_method_and_reference(small_sweep):
    from mlflow.tracking import MlflowClient

    from analysis.runs import load_sweep

    driver, uri, out = small_sweep
    report = driver.report_path
    assert report == out / "report" / "report.md" and report.is_file()
    text = report.read_text()
    for row in ("| attack (reference)", "| original (reference)", "| retrain (reference)"):
        assert row in text
    # every swept method with a finished trial is a table row: its best feasible trial, or, with none, its
    # least-violating trial marked infeasible with what it violates (and the line counting the violations names it)
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    table = pd.read_csv(out / "report" / "comparison.csv", dtype={"trial_id": str})
    without_line = next(line for line in text.splitlines() if line.startswith("Methods without a feasible trial")) \
        if "Methods without a feasible trial" in text else ""
    for method in ("realistic", "finetune"):
        has_feasible = bool((trials[trials["method"] == method]["feasible"] == 1.0).any())
        row = table[table["model"] == method].iloc[0]
        assert bool(row["feasible"]) == has_feasible and (row["verdict"] == "feasible") == has_feasible, method
        assert (method in without_line) == (not has_feasible), method
        if not has_feasible:  # the trial with the smallest constraint value
            assert row["verdict"].startswith("infeasible: ")
            frame = load_sweep("t-sweep", uri).metric_frame()
            least = frame[frame["method"] == method]["constraint"].min()
            assert float(MlflowClient(tracking_uri=uri).get_run(row["run_id"]).data.metrics["constraint"]) == least
    # the grid has a row for the inputs, the ground truth and every model of the table, none lost on the way
    grid_line = next(line for line in text.splitlines() if line.startswith("Grid rows: "))
    labels = grid_line.removeprefix("Grid rows: ").rstrip(".").split(", ")
    assert labels[:2] == ["masked_input", "ground_truth"] and "no image logged" not in grid_line
    assert set(labels[2:]) == {m.removesuffix(" (reference)") + ("" if f or "(reference)" in m else " (infeasible)")
                               for m, f in zip(table["model"], table["feasible"], strict=True)}, (labels, list(table["model"]))
    assert "max_loss" not in set(table["model"])
    assert "without a finished trial (all failed-infeasible): max_loss" in text
    assert "backbone: `domain`" in text and "`digits`" in text and "seed 0" in text
    assert "**marker audit: valid**" in text and "OOD threshold delta = 0.2" in text


@pytest.mark.parametrize("name", ["grid.png", "pareto.png", "distance.png", "tsne.png"])
def test_report_figures_are_real_plots(small_sweep, name):
    _, _, out = small_sweep
    path = out / "report" / name
    with Image.open(path) as img:
        assert img.width >= 400 and img.height >= 300
        colours = img.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert path.stat().st_size > 10_000
    assert colours is None or len(colours) > 20  # not a blank canvas


def _blobs(path, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Connected groups of pixels of one colour (a legend swatch is one; each plotted marker adds its own)."""
    import numpy as np
    from scipy import ndimage

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    return int(ndimage.label(np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance)[1])


def test_pareto_and_tsne_plot_their_points_not_only_their_legends(small_sweep):
    """Each method with a finite trial has markers of its colour beyond its legend swatch in pareto.png (measured: 7
    and 6 groups of pixels for finetune and realistic; an empty axes with its legend: 1 each); each model of the
    t-SNE has its points (measured 14-20 groups; its two legend swatches: 2)."""
    import matplotlib

    _, _, out = small_sweep
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    cycle = [tuple(int(255 * c) for c in matplotlib.colors.to_rgb(x))
             for x in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]]
    finite = trials.dropna(subset=["forget_marker_strength", "retain_degradation"])
    finite = finite[finite["failed"] == 0.0]
    methods = sorted(finite["method"].unique())  # the plotted (not failed) trials' methods, in groupby order
    assert methods
    for i, method in enumerate(methods):
        assert _blobs(out / "report" / "pareto.png", cycle[i]) >= 2, method
    table = pd.read_csv(out / "report" / "comparison.csv", dtype={"trial_id": str})
    models = 2 + ("realistic" in set(table["model"]))  # realistic's best (when feasible), retrain, attack
    tab10 = matplotlib.colormaps["tab10"]
    for i in range(models):
        assert _blobs(out / "report" / "tsne.png", tuple(int(255 * c) for c in tab10(i)[:3])) >= 5, i


def test_report_table_numbers_equal_mlflow_metrics(small_sweep):
    from mlflow.tracking import MlflowClient

    _, uri, out = small_sweep
    table = pd.read_csv(out / "report" / "comparison.csv", dtype={"trial_id": str})
    client = MlflowClient(tracking_uri=uri)
    trials = pd.read_csv(out / "trials.csv", dtype={"trial_id": str})
    experiment = client.get_experiment_by_name("t-sweep").experiment_id
    confirmed_rows = 0
    for _, row in table.iterrows():
        run = client.get_run(row["run_id"])
        metrics = run.data.metrics
        # the row is its model's own run (a swapped attack/original row would carry the other tag)
        if row["model"].endswith(" (reference)"):
            assert run.data.tags["reference"] == row["model"].removesuffix(" (reference)")
        else:
            assert run.data.tags["method"] == row["model"]
        checks = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{row['run_id']}' and tags.confirm != ''")
        columns = ("forget_marker_strength", "forget_marker", "forget_gap_vs_retrain", "retain_mse", "retain_fid",
                   "forget_fid_vs_retrain", "forget_clip")
        for column in columns:
            if checks:  # a confirmed row: the mean and std over its confirmation runs
                values = [c.data.metrics[column] for c in checks]
                assert row[column] == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12)
                assert row[f"{column}_std"] == pytest.approx(pd.Series(values).std(ddof=1), rel=1e-6, abs=1e-12)
            else:
                assert row[column] == pytest.approx(metrics[column], rel=1e-9, abs=1e-12)
        if row["model"].endswith("(reference)"):
            assert not checks  # a reference model never gets a confirmation child
            continue
        confirmed_rows += bool(checks)
        if checks:
            assert row["seeds"] == len(checks) == 2
            assert sorted(c.data.params["seed"] for c in checks) == ["1", "2"]  # fresh seeds; the search ran seed 0
            assert " ± " in (out / "report" / "report.md").read_text()
        if not row["feasible"]:  # a method without a feasible trial: its least-violating one, never confirmed
            assert not checks and metrics["feasible"] == 0.0
            continue
        # the row is the method's best: feasible, and no feasible trial of the method has a smaller strength
        assert metrics["feasible"] == 1.0
        rivals = trials[(trials["method"] == row["model"]) & (trials["feasible"] == 1.0)]
        assert (rivals["forget_marker_strength"].round(2) >= round(metrics["forget_marker_strength"], 2)).all()
    methods = table[~table["model"].str.endswith("(reference)")]
    assert confirmed_rows == int(methods["feasible"].sum())  # every method row with a feasible best is confirmed
    parent = client.search_runs([client.get_experiment_by_name("t-sweep").experiment_id], "tags.role = 'parent'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md", "report/grid.png"}


def test_report_md_table_is_comparison_csv(small_sweep):
    """report.md's table shows comparison.csv's rows, in its order: the verdict, the objectives and the constraints'
    figures first, to three significant digits (means for confirmed rows); no other figure."""
    _, _, out = small_sweep
    table = pd.read_csv(out / "report" / "comparison.csv", dtype={"trial_id": str})
    lines = (out / "report" / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model "))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 : start + 2 + len(table)]]
    assert [r[0] for r in rows] == list(table["model"])
    assert header[:4] == ["model", "verdict", "forget_marker_strength", "retain_degradation"]  # the objectives
    assert {"forget_ood_distance", "forget_gap_vs_retrain", "collapsed"} <= set(header) and "mia_auc" not in header
    for cells, (_, expected) in zip(rows, table.iterrows(), strict=True):
        assert cells[1] == expected["verdict"]
        for column in ("forget_marker_strength", "forget_gap_vs_retrain", "retain_degradation", "forget_ood_distance"):
            text = cells[header.index(column)].split(" ± ")[0]
            assert len(text.lstrip("-0.").replace(".", "").split("e")[0]) <= 3, text  # three significant digits
            assert float(text) == pytest.approx(expected[column], rel=5e-3, abs=1e-9), (expected["model"], column)


def test_report_for_missing_experiment_or_no_finished_trial(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["report", "--experiment", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("empty")
    client.create_run(exp, tags={"role": "parent", "sweep": "empty"})
    assert main(["report", "--experiment", "empty", "--tracking-uri", uri, "--out", str(tmp_path / "r")]) == 2
    assert "has no finished trial" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_distance_plot_has_the_curves_of_the_best_trials(small_sweep, tmp_path, monkeypatch):
    """The distance-vs-step figure reads each best trial's curves.json back from MLflow: it must be there. Reading
    artifacts back leaves nothing in the temporary folder (it used to keep one folder per artifact, for good)."""
    import tempfile

    from analysis.report import _curves
    from analysis.runs import load_sweep

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _, uri, _ = small_sweep
    runs = load_sweep("t-sweep", uri)
    assert runs.config().name == "digits-ae" and runs.image(runs.parent_id, "no-such.png") is None
    best = runs.best_trials()
    realistic = best[best["method"] == "realistic"]
    assert len(realistic) == 1
    curves = _curves(runs, realistic["run_id"].iloc[0])
    assert len(curves["ga_param_distance"]) == int(float(realistic["params.ga_steps"].iloc[0]))
    assert curves["finetune_loss"]
    assert not list(tmp_path.iterdir())


def _pixels_near(img, rgb: tuple[int, int, int], box: tuple[int, int, int, int], tolerance: int = 40) -> int:
    import numpy as np

    region = np.asarray(img.convert("RGB").crop(box), dtype=int)
    return int((np.abs(region - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_distance_plot_draws_the_best_trials_ga_curves_and_the_threshold(small_sweep):
    """Not only a canvas: the Eq. 3 and parameter-distance panels hold the best realistic trial's GA curve (the
    first colour of matplotlib's cycle, a line across the panel, not just a legend swatch) and the red OOD threshold."""
    import matplotlib

    _, _, out = small_sweep
    first = matplotlib.colors.to_rgb(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0])
    first = tuple(int(255 * c) for c in first)
    with Image.open(out / "report" / "distance.png") as img:
        third = img.width // 3
        eq3, params = (0, 0, third, img.height), (third, 0, 2 * third, img.height)
        assert _pixels_near(img, first, eq3) >= 150  # measured 1113 (919 and 526 below); an empty panel has 0
        assert _pixels_near(img, first, params) >= 150
        assert _pixels_near(img, (255, 0, 0), eq3, tolerance=60) >= 150  # the dashed threshold across the panel


def test_sample_level_sweeps_get_a_forget_fraction_table_of_the_best_trials_strength():
    """The report's sample-level table: for a sweep with data.forget_fraction < 1, one row (the fraction) with each
    method's best trial's forget_marker_strength, from the one definition of "best"; none at class level."""
    from types import SimpleNamespace

    from analysis.report import sample_table

    best = pd.DataFrame({"method": ["realistic", "finetune"], "forget_marker_strength": [0.125, 0.5]})
    runs = SimpleNamespace(param=lambda key, default: {"data.forget_fraction": "0.25"}.get(key, default),
                           best_trials=lambda: best)
    table = sample_table(runs)
    assert table.to_dict("records") == [{"forget_fraction": 0.25, "realistic": 0.125, "finetune": 0.5}]
    runs.param = lambda key, default: default  # class level: forget_fraction 1.0
    assert sample_table(runs) is None
