"""The method registry: every unlearning method as a list of phases over the one training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unlearn.config import UnlearnConfig
from unlearn.methods import objectives as obj
from unlearn.methods.loop import GradientSync, History, OODMonitor, Phase, StepContext, run_phases


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    phases: Callable[[UnlearnConfig], list[Phase]]
    # Hyperparameters the method actually uses: the sweep searches these and nothing else.
    hyperparameters: tuple[str, ...] = ()
    reference_stage: str | None = None  # `retrain` is a trained stage, not an unlearning procedure


def _ga(u: UnlearnConfig) -> Phase:
    return Phase("ga", obj.gradient_ascent, ("forget",), u.ga_steps, u.ga_lr, optimizer="sgd", ascent=True,
                 normalized=u.ga_step == "normalized")


def _ft(u: UnlearnConfig) -> Phase:
    return Phase("finetune", obj.fit("retain"), ("retain",), u.ft_steps, u.ft_lr, schedule=u.ft_schedule)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "realistic",
            "GA on D_f for T steps (early stop at the OOD threshold if asked), then fine-tune on D_r",
            lambda u: [_ga(u), _ft(u)],
            ("ga_steps", "ga_lr", "ft_steps", "ft_lr"),
        ),
        Method("max_loss", "GA on D_f only (phase 1 alone)", lambda u: [_ga(u)], ("ga_steps", "ga_lr")),
        Method("finetune", "fine-tune on D_r only (phase 2 alone)", lambda u: [_ft(u)], ("ft_steps", "ft_lr")),
        Method(
            "noisy_label",
            "descend on D_f with Gaussian-noise images as targets, and on D_r",
            lambda u: [Phase("noisy_label", obj.noisy_label, ("forget", "retain"), u.ft_steps, u.ft_lr)],
            ("ft_steps", "ft_lr"),
        ),
        Method(
            "random_encoder",
            "push the encoder output on D_f towards Gaussian noise (encoder only)",
            lambda u: [
                Phase("random_encoder", obj.random_encoder, ("forget",), u.ft_steps, u.ft_lr, params="encoder")
            ],
            ("ft_steps", "ft_lr"),
        ),
        Method(
            "i2i_sota",
            "Li et al. 2024: encoder only, keep E(x_r) = E0(x_r), map E(x_f) to E0(noise)",
            lambda u: [Phase("i2i_sota", obj.i2i_sota, ("forget", "retain"), u.ft_steps, u.ft_lr, params="encoder")],
            ("ft_steps", "ft_lr", "alpha"),
        ),
        Method(
            "merged",
            "one combined objective L(D_r) - lambda L(D_f)",
            lambda u: [Phase("merged", obj.merged, ("forget", "retain"), u.ft_steps, u.ft_lr)],
            ("ft_steps", "ft_lr", "lambda"),
        ),
        Method("retrain", "the reference: trained from scratch on D_r only", lambda u: [], reference_stage="retrain"),
    ]
}

REFERENCE_MODELS = ("original", "attack", "retrain")


def get_method(name: str) -> Method:
    from unlearn.config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "REFERENCE_MODELS",
    "GradientSync",
    "History",
    "Method",
    "OODMonitor",
    "Phase",
    "StepContext",
    "get_method",
    "run_phases",
]
