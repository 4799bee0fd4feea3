"""The method registry: every unlearning method as a list of phases over the one training loop, with the
hyperparameters it reads declared beside them.

Adding a method = one `Method` entry in `METHODS`. Its `hyperparameters` become config keys `unlearn.<name>` (type,
default and bounds from the declaration), the sweep's search space (range and scale) and the certificate's figures;
`tests/test_registry.py` runs every method's phases and objectives and fails if they read anything undeclared.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from unlearn.errors import ConfigError
from unlearn.methods import objectives as obj
from unlearn.methods.loop import GradientSync, History, OODMonitor, Phase, StepContext, run_phases

if TYPE_CHECKING:
    from unlearn.config import UnlearnConfig


@dataclass(frozen=True)
class Hyperparameter:
    """A setting a method reads and the sweep searches: the config key `unlearn.<name>`."""

    name: str
    kind: type[int] | type[float]
    default: float
    low: float  # the search range (the sweep's default; `sweep.space` / `sweep.method_space` override it)
    high: float
    scale: Literal["linear", "log"]  # how the sweep samples it: integers uniformly, rates and weights log-uniformly
    description: str
    minimum: int = 1  # integers: the smallest valid value (floats must be > 0)

    @property
    def field(self) -> str:
        """The attribute on `UnlearnConfig` (`lambda` is a Python keyword: `lambda_`)."""
        return f"{self.name}_" if keyword.iskeyword(self.name) else self.name

    def cast(self, value: Any) -> int | float:
        return int(round(float(value))) if self.kind is int else float(value)


GA_STEPS = Hyperparameter("ga_steps", int, 20, 4, 24, "linear", "T: gradient-ascent steps on D_f")
GA_LR = Hyperparameter("ga_lr", float, 0.1, 0.01, 0.2, "log",
                       "GA learning rate (normalised GA: the parameter distance of one step)")
FT_STEPS = Hyperparameter("ft_steps", int, 120, 60, 200, "linear", "steps of the descent phase", minimum=0)
FT_LR = Hyperparameter("ft_lr", float, 2e-3, 5e-4, 2e-2, "log", "learning rate of the descent phase (Adam)")


def _ga(u: Mapping[str, Any], ascent_step: str) -> Phase:
    return Phase("ga", obj.gradient_ascent, ("forget",), u["ga_steps"], u["ga_lr"], optimizer="sgd", ascent=True,
                 normalized=ascent_step == "normalized")


def _ft(u: Mapping[str, Any], schedule: str) -> Phase:
    return Phase("finetune", obj.fit("retain"), ("retain",), u["ft_steps"], u["ft_lr"], schedule=schedule)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (hyperparameter values by name, the config's unlearn section) -> the phases; the values hold exactly the
    # declared hyperparameters, the section only the method-independent settings (GA step rule, schedule)
    build: Callable[[Mapping[str, Any], UnlearnConfig], list[Phase]]
    hyperparameters: tuple[Hyperparameter, ...] = ()

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        return tuple(hp.name for hp in self.hyperparameters)

    def values(self, u: UnlearnConfig) -> dict[str, int | float]:
        """This method's hyperparameter values in the config's unlearn section."""
        return {hp.name: getattr(u, hp.field) for hp in self.hyperparameters}

    def phases(self, u: UnlearnConfig) -> list[Phase]:
        return self.build(self.values(u), u)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "realistic",
            "GA on D_f for T steps (early stop at the OOD threshold if asked), then fine-tune on D_r",
            lambda v, u: [_ga(v, u.ga_step), _ft(v, u.ft_schedule)],
            (GA_STEPS, GA_LR, FT_STEPS, FT_LR),
        ),
        Method("max_loss", "GA on D_f only (phase 1 alone)", lambda v, u: [_ga(v, u.ga_step)], (GA_STEPS, GA_LR)),
        Method("finetune", "fine-tune on D_r only (phase 2 alone)", lambda v, u: [_ft(v, u.ft_schedule)],
               (FT_STEPS, FT_LR)),
        Method(
            "noisy_label",
            "descend on D_f with Gaussian-noise images as targets, and on D_r",
            lambda v, u: [Phase("noisy_label", obj.noisy_label, ("forget", "retain"), v["ft_steps"], v["ft_lr"])],
            (FT_STEPS, FT_LR),
        ),
        Method(
            "random_encoder",
            "push the encoder output on D_f towards Gaussian noise (encoder only)",
            lambda v, u: [Phase("random_encoder", obj.random_encoder, ("forget",), v["ft_steps"], v["ft_lr"],
                                params="encoder")],
            (FT_STEPS, FT_LR),
        ),
        Method(
            "i2i_sota",
            "Li et al. 2024: encoder only, keep E(x_r) = E0(x_r), map E(x_f) to E0(noise)",
            lambda v, u: [Phase("i2i_sota", obj.i2i_sota, ("forget", "retain"), v["ft_steps"], v["ft_lr"],
                                params="encoder")],
            (FT_STEPS, FT_LR, Hyperparameter("alpha", float, 1.0, 0.1, 10.0, "log", "weight of the forget term")),
        ),
        Method(
            "l1_sparse",
            "Jia et al. 2023: fine-tune on D_r with an l1 penalty on the weights (sparsity eases forgetting)",
            lambda v, u: [Phase("l1_sparse", obj.l1_sparse, ("retain",), v["ft_steps"], v["ft_lr"], schedule=u.ft_schedule)],
            (FT_STEPS, FT_LR, Hyperparameter("l1_weight", float, 0.1, 0.01, 1.0, "log",
                                             "weight of the penalty: l1_weight x mean |theta|")),
        ),
        Method(
            "merged",
            "one combined objective L(D_r) - lambda L(D_f)",
            lambda v, u: [Phase("merged", obj.merged, ("forget", "retain"), v["ft_steps"], v["ft_lr"])],
            (FT_STEPS, FT_LR, Hyperparameter("lambda", float, 0.1, 0.01, 1.0, "log", "weight of the forget term")),
        ),
    ]
}

REFERENCE_MODELS = ("original", "attack", "retrain")  # trained stages, not unlearning procedures


def hyperparameters() -> dict[str, Hyperparameter]:
    """Every declared hyperparameter by name (one declaration per name: methods sharing it share the object)."""
    out: dict[str, Hyperparameter] = {}
    for method in METHODS.values():
        for hp in method.hyperparameters:
            if out.setdefault(hp.name, hp) != hp:
                raise AssertionError(f"hyperparameter {hp.name!r} is declared twice, differently ({method.name})")
    return out


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = [
    "METHODS",
    "REFERENCE_MODELS",
    "GradientSync",
    "History",
    "Hyperparameter",
    "Method",
    "OODMonitor",
    "Phase",
    "StepContext",
    "get_method",
    "hyperparameters",
    "run_phases",
]
