"""The report (issue 4): tables equal the MLflow metrics, the figures are real plots, clear errors."""

import pandas as pd
import pytest
from PIL import Image

from unlearn.cli import main


def test_report_has_every_method_and_reference(small_sweep):
    driver, _, out = small_sweep
    report = driver.report_path
    assert report == out / "report" / "report.md" and report.is_file()
    text = report.read_text()
    for row in ("| realistic", "| finetune", "| attack (reference)", "| original (reference)", "| retrain (reference)"):
        assert row in text
    assert "max_loss" in text  # named among the methods without a finished trial
    assert "backbone: `domain`" in text and "`digits`" in text and "seed 0" in text


@pytest.mark.parametrize("name", ["grid.png", "pareto.png", "distance.png", "tsne.png"])
def test_report_figures_are_real_plots(small_sweep, name):
    _, _, out = small_sweep
    path = out / "report" / name
    with Image.open(path) as img:
        assert img.width >= 400 and img.height >= 300
        colours = img.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert path.stat().st_size > 10_000
    assert colours is None or len(colours) > 20  # not a blank canvas


def test_report_table_numbers_equal_mlflow_metrics(small_sweep):
    from mlflow.tracking import MlflowClient

    _, uri, out = small_sweep
    table = pd.read_csv(out / "report" / "comparison.csv")
    client = MlflowClient(tracking_uri=uri)
    for _, row in table.iterrows():
        metrics = client.get_run(row["run_id"]).data.metrics
        for column in ("forget_marker", "retain_mse", "retain_fid", "forget_fid_vs_retrain", "forget_clip"):
            assert row[column] == pytest.approx(metrics[column], rel=1e-9, abs=1e-12)
    parent = client.search_runs([client.get_experiment_by_name("t-sweep").experiment_id], "tags.role = 'parent'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {"report/report.md", "report/grid.png"}


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
