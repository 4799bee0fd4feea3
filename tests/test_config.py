import pytest

from unlearn.cli import main
from unlearn.config import load_config, preset_names, with_overrides
from unlearn.errors import ConfigError


def test_default_preset_loads_and_overrides_apply():
    cfg = load_config("digits-ae", ["unlearn.ga_steps=7", "data.forget_classes=[3, 4]", "unlearn.lambda=0.3"])
    assert cfg.name == "digits-ae"
    assert cfg.unlearn.ga_steps == 7
    assert cfg.data.forget_classes == ["3", "4"]
    assert cfg.unlearn.lambda_ == 0.3
    assert "digits-ae" in preset_names()


def test_with_overrides_returns_validated_copy():
    cfg = load_config("digits-ae")
    new = with_overrides(cfg, {"unlearn.ga_lr": 1e-5, "unlearn.ft_steps": 3})
    assert new.unlearn.ga_lr == 1e-5 and new.unlearn.ft_steps == 3
    assert cfg.unlearn.ft_steps != 3  # the original is untouched
    with pytest.raises(ConfigError, match="ga_lr"):
        with_overrides(cfg, {"unlearn.ga_lr": -1.0})


def test_section_key_changes_with_content():
    a, b = load_config("digits-ae"), load_config("digits-ae", ["data.mask.size=4"])
    assert a.section_key("data") != b.section_key("data")
    assert a.section_key("model") == b.section_key("model")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.forget_fraction=0"], "forget_fraction"),
        (["data.forget_fraction=1.5"], "forget_fraction"),
        (["data.mask.size=16"], "mask.size"),
        (["unlearn.ga_steps=0"], "ga_steps"),
        (["unlearn.ga_lr=0"], "ga_lr"),
        (["unlearn.ft_lr=-0.1"], "ft_lr"),
        (["audit.backbone=resnet"], "backbone"),
        (["unlearn.no_such_key=1"], "no_such_key"),
        (["nosection.key=1"], "nosection"),
        (["data.mask=3"], "mask"),
        (["novalue"], "key=value"),
        (["sweep.confirm_seeds=-1"], "confirm_seeds"),
        (["sweep.keep_weights=some"], "keep_weights"),
        (["unlearn.seed=-1"], "seed"),
        (["sweep.space.ga_steps=[0.5,3]"], "ga_steps: an integer range from 1 up"),
        (["sweep.methods=[nope]"], "unknown method 'nope'"),
        (["sweep.select=retrain"], "'retrain' is not an unlearning method"),
        (["sweep.max_forget_gap=0.5"], "'sweep.max_forget_gap' moved to 'audit.max_forget_gap'"),
        (["model.kind=gan"], "model.kind"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config("digits-ae", overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/run.yaml")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--method", "nope"], "unknown method 'nope'"),
        (["run", "--method", "realistic", "--set", "unlearn.ga_steps=0"], "unlearn.ga_steps"),
        (["run", "--method", "realistic", "--set", "data.root=/nonexistent", "--set", "data.dataset=cifar10"], "/nonexistent"),
        (["run", "--method", "realistic", "--set", "data.forget_classes=[42]"], "unknown class '42'"),
        (["run", "--method", "realistic", "--set", "audit.backbone=vgg"], "audit.backbone"),
        (["run", "--method", "realistic", "--set", "unlearn.typo=1"], "'unlearn.typo' does not exist"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    code = main([*argv, "--set", f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("unlearn: error:") and "\n" not in err and needle in err, err
    assert not any(tmp_path.iterdir())  # nothing was decoded, trained or cached


def test_methods_command_lists_registry(capsys):
    from unlearn.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)
    assert len(METHODS) == 8 and "retrain" not in METHODS  # a reference model, not a method


def test_model_shorthand_sets_the_kind():
    assert load_config("digits-ae", ["model=vq"]).model.kind == "vq"
    assert load_config("digits-ae", ["model.kind=diffusion"]).model.kind == "diffusion"
