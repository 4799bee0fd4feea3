"""One audited unlearning run: prepare (data, stages, audit references), unlearn, evaluate.

`prepare` is everything that is shared between runs and cached on disk; `unlearn` is one method on one
set of hyperparameters, the unit a sweep trial executes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn.audit.evaluate import Auditor
from unlearn.audit.guarantees import ga_guarantees
from unlearn.cache import ArtifactCache, DamagedEntry
from unlearn.config import Config, UnlearnConfig
from unlearn.data import BatchStream, UnlearningData
from unlearn.data.splits import SUBSETS, assemble, prepare_store, split_store
from unlearn.data.store import KIND as STORE_KIND
from unlearn.data.store import MapShards, open_store, verify_store
from unlearn.errors import ConfigError
from unlearn.methods import (
    METHODS,
    REFERENCE_MODELS,
    GradientSync,
    History,
    OODMonitor,
    StepContext,
    get_method,
    run_phases,
)
from unlearn.methods.loop import Phase, PhaseRecord
from unlearn.models import I2IModel
from unlearn.runtime import import_before_timing, resolve_device, seed_everything
from unlearn.stages import Stage, prepare_stages, strengthen_attack

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    config: Config
    data: UnlearningData
    stages: dict[str, Stage]
    auditor: Auditor
    device: torch.device


# Bump when a split entry changes meaning (v4: its store is of STORE_SCHEMA 2, rows (H, W, 3); v3: index lists into
# a store of rows (3, H, W); v2 held the pixels themselves). (Chains added the earlier/<j> and poisoned lists: absent
# from every other split, so entries keep their meaning.)
SPLIT_SCHEMA = 4


def load_data(config: Config, map_shards: MapShards | None = None, verify: bool = False) -> UnlearningData:
    """The image store (decoded once, shared by every process) and the split, an index list per subset, cached so
    that sweep trials neither decode nor split again. `map_shards` decodes in parallel elsewhere (the sweep: Ray
    tasks); by default a process pool does. `verify` hashes a reused store in full (`unlearn prepare`, the sweep's
    preparation); every open checks its files' sizes."""
    cache = ArtifactCache(config.resolved_cache_dir())
    key = f"split-v{SPLIT_SCHEMA}-" + config.section_key("data") + ("" if config.has_marker else "-clean")
    for _ in range(2):  # a store that fails verification is removed and built again, once
        data = _split(config, cache, key, map_shards)
        store = data.store
        if store.built_seconds is not None:
            logger.info(f"image store: built {store.key}: {len(store)} images in {store.built_seconds:.1f} s "
                f"({len(store) / max(store.built_seconds, 1e-9):.0f} images/s)")
            return data
        if not verify:
            return data
        started = time.perf_counter()
        try:
            verify_store(cache, store.key)
        except DamagedEntry as exc:
            cache.discard_damaged(STORE_KIND, store.key, exc)
            continue
        except FileNotFoundError:  # removed by another process (purge, a clean-up) since it was opened
            continue
        logger.info(f"image store: reused {store.key} ({len(store)} images), verified in {time.perf_counter() - started:.1f} s")
        return data
    raise RuntimeError(f"the image store {cache.entry(STORE_KIND, store.key)} failed verification again after a rebuild")


def _split(config: Config, cache: ArtifactCache, key: str, map_shards: MapShards | None) -> UnlearningData:
    if (hit := cache.get("data", key)) is not None:
        tensors, meta = hit
        if (store := open_store(cache, meta["store"])) is not None:
            return assemble(config.data, store, {name: tensors[f"{name}/index"] for name in meta["subsets"]},
                            poison=config.has_marker)
        cache.remove("data", key)  # its store is gone (purged, or damaged and removed): split it anew
    store = prepare_store(config.data, cache, map_shards)
    data = split_store(config.data, config.seed, store, poison=config.has_marker)
    digest, *earlier = data.held_digests(config.data.dataset)
    indices = {name: getattr(data, name).index for name in SUBSETS if getattr(data, name) is not None}
    indices.update({f"earlier/{j}": subset.index for j, subset in enumerate(data.earlier, 1)})
    if (poisoned := data.retain_train.poison) is not None and poisoned.only is not None:
        indices["poisoned"] = torch.tensor(poisoned.only, dtype=torch.int64)
    cache.save("data", key, {f"{name}/index": index for name, index in indices.items()},
               {"subsets": list(indices), "store": store.key, "class_names": data.class_names, "forget_digest": digest})
    for other in earlier:  # the split names the earlier requests' images too: purging any of them finds it
        cache.add_forget_digest("data", key, other)
    cache.add_forget_digest(STORE_KIND, store.key, digest)  # the store holds D_f's pixels: purge finds it
    return data


