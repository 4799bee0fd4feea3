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
    dec = {id(p) for p in model.decoder_parameters()}
    assert enc and dec and not enc & dec and enc | dec == {id(p) for p in model.parameters()}
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
    from unlearn.audit.catalogue import PER_SPLIT
    from unlearn.pipeline import audit_result, evaluate_reference, prepare, unlearn

    config = load_config("digits-ae", [*overrides, f"cache_dir={tmp_path}"])
    prepared = prepare(config, log=lambda _: None)
    attack = evaluate_reference(prepared, "attack")
    realistic = audit_result(prepared, unlearn(prepared, "realistic"))
    for split in ("retain", "forget"):
        for name in (n for n in PER_SPLIT if config.audit.retrain or "retrain" not in n):
            assert torch.isfinite(torch.tensor(realistic[f"{split}_{name}"])), f"{split}_{name}"
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
        ["model.kind=vq", "unlearn.ood_check_every=8", "model.width=8", "model.latent_channels=8", "data.max_per_class=60", "stages.epochs=15",
         "stages.attack_epochs=15", "stages.lr=0.003", "audit.retrain=false", "unlearn.ga_lr=0.1"], tmp_path)
    _assert_unlearned(attack, realistic)


def test_diffusion_end_to_end_on_digits(tmp_path):
    """Tiny conditional diffusion model on digits (CPU, ~1 min): same pipeline, same catalogue. Short stages, 35
    images per class and few sampling steps (suite time), GA at ga_lr 0.1 as the VQ test. Measured (torch 2.14.1, AMD
    EPYC, one thread): realistic's forget_ood_distance beyond the null method's 0.181 by +0.051 to +0.102 over
    unlearning seeds 0-4, strength 0.0. At the preset's ga_lr 0.05: +0.018 to +0.032 (seed 0: +0.019), straddling
    the 0.02 this test asks for (the first run of this test measured +0.030 at seed 0, with a random-number stream
    that a per-trial forget-loss evaluation used to consume before training)."""
    attack, realistic = _attack_and_realistic(
        ["model.kind=diffusion", "unlearn.ood_check_every=8", "model.width=16", "model.diffusion_steps=50", "model.sample_steps=10",
         "data.max_per_class=35", "stages.epochs=15", "stages.attack_epochs=15", "stages.batch_size=32",
         "stages.lr=0.002", "unlearn.ft_steps=40", "audit.retrain=false", "unlearn.ga_lr=0.1"], tmp_path)
    _assert_unlearned(attack, realistic)
