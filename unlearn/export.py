"""The deliverable: an unlearned model saved with its evidence, and re-audited from its weights alone.

    DIR/
      model/              the model as `I2IModel.save_pretrained` writes it, for every kind: config.json (the kind
                          and its constructor's arguments) and model.safetensors (the weights, provenance as metadata)
      config.yaml         the resolved config the model was made with (data, split, stages, audit, thresholds)
      metrics.json        the run's catalogue, for reading (`unlearn audit` never reads it)
      certificate.md      what was forgotten, how, every audit figure against its threshold and the references,
                          and the places that still hold D_f

Weights are written as safetensors and read back with safetensors (no pickle).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from unlearn.audit.catalogue import format_figure, shown_in
from unlearn.audit.verdict import constraint_values, describe_constraints
from unlearn.config import Config, load_config
from unlearn.errors import ConfigError
from unlearn.lineage import THETA0
from unlearn.models import I2IModel, build_model
from unlearn.models.io import RUN_MODEL_FOLDER, WEIGHTS_FILE, load_provenance, run_model_folder


def check_out_folder(path: str | Path) -> Path:
    """Where `--out` may write: a new or empty folder (ConfigError otherwise, before any work)."""
    import os

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"--out {folder} is not empty; choose a new folder")
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise ConfigError(f"--out {folder}: {ancestor} is not a writable folder")
    return folder


# What the weights cannot show but the verdict needs: the collapse measured right after GA (stored with the
# weights, inside the hashed artefact: the safetensors metadata).
PROVENANCE_KEYS = ("ga_output_std_ratio",)


def save_weights(model: I2IModel, folder: Path, provenance: dict[str, float] | None = None) -> Path:
    """Write the model (and the provenance figures) into `folder/model/`; return that folder."""
    provenance = {k: float(v) for k, v in (provenance or {}).items() if k in PROVENANCE_KEYS}
    return model.save_pretrained(folder / RUN_MODEL_FOLDER, provenance)


def model_folder(folder: Path) -> Path:
    """`folder/model/`, the saved model of a bundle (ConfigError if there is none, or a layout of an older version)."""
    found = run_model_folder(folder)
    if found is None:
        raise ConfigError(f"{folder} holds no model ({RUN_MODEL_FOLDER}/ with config.json and {WEIGHTS_FILE})")
    return found


def weights_digest(folder: Path) -> str:
    """The weights' sha256 as the certificate states it: the sha256 of `model/model.safetensors` (provenance
    included), checkable with `sha256sum model/model.safetensors`. `model/config.json` is not hashed: it is the
    model section of config.yaml (whose sha256 the registry records), and loading refuses one that differs."""
    from unlearn.cache import file_sha256

    return file_sha256(model_folder(folder) / WEIGHTS_FILE)


def load_saved(path: str | Path) -> tuple[Config, Path]:
    """(config, folder) of a saved model folder; ConfigError naming what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--model {folder} does not exist or is not a folder")
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"--model {folder} has no config.yaml (not a folder written by `unlearn run --out`)")
    return load_config(str(folder / "config.yaml")), folder


def audit_saved(path: str | Path) -> dict[str, float]:
    """Re-audit a saved model from its weights: same data, same references, same catalogue."""
    from unlearn.lineage import THETA0, Lineage
    from unlearn.pipeline import log_audit_warnings, prepare
    from unlearn.runtime import seed_everything

    config, folder = load_saved(path)
    lineage = Lineage.load(folder)
    if lineage is not None:  # a request of a chain: its theta0 (the parent version) travels in the bundle
        config = config.model_copy(update={"stages": config.stages.model_copy(update={"theta0": str(folder / THETA0)})})
    seed_everything(config.seed)
    model = build_model(config)
    model.load_weights(model_folder(folder))
    prepared = prepare(config)
    log_audit_warnings(prepared)
    metrics = {**prepared.auditor.evaluate(model.to(prepared.device).eval()), **load_provenance(model_folder(folder))}
    # a request of a chain: every earlier request judged against what its certificate recorded
    return prepared.auditor.verdict(metrics, lineage.certified()[:-1] if lineage is not None else None)


_fmt = format_figure  # the catalogue's one way of printing a figure


def _seed_lines(spread: dict[str, float] | None, shown: list[str], metrics: dict[str, float]) -> list[str]:
    if not spread:
        return []
    lines = [f"## Spread over {int(spread['seeds'])} unlearning seeds (this model: seed {int(metrics['unlearn_seed'])}, "
             "the one nearest the mean of the sweep objectives)", "", "| figure | mean | std |", "| --- | --- | --- |"]
    lines += [f"| {n} | {_fmt(spread[n])} | {_fmt(spread.get(f'{n}_std', 0.0))} |" for n in shown if n in spread]
    return [*lines, ""]