def prepare(config: Config, map_shards: MapShards | None = None, verify: bool = False) -> Prepared:
    """Data, stages, audit references and the audit's calibration; every piece cached by content key (`load_data`
    says what `map_shards` and `verify` do).

    With `stages.attack_strengthen_rounds` N > 0, the attack stage is strengthened round by round while the
    null method still removes the marker (at most N rounds); the calibration records how many it took.
    """
    device = resolve_device(config)
    if config.stages.theta0 and not Path(config.stages.theta0).exists():  # before anything is cached
        raise ConfigError(f"stages.theta0 {config.stages.theta0} not found")
    data = load_data(config, map_shards, verify)
    stages = prepare_stages(config, data, device)
    rounds = config.stages.attack_strengthen_rounds if config.has_marker else 0
    for round_ in range(rounds + 1):
        if round_:
            stages["attack"] = strengthen_attack(config, data, stages["attack"], round_, device)
        auditor = Auditor(config, data, {k: s.model for k, s in stages.items()}, {k: s.key for k, s in stages.items()},
                          device)
        prepared = Prepared(config, data, stages, auditor, device)
        calibration = calibrate(prepared)
        if round_ == rounds or calibration["audit_null_strength"] >= config.audit.min_marker_strength:
            break
    calibration["attack_strengthen_rounds_used"] = float(round_)
    return prepared


def log_audit_warnings(prepared: Prepared) -> None:
    """Why this setup's audit cannot fully decide, one warning a line: said by whoever owns the preparation (a
    run, a re-audit, the sweep's preparing worker), not by every trial process that loads it again."""
    for line in audit_warnings(prepared):
        logger.warning(line)


_WARM: dict[str, Prepared] = {}


def prepare_warm(config: Config) -> Prepared:
    """`prepare` memoised in this process, keyed by everything except the unlearning hyperparameters and seed
    (what sweep trials vary): a trial that lands on a reused Ray actor loads nothing. Quiet (trials only load)."""
    varied = {hp.name for method in METHODS.values() for hp in method.hyperparameters} | {"seed"}
    dumped = config.model_dump(mode="json", by_alias=True)
    dumped["unlearn"] = {k: v for k, v in dumped["unlearn"].items() if k not in varied}
    key = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()
    if key not in _WARM:
        _WARM.clear()  # one setup at a time: a sweep has one, and its tensors can be large
        _WARM[key] = prepare(config)
    return dataclasses.replace(_WARM[key], config=config)


