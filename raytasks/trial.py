"""The Tune trial: one method on one set of hyperparameters, in-process (1 worker) or on Ray Train."""

from __future__ import annotations

from typing import Any

import torch

from raytasks.outcome import finish_trial
from unlearn.config import validate_config, with_overrides


def trial_config(spec: dict[str, Any], params: dict[str, Any]):
    return with_overrides(validate_config(spec["config"]), {f"unlearn.{k}": v for k, v in params.items()})


def run_trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """Function trainable (wrapped with tune.with_parameters): reports one sanitised result + artifacts."""
    from ray import tune
    from ray.tune import Checkpoint

    torch.set_num_threads(spec["threads"])
    method = spec["method"]
    if "point" in params:  # a confirmation trial names its method: {"point": {"method", "confirms", hps, "seed"}}
        method = params["point"]["method"]
        params = {k: v for k, v in params["point"].items() if k not in ("method", "confirms")}
    config = trial_config(spec, params)
    if spec["workers"] > 1:
        from raytasks.distributed import run_data_parallel

        context = tune.get_context()
        metrics, folder = run_data_parallel(
            config, method, spec["workers"], spec["storage_path"], f"{context.get_trial_name()}-train",
            use_gpu=spec["use_gpu"],
        )
    else:
        from unlearn.pipeline import prepare, unlearn

        prepared = prepare(config, log=lambda _: None)  # every stage and reference comes from the cache
        metrics, folder = finish_trial(prepared, unlearn(prepared, method), method)
    tune.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
