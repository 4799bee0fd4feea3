"""The model interface (autoencoder, VQ, diffusion), pretrained loading, and the large presets."""

import pytest
import torch

from unlearn.cli import main
from unlearn.config import load_config
from unlearn.models import build_model
from unlearn.models.pretrained import load_pretrained

KINDS = ["ae", "vq", "diffusion"]


def _tiny(kind: str, tmp_path=None):
    extra = [f"cache_dir={tmp_path}"] if tmp_path else []
    return load_config("digits-ae", [f"model.kind={kind}", "model.width=8", "model.latent_channels=4", *extra])


def _batch():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:11, 5:11] = 1
    return images, mask


@pytest.mark.parametrize("kind", KINDS)
def test_interface(kind):
    torch.manual_seed(0)
    model = build_model(_tiny(kind))
    images, mask = _batch()
    loss = model.loss(images, mask, images)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    out = model.reconstruct(images, mask)
    assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out * (1 - mask), images * (1 - mask))  # the context is kept
    assert model.encode(images, mask).shape[0] == 4
    enc = {id(p) for p in model.encoder_parameters()}
    assert enc and enc < {id(p) for p in model.parameters()}  # the encoder is a proper part of the model
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_masked_region_is_hidden_from_the_model(kind):
    torch.manual_seed(0)
    model = build_model(_tiny(kind)).eval()
    images, mask = _batch()
    changed = images.clone()
    changed[..., 5:11, 5:11] = 1.0 - changed[..., 5:11, 5:11]
    assert torch.allclose(model.generate(images, mask), model.generate(changed, mask))