def calibrate(prepared: Prepared) -> dict[str, float]:
    """Once per prepared setup (cached): the attack's own figures, the null method's marker strength and
    OOD distance (the audit checks itself), and ood_delta (resolved from `auto`). Sets auditor.calibration."""
    config, auditor = prepared.config, prepared.auditor
    cache = ArtifactCache(config.resolved_cache_dir())
    # seed 0: one calibration per prepared setup, whatever unlearning seed the runs use
    null_settings = config.unlearn.model_copy(update={"ft_steps": config.audit.null_ft_steps, "ft_lr": config.audit.null_ft_lr,
                                                      "seed": 0})
    # Everything the null run depends on that trials do not vary (they vary the declared hyperparameters).
    null_key = hashlib.sha256(repr((null_settings.ft_steps, null_settings.ft_lr, null_settings.ft_schedule,
                                    null_settings.batch_size, null_settings.clip_norm, config.precision,
                                    str(prepared.device))).encode()).hexdigest()[:12]
    key = f"{auditor.key}-{prepared.stages['attack'].key}-{null_key}"
    if (hit := cache.get("calibration", key)) is not None:
        figures = hit[1]["figures"]
    else:
        auditor.calibration = {}
        attack = auditor.evaluate(prepared.stages["attack"].model)
        logger.info(f"audit self-check: the null method (finetune, {null_settings.ft_steps} steps "
                    f"at lr {null_settings.ft_lr:g}) ...")
        null_model = unlearn(prepared, "finetune", null_settings).model
        figures = {"attack_retain_mse": attack["retain_mse"], "attack_retain_fid": attack["retain_fid"],
                   "audit_null_ood_distance": auditor.ood_distance(null_model)}
        if config.has_marker:
            figures.update(audit_attack_strength=attack["forget_marker_strength"],
                           audit_null_strength=auditor.marker_figures(null_model)["forget_marker_strength"])
            figures["audit_valid"] = float(min(figures["audit_attack_strength"], figures["audit_null_strength"])
                                           >= config.audit.min_marker_strength)
        cache.save("calibration", key, {},
                   {"figures": figures, "forget_digest": prepared.data.forget_digest(config.data.dataset)})
    # Not cached: a changed unlearn.ood_delta must take effect on the next run.
    auditor.calibration = {**figures, **_resolve_delta(config, auditor.refs, figures), **_resolve_gap(config, auditor.refs)}
    if skipped := prepared.data.store.skipped_count:  # unreadable files left out (data.skip_unreadable)
        auditor.calibration["data_skipped_images"] = float(skipped)
    return auditor.calibration


def _resolve_delta(config: Config, refs: dict[str, torch.Tensor], figures: dict[str, float]) -> dict[str, float]:
    """ood_delta: a number as configured; auto = audit.ood_delta_fraction x retrain's own Eq. 3 distance, or,
    without a retrain reference, the null method's distance / ood_delta_fraction."""
    fraction, delta = config.audit.ood_delta_fraction, config.unlearn.ood_delta
    if "retrain/ood_distance" in refs:
        retrain = float(refs["retrain/ood_distance"])
        return {"ood_delta": fraction * retrain if delta == "auto" else float(delta), "retrain_ood_distance": retrain}
    return {"ood_delta": figures["audit_null_ood_distance"] / fraction if delta == "auto" else float(delta)}


def _resolve_gap(config: Config, refs: dict[str, torch.Tensor]) -> dict[str, float]:
    """audit.max_forget_gap: a number as configured; auto = audit.gap_margin x retrain_gap_yardstick, the gap of the
    second retrain reference (another seed) to the first, in the gap's own units; none without a retrain reference."""
    out = {}
    if "retrain2/forget_gap" in refs:
        out["retrain_gap_yardstick"] = float(refs["retrain2/forget_gap"])
    limit = config.audit.max_forget_gap
    if limit == "auto" and "retrain_gap_yardstick" in out:
        # at most 1, the original model's own gap: a model as far from retrain as the model that saw D_f does not
        # behave like retraining, however far apart two retrainings lie
        out["max_forget_gap"] = min(1.0, config.audit.gap_margin * out["retrain_gap_yardstick"])
    elif isinstance(limit, (int, float)) and config.audit.retrain:
        out["max_forget_gap"] = float(limit)
    return out


