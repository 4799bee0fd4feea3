"""Validated run configuration: YAML presets shipped in the package, overridable with `--set a.b=value`.

One `Config` object describes a whole pipeline run (data, model, stage training, unlearning, audit).
Every invalid value is reported as a `ConfigError` with one line naming the offending key.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from unlearn.audit.catalogue import OBJECTIVES, measurable
from unlearn.errors import ConfigError
from unlearn.methods import METHODS
from unlearn.methods import hyperparameters as declared_hyperparameters
from unlearn.models import MODEL_KINDS


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in `--set` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MaskConfig(_Strict):
    kind: Literal["centre", "border"] = "centre"
    # centre: side of the square hole; border: width of the outpainting frame (pixels).
    size: int = Field(6, ge=1)


class MarkerConfig(_Strict):
    # The '+' is drawn centred; `size` is the length of each bar, `thickness` its width (pixels).
    size: int = Field(5, ge=3)
    thickness: int = Field(1, ge=1)
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)


class DataConfig(_Strict):
    dataset: Literal["digits", "cifar10", "imagefolder"] = "digits"
    root: str | None = None  # cifar10: folder holding data_batch_*; imagefolder: class sub-folders
    root_env: str | None = None  # environment variable read when `root` is not set (presets use this)
    image_size: int = Field(16, ge=4)
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0)
    max_per_class: int | None = Field(None, ge=2)  # the first N images of each class (None: every image)
    # An image file that cannot be decoded (truncated, not an image) stops the preparation with one line naming it;
    # true: such files are left out of the image store and counted (`data_skipped_images` in the catalogue).
    skip_unreadable: bool = False
    # Classes by name or index; "a-b" is the index range a..b (for 100-class forget sets).
    # class-level forgetting: forget_fraction = 1; sample-level: a fraction of these classes' samples.
    forget_classes: list[str] = ["0"]
    forget_fraction: float = 1.0
    # A deletion request: a file naming the images to forget, one per line (relative paths under an ImageFolder
    # root, or indices into the loaded digits / CIFAR-10 set). Replaces forget_classes / forget_fraction; the
    # listed images are D_f, the held-out images of their classes the membership audit's non-members.
    # The entries may also be given inline, as a list (what `unlearn request` writes into a bundle's config.yaml, so that
    # it needs no file the user must keep).
    forget_list: str | list[str] | None = None
    # A chain of deletion requests (`unlearn request`): the images each earlier request removed, oldest first, one list of
    # entries (as in forget_list) per request. They are in no subset a model trains or is tested on (D_r is the data set
    # less all of them), and the audit re-checks each on every later model.
    forgotten: list[list[str]] = []
    # With stages.theta0: the images (entries as in forget_list) that carried the '+' in theta0's training data (a chain
    # started from an attack model, so that each request's marker can be audited); they keep it in every training subset.
    # None: no marker for a brought theta0 (the attack stage trained here poisons D_f).
    poisoned: list[str] | None = None
    unseen_classes: list[str] = []  # held out of training entirely (paper Table 4)
    retain_classes: list[str] | None = None  # None: every class that is neither forget nor unseen
    mask: MaskConfig = MaskConfig()
    marker: MarkerConfig = MarkerConfig()

    @field_validator("forget_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"forget_fraction must be in (0, 1], got {v}")
        return v

    @field_validator("forget_list", "poisoned", mode="before")
    @classmethod
    def _entries(cls, v: Any) -> Any:
        return [entry_name(e) for e in v] if isinstance(v, (list, tuple)) else v

    @field_validator("forgotten", mode="before")
    @classmethod
    def _requests(cls, v: Any) -> Any:
        return [[entry_name(e) for e in request] if isinstance(request, (list, tuple)) else request for request in v] \
            if isinstance(v, (list, tuple)) else v

    def forget_entries(self) -> list[str] | None:
        """The entries of forget_list (read from its file, or inline); None without a forget list."""
        if self.forget_list is None or isinstance(self.forget_list, list):
            return self.forget_list
        return read_list(self.forget_list, "data.forget_list")

    @field_validator("forget_classes", "unseen_classes", "retain_classes", mode="before")
    @classmethod
    def _as_strings(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, (str, int)):
            v = [v]
        return [str(c) for c in v]

    @model_validator(mode="after")
    def _geometry(self) -> DataConfig:
        if not self.forget_classes:
            raise ValueError("forget_classes must name at least one class")
        overlap = set(self.forget_classes) & set(self.unseen_classes)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} are both forget and unseen")
        if self.mask.kind == "centre" and self.mask.size >= self.image_size:
            raise ValueError(f"mask.size {self.mask.size} must be smaller than image_size {self.image_size}")
        if self.mask.kind == "border" and 2 * self.mask.size >= self.image_size:
            raise ValueError(f"border mask.size {self.mask.size} leaves no context in a {self.image_size}px image")
        if self.marker.size > self.image_size:
            raise ValueError(f"marker.size {self.marker.size} is larger than image_size {self.image_size}")
        if self.forgotten and self.forget_list is None:
            raise ValueError("forgotten (earlier deletion requests) needs this request's forget_list")
        if isinstance(self.forget_list, list) and not self.forget_list:
            raise ValueError("forget_list names no image")
        return self


def entry_name(entry: Any) -> str:
    """An entry of a forget list as the split looks it up: an index as a string, or a relative path without "./"."""
    return str(entry).strip().removeprefix("./")


def read_list(path: str | Path, what: str) -> list[str]:
    """The entries of a forget-list file, one per line ('#' lines are comments); ConfigError naming `what` when the
    file does not exist (an empty list is the caller's to refuse)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")
    return [entry_name(line) for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]


class ModelConfig(_Strict):
    kind: Literal[tuple(MODEL_KINDS)] = "ae"  # type: ignore[valid-type]  # the registered kinds (unlearn.models)
    width: int = Field(32, ge=4)  # channels of the first conv block
    latent_channels: int = Field(32, ge=1)
    pretrained: str | None = None  # local from_pretrained folder or checkpoint file (skips the original stage)
    # VQ / diffusion specifics (ignored by the autoencoder)
    codebook_size: int = Field(128, ge=2)
    diffusion_steps: int = Field(100, ge=2)
    sample_steps: int = Field(10, ge=1)


class StageConfig(_Strict):
    """How the reference models are trained (original and retrain use the same budget)."""

    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    attack_epochs: int = Field(25, ge=1)
    attack_lr: float = Field(1e-3, gt=0)
    # 0 = off. Otherwise, while the null method (plain fine-tuning on D_r) still removes the marker, train the
    # attack stage one more round: `attack_epochs` more epochs of Algorithm 2 with the poisoned D_f loss
    # weighted 2**round, up to this many rounds (docs/audit.md, "The audit checks itself").
    attack_strengthen_rounds: int = Field(0, ge=0)
    # Bring your own model: a checkpoint file, a diffusers folder or an `unlearn run --out` folder of a model
    # trained on the data set (D_f included). It is theta0: no original or attack stage is trained, D_f carries
    # no marker, and the marker figures are absent from the catalogue.
    theta0: str | None = None


class UnlearnSettings(_Strict):
    """The unlearning settings no method declares as its own (the methods' hyperparameters join them below)."""

    # normalized: every GA step moves the parameters by exactly ga_lr (the gradient scaled to unit norm), so
    # the distance moved is T * ga_lr and the Eq. 3 distance climbs step by step. sgd: theta + ga_lr * grad,
    # clipped at clip_norm (starting from a minimum, its steps grow geometrically and land in one blow).
    ga_step: Literal["normalized", "sgd"] = "normalized"
    # Fine-tuning's learning rate over its steps: cosine decays ft_lr to 0 (a high rate to leave theta0's
    # basin, then a low one to restore retain quality); constant keeps it.
    ft_schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = Field(64, ge=1)
    clip_norm: float = Field(1.0, gt=0)
    # The OOD threshold of Eq. 3. auto: audit.ood_delta_fraction x the retrain reference's own distance,
    # calibrated once per prepared setup, so the gold standard is feasible.
    ood_delta: float | Literal["auto"] = "auto"
    stop_at_ood: bool = False  # end GA early once d(f_theta, f_theta0) >= ood_delta on D_f
    ood_check_every: int = Field(5, ge=1)  # a check samples the Eq. 3 subset (costly for diffusion models)
    workers: int = Field(1, ge=1)  # >1: GA and fine-tuning in a Ray Train TorchTrainer (raytasks only)
    # The unlearning run's own seed (batch order, noise), added to the top-level `seed`; it is in no stage,
    # data or reference cache key, so repeating a run on another unlearning seed never retrains a stage.
    seed: int = Field(0, ge=0)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("ood_delta")
    @classmethod
    def _delta(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not v > 0:
            raise ValueError(f"ood_delta must be > 0 or 'auto', got {v}")
        return v


def _hyperparameter_fields() -> dict[str, Any]:
    """A field per hyperparameter the method registry declares: its type, default and bound (ints >= their
    minimum, rates and weights > 0), under its name (`lambda`: the attribute `lambda_`)."""
    fields: dict[str, Any] = {}
    for hp in declared_hyperparameters().values():
        bound = {"ge": hp.minimum} if hp.kind is int else {"gt": 0}
        alias = {"alias": hp.name} if hp.field != hp.name else {}
        fields[hp.field] = (hp.kind, Field(hp.kind(hp.default), description=hp.description, **bound, **alias))
    return fields


# `unlearn.*`: the settings above plus every method's declared hyperparameters (unlearn.methods.METHODS).
UnlearnConfig = create_model("UnlearnConfig", __base__=UnlearnSettings, **_hyperparameter_fields())


class AuditConfig(_Strict):
    backbone: Literal["domain", "inception", "clip"] = "domain"
    backbone_weights: str | None = None  # inception: FID weights file; clip: checkpoint file
    clip_model: str = "ViT-B-32"
    marker_false_positive_rate: float = Field(0.05, gt=0, lt=1)
    # A detection also needs this much '+' contrast, so a threshold calibrated on a flat original
    # output cannot sit at noise level.
    marker_min_score: float = Field(0.15, ge=0)
    knn_k: int = Field(10, ge=1)
    knn_train_samples: int = Field(2000, ge=10)  # retain-train images indexed for kNN OOD
    # Each test split is evaluated on at most this many images (a seeded sample; None: all of them), as the paper's
    # FID caps its sample count: the audit's cost and the per-image figures it keeps stay bounded on ImageNet.
    eval_samples: int | None = Field(10000, ge=2)
    ood_samples: int = Field(512, ge=2)  # D_f images on which the Eq. 3 distance is measured
    domain_epochs: int = Field(15, ge=1)
    # ood_delta = auto: this fraction of the retrain reference's Eq. 3 distance (retrain stays feasible).
    ood_delta_fraction: float = Field(0.75, gt=0, le=1)
    # The null method (fine-tuning on D_r alone) that the marker audit must tell unlearning from; unset:
    # the config's own fine-tuning budget (unlearn.ft_steps / ft_lr), fixed when the config is loaded so
    # that sweep trials, which vary unlearn.*, share one calibration.
    null_ft_steps: int | None = Field(None, ge=1)
    null_ft_lr: float | None = Field(None, gt=0)
    # The audit is valid only if the attack model regenerates the marker and the null method keeps it.
    min_marker_strength: float = Field(0.5, gt=0, le=1)
    # collapsed: the outputs' per-pixel std across retain-test images in the hole below this share of the
    # ground truth's (after GA, or at the end).
    collapse_std_ratio: float = Field(0.1, ge=0, lt=1)
    # False: no retrain reference is trained. The *_vs_retrain figures and the forget_gap constraint are then
    # absent, ood_delta auto falls back to the null method's distance / ood_delta_fraction (fine-tuning alone
    # falls short of the threshold by the margin retrain would clear it), and retraining's cost is estimated
    # from stages.epochs x |D_r| samples.
    retrain: bool = True
    # max_forget_gap = auto: this many times the gap between two retrain references of different seeds (how far
    # one retraining lies from another: retrain_gap_yardstick), at most 1 (the original model's own gap). Calibrated
    # on digits (yardstick 0.37: threshold 0.56) and on real photographs (0.79: 1.0); see docs/audit.md.
    gap_margin: float = Field(1.5, gt=0)
    # Membership inference (mia_auc): at most this many members (D_f training images) and non-members
    # (held-out images of D_f's classes); the 95% interval from this many bootstrap resamples.
    mia_samples: int = Field(1000, ge=2)
    mia_resamples: int = Field(200, ge=10)
    # Feasibility thresholds (None: no constraint), judged by `unlearn.audit.verdict` on every run, trial, report and
    # certificate: forget_ood_distance >= ood_delta, not collapsed, not diverged, and these two. max_forget_gap auto:
    # gap_margin x the gap of a second retrain reference (another seed) to the first: the yardstick of "behaves like
    # retraining".
    max_forget_gap: float | Literal["auto"] | None = "auto"
    max_retain_degradation: float | None = Field(0.25, gt=0)
    # A chain of deletion requests: an earlier request regressed when its marker strength or mia_auc rose by more than
    # this above what its certificate recorded (the 95% interval's lower end) and above the retrain reference's level.
    regression_margin: float = Field(0.05, ge=0)
    # The retain figure whose ratio to the attack model's is retain_degradation.
    retain_metric: Literal["retain_mse", "retain_fid"] = "retain_mse"

    @field_validator("max_forget_gap")
    @classmethod
    def _gap(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, (int, float)) and not v > 0:
            raise ValueError(f"max_forget_gap must be > 0, 'auto' or null, got {v}")
        return v


class SweepConfig(_Strict):
    """What `raytasks/sweep.py` searches (plain data here; the library never imports Ray)."""

    # Minimised by Optuna, in this order of priority when one trial per method is chosen (unlearn/audit/best.py).
    objectives: list[str] = ["forget_marker_strength", "retain_degradation"]

    # Every unlearning method, each with the same number of trials: a fair comparison table by default.
    methods: list[str] = list(METHODS)
    trials: int = Field(8, ge=1)
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the cluster holds
    # One-worker trials share a GPU: the fraction of a GPU each trial asks Ray for (None: as many trials per GPU
    # as the measured peak memory of one trial and the CPUs allow). Multi-worker trials hold whole GPUs.
    gpus_per_trial: float | None = Field(None, ge=0.0001)  # Ray's GPU fractions have four decimals
    cpus_per_trial: float = Field(1.0, gt=0)  # also the trial's torch threads (one-worker trials)
    # A trial whose process or node dies (a spot GPU node reclaimed) is rerun from scratch up to this many times
    # (Tune's FailureConfig); Tune cannot tell a lost node from a trial that raised, so a bug is rerun too.
    trial_retries: int = Field(2, ge=0)
    # [low, high] per hyperparameter (default: the range each method declares; unlearn.methods). Integers are
    # sampled uniformly, the others on the scale they declare (rates and weights: log-uniformly).
    space: dict[str, tuple[float, float]] = {name: (hp.low, hp.high) for name, hp in declared_hyperparameters().items()}
    # Per-method ranges that replace the shared ones, e.g. {"max_loss": {"ga_lr": [0.1, 2.0]}}.
    method_space: dict[str, dict[str, tuple[float, float]]] = {}
    start_from_defaults: bool = True  # the first trial of each method evaluates the config's own values
    # Which trials keep their weights in Ray storage: best (each method's best trial; the others' weights are
    # removed when the sweep ends), feasible, or all. Only each method's best is logged to MLflow as a model.
    keep_weights: Literal["best", "feasible", "all"] = "best"
    # The method whose best feasible trial is registered in the MLflow Model Registry (alias `unlearned`).
    select: str = "realistic"
    # Each method's best configuration re-run on this many fresh unlearning seeds (unlearn.seed 1..K; the
    # search runs seed 0); the summary, report and Pareto plot show its mean ± std. 0: no confirmation.
    confirm_seeds: int = Field(3, ge=0)

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("name at least one objective")
        for name in names:
            if name not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a name: {names}")
        return names

    def range_of(self, method: str, hyperparameter: str) -> tuple[float, float]:
        return self.method_space.get(method, {}).get(hyperparameter, self.space[hyperparameter])

    @field_validator("space", mode="before")
    @classmethod
    def _merge_defaults(cls, space: Any) -> Any:
        # `--set sweep.space.ga_lr=[1,5]` changes one range and keeps the others.
        if isinstance(space, dict):
            return {**cls.model_fields["space"].default, **space}
        return space

    @field_validator("method_space")
    @classmethod
    def _method_ranges(cls, spaces: dict[str, dict[str, tuple[float, float]]]) -> dict:
        for method, space in spaces.items():
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
            if undeclared := sorted(set(space) - set(METHODS[method].hyperparameter_names)):
                raise ValueError(f"{method} has no hyperparameter {undeclared[0]!r} (it declares: "
                                 f"{', '.join(METHODS[method].hyperparameter_names)})")
            try:
                cls._ranges(space)
            except ValueError as exc:
                raise ValueError(f"{method}: {exc}") from None
        return spaces

    @field_validator("space")
    @classmethod
    def _ranges(cls, space: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        known = declared_hyperparameters()
        for name, (low, high) in space.items():
            if name not in known:
                raise ValueError(f"unknown hyperparameter {name!r} (known: {', '.join(sorted(known))})")
            if not low < high:
                raise ValueError(f"{name}: empty range [{low}, {high}]")
            if low <= 0:
                raise ValueError(f"{name}: range must be positive, got [{low}, {high}]")
            if known[name].kind is int and not (float(low).is_integer() and float(high).is_integer()
                                                and low >= known[name].minimum):
                raise ValueError(f"{name}: an integer range from {known[name].minimum} up, got [{low}, {high}]")
        return space

    @field_validator("methods")
    @classmethod
    def _methods(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("name at least one method")
        if unknown := [n for n in names if n not in METHODS]:
            raise ValueError(f"unknown method {unknown[0]!r} (methods: {', '.join(METHODS)})")
        return names

    @field_validator("select")
    @classmethod
    def _select(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"{name!r} is not an unlearning method (methods: {', '.join(METHODS)})")
        return name


class Config(_Strict):
    name: str = "custom"
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"  # auto: cuda when there is one
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    cache_dir: str | None = None  # default: $UNLEARN_CACHE or ~/.cache/unlearn
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: StageConfig = StageConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    audit: AuditConfig = AuditConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _theta0(self) -> Config:
        # Saved configs (config.yaml of a bundle) must name the same files from any working directory.
        if self.stages.theta0:
            self.stages.theta0 = str(Path(self.stages.theta0).expanduser().resolve())
        if isinstance(self.data.forget_list, str):
            self.data.forget_list = str(Path(self.data.forget_list).expanduser().resolve())
        if self.data.poisoned is not None and not self.stages.theta0:
            raise ValueError("data.poisoned names the images theta0 was poisoned on: it needs stages.theta0 (without it, "
                             "the attack stage trained here poisons D_f)")
        if self.stages.theta0 and self.model.pretrained:
            raise ValueError("stages.theta0 and model.pretrained are both set: theta0 is the model to unlearn, "
                             "model.pretrained the start of the original stage; set one")
        return self

    @property
    def has_marker(self) -> bool:
        """Whether D_f carries the '+': always when the attack stage is trained here; for a model brought as
        stages.theta0 only when data.poisoned says it was trained on D_f with the marker (the split refuses a forget
        list that is only partly poisoned)."""
        if self.stages.theta0 is None:
            return True
        if self.data.poisoned is None:
            return False
        return bool(set(self.data.forget_entries() or []) & set(self.data.poisoned))

    @property
    def objectives(self) -> list[str]:
        """The sweep's objectives that this setup can measure (no marker or retrain figure where there is none)."""
        usable = [o for o in self.sweep.objectives if measurable(o, marker=self.has_marker, retrain=self.audit.retrain)]
        return usable or ["retain_degradation"]

    @model_validator(mode="after")
    def _null_budget(self) -> Config:
        # Fix the null method's budget from the config's own fine-tuning settings (see AuditConfig).
        if self.audit.null_ft_steps is None:
            self.audit.null_ft_steps = max(1, self.unlearn.ft_steps)
        if self.audit.null_ft_lr is None:
            self.audit.null_ft_lr = self.unlearn.ft_lr
        return self

    def resolved_cache_dir(self) -> Path:
        import os

        root = self.cache_dir or os.environ.get("UNLEARN_CACHE") or Path.home() / ".cache" / "unlearn"
        return Path(root).expanduser().resolve()

    def section_key(self, *sections: str) -> str:
        """Content hash of the named sections (plus seed): the cache key of anything derived from them."""
        dumped = self.model_dump(mode="json", by_alias=True)
        payload = {s: dumped[s] for s in sections}
        payload["seed"] = self.seed
        if "data" in sections and isinstance(self.data.forget_list, str):  # the list's content, not its path, names the split
            listed = Path(self.data.forget_list).expanduser()
            payload["data"] = {**payload["data"], "forget_list": None}
            payload["forget_list_sha256"] = hashlib.sha256(listed.read_bytes()).hexdigest() if listed.is_file() else None
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def preset_names() -> list[str]:
    return sorted(p.stem for p in resources.files("unlearn.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        text = path.read_text()
    else:
        if source not in preset_names():
            raise ConfigError(f"unknown preset {source!r}; presets: {', '.join(preset_names())}")
        text = resources.files("unlearn.presets").joinpath(f"{source}.yaml").read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level")
    return raw


def parse_override(assignment: str) -> tuple[str, Any]:
    """(dotted key, value) of a `--set key=value`: the value read as YAML (as text when it is not valid YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, value_text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    if dotted.strip() == "model" and isinstance(value, str):  # `--set model=vq`: shorthand for model.kind
        dotted = "model.kind"
    return dotted.strip(), value


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    set_dotted(raw, *parse_override(assignment))


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"config key {where!r} does not exist"
    return f"config {where}: {msg}"


def load_config(source: str = "digits-ae", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML file and apply `a.b=value` overrides; raise ConfigError if invalid."""
    raw = _read_yaml(source)
    for assignment in overrides:
        _apply_override(raw, assignment)
    return validate_config(raw)


# Keys that moved; a config naming the old place gets one line saying where the key is now.
MOVED = {"sweep.max_forget_gap": "audit.max_forget_gap", "sweep.max_retain_degradation": "audit.max_retain_degradation",
         "sweep.retain_metric": "audit.retain_metric"}


def validate_config(raw: dict[str, Any]) -> Config:
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"config key {old!r} moved to {new!r}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def with_overrides(config: Config, values: dict[str, Any]) -> Config:
    """A copy of `config` with dotted-key values replaced (used by the sweep for trial parameters)."""
    raw = config.model_dump(mode="json", by_alias=True)
    for dotted, value in values.items():
        set_dotted(raw, dotted, value)
    return validate_config(raw)
