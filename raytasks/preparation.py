"""The sweep's preparation as Ray work, into the shared cache: the image store is decoded by Ray tasks over the
cluster's CPUs; stages, audit backbone, reference features and calibration are built on a worker with a trial's
resources (a GPU node on a cluster, never the CPU-only head).

The driver only coordinates: it gets back what it logs and certifies (the references' figures and images, the
calibration, the forget digest, the stage keys) and, for one-worker GPU trials, one trial's measured peak memory.
"""

from __future__ import annotations

import logging
import logging.handlers
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn.config import Config
from unlearn.errors import ConfigError


@dataclass
class Preparation:
    node_id: str  # the Ray node that prepared (and filled the cache)
    calibration: dict[str, float]
    warnings: list[str]  # why the audit cannot decide, one line each (audit_warnings)
    forget_digest: str
    stage_keys: dict[str, str]
    references: dict[str, dict[str, float]]  # reference model -> its audited figures
    reference_files: dict[str, dict[str, bytes]]  # reference model -> outputs.png, embeddings.npz
    grid_rows: dict[str, bytes] = field(default_factory=dict)  # masked input and ground truth strips (PNG)
    peak_gpu_bytes: int | None = None  # one trial's peak (largest over the swept methods), when measured
    free_gpu_bytes: int | None = None


def prepare_here(config_dump: dict[str, Any], methods: list[str], measure_gpu: bool, node_id: str = "",
                 logged: frozenset[str] = frozenset()) -> Preparation:
    """Prepare (or load from the cache) and evaluate the reference models in this process, except those in `logged`
    (a resumed sweep reads their figures back from MLflow)."""
    import torch

    from raytasks.resources import measure_trial_peak
    from unlearn.audit.samples import reference_rows, save_png
    from unlearn.config import validate_config
    from unlearn.methods import REFERENCE_MODELS
    from unlearn.pipeline import audit_warnings, evaluate_reference, log_audit_warnings, prepare

    config = validate_config(config_dump)
    prepared = prepare(config)
    log_audit_warnings(prepared)  # on the driver, through the records queue
    references, files = {}, {}
    for ref in (r for r in REFERENCE_MODELS if r in prepared.stages and r not in logged):  # no retrain w/o audit.retrain
        references[ref] = evaluate_reference(prepared, ref)
        with tempfile.TemporaryDirectory() as folder:
            save_png(prepared.auditor.output_row(prepared.stages[ref].model), Path(folder) / "outputs.png")
            prepared.auditor.save_embeddings(prepared.stages[ref].model, Path(folder) / "embeddings.npz")
            files[ref] = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, row in reference_rows(prepared.data).items():
            rows[f"{name}.png"] = save_png(row, Path(folder) / f"{name}.png").read_bytes()
    peak = free = None
    if measure_gpu and prepared.device.type == "cuda":
        peak = max(measure_trial_peak(prepared, method) for method in methods)
        torch.cuda.empty_cache()
        free = int(torch.cuda.mem_get_info()[0])
    return Preparation(node_id, dict(prepared.auditor.calibration), audit_warnings(prepared),
                       prepared.data.forget_digest(config.data.dataset), {k: s.key for k, s in prepared.stages.items()},
                       references, files, rows, peak, free)


def ray_map_shards(fn: Callable, tasks: list) -> list:
    """The image store's decoding as Ray tasks, one per shard, over the cluster's CPUs (each writes its shard into
    the shared cache). A worker lost mid-shard is retried; a task's own error (an unreadable image, a full disk)
    is raised as itself."""
    import ray

    remote = ray.remote(fn).options(num_cpus=1, max_retries=2)
    refs = [remote.remote(task) for task in tasks]
    try:
        return ray.get(refs)
    except BaseException as exc:
        # The other tasks may still be writing their shards into the entry's temporary folder: wait until none runs,
        # so that the build's clean-up that follows leaves nothing behind. (Not ray.cancel: cancelling the running
        # tasks took the test session's own process down once.) The error is reported when every shard has ended.
        ray.wait(refs, num_returns=len(refs))
        if isinstance(exc, ray.exceptions.RayTaskError):
            raise exc.cause from None
        raise


def _data_task(config_dump: dict[str, Any]) -> dict[str, Any]:
    from unlearn.config import validate_config
    from unlearn.pipeline import load_data

    store = load_data(validate_config(config_dump), ray_map_shards, verify=True).store
    return {"store": store.key, "images": len(store), "built_seconds": store.built_seconds}


def _prepare_task(config_dump: dict[str, Any], methods: list[str], measure_gpu: bool,
                  logged: frozenset[str]) -> Preparation:
    import os

    import ray
    import torch

    # Ray pins a task's threads to its CPUs; nothing else runs while the sweep prepares, so use the node's cores
    torch.set_num_threads(os.cpu_count() or 1)
    return prepare_here(config_dump, methods, measure_gpu, ray.get_runtime_context().get_node_id(), logged)


def _logged(fn: Callable, records, level: int, *args):
    """Run `fn(*args)` with the log records of the library and of raytasks (at the driver's `level`) going to the
    queue `records` (None marks the end)."""
    handler = logging.handlers.QueueHandler(records)
    loggers = [logging.getLogger(name) for name in ("unlearn", "raytasks")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the driver prints them; not also this worker's own output
    try:
        return fn(*args)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        records.put(None)  # done: the driver stops reading


def run_on_worker(fn: Callable, args: tuple, cpus: float = 1, gpus: float = 0):
    """`fn(*args)` as a Ray task; its log records come back through a queue while it runs and are handled by the
    driver's loggers of the same names, and a ConfigError it raises is raised here as itself (one line, exit 2)."""
    import ray
    from ray.util.queue import Empty, Queue

    records = Queue(actor_options={"num_cpus": 0})
    level = logging.getLogger("unlearn").getEffectiveLevel()
    try:
        # max_retries: a worker node lost while preparing (a reclaimed spot node) is retried on another
        result = ray.remote(_logged).options(num_cpus=cpus, num_gpus=gpus, max_retries=2).remote(fn, records, level, *args)
        while True:
            try:
                record = records.get(timeout=2.0)
            except Empty:
                if ray.wait([result], timeout=0)[0]:
                    break
                continue
            if record is None:
                break
            logging.getLogger(record.name).handle(record)
        try:
            return ray.get(result)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ConfigError):  # e.g. stages.theta0 not found, an unreadable image
                raise exc.cause from None
            raise
    finally:
        records.shutdown()


def prepare_data_on_worker(config: Config) -> dict[str, Any]:
    """The image store (decoded by Ray tasks over the cluster's CPUs, or reused and verified) and the split, from a
    worker that sees the data root (never the CPU-only head)."""
    return run_on_worker(_data_task, (config.model_dump(mode="json", by_alias=True),))


def prepare_on_worker(config: Config, methods: list[str], use_gpu: bool, cpus: float, measure_gpu: bool,
                      logged: frozenset[str] = frozenset()) -> Preparation:
    """Run the preparation as a Ray task with one trial's CPUs and a whole GPU (when trials use GPUs): the autoscaler
    launches a worker for it like for any trial, and what it builds lands in the shared cache."""
    return run_on_worker(_prepare_task, (config.model_dump(mode="json", by_alias=True), methods, measure_gpu, logged),
                         cpus, 1 if use_gpu else 0)
