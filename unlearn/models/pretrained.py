"""Loading user-supplied weights: a checkpoint file (state dict) or a diffusers `from_pretrained` folder."""

from __future__ import annotations

from pathlib import Path

import torch

from unlearn.config import ConfigError
from unlearn.models.base import I2IModel


def load_pretrained(model: I2IModel, source: str, key: str = "model.pretrained") -> None:
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"pretrained weights not found: {path} ({key})")
    if path.is_dir():
        loader = getattr(model, "load_diffusers_folder", None)
        if loader is None:
            raise ConfigError(f"{key} {path} is a folder, but this model kind loads only checkpoint files")
        loader(path)
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