def audit_warnings(prepared: Prepared) -> list[str]:
    """One line per way the audit cannot decide or the threshold misjudges the references."""
    c, a = prepared.auditor.calibration, prepared.config.audit
    lines = []
    if "audit_attack_strength" not in c:  # no marker (a model brought by the user): nothing to check
        pass
    elif c["audit_attack_strength"] < a.min_marker_strength:
        lines.append(f"audit not valid: the attack model regenerates the marker at strength {c['audit_attack_strength']:.2f} "
                     f"< {a.min_marker_strength:g}; train it longer (stages.attack_epochs) "
                     "or use a larger marker (data.marker.size)")
    elif c["audit_null_strength"] < a.min_marker_strength:
        lines.append(f"audit not valid: plain fine-tuning on D_r (the null method) brings the marker down to strength "
                     f"{c['audit_null_strength']:.2f} < {a.min_marker_strength:g}, so the marker audit cannot tell unlearning "
                     "from fine-tuning; set stages.attack_strengthen_rounds "
                     f"(used {int(c.get('attack_strengthen_rounds_used', 0))}) "
                     "or lower the fine-tuning budget (audit.null_ft_lr / unlearn.ft_lr)")
    yardstick = c.get("retrain_gap_yardstick")
    if prepared.config.audit.max_forget_gap == "auto" and yardstick is not None and a.gap_margin * yardstick >= 1.0:
        lines.append(f"warning: forget_gap_vs_retrain can hardly decide here: a second retraining lies at {yardstick:.3g} "
                     f"of the original model's gap from the first, so the threshold is capped at 1 (the original's own "
                     "gap); read the other figures")
    if c.get("retrain_ood_distance", math.inf) < c["ood_delta"]:
        lines.append(f"warning: ood_delta {c['ood_delta']:.4g} > the retrain reference's own distance "
                     f"{c['retrain_ood_distance']:.4g}: the gold standard is infeasible (use unlearn.ood_delta=auto)")
    if c["audit_null_ood_distance"] >= c["ood_delta"]:
        lines.append(f"warning: the null method reaches the OOD threshold ({c['audit_null_ood_distance']:.4g} >= "
                     f"{c['ood_delta']:.4g}): the threshold does not separate fine-tuning from unlearning")
    return lines


