"""One home per concept: the method registry declares exactly what each method reads, the metric table names exactly
what the audit computes, and the config, the search space and the consumers derive from them."""

from __future__ import annotations

import copy

import pytest
import torch

from unlearn.audit.catalogue import METRICS, OBJECTIVES, WORST, describe, measurable, shown_in
from unlearn.config import ConfigError, load_config
from unlearn.methods import METHODS, StepContext, hyperparameters
from unlearn.models import build_model


class _Recording(dict):
    """The method's hyperparameter values, remembering which ones were read."""

    def __init__(self, values: dict) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def __getitem__(self, name: str):
        self.read.add(name)
        return super().__getitem__(name)


class _SettingsWithoutHyperparameters:
    """The config's unlearn section minus every declared hyperparameter: a method reading one outside its
    declaration (e.g. `u.alpha` in a phase builder) fails here."""

    def __init__(self, settings) -> None:
        self._settings = settings

    def __getattr__(self, name: str):
        if name in {hp.field for hp in hyperparameters().values()}:
            raise AssertionError(f"read unlearn.{name} outside the method's declared hyperparameters")
        return getattr(self._settings, name)


TINY = load_config("digits-ae", ["model.width=4", "model.latent_channels=4", "data.image_size=16"])


def _read_hyperparameters(name: str) -> set[str]:
    """Build a method's phases and run each phase's objective once on a tiny model; the hyperparameters read."""
    config = TINY
    torch.manual_seed(0)
    model = build_model(config)
    method = METHODS[name]
    values = _Recording(method.values(config.unlearn))
    phases = method.build(values, _SettingsWithoutHyperparameters(config.unlearn))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:11, 5:11] = 1.0
    images = torch.rand(4, 3, 16, 16)
    batch = (images, images, torch.zeros(4, dtype=torch.long))
    ctx = StepContext(model=model, mask=mask, reference=copy.deepcopy(model), hyper=values)
    for phase in phases:
        loss = phase.objective(ctx, {stream: batch for stream in phase.streams})
        assert torch.isfinite(loss), (name, phase.name)
    return values.read


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_reads_exactly_the_hyperparameters_it_declares(name):
    assert _read_hyperparameters(name) == set(METHODS[name].hyperparameter_names)


def test_a_method_reading_an_undeclared_hyperparameter_fails(monkeypatch):
    """The check above can fail: merged without its `lambda` declaration reads an undeclared value."""
    from unlearn.methods import Method

    merged = METHODS["merged"]
    monkeypatch.setitem(METHODS, "merged", Method(merged.name, merged.summary, merged.build, merged.hyperparameters[:-1]))
    with pytest.raises(KeyError, match="lambda"):
        _read_hyperparameters("merged")
    undeclared_read = Method("sneaky", "", lambda v, u: METHODS["finetune"].build(v, u) if u.alpha else [],
                             METHODS["finetune"].hyperparameters)
    monkeypatch.setitem(METHODS, "sneaky", undeclared_read)
    with pytest.raises(AssertionError, match="unlearn.alpha"):
        _read_hyperparameters("sneaky")


def test_the_config_and_the_search_space_derive_from_the_declarations():
    config = load_config("digits-ae", ["sweep.space={}"])
    declared = hyperparameters()
    for name, hp in declared.items():
        field = type(config.unlearn).model_fields[hp.field]
        assert field.annotation is hp.kind and field.default == hp.default, name
        assert config.sweep.space[name] == (hp.low, hp.high), name
    with pytest.raises(ConfigError, match="unknown hyperparameter 'beta'"):
        load_config("digits-ae", ["sweep.space.beta=[1,2]"])
    with pytest.raises(ConfigError, match="finetune has no hyperparameter 'ga_lr'"):
        load_config("digits-ae", ["sweep.method_space={finetune: {ga_lr: [0.1, 0.2]}}"])
    with pytest.raises(ConfigError, match="ga_steps"):
        load_config("digits-ae", ["unlearn.ga_steps=0"])  # an integer's declared minimum
    assert load_config("digits-ae", ["unlearn.ft_steps=0"]).unlearn.ft_steps == 0


def test_the_search_samples_each_hyperparameter_on_its_declared_scale():
    from ray import tune

    from raytasks.search import search_space

    config = load_config("digits-ae")
    space = search_space(config, "i2i_sota")
    assert isinstance(space["ft_steps"], tune.search.sample.Integer)
    assert isinstance(space["ft_lr"].sampler, tune.search.sample.LogUniform)
    assert isinstance(space["alpha"].sampler, tune.search.sample.LogUniform)
    assert set(space) == {"ft_steps", "ft_lr", "alpha"}


def test_the_metric_table_agrees_with_what_the_audit_computes(method_metrics):
    """Every figure of every method's and reference's catalogue is a row of the table; every row this setup can
    measure (marker, retrain reference; no unseen classes, one process, one seed) is computed by some model."""
    computed = {name for metrics in method_metrics.values() for name in metrics}
    assert computed <= set(METRICS), sorted(computed - set(METRICS))
    conditional = {"side_by_side", "no_retrain", "skipped", "workers", "seeds", "unseen", "trial", "prepare", "chain"}
    expected = {name for name, m in METRICS.items() if not (m.needs & conditional)}
    assert expected <= computed, sorted(expected - computed)
    for name in OBJECTIVES:  # an objective is minimised, and a failed trial reports its worst value
        assert METRICS[name].direction == "lower" and name in WORST


def test_every_consumer_names_only_catalogue_figures():
    for place in ("certificate", "report", "summary", "confirmed", "registry", "calibration", "guarantee"):
        assert shown_in(place) and set(shown_in(place)) <= set(METRICS), place
    assert describe("forget_marker_strength_std").startswith("sample std")
    assert not measurable("forget_marker_strength", marker=False, retrain=True)
    assert not measurable("forget_gap_vs_retrain", marker=True, retrain=False)
    config = load_config("digits-ae", ["audit.retrain=false"])
    assert "forget_gap_vs_retrain" not in config.objectives
