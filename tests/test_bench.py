"""The benchmark script's plumbing (the full run is `python analysis/bench.py --out DIR`, minutes long)."""

import json

from analysis.bench import main


def test_bench_eval_writes_json(prepared, default_config, tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--only", "eval", "--set", f"cache_dir={default_config.cache_dir}"])
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["eval_images_per_second"] > 0
    assert result["evaluation"]["images"] == sum(len(s) for s in prepared.data.eval_splits().values())
    assert "Evaluation throughput" in capsys.readouterr().out


def test_bench_bad_config_exits_2(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--set", "unlearn.ga_lr=0"]) == 2
    assert capsys.readouterr().err.startswith("bench: error:")