@dataclass
class UnlearnResult:
    model: I2IModel
    history: History
    seconds: float
    metrics: dict[str, float]  # bookkeeping of the procedure (guarantees, cost); the audit adds the rest
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def unlearn(
    prepared: Prepared,
    method_name: str,
    settings: UnlearnConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    sync: GradientSync | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> UnlearnResult:
    """Run one unlearning method from theta0 (the attack model) on a fresh copy of it.

    `on_checkpoint` receives a restorable state at every phase boundary; `resume` continues from one,
    so a restarted data-parallel worker group picks up where the last finished phase left off.
    """
    u = settings or prepared.config.unlearn
    seed = prepared.config.seed + u.seed
    method = get_method(method_name)
    device, data = prepared.device, prepared.data
    theta0 = prepared.stages["attack"].model
    model = copy.deepcopy(theta0).to(device)
    theta0_params = [p.detach().clone() for p in theta0.parameters()]
    seed_everything(seed + 100)
    streams = {
        "forget": BatchStream(data.forget_train, u.batch_size, seed + 10, rank, world_size, device),
        "retain": BatchStream(data.retain_train, u.batch_size, seed + 11, rank, world_size, device),
    }
    ctx = StepContext(model=model, mask=data.mask.to(device), reference=theta0, hyper=method.values(u),
                      noise_seed=seed + 12, rank=rank, world_size=world_size)
    ood = OODMonitor(prepared.auditor.ood_distance, prepared.auditor.ood_delta, u.ood_check_every, u.stop_at_ood)
    phases = method.phases(u)
    state = _restore(resume, model, streams, ctx) if resume is not None else {
        "next_phase": 0, "history": History(), "after_ga": {}, "seconds": 0.0,
        "loss_before": float(prepared.auditor.refs["theta0/forget_loss"])}  # theta0's: computed once per setup
    import_before_timing()
    started = time.perf_counter()

    def phase_end(phase: Phase, record: PhaseRecord) -> None:
        if phase.ascent:
            state["after_ga"] = _after_ga(prepared, model, record)
        state["next_phase"] = phases.index(phase) + 1
        if on_checkpoint is not None:
            on_checkpoint(_checkpoint(state, model, streams, ctx, time.perf_counter() - started))

    history = run_phases(model, phases[state["next_phase"]:], streams, ctx, u.clip_norm, prepared.config.precision, sync,
                         ood, on_step, phase_end, history=state["history"], theta0=theta0_params)
    seconds = state["seconds"] + time.perf_counter() - started - (0.0 if u.stop_at_ood else ood.seconds)

    metrics: dict[str, float] = {"diverged": float(history.diverged), "unlearn_samples": float(history.samples),
                                 "resumed_from_phase": float(resume["next_phase"]) if resume is not None else 0.0}
    # Each rank reads only its shard of every global batch; the most any rank read (after a resume: since it)
    metrics["unlearn_images_read_per_rank"] = (sync or GradientSync()).max(float(sum(s.images_read for s in streams.values())))
    ga_phase = next((phase for phase in phases if phase.ascent), None)  # its lr: the method's declared GA rate
    metrics.update(_ga_figures(history, state, ga_phase.lr if ga_phase is not None else math.nan))
    return UnlearnResult(model, history, seconds, metrics, _curves(history))


def _after_ga(prepared: Prepared, model: I2IModel, record: PhaseRecord) -> dict[str, float]:
    """The state right after GA: D_f's loss, the Eq. 3 distance and the outputs' spread. Collapse is judged here
    too: fine-tuning must not rescue a killed decoder into a "success"."""
    loss = prepared.auditor.forget_loss(model)
    distance = record.ood_distance[-1][1] if record.ood_distance else prepared.auditor.ood_distance(model)
    return {"loss": loss, "distance": distance, "std_ratio": prepared.auditor.output_std_ratio(model)}


def _checkpoint(state: dict[str, Any], model: I2IModel, streams: dict[str, BatchStream], ctx: StepContext,
                seconds: float) -> dict[str, Any]:
    """A restorable state at a phase boundary (`_restore` reads it back); `seconds`: spent since this run started."""
    return {"next_phase": state["next_phase"],
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "streams": {n: st.state_dict() for n, st in streams.items()},
            "noise": ctx.noise_state(),
            "history": state["history"].to_dict(),
            "after_ga": state["after_ga"],
            "loss_before": state["loss_before"],
            "seconds": state["seconds"] + seconds}


def _restore(resume: dict[str, Any], model: I2IModel, streams: dict[str, BatchStream], ctx: StepContext) -> dict[str, Any]:
    """Model, batch streams and noise back to a phase-boundary checkpoint; the run's state at that boundary."""
    model.load_state_dict(resume["model"])
    for name, stream in streams.items():
        stream.load_state_dict(resume["streams"][name])
    ctx.set_noise_state(resume["noise"])
    return {"next_phase": resume["next_phase"], "history": History.from_dict(resume["history"]),
            "after_ga": dict(resume["after_ga"]), "seconds": resume["seconds"], "loss_before": resume["loss_before"]}


def _ga_figures(history: History, state: dict[str, Any], ga_lr: float) -> dict[str, float]:
    """The GA guarantee bookkeeping and the state right after GA (none without a GA phase)."""
    ga, after_ga = history.phase("ga"), state["after_ga"]
    if ga is None or "loss" not in after_ga:
        return {}
    return {**ga_guarantees(ga, ga_lr, state["loss_before"], after_ga["loss"]),
            "ga_ood_distance": after_ga["distance"], "ga_output_std_ratio": after_ga["std_ratio"]}


def _curves(history: History) -> dict[str, list[tuple[int, float]]]:
    """Loss, parameter distance and (GA) Eq. 3 distance per step of each phase, for the report's plots."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in history.phases:
        curves[f"{record.name}_loss"] = list(enumerate(record.losses, 1))
        curves[f"{record.name}_param_distance"] = list(enumerate(record.param_distance, 1))
        if record.ood_distance:
            curves[f"{record.name}_ood_distance"] = record.ood_distance
    return curves


def _cost(metrics: dict[str, float], seconds: float, samples: float, prepared: Prepared) -> None:
    """Cost against retraining. Samples always compare; seconds only when retrain was trained in this process
    (same process and device, side by side), never against a time read from the cache of another run.
    Without a retrain reference (audit.retrain = false) its samples are estimated: stages.epochs x |D_r|."""
    metrics["unlearn_seconds"] = seconds
    metrics["unlearn_samples"] = float(samples)
    retrain = prepared.stages.get("retrain")
    if retrain is None:
        s = prepared.config.stages
        estimate = s.epochs * math.ceil(len(prepared.data.retain_train) / s.batch_size) * s.batch_size
        metrics.update(retrain_samples=float(estimate), retrain_samples_estimated=1.0, sample_ratio=samples / estimate,
                       cost_ratio_side_by_side=0.0)
        return
    metrics["retrain_seconds"] = retrain.seconds
    metrics["retrain_samples"] = float(retrain.samples)
    metrics["sample_ratio"] = samples / retrain.samples if retrain.samples > 0 else math.nan
    metrics["cost_ratio_side_by_side"] = float(not retrain.reused)
    if not retrain.reused and retrain.seconds > 0:
        metrics["cost_ratio"] = seconds / retrain.seconds


def audit_result(prepared: Prepared, result: UnlearnResult) -> dict[str, float]:
    """The full catalogue; a diverged model (a non-finite loss or gradient in its run, non-finite weights, or
    non-finite outputs on the Eq. 3 subset) is reported, not audited."""
    metrics = dict(result.metrics)
    auditor = prepared.auditor
    finite = all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
    if result.history.diverged or not finite or not auditor.outputs_finite(result.model):
        metrics.update(diverged=1.0, ood_reached=0.0)
        _cost(metrics, result.seconds, metrics["unlearn_samples"], prepared)
        return auditor.verdict(metrics)
    import_before_timing(audit=True)
    started = time.perf_counter()
    audit = auditor.evaluate(result.model)
    audit["diverged"] = max(audit.get("diverged", 0.0), metrics.get("diverged", 0.0))
    metrics.update(audit, audit_seconds=time.perf_counter() - started)
    _cost(metrics, result.seconds, metrics["unlearn_samples"], prepared)
    return auditor.verdict(metrics)


def evaluate_reference(prepared: Prepared, name: str) -> dict[str, float]:
    """The catalogue for a reference model (original, attack, retrain); its cost is its training."""
    stage = prepared.stages[name]
    metrics = prepared.auditor.evaluate(stage.model)
    _cost(metrics, stage.seconds, stage.samples, prepared)
    return metrics


def run_seeds(config: Config, method_name: str, seeds: int) -> tuple[Prepared, list[I2IModel], list[dict[str, float]]]:
    """The method on `seeds` unlearning seeds (unlearn.seed, +1, ...): one prepared setup, no stage retrained."""
    prepared = prepare(config)
    log_audit_warnings(prepared)
    models, runs = [], []
    for offset in range(seeds):
        settings = config.unlearn.model_copy(update={"seed": config.unlearn.seed + offset})
        logger.info(f"unlearning with {method_name}, unlearning seed {settings.seed} ({offset + 1}/{seeds}) ...")
        result = unlearn(prepared, method_name, settings)
        runs.append({**audit_result(prepared, result), "unlearn_seed": float(settings.seed)})
        models.append(result.model.cpu())  # after the audit, which runs on the device; K models wait on the host
    return prepared, models, runs


def run_model(config: Config, method_name: str) -> tuple[Prepared, I2IModel, dict[str, float]]:
    """Prepare or reuse the stages, run the method (or take a reference model), audit; the prepared setup, the
    model and its figures."""
    if method_name not in REFERENCE_MODELS:
        get_method(method_name)  # an unknown name: ConfigError before any work
    prepared = prepare(config)
    log_audit_warnings(prepared)
    if method_name in REFERENCE_MODELS:
        if method_name not in prepared.stages:
            raise ConfigError(f"there is no {method_name} model in this setup (audit.retrain = false)")
        return prepared, prepared.stages[method_name].model, evaluate_reference(prepared, method_name)
    logger.info(f"unlearning with {method_name} ...")
    result = unlearn(prepared, method_name)
    logger.info(f"{method_name}: {result.seconds:.2f}s, {int(result.metrics['unlearn_samples'])} samples; auditing ...")
    return prepared, result.model, audit_result(prepared, result)