def save_run(folder: Path, config: Config, model: I2IModel, method: str, metrics: dict[str, float]) -> Path:
    """The re-auditable part of a bundle: weights (with provenance), config.yaml, metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if "unlearn_seed" in metrics:  # the config that re-creates this very run
        config = config.model_copy(update={"unlearn": config.unlearn.model_copy(update={"seed": int(metrics["unlearn_seed"])})})
    weights = save_weights(model, folder, metrics)
    (folder / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps({"method": method, **metrics}, indent=2, sort_keys=True))
    return weights


def write_bundle(folder: Path, prepared: Any, model: I2IModel, method: str, metrics: dict[str, float],
                 references: dict[str, dict[str, float]], spread: dict[str, float] | None = None) -> Path:
    """Write weights, config.yaml, metrics.json and certificate.md into `folder` (new or empty).

    `spread`: the seed summary (`catalogue.seed_summary`) when `metrics` is one of several unlearning seeds."""
    save_run(folder, prepared.config, model, method, metrics)
    write_certificate(folder, prepared.data, {k: s.key for k, s in prepared.stages.items()}, method, metrics, references, spread)
    return folder


def write_certificate(folder: Path, data: Any, stage_keys: dict[str, str], method: str, metrics: dict[str, float],
                      references: dict[str, dict[str, float]], spread: dict[str, float] | None = None,
                      location: str | None = None, chain: list[str] | None = None) -> Path:
    """certificate.md beside the weights and config.yaml that `save_run` wrote into `folder`; `data`: the split
    (UnlearningData), `stage_keys`: stage name -> cache key; `location`: where the model will be found (a runs:/ or
    models:/ URI; default: the folder); `chain`: the lines of a request's chain (`unlearn.chain.chain_lines`)."""
    config = load_config(str(folder / "config.yaml"))
    lines = [
        f"# Unlearning certificate: {method}", "",
        *_forgotten_lines(config, data), "",
        *_how_lines(config, folder, stage_keys, method), "",
        *_verdict_lines(config, metrics), "",
        *(chain or []),
        *_figure_lines(metrics, references), "",
        *_seed_lines(spread, shown_in("certificate"), metrics),
        "## Gradient-ascent guarantee bookkeeping", "",
        *([f"- {k}: {_fmt(metrics[k])}" for k in shown_in("guarantee") if k in metrics] or ["- (no gradient-ascent phase)"]),
        "",
        "## Cost", _cost_line(metrics), "",
        *_residue_lines(config, stage_keys), "",
        f"Re-audit from the weights alone: `unlearn audit --model {location or folder}`",
    ]
    (folder / "certificate.md").write_text("\n".join(lines) + "\n")
    return folder / "certificate.md"


def _forgotten_lines(config: Config, data: Any) -> list[str]:
    classes = sorted({data.class_names[int(c)] for c in data.forget_train.labels.unique()})
    if isinstance(config.data.forget_list, list):
        what = f"the images this request names (listed in config.yaml, data.forget_list; classes {classes})"
    elif config.data.forget_list:
        what = f"the images listed in `{config.data.forget_list}` (classes {classes})"
    else:
        what = f"forget classes {config.data.forget_classes}, forget fraction {config.data.forget_fraction}"
    return ["## What was forgotten",
            f"- data set `{config.data.dataset}` ({config.data.image_size}px), {what}: {len(data.forget_train)} training images",
            f"- forget-set digest (sha256 of the sorted sample ids): `{data.forget_digest(config.data.dataset)}`"]


