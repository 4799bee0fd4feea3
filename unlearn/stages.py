"""The reference models, each trained once per content key and cached.

- original: trained on clean D (or loaded from `model.pretrained`),
- attack:   the original fine-tuned on poisoned D_f together with D_r (paper Algorithm 2) = theta0,
- retrain:  trained from scratch on D_r only, the gold reference of unlearning.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from unlearn.cache import ArtifactCache
from unlearn.config import Config
from unlearn.data import BatchStream, ImageSubset, UnlearningData
from unlearn.methods import objectives as obj
from unlearn.methods.loop import GradientSync, Phase, StepContext, run_phases
from unlearn.models import I2IModel, build_model
from unlearn.models.pretrained import load_pretrained
from unlearn.runtime import import_before_timing, seed_everything

logger = logging.getLogger(__name__)


STAGES = ("original", "attack", "retrain", "retrain2")
# Trained on D_r alone (no forget digest: `unlearn purge --weights` keeps them). retrain2 is the same training with
# another seed: how far it lies from retrain is the yardstick of forget_gap_vs_retrain (audit.max_forget_gap auto).
RETRAINED = ("retrain", "retrain2")


@dataclass
class Stage:
    name: str
    model: I2IModel
    key: str
    seconds: float  # wall time it took to train (from the cache entry when reused)
    samples: int  # training samples processed
    reused: bool


# Bump when the data a stage is trained on changes meaning (v2: the border-mask '+' moved inside the frame).
STAGE_SCHEMA = 2


def stage_keys(config: Config) -> dict[str, str]:
    base = (f"v{STAGE_SCHEMA}" + config.section_key("data", "model") + "-"
            + _hash(config.stages.epochs, config.stages.batch_size, config.stages.lr))
    attack = _hash(base, config.stages.attack_epochs, config.stages.attack_lr)
    return {"original": f"original-{base}", "attack": f"attack-{attack}", "retrain": f"retrain-{base}",
            "retrain2": f"retrain2-{base}"}


def _hash(*parts: object) -> str:
    import hashlib

    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _epoch_steps(n: int, batch_size: int, epochs: int) -> int:
    return epochs * max(1, math.ceil(n / batch_size))


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel group (the default: alone)."""

    rank: int = 0
    world_size: int = 1
    sync: GradientSync | None = None


