"""The one interface every image-to-image model implements (autoencoder, VQ, diffusion).

Models receive the full image and the mask and hide the masked region themselves, so no method can leak
the ground truth of the hole into the input by accident. They save and load themselves as diffusers models do
(`save_pretrained` / `from_pretrained`: config.json and model.safetensors, see `unlearn.models.io`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from unlearn.errors import ConfigError
from unlearn.models.io import CONFIG_FILE, read_spec, read_state, write_folder

if TYPE_CHECKING:
    from unlearn.config import Config


class ModelKinds(Mapping[str, "type[I2IModel]"]):
    """`model.kind` -> model class. Each class is imported on first use (diffusers takes seconds to import);
    `unlearn.models` registers the kinds, so that this module imports none of them."""

    def __init__(self) -> None:
        self._loaders: dict[str, Callable[[], type[I2IModel]]] = {}

    def register(self, kind: str, loader: Callable[[], type[I2IModel]]) -> None:
        """`loader` imports and returns the class of `kind` (whose `kind` attribute is `kind`)."""
        self._loaders[kind] = loader

    def __getitem__(self, kind: str) -> type[I2IModel]:
        return self._loaders[kind]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


MODEL_KINDS = ModelKinds()


class I2IModel(nn.Module, abc.ABC):
    """Inpainting/outpainting model: fill the masked region of an image from its context.

    A subclass names its `kind` (its key in MODEL_KINDS), passes its constructor's arguments to
    `I2IModel.__init__` (recorded as `init_kwargs`, written to config.json) and names them after the config's keys
    (`image_size`, `model.*`), so `kwargs_from_config` builds it from any config."""

    kind: ClassVar[str]

    def __init__(self, **init_kwargs: Any) -> None:
        super().__init__()
        self.init_kwargs = dict(init_kwargs)

    @classmethod
    def kwargs_from_config(cls, config: Config) -> dict[str, Any]:
        """The constructor's arguments for `config`, by name: `image_size` is `data.image_size`, every other one the
        `model.*` key of its name (a kind's constructor names its settings after the config's keys)."""
        import inspect

        kwargs: dict[str, Any] = {}
        settings = {"image_size": config.data.image_size, **config.model.model_dump()}
        for name in list(inspect.signature(cls.__init__).parameters)[1:]:
            if name in settings:
                kwargs[name] = settings[name]
            else:
                raise TypeError(f"{cls.__name__}({name}=...): no model.{name} config key to build it from")
        return kwargs

    @classmethod
    def from_config(cls, config: Config) -> I2IModel:
        """A freshly initialised model of this class for `config` (seeded by the caller)."""
        return cls(**cls.kwargs_from_config(config))

    def spec(self) -> dict[str, Any]:
        """What config.json holds: the kind and the constructor's arguments."""
        return {"kind": self.kind, **self.init_kwargs}

    def save_pretrained(self, folder: str | Path, provenance: dict[str, float] | None = None) -> Path:
        """Write config.json and model.safetensors (with `provenance` as its metadata) into `folder`; return it."""
        return write_folder(Path(folder), self.spec(), self.state_dict(), provenance)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> I2IModel:
        """The model saved in `folder` by `save_pretrained`, built from its config.json (the kind picks the class)
        with its weights; ConfigError naming the folder if either does not make a model of this class."""
        folder = Path(folder).expanduser()
        spec = read_spec(folder)
        kind = spec.pop("kind")
        if kind not in MODEL_KINDS:
            raise ConfigError(f"{folder / CONFIG_FILE} names an unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})")
        model_class = MODEL_KINDS[kind]
        if not issubclass(model_class, cls):
            raise ConfigError(f"{folder} holds a {model_class.__name__} ({kind}), not a {cls.__name__}")
        try:
            model = model_class(**spec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{folder / CONFIG_FILE} does not describe a {kind} model: {exc}") from None
        model._load_state(folder, "its config.json")
        return model

    def load_weights(self, folder: str | Path) -> None:
        """The weights of a `save_pretrained` folder whose config.json describes this very model (ConfigError
        naming the folder and the differing arguments otherwise)."""
        folder = Path(folder).expanduser()
        saved, mine = read_spec(folder), self.spec()
        if saved != mine:
            keys = [k for k in {**saved, **mine} if saved.get(k) != mine.get(k)]
            raise ConfigError(f"the weights in {folder} do not fit the configured model: {CONFIG_FILE} has "
                              f"{_args(saved, keys)}, the config {_args(mine, keys)}")
        self._load_state(folder, "the configured model")

    def _load_state(self, folder: Path, what: str) -> None:
        try:
            self.load_state_dict(read_state(folder))
        except RuntimeError as exc:
            raise ConfigError(f"the weights in {folder} do not fit {what}: {str(exc).splitlines()[0][:200]}") from None

    def load_external_folder(self, folder: Path, key: str) -> None:
        """Weights from a folder in another library's layout (`model.pretrained`, `stages.theta0`); a kind built on
        diffusers reads its `from_pretrained` folders. By default a kind reads none."""
        raise ConfigError(f"{key} {folder} is a folder, but this model kind loads only checkpoint files")

    @abc.abstractmethod
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder E (trained alone by `i2i_sota` and `random_encoder`)."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E(tau(x)): features of the masked input, (N, ...)."""

    @abc.abstractmethod
    def loss(self, images: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss (N,) for learning to produce `target` from tau(images)."""

    @abc.abstractmethod
    def generate(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw model output for tau(images), (N, 3, H, W) in [0, 1]."""

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inpainted image: known context kept, the masked region filled by the model."""
        return images * (1 - mask) + self.generate(images, mask) * mask


def _args(spec: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={spec[k]!r}" if k in spec else f"no {k}" for k in keys)


def masked_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tau(x) with the mask as a fourth channel: the conditioning every model consumes."""
    mask = mask.expand(images.shape[0], 1, *images.shape[-2:])
    return torch.cat([images * (1 - mask), mask], dim=1)


def hole_weighted_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the hidden region plus a tenth of the context MSE.

    The hole is a small share of the pixels; weighting it keeps capacity on the part that is inpainted.
    """
    sq = (pred - target).pow(2)
    hole = (sq * mask).sum(dim=(1, 2, 3)) / (mask.sum() * sq.shape[1]).clamp_min(1)
    context = (sq * (1 - mask)).sum(dim=(1, 2, 3)) / ((1 - mask).sum() * sq.shape[1]).clamp_min(1)
    return hole + 0.1 * context
