"""Loading user-supplied weights (`model.pretrained`, `stages.theta0`): a checkpoint file (a state dict), a folder
written by `I2IModel.save_pretrained`, or a folder in another library's layout that the model kind reads
(`I2IModel.load_external_folder`: the diffusers `from_pretrained` folder of the VQ or diffusion model's submodule)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unlearn.errors import ConfigError
from unlearn.models.base import I2IModel
from unlearn.models.io import read_spec


def load_pretrained(model: I2IModel, source: str, key: str = "model.pretrained") -> None:
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"pretrained weights not found: {path} ({key})")
    if path.is_dir():
        if _saved_by_unlearn(path):
            model.load_weights(path)
        else:
            model.load_external_folder(path, key)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a checkpoint, or one that needs pickle beyond tensors
        raise ConfigError(f"{key} {path} is not a weights-only checkpoint ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{key} {path} does not match the model: {str(exc).splitlines()[0][:200]}") from None


def load_diffusers_submodule(module: nn.Module, model_class: type, folder: Path, key: str) -> None:
    """Load into `module` the weights of the diffusers `from_pretrained` folder of a `model_class` (e.g. VQModel)."""
    try:
        loaded = model_class.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:  # no config.json or weights, or a config of another model class
        raise ConfigError(f"{key} {folder} is not a diffusers {model_class.__name__} folder: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    try:
        module.load_state_dict(loaded.state_dict())
    except RuntimeError as exc:
        raise ConfigError(f"{key} {folder} does not match the model: {str(exc).splitlines()[0][:200]}") from None


def _saved_by_unlearn(folder: Path) -> bool:
    """Whether `folder` holds a config.json that names a model kind (a diffusers config.json names a class)."""
    try:
        read_spec(folder)
    except ConfigError:
        return False
    return True
