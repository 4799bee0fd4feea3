"""The deliverable (issue 11, part): `unlearn run --out DIR` saves the model with its evidence, and
`unlearn audit --model DIR` re-audits it from the weights alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unlearn.audit.catalogue import PROCEDURE


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unlearn.cli", *argv], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def saved(prepared, default_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("deliverable") / "realistic"
    done = _cli("run", "--method", "realistic", "--out", str(out), "--json", "--set", f"cache_dir={default_config.cache_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_out_folder_holds_weights_config_metrics_and_a_certificate(saved, prepared):
    import hashlib

    out, metrics = saved
    assert {p.name for p in out.iterdir()} == {"model", "config.yaml", "metrics.json", "certificate.md"}
    # the one layout of every kind: the model as `save_pretrained` writes it
    assert {p.name for p in (out / "model").iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((out / "model" / "config.json").read_text()) == {
        "kind": "ae", "image_size": prepared.config.data.image_size, "width": prepared.config.model.width,
        "latent_channels": prepared.config.model.latent_channels}
    assert json.loads((out / "metrics.json").read_text())["forget_marker_strength"] == metrics["forget_marker_strength"]
    text = (out / "certificate.md").read_text()
    for needle in ("method `realistic`", "marker audit valid", "forget_gap_vs_retrain", "Where D_f still lives",
                   "ga_bound_upper", '"ga_lr": 0.05'):
        assert needle in text, needle
    # the digests, recomputed here: D_f's from its positions in the data set, the weights' as `sha256sum` prints it
    ids = sorted(f"digits:{int(i)}" for i in prepared.data.forget_train.index)
    assert (f"forget-set digest (sha256 of the sorted sample ids): "
            f"`{hashlib.sha256(chr(10).join(ids).encode()).hexdigest()}`") in text
    assert (f"weights `model/model.safetensors`, sha256 "
            f"`{hashlib.sha256((out / 'model' / 'model.safetensors').read_bytes()).hexdigest()}`") in text
    # one verdict line per constraint, each judged on the figures as the spec states it
    config = prepared.config
    expected = {
        "ood": metrics["forget_ood_distance"] >= metrics["ood_delta"],
        "collapsed": metrics["collapsed"] == 0.0,
        "diverged": metrics["diverged"] == 0.0,
        "forget_gap": metrics["forget_gap_vs_retrain"] <= metrics["max_forget_gap"],
        "retain_degradation": metrics["retain_degradation"] <= config.audit.max_retain_degradation,
    }
    verdict = text.split("## Verdict")[1].split("\n## ")[0]
    for name, holds in expected.items():
        lines = [line for line in verdict.splitlines() if line.strip().startswith(f"- {name}: ")]
        assert len(lines) == 1 and (": pass (" in lines[0]) == holds, (name, lines)
    assert ("**NOT feasible**" in text) == (not all(expected.values())) == (metrics["feasible"] == 0.0)


def test_audit_from_the_weights_alone_reproduces_the_run(saved, tmp_path):
    out, metrics = saved
    (out / "metrics.json").unlink()  # never read by the audit
    done = _cli("audit", "--model", str(out), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    audited = json.loads(done.stdout.strip().splitlines()[-1])
    compared = [k for k in audited if k in metrics and k != "model" and k not in PROCEDURE]
    assert {"forget_marker_strength", "retain_mse", "forget_fid", "forget_gap_vs_retrain", "forget_ood_distance"} <= set(compared)
    for key in compared:
        assert audited[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key


def _main(capsys, *argv: str) -> tuple[int, list[str], dict | None]:
    """The CLI in this process (no interpreter start-up): exit code, stderr lines, the JSON line if any."""
    from unlearn.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, captured.err.strip().splitlines(), (json.loads(lines[-1]) if "--json" in argv and code == 0 else None)


def test_changed_weights_give_different_figures(saved, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    out, metrics = saved
    copy = tmp_path / "changed"
    shutil.copytree(out, copy)
    state = load_file(str(copy / "model" / "model.safetensors"))
    name = next(k for k in state if k.startswith("decoder") and k.endswith("bias"))
    state[name] = state[name] + 0.5
    save_file(state, str(copy / "model" / "model.safetensors"))
    code, err, audited = _main(capsys, "audit", "--model", str(copy), "--json")
    assert code == 0, err[-5:]
    assert audited["retain_mse"] != pytest.approx(metrics["retain_mse"], rel=1e-3)


def test_bad_model_or_out_exits_2_and_writes_nothing(saved, tmp_path, default_config, capsys):
    import shutil

    out, _ = saved
    cases = [
        (["audit", "--model", str(tmp_path / "missing")], "does not exist"),
        (["audit", "--model", str(tmp_path)], "no config.yaml"),
    ]
    (tmp_path / "file.txt").write_text("x")
    cases.append((["run", "--method", "finetune", "--out", str(tmp_path / "file.txt"), "--set",
                   f"cache_dir={default_config.cache_dir}"], "is a file"))
    cases.append((["run", "--method", "finetune", "--out", str(out), "--set", f"cache_dir={default_config.cache_dir}"],
                  "not empty"))
    cases.append((["run", "--method", "finetune", "--out", str(tmp_path / "file.txt" / "sub"), "--set",
                   f"cache_dir={default_config.cache_dir}"], "is not a writable folder"))
    corrupt = tmp_path / "corrupt"
    (corrupt / "model").mkdir(parents=True)
    (corrupt / "config.yaml").write_text((out / "config.yaml").read_text())
    (corrupt / "model" / "config.json").write_text((out / "model" / "config.json").read_text())
    (corrupt / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    cases.append((["audit", "--model", str(corrupt)], "cannot be read"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.yaml").write_text((out / "config.yaml").read_text().replace("width: 32", "width: 16"))
    shutil.copytree(out / "model", wrong / "model")
    cases.append((["audit", "--model", str(wrong)],
                  "do not fit the configured model: config.json has width=32, the config width=16"))
    unfit = tmp_path / "unfit"
    shutil.copytree(out, unfit)
    (unfit / "model" / "config.json").write_text(
        (out / "model" / "config.json").read_text().replace('"width": 32', '"width": 16'))
    cases.append((["audit", "--model", str(unfit)], "do not fit the configured model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((out / "config.yaml").read_text())
    cases.append((["audit", "--model", str(empty)], "holds no model (model/ with config.json"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, needle in cases:
        code, lines, _ = _main(capsys, *argv)
        assert code == 2 and len(lines) == 1 and needle in lines[0] and lines[0].startswith("unlearn: error:"), (argv, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in wrong.iterdir()) == ["config.yaml", "model"]


def test_a_run_collapsed_by_ga_stays_collapsed_when_re_audited(prepared, default_config, tmp_path, capsys):
    """Fine-tuning restores the outputs of a decoder GA killed; the weights alone cannot show it, the verdict must."""
    out = tmp_path / "collapsed"
    code, err, run = _main(capsys, "run", "--method", "realistic", "--out", str(out), "--json", "--set",
                           f"cache_dir={default_config.cache_dir}", "--set", "unlearn.ga_step=sgd", "--set",
                           "unlearn.ga_lr=5", "--set", "unlearn.ga_steps=20")
    assert code == 0, err[-5:]
    assert run["collapsed"] == 1.0 and run["retain_output_std_ratio"] > 0.5
    code, err, audited = _main(capsys, "audit", "--model", str(out), "--json")
    assert audited["collapsed"] == 1.0 and audited["feasible"] == 0.0
    assert audited["ga_output_std_ratio"] == pytest.approx(run["ga_output_std_ratio"], rel=1e-6)


def test_a_bundle_of_an_older_layout_is_named_as_such(saved, tmp_path, capsys):
    """Before the one layout, an autoencoder's bundle held model.safetensors at its root and a VQ or diffusion bundle
    a diffusers folder `model/`: `unlearn audit` and `stages.theta0` say in one line that an older version wrote it."""
    import torch

    from unlearn.config import ConfigError, load_config, with_overrides
    from unlearn.models import build_model
    from unlearn.stages import load_theta0

    out, _ = saved
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.yaml").write_text((out / "config.yaml").read_text())
    (flat / "model.safetensors").write_bytes((out / "model" / "model.safetensors").read_bytes())
    vq_config = load_config(str(out / "config.yaml"), ["model.kind=vq", "model.width=8", "model.latent_channels=4"])
    diffusers = tmp_path / "diffusers"
    build_model(vq_config).save_diffusers_folder(diffusers / "model")
    (diffusers / "config.yaml").write_text((out / "config.yaml").read_text())
    for folder, config in ((flat, load_config(str(out / "config.yaml"))), (diffusers, vq_config)):
        code, lines, _ = _main(capsys, "audit", "--model", str(folder))
        assert code == 2 and len(lines) == 1 and str(folder) in lines[0] and "older version" in lines[0], lines
        with pytest.raises(ConfigError, match="older version"):
            load_theta0(with_overrides(config, {"stages.theta0": str(folder)}), torch.device("cpu"))

