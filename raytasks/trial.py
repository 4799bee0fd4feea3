"""The Tune trial: one method on one set of hyperparameters, in-process (1 worker) or on Ray Train."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from raytasks.search import CONFIRMS_KEY, METHOD_KEY
from raytasks.trial_outcome import failed_trial, finish_trial
from unlearn.config import validate_config, with_overrides


def trial_config(spec: dict[str, Any], params: dict[str, Any]):
    return with_overrides(validate_config(spec["config"]), {f"unlearn.{k}": v for k, v in params.items()})


def run_trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """Function trainable (wrapped with tune.with_parameters): reports one sanitised result + artifacts.

    `params` is what `SweepSearch` suggested: the method, its hyperparameters, and for a confirmation trial the
    trial it confirms and the unlearning seed (`seed` -> unlearn.seed)."""
    from ray import tune
    from ray.tune import Checkpoint

    torch.set_num_threads(spec["threads"])
    method = params[METHOD_KEY]
    config = trial_config(spec, {k: v for k, v in params.items() if k not in (METHOD_KEY, CONFIRMS_KEY)})
    # the trial's artifacts: tune.report copies them into the run's storage before it returns, so the folder goes
    with tempfile.TemporaryDirectory(prefix="trial-") as scratch:
        folder = Path(scratch) / "artifacts"
        folder.mkdir()
        if spec["workers"] > 1:
            from raytasks.distributed import run_data_parallel

            context = tune.get_context()
            metrics = run_data_parallel(
                config, method, spec["workers"], spec["storage_path"], f"{context.get_trial_name()}-train", folder,
                use_gpu=spec["use_gpu"],
            )
        else:
            from unlearn.pipeline import prepare_warm, unlearn

            prepared = prepare_warm(config)  # from this process's memo or the cache: nothing is trained here
            try:
                metrics, _ = finish_trial(prepared, unlearn(prepared, method), method, folder)
            except torch.cuda.OutOfMemoryError:  # trials share the GPU: this one did not fit beside the others
                import traceback

                torch.cuda.empty_cache()
                folder = Path(scratch) / "failed"  # not beside what the audit wrote before it ran out (curves.json)
                folder.mkdir()
                metrics, _ = failed_trial(prepared, "out of GPU memory while sharing the GPU:\n" + traceback.format_exc(),
                                          folder)
        import ray

        # where it ran (MLflow tag `node_id`): on a cluster, which node each trial used
        tune.report({**metrics, "node_id": ray.get_runtime_context().get_node_id()},
                    checkpoint=Checkpoint.from_directory(str(folder)))