def _how_lines(config: Config, folder: Path, stage_keys: dict[str, str], method: str) -> list[str]:
    from unlearn.methods import METHODS, REFERENCE_MODELS

    hyper = METHODS[method].values(config.unlearn) if method in METHODS else {}
    delta_rule = ("ood_delta auto = audit.ood_delta_fraction x retrain's distance" if config.audit.retrain else
                  "no retrain reference (audit.retrain = false): ood_delta auto = the null method's distance / "
                  "audit.ood_delta_fraction; no *_vs_retrain figure and no forget_gap constraint; retraining's samples "
                  "estimated as stages.epochs x |D_r|")
    theta0 = (f"- theta0 = the user's model `{config.stages.theta0}` (`{stage_keys['attack']}`)" if config.stages.theta0
              else f"- theta0 = the attack stage `{stage_keys['attack']}`")
    if (folder / THETA0).is_dir():  # a request of a chain (unlearn.chain)
        theta0 = f"- theta0 = the parent version, kept in `theta0/` of this folder (`{stage_keys['attack']}`)"
    weights = model_folder(folder) / WEIGHTS_FILE
    return ["## How",
            f"- method `{method}`" + (" (a reference model, not an unlearning run)" if method in REFERENCE_MODELS else ""),
            f"- hyperparameters: {json.dumps(hyper)}; GA step `{config.unlearn.ga_step}`; data/stage seed {config.seed}, "
            f"unlearning seed {config.unlearn.seed}",
            f"{theta0}; model `{config.model.kind}`",
            f"- {delta_rule}",
            f"- weights `{weights.relative_to(folder)}`, sha256 `{weights_digest(folder)}`"]


def _verdict_lines(config: Config, metrics: dict[str, float]) -> list[str]:
    """The marker audit's validity and every constraint of `unlearn.audit.verdict` against its threshold."""
    if not config.has_marker:
        marker = "- marker audit: not applicable (theta0 was brought by the user; D_f carries no '+' marker)"
    else:
        marker = (f"- **marker audit {'valid' if metrics.get('audit_valid') == 1.0 else 'NOT VALID: it cannot decide'}** (attack "
                  f"strength {_fmt(metrics.get('audit_attack_strength', math.nan))}, null method (fine-tuning alone) "
                  f"{_fmt(metrics.get('audit_null_strength', math.nan))}; both must be >= {config.audit.min_marker_strength:g})")
    limits = describe_constraints(metrics, config)
    return ["## Verdict", marker, f"- **{'feasible' if metrics.get('feasible') == 1.0 else 'NOT feasible'}**:",
            *[f"  - {name}: {'pass' if value <= 0 else 'FAIL'} ({limits[name]})"
              for name, value in constraint_values(metrics, config).items()]]


def _figure_lines(metrics: dict[str, float], references: dict[str, dict[str, float]]) -> list[str]:
    """The catalogue's certificate figures of this model beside the retrain and attack references'."""
    columns = [r for r in ("retrain", "attack") if r in references]
    return ["## Audit figures (forget = held-out images of the forgotten classes, or the forgotten images themselves at "
            "sample level; retain = the other test images; membership: D_f's training images vs held-out images of its "
            "classes)", "",
            "| figure | this model | " + " | ".join("attack (theta0)" if r == "attack" else r for r in columns) + " |",
            "| --- " * (len(columns) + 2) + "|",
            *[f"| {name} | {_fmt(metrics[name])} | " + " | ".join(_fmt(references[r].get(name, math.nan)) for r in columns)
              + " |" for name in shown_in("certificate") if name in metrics]]


def _cost_line(metrics: dict[str, float]) -> str:
    def figure(name: str) -> str:
        return _fmt(metrics.get(name, math.nan))

    retraining = (f"retraining (estimated, no retrain reference) {figure('retrain_samples')} "
                  if metrics.get("retrain_samples_estimated") else
                  f"retraining {figure('retrain_seconds')} s, {figure('retrain_samples')} ")
    ratio = (f"cost_ratio {figure('cost_ratio')}, timed side by side)" if "cost_ratio" in metrics else
             "the seconds were measured in different processes, so no time ratio is claimed)")
    return (f"- unlearning {figure('unlearn_seconds')} s, {figure('unlearn_samples')} samples; {retraining}samples "
            f"(sample_ratio {figure('sample_ratio')}; {ratio}")


def _residue_lines(config: Config, stage_keys: dict[str, str]) -> list[str]:
    """The places that still hold D_f (what `unlearn purge` removes, and what it cannot)."""
    cache_root = config.resolved_cache_dir()
    byo = config.stages.theta0 is not None
    stage_paths = ([Path(config.stages.theta0).expanduser()] if byo else
                   [cache_root / "stages" / key for n, key in stage_keys.items() if n in ("original", "attack")])
    return ["## Where D_f still lives",
            f"- the data cache: `{cache_root / 'data'}` (the split, forget images included)",
            *[f"- {'the model brought as theta0' if byo else 'stage weights trained on D_f'}: `{p}`" for p in stage_paths],
            f"- reference features and calibration computed from forget images: `{cache_root / 'references'}`, "
            f"`{cache_root / 'calibration'}`",
            "- the original data set itself, and any MLflow run that logged forget-image grids or embeddings"]
