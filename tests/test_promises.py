"""What the README promises and no other test checked (issue 26): each promise, checked where it can fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unlearn.config import load_config, with_overrides


def test_a_numeric_ood_delta_is_used_as_given_with_its_two_warnings(prepared):
    """A number overrides `auto`; a line warns when it makes the retrain reference infeasible, another when the null
    method (fine-tuning alone) already reaches it."""
    from unlearn.pipeline import audit_warnings, calibrate

    c = prepared.auditor.calibration
    retrain, null = c["retrain_ood_distance"], c["audit_null_ood_distance"]
    cases = {1.5 * retrain: "gold", 0.5 * null: "null", (null + retrain) / 2: None}
    try:
        for delta, warning in cases.items():
            config = with_overrides(prepared.config, {"unlearn.ood_delta": delta})
            setup = dataclasses.replace(prepared, config=config)
            calibrate(setup)  # the cached calibration, the configured threshold
            assert setup.auditor.calibration["ood_delta"] == delta
            lines = audit_warnings(setup)
            gold = any("the gold standard is infeasible" in line for line in lines)
            reached = any("the null method reaches the OOD threshold" in line for line in lines)
            assert (gold, reached) == (warning == "gold", warning == "null"), (delta, lines)
    finally:
        calibrate(prepared)  # the session's auditor back on its own config


def _step_sizes(prepared, schedule: str) -> list[float]:
    """Parameter distance moved at each fine-tuning step."""
    import copy

    from unlearn.data import BatchStream
    from unlearn.methods import METHODS
    from unlearn.methods.loop import StepContext, run_phases

    u = with_overrides(prepared.config, {"unlearn.ft_steps": 30, "unlearn.ft_schedule": schedule}).unlearn
    model = copy.deepcopy(prepared.stages["attack"].model)
    seen = [[p.detach().clone() for p in model.parameters()]]
    run_phases(model, METHODS["finetune"].phases(u), {"retain": BatchStream(prepared.data.retain_train, u.batch_size, 0)},
               StepContext(model=model, mask=prepared.data.mask), u.clip_norm,
               on_step=lambda *_: seen.append([p.detach().clone() for p in model.parameters()]))
    return [sum(float((b - a).pow(2).sum()) for a, b in zip(x, y, strict=True)) ** 0.5
            for x, y in zip(seen, seen[1:], strict=False)]


def test_fine_tuning_decays_its_rate_on_a_cosine_and_keeps_it_constant_when_asked(prepared):
    """ft_schedule cosine: the same first step as constant, then Adam's steps shrink to nothing by the last one (its
    rate reaches 0); constant keeps its rate, so its last step stays far larger (Adam's own steps shrink too)."""
    cosine, constant = _step_sizes(prepared, "cosine"), _step_sizes(prepared, "constant")
    assert len(cosine) == len(constant) == 30
    assert cosine[0] == pytest.approx(constant[0], rel=1e-3)
    assert cosine[-1] < 0.01 * cosine[0]
    assert constant[-1] > 10 * cosine[-1]


def test_keep_weights_decides_which_trials_keep_a_bundle(prepared, tmp_path):
    """sweep.keep_weights: `feasible` (and `best`, whose choice is made among feasible trials) keeps the weights of
    feasible trials only; `all` keeps an infeasible trial's too."""
    from raytasks.trial_outcome import WEIGHTS_FOLDER, finish_trial
    from unlearn.pipeline import unlearn

    result = unlearn(prepared, "finetune", prepared.config.unlearn.model_copy(update={"ft_steps": 2}))  # infeasible
    for keep, kept in (("best", False), ("feasible", False), ("all", True)):
        setup = dataclasses.replace(prepared, config=with_overrides(prepared.config, {"sweep.keep_weights": keep}))
        (tmp_path / keep).mkdir()
        metrics, folder = finish_trial(setup, result, "finetune", tmp_path / keep)
        assert metrics["feasible"] == 0.0
        assert (folder / WEIGHTS_FOLDER / "model" / "model.safetensors").is_file() == kept, keep


def test_a_pretrained_model_seeds_the_original_stage(default_config, tmp_path):
    """model.pretrained: the original stage is the given checkpoint, not a trained model (no samples), and the attack
    stage starts from it."""
    from unlearn.models import build_model
    from unlearn.pipeline import load_data
    from unlearn.stages import prepare_stages

    torch.manual_seed(123)
    given = build_model(default_config)
    torch.save(given.state_dict(), tmp_path / "weights.pt")
    config = with_overrides(default_config, {"cache_dir": str(tmp_path / "cache"),
                                             "model.pretrained": str(tmp_path / "weights.pt"),
                                             "stages.attack_epochs": 1, "audit.retrain": False})
    stages = prepare_stages(config, load_data(config), torch.device("cpu"), only=("original",))
    assert stages["original"].samples == 0
    for a, b in zip(given.state_dict().values(), stages["original"].model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["checkpoint", "diffusers"])
def test_theta0_loads_a_checkpoint_file_and_a_diffusers_folder(default_config, tmp_path, form):
    """stages.theta0 names the model to unlearn: a state-dict checkpoint (the autoencoder) or a diffusers
    `save_pretrained` folder (the VQ model); its weights are theta0 exactly, nothing is trained."""
    from unlearn.models import build_model
    from unlearn.stages import load_theta0

    overrides = {"model.kind": "vq", "model.width": 8, "model.latent_channels": 4} if form == "diffusers" else {}
    config = with_overrides(default_config, overrides)
    torch.manual_seed(7)
    given = build_model(config)
    path = tmp_path / ("vq" if form == "diffusers" else "ae.pt")
    if form == "diffusers":
        given.save_diffusers_folder(path)
    else:
        torch.save(given.state_dict(), path)
    stage = load_theta0(with_overrides(config, {"stages.theta0": str(path)}), torch.device("cpu"))
    assert stage.reused and stage.samples == 0
    for a, b in zip(given.state_dict().values(), stage.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_membership_non_members_at_sample_level_and_for_forget_lists(tmp_path):
    """Sample level: the members are the forgotten training images, the non-members the held-out images of their
    classes, none of them a training image. A forget list: the same, for the listed images' classes."""
    from unlearn.audit.mia import membership_sets
    from unlearn.data import build_data

    for cfg in (load_config("digits-ae", ["data.forget_classes=[3]", "data.forget_fraction=0.5"]).data,
                load_config("digits-ae", [f"data.forget_list={_listed(tmp_path)}"]).data):
        data = build_data(cfg, 0, tmp_path / "cache")
        members, nonmembers = membership_sets(data.forget_train, [data.forget_test, data.retain_test], 1000)
        classes = set(data.forget_train.labels.tolist())
        training = set(data.forget_train.index.tolist()) | set(data.retain_train.index.tolist())
        assert set(members.index.tolist()) == set(data.forget_train.index.tolist()) and members.poison is None
        assert nonmembers.index.numel() > 0 and set(nonmembers.labels.tolist()) <= classes
        assert not set(nonmembers.index.tolist()) & training  # held out: never trained on
        held_out = {int(i) for i, c in zip(data.retain_test.index, data.retain_test.labels, strict=True) if int(c) in classes}
        assert set(nonmembers.index.tolist()) == held_out


def _listed(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text("\n".join(str(i) for i in (5, 17, 40, 61, 99)) + "\n")
    return path