def test_diffusion_sampling_is_deterministic():
    torch.manual_seed(0)
    model = build_model(_tiny("diffusion")).eval()
    images, mask = _batch()
    assert torch.equal(model.generate(images, mask), model.generate(images, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_pretrained_checkpoint_file(kind, tmp_path):
    torch.manual_seed(0)
    source = build_model(_tiny(kind))
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = build_model(_tiny(kind))
    load_pretrained(target, str(tmp_path / "weights.pt"))
    images, mask = _batch()
    assert torch.equal(source.eval().generate(images, mask), target.eval().generate(images, mask))


@pytest.mark.parametrize(("kind", "attr"), [("vq", "vq"), ("diffusion", "unet")])
def test_pretrained_diffusers_folder(kind, attr, tmp_path):
    torch.manual_seed(0)
    source = build_model(_tiny(kind))
    getattr(source, attr).save_pretrained(tmp_path / "model")
    target = build_model(_tiny(kind))
    load_pretrained(target, str(tmp_path / "model"))
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pretrained_mismatch_is_a_config_error(tmp_path):
    from unlearn.config import ConfigError

    torch.save(build_model(_tiny("ae")).state_dict(), tmp_path / "ae.pt")
    with pytest.raises(ConfigError, match="does not match"):
        load_pretrained(build_model(_tiny("vq")), str(tmp_path / "ae.pt"))


@pytest.mark.parametrize(
    ("preset", "env"),
    [("cifar10-ae", "CIFAR10_ROOT"), ("cifar10-sample", "CIFAR10_ROOT"), ("imagenet-vqgan", "IMAGENET_ROOT"),
     ("places365-diffusion", "PLACES365_ROOT")],
)
def test_large_presets_validate_and_name_the_missing_root(preset, env, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(env, raising=False)
    config = load_config(preset)
    assert config.data.root_env == env and config.precision == "bf16"
    assert main(["run", "--method", "realistic", "--config", preset, "--set", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and env in err
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    assert main(["run", "--method", "realistic", "--config", preset, "--set", f"cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "missing") in err and env in err


def _attack_and_realistic(overrides: list[str], tmp_path) -> tuple[dict, dict]:
    """Prepare a tiny model on digits, audit the attack model and a realistic run (full catalogue)."""
    from unlearn.audit.catalogue import METRICS, measurable
    from unlearn.pipeline import audit_result, evaluate_reference, prepare, unlearn

    config = load_config("digits-ae", [*overrides, f"cache_dir={tmp_path}"])
    prepared = prepare(config)
    attack = evaluate_reference(prepared, "attack")
    realistic = audit_result(prepared, unlearn(prepared, "realistic"))
    for split in ("retain", "forget"):
        for name in (n for n in METRICS
                     if n.startswith(f"{split}_") and measurable(n, marker=True, retrain=config.audit.retrain)):
            assert torch.isfinite(torch.tensor(realistic[name])), name
    assert realistic["ga_steps"] == config.unlearn.ga_steps
    return attack, realistic


def _assert_unlearned(attack: dict, realistic: dict) -> None:
    """The effect the marker audit asks for, with sizes (the forget-test sets hold 10-12 images here):
    - the attack model regenerates the '+' (rate >= 0.6, strength >= 0.4);
    - realistic removes it: at most a quarter of the outputs carry it, and at most a quarter of the attack's
      strength is left;
    - its gradient ascent moved the forget outputs away from theta0 beyond what fine-tuning alone does (the null
      method, same fine-tuning budget, in the calibration) by >= 0.02 in Eq. 3 distance (measured +0.036 to +0.038).
    On these tiny models fine-tuning alone also clears the '+' (null strength 0.004-0.06, below
    audit.min_marker_strength): the marker figures cannot tell GA from fine-tuning, the distance can."""
    assert attack["forget_marker"] >= 0.6 and attack["forget_marker_strength"] >= 0.4
    assert realistic["forget_marker"] <= 0.25
    assert realistic["forget_marker_strength"] <= 0.25 * attack["forget_marker_strength"]
    assert realistic["forget_ood_distance"] >= realistic["audit_null_ood_distance"] + 0.02


def test_vq_end_to_end_on_digits(tmp_path):
    """Tiny VQ on digits (CPU, ~50 s). GA at ga_lr 0.1 (16 normalised steps: 1.6 in parameter distance). Measured on
    torch 2.14.1, AMD EPYC, one thread: attack rate 1.0, strength 0.75; realistic strength 0.032, forget_ood_distance
    0.029 beyond the null method's 0.253 (unlearning seeds 0-4: +0.022 to +0.039). At the preset's ga_lr 0.05 GA's
    trace is erased by fine-tuning here (+0.002 to +0.018 over the same seeds; +0.036 was measured on the machine
    that first ran this test), so this setting asks GA for twice the distance."""
    attack, realistic = _attack_and_realistic(
        ["model.kind=vq", "unlearn.ood_check_every=8", "model.width=8", "model.latent_channels=8", "data.max_per_class=60",
         "stages.epochs=15", "stages.attack_epochs=15", "stages.lr=0.003", "audit.retrain=false", "unlearn.ga_lr=0.1"], tmp_path)
    _assert_unlearned(attack, realistic)


def test_diffusion_end_to_end_on_digits(tmp_path):
    """Tiny conditional diffusion model on digits (CPU, ~1 min): same pipeline, same catalogue. Short stages, 35
    images per class and few sampling steps (suite time), GA at ga_lr 0.1 as the VQ test. Measured (torch 2.14.1, AMD
    EPYC, one thread): realistic's forget_ood_distance beyond the null method's 0.181 by +0.051 to +0.102 over
    unlearning seeds 0-4, strength 0.0. At the preset's ga_lr 0.05: +0.018 to +0.032 (seed 0: +0.019), straddling
    the 0.02 this test asks for (the first run of this test measured +0.030 at seed 0, with a random-number stream
    that a per-trial forget-loss evaluation used to consume before training)."""
    attack, realistic = _attack_and_realistic(
        ["model.kind=diffusion", "unlearn.ood_check_every=8", "model.width=16", "model.diffusion_steps=50",
         "model.sample_steps=10", "data.max_per_class=35", "stages.epochs=15", "stages.attack_epochs=15", "stages.batch_size=32",
         "stages.lr=0.002", "unlearn.ft_steps=40", "audit.retrain=false", "unlearn.ga_lr=0.1"], tmp_path)
    _assert_unlearned(attack, realistic)


# --- models save and load themselves (issue 25): one layout for every kind, a kind registry ---


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_and_from_pretrained_round_trip(kind, tmp_path):
    """config.json = the kind and the constructor's arguments; model.safetensors = the weights, the provenance as
    its metadata; `I2IModel.from_pretrained` builds the same class with the same outputs."""
    import json

    from unlearn.models import MODEL_KINDS, I2IModel, load_provenance

    config = _tiny(kind)
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert model.save_pretrained(tmp_path / "m", {"ga_output_std_ratio": 0.25}) == tmp_path / "m"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    spec = json.loads((tmp_path / "m" / "config.json").read_text())
    assert spec == {"kind": kind, **MODEL_KINDS[kind].kwargs_from_config(config)} == model.spec()
    assert spec["image_size"] == 16 and spec["width"] == 8
    loaded = I2IModel.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.init_kwargs == model.init_kwargs
    images, mask = _batch()
    assert torch.equal(model.generate(images, mask), loaded.generate(images, mask))
    assert load_provenance(tmp_path / "m") == {"ga_output_std_ratio": 0.25}
    assert type(MODEL_KINDS[kind].from_pretrained(tmp_path / "m")) is type(model)  # through the class itself too
    other = build_model(config)
    other.load_weights(tmp_path / "m")  # into a model built from the same config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))


def test_model_kinds_registry_matches_the_config():
    """One registry entry per `model.kind` the config accepts; each class names its own kind; no kind is
    imported before it is asked for (diffusers takes seconds)."""
    import subprocess
    import sys
    import typing

    from unlearn.config import ModelConfig
    from unlearn.models import MODEL_KINDS

    assert list(MODEL_KINDS) == list(typing.get_args(ModelConfig.model_fields["kind"].annotation))
    for kind in MODEL_KINDS:
        assert MODEL_KINDS[kind].kind == kind
        assert type(build_model(_tiny(kind))) is MODEL_KINDS[kind]
    code = "import sys, unlearn.models; assert 'diffusers' not in sys.modules and 'unlearn.models.vq' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _one_line_config_error(call, *needles: str) -> str:
    from unlearn.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text and all(n in text for n in needles), (text, needles)
    return text


def test_from_pretrained_names_the_folder_and_the_problem(tmp_path):
    import json

    from unlearn.models import I2IModel

    torch.manual_seed(0)
    model = build_model(_tiny("ae"))
    folder = model.save_pretrained(tmp_path / "m")
    spec = json.loads((folder / "config.json").read_text())

    def variant(name: str, spec_text: str | None, weights: bool = True):
        target = tmp_path / name
        target.mkdir()
        if spec_text is not None:
            (target / "config.json").write_text(spec_text)
        if weights:
            (target / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        return target

    missing = variant("missing", None)
    _one_line_config_error(lambda: I2IModel.from_pretrained(missing), str(missing), "no config.json")
    broken = variant("broken", "{not json")
    _one_line_config_error(lambda: I2IModel.from_pretrained(broken), str(broken), "not valid JSON")
    unknown = variant("unknown", json.dumps({**spec, "kind": "gan"}))
    _one_line_config_error(lambda: I2IModel.from_pretrained(unknown), str(unknown), "unknown model kind 'gan'")
    kindless = variant("kindless", json.dumps({k: v for k, v in spec.items() if k != "kind"}))
    _one_line_config_error(lambda: I2IModel.from_pretrained(kindless), str(kindless), "names no model kind")
    bad_args = variant("bad_args", json.dumps({**spec, "depth": 3}))
    _one_line_config_error(lambda: I2IModel.from_pretrained(bad_args), str(bad_args), "does not describe a ae model")
    wider = variant("wider", json.dumps({**spec, "width": 16}))
    _one_line_config_error(lambda: I2IModel.from_pretrained(wider), str(wider), "do not fit its config.json")
    no_weights = variant("no_weights", json.dumps(spec), weights=False)
    _one_line_config_error(lambda: I2IModel.from_pretrained(no_weights), str(no_weights), "no model.safetensors")
    garbage = variant("garbage", json.dumps(spec), weights=False)
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file")
    _one_line_config_error(lambda: I2IModel.from_pretrained(garbage), str(garbage), "cannot be read")
    # into a model of another config: the differing arguments named
    wide = load_config("digits-ae", ["model.width=16", "model.latent_channels=4"])
    _one_line_config_error(lambda: build_model(wide).load_weights(folder), str(folder), "do not fit the configured model",
                           "width=8", "width=16")
    _one_line_config_error(lambda: build_model(_tiny("vq")).load_weights(folder), "kind='ae'", "kind='vq'")


def test_an_older_layout_is_named_as_such(tmp_path):
    """A VQ or diffusion bundle of an older version held a diffusers folder `model/`, an autoencoder's bundle its
    model.safetensors at the root: one line says so (there is no loader for them)."""
    from unlearn.models import I2IModel, run_model_folder

    torch.manual_seed(0)
    build_model(_tiny("vq")).save_diffusers_folder(tmp_path / "vq" / "model")
    _one_line_config_error(lambda: I2IModel.from_pretrained(tmp_path / "vq" / "model"), "older version")
    _one_line_config_error(lambda: run_model_folder(tmp_path / "vq"), str(tmp_path / "vq"), "older version")
    (tmp_path / "vq" / "model" / "config.json").unlink()
    _one_line_config_error(lambda: run_model_folder(tmp_path / "vq"), "older version")
    ae = tmp_path / "ae"
    build_model(_tiny("ae")).save_pretrained(ae)
    assert run_model_folder(ae) is None  # a save_pretrained folder is not a run folder
    (ae / "config.yaml").write_text("seed: 0\n")
    _one_line_config_error(lambda: run_model_folder(ae), str(ae), "older version")


def test_pretrained_reads_save_pretrained_folders_and_names_bad_folders(tmp_path):
    """model.pretrained / stages.theta0 accept a `save_pretrained` folder; a folder the model kind cannot read, or a
    diffusers folder of another architecture, is one ConfigError line naming the key."""
    torch.manual_seed(0)
    source = build_model(_tiny("vq"))
    source.save_pretrained(tmp_path / "saved")
    target = build_model(_tiny("vq"))
    load_pretrained(target, str(tmp_path / "saved"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True))
    source.save_diffusers_folder(tmp_path / "diffusers")
    _one_line_config_error(lambda: load_pretrained(build_model(_tiny("ae")), str(tmp_path / "diffusers")),
                           "model.pretrained", "loads only checkpoint files")
    wide = load_config("digits-ae", ["model.kind=vq", "model.width=16", "model.latent_channels=4"])
    _one_line_config_error(lambda: load_pretrained(build_model(wide), str(tmp_path / "diffusers"), key="stages.theta0"),
                           "stages.theta0", "does not match the model")
    (tmp_path / "empty").mkdir()
    _one_line_config_error(lambda: load_pretrained(build_model(_tiny("diffusion")), str(tmp_path / "empty")),
                           "model.pretrained", "not a diffusers UNet2DModel folder")


def test_weight_io_lives_with_the_models_without_duck_typing():
    """No `getattr` on a model for its methods, no weight I/O through the export, no import of the export, pipeline
    or stages from the models, and the stages do not import the export (the circle export -> pipeline -> stages ->
    export is gone); function-level imports count."""
    import ast
    from pathlib import Path

    import unlearn

    root = Path(unlearn.__file__).parent
    for path in [*sorted((root / "models").glob("*.py")), root / "export.py"]:
        assert "getattr(" not in path.read_text(), path

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return names

    above = ("unlearn.export", "unlearn.pipeline", "unlearn.stages")
    for path in sorted((root / "models").glob("*.py")):
        assert not [n for n in imported(path) if n.startswith(above)], path
    assert not [n for n in imported(root / "stages.py") if n.startswith("unlearn.export")]
