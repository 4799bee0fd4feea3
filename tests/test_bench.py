"""The benchmark script's plumbing (the full run is `python analysis/bench.py --out DIR`, minutes long)."""

import json

import pytest

from analysis.bench import main


def test_bench_eval_writes_json(prepared, default_config, tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--only", "eval", "--set", f"cache_dir={default_config.cache_dir}"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["eval_images_per_second"] > 0
    assert result["evaluation"]["images"] == sum(len(s) for s in prepared.data.eval_splits().values())
    assert "Evaluation throughput" in capsys.readouterr().out


def test_bench_threads_runs_the_loop_both_ways(prepared, default_config, tmp_path, capsys):
    """One process on every core and one 1-thread process per core, each running the fine-tuning loop (~25 s)."""
    code = main(["--out", str(tmp_path), "--only", "threads", "--steps", "25", "--set", f"cache_dir={default_config.cache_dir}"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    row = result["cpu_threads"]
    assert row["cores"] >= 1
    assert row["one_process_steps_per_second"] > 0 and row["one_thread_processes_steps_per_second"] > 0  # both ran
    assert result["processes_over_threads"] == row["processes_over_threads"] > 0
    assert "CPU threads" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "needle"), [
    (["--set", "unlearn.ga_lr=0"], "ga_lr"), (["--steps", "5"], "--steps"),
    (["--only", "eval,nonsense"], "--only nonsense: unknown"),  # an unknown section runs nothing, not the rest
    (["--only", "data"], "--only data measures an ImageFolder"),  # the default config reads digits
])
def test_bench_bad_input_exits_2(argv, needle, tmp_path, capsys):
    assert main(["--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: error:") and needle in err and "\n" not in err
