"""The one on-disk layout of a model, as diffusers models save themselves (no pickle):

    FOLDER/
      config.json         {"kind": ..., **the constructor's arguments}: what `I2IModel.from_pretrained` builds
      model.safetensors   the state dict; the provenance figures (floats) as its metadata, inside the hashed file

An `unlearn run --out` folder holds its model in `model/` (`unlearn.export`); `run_model_folder` finds it there, for
the export and for `stages.theta0` alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RUN_MODEL_FOLDER = "model"  # the model's folder inside an `unlearn run --out` folder
_OLDER = "written by an older version of unlearn; run `unlearn run --out` again to save it in the current layout"


def write_folder(folder: Path, spec: dict[str, Any], state: dict[str, torch.Tensor],
                 provenance: dict[str, float] | None = None) -> Path:
    """config.json (`spec`) and model.safetensors (`state`, `provenance` as metadata) into `folder`; return it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={k: repr(float(v)) for k, v in (provenance or {}).items()})
    return folder


def read_spec(folder: Path) -> dict[str, Any]:
    """config.json of a saved model: a JSON object with a `kind` (ConfigError naming the folder otherwise)."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder (a saved model is a folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
    if not path.is_file():
        raise ConfigError(f"{folder} has no {CONFIG_FILE} (not a folder written by `save_pretrained`)")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if "kind" not in spec:
        if "_class_name" in spec:  # the diffusers folder that VQ and diffusion bundles held before
            raise ConfigError(f"{folder} is a diffusers folder without a model kind: {_OLDER}")
        raise ConfigError(f"{path} names no model kind")
    return spec


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in model.safetensors (ConfigError if it is missing or not a safetensors file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"the weights in {path} cannot be read: {str(exc).splitlines()[0][:200]}") from None


def load_provenance(folder: Path) -> dict[str, float]:
    """The provenance figures saved with the weights of `folder` ({} when there are none)."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        meta = handle.metadata() or {}
    figures = {}
    for key, text in meta.items():
        try:
            figures[key] = float(text)
        except ValueError:  # not a figure (e.g. a "format" entry that other writers add)
            continue
    return figures


def run_model_folder(folder: Path) -> Path | None:
    """The model folder `folder/model/` of an `unlearn run --out` folder; None when `folder` holds none;
    ConfigError for a run folder of an older version (weights at its root, or a diffusers folder `model/`)."""
    model = folder / RUN_MODEL_FOLDER
    if (model / CONFIG_FILE).is_file():
        read_spec(model)  # a diffusers folder of an older version names no kind
        return model
    if model.is_dir() and any(model.glob("diffusion_pytorch_model*")):
        raise ConfigError(f"{model} is a diffusers folder without {CONFIG_FILE}: {_OLDER}")
    if (folder / WEIGHTS_FILE).is_file() and (folder / "config.yaml").is_file() and not model.exists():
        raise ConfigError(f"{folder} holds {WEIGHTS_FILE} at its root: {_OLDER}")
    return None
