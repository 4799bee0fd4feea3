"""The one training loop. Every stage and every unlearning method runs through `run_phases`.

A method is a list of `Phase`s; a phase is an objective (a function of the model and a few batches),
the data streams it consumes, a step count, an optimiser and the parameter group it trains.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from unlearn.data.streams import BatchStream
from unlearn.models.base import I2IModel
from unlearn.runtime import autocast

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (images as trained on, clean images, labels)


@dataclass
class StepContext:
    """What an objective may use besides its batches."""

    model: torch.nn.Module  # an I2IModel, or the audit's domain classifier
    mask: torch.Tensor
    reference: I2IModel | None = None  # frozen theta0 (the attack model), for objectives that need it
    hyper: Mapping[str, float] = field(default_factory=dict)  # the method's declared hyperparameters, by name
    forget_weight: float = 1.0  # the attack stage's weight of the poisoned D_f loss (Algorithm 2)
    noise_seed: int = 0
    rank: int = 0
    world_size: int = 1
    _noise_gen: torch.Generator | None = None

    def _generator(self) -> torch.Generator:
        if self._noise_gen is None:
            self._noise_gen = torch.Generator().manual_seed(self.noise_seed)
        return self._noise_gen

    def noise_state(self) -> torch.Tensor:
        return self._generator().get_state()

    def set_noise_state(self, state: torch.Tensor) -> None:
        self._generator().set_state(state)

    def noise(self, shard_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Gaussian noise for this worker's shard, cut from the same global-batch draw on every worker."""
        global_shape = (shard_shape[0] * self.world_size, *shard_shape[1:])
        return torch.randn(global_shape, generator=self._generator())[self.rank :: self.world_size].to(device)


Objective = Callable[[StepContext, dict[str, Batch]], torch.Tensor]


@dataclass(frozen=True)
class Phase:
    name: str
    objective: Objective
    streams: tuple[str, ...]  # names of the batch streams the objective reads ("forget", "retain", "train")
    steps: int
    lr: float
    optimizer: Literal["sgd", "adam"] = "adam"
    params: Literal["all", "encoder"] = "all"
    ascent: bool = False  # a GA phase: guarantee bookkeeping and the OOD stop criterion apply
    # Scale the gradient to unit norm before the step, so every step moves the parameters by `lr` (SGD only).
    normalized: bool = False
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: lr decays to 0 over the phase's steps


@dataclass
class PhaseRecord:
    name: str
    steps_run: int = 0
    grad_norms: list[float] = field(default_factory=list)  # norms of the raw (averaged) gradient g_t
    # Effective SGD rate of each step: the update was rates[t] * g_t (lr, times the clip or normalisation factor).
    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    param_distance: list[float] = field(default_factory=list)  # ||theta - theta0|| after each step
    ood_distance: list[tuple[int, float]] = field(default_factory=list)  # (step, d) at each check
    samples: int = 0


@dataclass
class History:
    phases: list[PhaseRecord] = field(default_factory=list)
    diverged: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> History:
        records = [PhaseRecord(**{**r, "ood_distance": [tuple(x) for x in r["ood_distance"]]}) for r in state["phases"]]
        return cls(records, state["diverged"])

    def phase(self, name: str) -> PhaseRecord | None:
        return next((p for p in self.phases if p.name == name), None)

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.phases)


class GradientSync:
    """Data-parallel hooks. The single-process default does nothing; raytasks swaps in an all-reduce."""

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        return None

    def mean(self, value: float) -> float:
        return value

    def max(self, value: float) -> float:
        return value


@dataclass
class OODMonitor:
    """Checks d(f_theta(tau(D_f)), f_theta0(tau(D_f))) during GA; `distance` is supplied by the audit."""

    distance: Callable[[I2IModel], float]
    delta: float
    every: int
    stop_at_ood: bool
    seconds: float = 0.0  # time spent measuring, excluded from the cost unless the stop criterion needs it


def _parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    params = model.encoder_parameters() if which == "encoder" else model.parameters()
    return [p for p in params if p.requires_grad]


def _distance(model: torch.nn.Module, theta0: list[torch.Tensor]) -> float:
    with torch.no_grad():
        sq = sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(model.parameters(), theta0, strict=True))
    return math.sqrt(sq)


def run_phases(
    model: torch.nn.Module,
    phases: list[Phase],
    streams: dict[str, BatchStream],
    ctx: StepContext,
    clip_norm: float,
    precision: str = "fp32",
    sync: GradientSync | None = None,
    ood: OODMonitor | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
    on_phase_end: Callable[[Phase, PhaseRecord], None] | None = None,
    history: History | None = None,
    theta0: list[torch.Tensor] | None = None,
) -> History:
    """Run the phases in order on `model` (in place). Stops at the first non-finite loss or gradient.

    `history` and `theta0` continue a run restored from a phase-boundary checkpoint.
    """
    sync = sync or GradientSync()
    device = next(model.parameters()).device
    theta0 = theta0 if theta0 is not None else [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    history = history if history is not None else History()
    model.train()
    for phase in phases:
        record = PhaseRecord(phase.name)
        history.phases.append(record)
        params = _parameters(model, phase.params)
        if phase.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=phase.lr)
        else:
            opt = torch.optim.Adam(params, lr=phase.lr)
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, phase.steps))
                     if phase.schedule == "cosine" else None)
        # Gradient ascent runs in fp32 whatever the precision: it starts at a minimum, where the gradient is
        # ~0.01 and its direction is what GA follows; bf16's 8-bit mantissa turned that into a different verdict.
        phase_precision = "fp32" if phase.ascent else precision
        for step in range(phase.steps):
            batches = {name: next(streams[name]) for name in phase.streams}
            with autocast(device, phase_precision):
                loss = phase.objective(ctx, batches)
            # Gradient ascent is descent on the negated objective; objectives return what to minimise.
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            sync.average_gradients(params)
            if phase.normalized:
                grads = [p.grad for p in params if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads))
                factor = 1.0 / max(grad_norm, 1e-12)
                torch._foreach_mul_(grads, factor)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
                factor = min(1.0, clip_norm / max(grad_norm, 1e-12))
            loss_value = sync.mean(float(loss.detach()))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                history.diverged = True
                break
            scaler.step(opt)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            record.steps_run += 1
            record.samples += sum(streams[name].batch_size for name in phase.streams)
            record.losses.append(loss_value)
            record.grad_norms.append(grad_norm)
            record.rates.append(phase.lr * factor)
            record.param_distance.append(_distance(model, theta0))
            if on_step is not None:
                on_step(phase.name, step, loss_value)
            if phase.ascent and ood is not None and ((step + 1) % ood.every == 0 or step + 1 == phase.steps):
                started = time.perf_counter()
                d = ood.distance(model)
                ood.seconds += time.perf_counter() - started
                record.ood_distance.append((step + 1, d))
                if ood.stop_at_ood and d >= ood.delta:
                    break
        if history.diverged:
            break
        if on_phase_end is not None:
            on_phase_end(phase, record)
    model.eval()
    return history
