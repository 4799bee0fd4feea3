"""Device, precision and seeding: the few facts every training or evaluation step needs."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from unlearn.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the config imports the method registry, which imports this
    from unlearn.config import Config


def resolve_device(config: Config) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return torch.device(config.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision on GPUs where asked for; on the CPU (tests, CI) everything runs in fp32."""
    if precision == "fp32" or device.type == "cpu":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def import_before_timing(*, audit: bool = False) -> None:
    """Import what a timed region would otherwise import at its first use, so that no stage's, unlearning run's or
    audit's seconds include a one-off import: torch.optim imports torch._dynamo at a process's first optimiser
    (~2.5 s on 2 cores), the audit torchmetrics, scikit-learn and scipy (~4 s more). Idempotent: once per process."""
    import torch._dynamo  # noqa: F401

    if audit:
        import scipy.stats  # noqa: F401
        import sklearn.metrics  # noqa: F401
        import sklearn.neighbors  # noqa: F401
        import torchmetrics.image.fid  # noqa: F401