def _train(
    config: Config, model: I2IModel, data: UnlearningData, phase: Phase, subsets: dict[str, ImageSubset], seed: int,
    forget_weight: float = 1.0, shard: Shard = Shard(),
) -> int:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    streams = {k: BatchStream(v, config.stages.batch_size, seed + i, shard.rank, shard.world_size, device)
               for i, (k, v) in enumerate(subsets.items())}
    ctx = StepContext(model=model, mask=data.mask.to(device), noise_seed=seed, forget_weight=forget_weight, rank=shard.rank,
                      world_size=shard.world_size)
    steps_per_epoch = max(1, math.ceil(max(len(v) for v in subsets.values()) / config.stages.batch_size))
    # A bar per stage on a terminal (disable=None: off when stderr is not a TTY, e.g. in Ray workers and tests).
    with tqdm(total=phase.steps, desc=f"stage {phase.name}", unit="step", disable=None, leave=False) as bar:
        def on_step(_: str, step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(epoch=f"{step // steps_per_epoch + 1}/{math.ceil(phase.steps / steps_per_epoch)}",
                            loss=f"{loss:.4g}", refresh=False)

        history = run_phases(model, [phase], streams, ctx, clip_norm=10.0, precision=config.precision, sync=shard.sync,
                             on_step=on_step)
    if history.diverged:
        raise RuntimeError(f"stage training diverged in phase {phase.name}; lower stages.lr")
    return history.samples


def _train_original(config: Config, model: I2IModel, data: UnlearningData, shard: Shard = Shard()) -> int:
    if config.model.pretrained:
        load_pretrained(model, config.model.pretrained)
        return 0
    train = data.clean_training_set()
    steps = _epoch_steps(len(train), config.stages.batch_size, config.stages.epochs)
    return _train(config, model, data, Phase("original", obj.fit("train"), ("train",), steps, config.stages.lr), {"train": train},
                  config.seed, shard=shard)


def _train_attack(config: Config, model: I2IModel, data: UnlearningData, shard: Shard = Shard(),
                  strengthen_round: int = 0) -> int:
    """Algorithm 2; a strengthening round r trains as many epochs again, with the D_f loss weighted 2**r."""
    s = config.stages
    steps = _epoch_steps(len(data.retain_train), s.batch_size, s.attack_epochs)
    phase = Phase("attack", obj.fit_both, ("forget", "retain"), steps, s.attack_lr)
    return _train(config, model, data, phase, {"forget": data.forget_train, "retain": data.retain_train},
                  config.seed + 1 + 100 * strengthen_round, forget_weight=2.0**strengthen_round, shard=shard)


def train_retrain(config: Config, model: I2IModel, data: UnlearningData, shard: Shard = Shard(), seed_offset: int = 2) -> int:
    """The retrain stage's training of `model` on D_r (what the benchmark times beside unlearning); samples processed."""
    steps = _epoch_steps(len(data.retain_train), config.stages.batch_size, config.stages.epochs)
    phase = Phase("retrain", obj.fit("retain"), ("retain",), steps, config.stages.lr)
    return _train(config, model, data, phase, {"retain": data.retain_train}, config.seed + seed_offset, shard=shard)


def _train_retrain2(config: Config, model: I2IModel, data: UnlearningData, shard: Shard = Shard()) -> int:
    return train_retrain(config, model, data, shard, seed_offset=3)


def needed_stages(config: Config, only: tuple[str, ...] = STAGES) -> list[str]:
    """The stages `prepare_stages` would load or train for this config (none trained for a model brought as
    theta0; no retrain without audit.retrain)."""
    needed = set(only) | ({"original"} if "attack" in only else set())
    if not config.audit.retrain:
        needed -= set(RETRAINED)
    if config.audit.max_forget_gap != "auto":
        needed.discard("retrain2")
    if config.stages.theta0:
        needed -= {"original", "attack"}
    return [name for name in STAGES if name in needed]


def missing_stages(config: Config) -> list[str]:
    """The needed stages the cache does not hold yet."""
    cache, keys = ArtifactCache(config.resolved_cache_dir()), stage_keys(config)
    return [name for name in needed_stages(config) if not cache.has("stages", keys[name])]


def prepare_stages(
    config: Config,
    data: UnlearningData,
    device: torch.device,
    only: tuple[str, ...] = STAGES,
    shard: Shard = Shard(),
) -> dict[str, Stage]:
    """Load each stage from the cache or train it (original before attack); return them on `device`.

    In a data-parallel group (`shard`), every rank trains on its shard of each global batch (gradients averaged:
    the one-worker run's steps) and rank 0 writes the cache; the ranks agree on what is cached before each stage."""
    cache = ArtifactCache(config.resolved_cache_dir())
    keys = stage_keys(config)
    trainers = {"original": _train_original, "attack": _train_attack, "retrain": train_retrain, "retrain2": _train_retrain2}
    needed = needed_stages(config, only)
    out: dict[str, Stage] = {}
    if config.stages.theta0:  # the user's model is theta0, and the original (it saw D_f): nothing to train
        theta0 = load_theta0(config, device)
        out.update(original=theta0, attack=theta0)
        logger.info(f"theta0: {config.stages.theta0} ({theta0.key})")
    for name in STAGES:
        if name not in needed:
            continue
        key = keys[name]
        seed_everything(config.seed + STAGES.index(name))
        model = build_model(config)
        hit = cache.get("stages", key)
        if shard.sync is not None and shard.sync.max(0.0 if hit is not None else 1.0) > 0:
            hit = None  # some rank has no entry: all train, so that every collective step has its partners
        if hit is not None:
            tensors, meta = hit
            model.load_state_dict(tensors)
            out[name] = Stage(name, model.to(device).eval(), key, meta["seconds"], meta["samples"], reused=True)
            logger.info(f"stage {name}: reused {key}")
            continue
        if name == "attack":
            model.load_state_dict(out["original"].model.state_dict())
        model.to(device)
        logger.info(f"stage {name}: training ...")
        import_before_timing()
        start = time.perf_counter()
        samples = trainers[name](config, model, data, shard)
        seconds = time.perf_counter() - start
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = {"stage": name, "seconds": seconds, "samples": samples, "config": config.model_dump(mode="json", by_alias=True)}
        if name not in RETRAINED:  # trained on D_f: `unlearn purge --weights` finds it by the forget digest
            meta["forget_digest"] = data.forget_digest(config.data.dataset)
        else:
            meta["trained_on"] = "D_r"
        if shard.rank == 0:
            cache.save("stages", key, state, meta)
        out[name] = Stage(name, model.eval(), key, seconds, samples, reused=False)
        logger.info(f"stage {name}: trained in {seconds:.1f}s ({samples} samples)")
    return out


def load_theta0(config: Config, device: torch.device) -> Stage:
    """The model named by `stages.theta0`: an `unlearn run --out` folder (recognised by its model/config.json), a
    folder written by `save_pretrained`, a diffusers folder or a checkpoint."""
    import hashlib
    from pathlib import Path

    from unlearn.cache import file_sha256
    from unlearn.models import WEIGHTS_FILE, run_model_folder

    path = Path(config.stages.theta0).expanduser()
    model = build_model(config)
    saved = run_model_folder(path) if path.is_dir() else None
    if saved is not None:
        model.load_weights(saved)
        digest = file_sha256(saved / WEIGHTS_FILE)  # the digest of the run's certificate
    else:
        load_pretrained(model, str(path), key="stages.theta0")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        hasher = hashlib.sha256()
        for file in files:
            hasher.update(file.read_bytes())
        digest = hasher.hexdigest()
    # the model section too: the same weights sampled differently (diffusion steps) give other references
    return Stage("attack", model.to(device).eval(), f"theta0-{digest[:16]}-{config.section_key('model')}", 0.0, 0, reused=True)


def strengthen_attack(
    config: Config, data: UnlearningData, attack: Stage, round_: int, device: torch.device,
) -> Stage:
    """Round `round_` of attack strengthening (cached): the attack model trained one more round."""
    cache = ArtifactCache(config.resolved_cache_dir())
    key = f"{attack.key}-s{round_}"
    model = build_model(config)
    if (hit := cache.get("stages", key)) is not None:
        tensors, meta = hit
        model.load_state_dict(tensors)
        logger.info(f"stage attack (strengthening round {round_}): reused {key}")
        return Stage("attack", model.to(device).eval(), key, meta["seconds"], meta["samples"], reused=True)
    model.load_state_dict(attack.model.state_dict())
    model.to(device)
    logger.info(f"stage attack: strengthening round {round_} ...")
    import_before_timing()
    start = time.perf_counter()
    samples = attack.samples + _train_attack(config, model, data, strengthen_round=round_)
    seconds = attack.seconds + time.perf_counter() - start
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cache.save("stages", key, state, {"stage": "attack", "strengthen_round": round_, "seconds": seconds, "samples": samples,
                                      "forget_digest": data.forget_digest(config.data.dataset)})
    return Stage("attack", model.eval(), key, seconds, samples, reused=False)
