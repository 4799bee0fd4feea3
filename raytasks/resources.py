"""What one trial asks Ray for and how many trials run at once, checked against the cluster before any trial starts.

One-worker trials share accelerators: each asks for `sweep.gpus_per_trial` of a GPU (default: as many trials per
GPU as the measured peak memory of one trial and the node's CPUs allow) and `sweep.cpus_per_trial` CPUs, which are
also its torch threads. Multi-worker trials keep whole GPUs, one Ray Train rank each; the trial itself holds almost
nothing (its workers hold the resources).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.config import Config
from unlearn.errors import ConfigError

# Per process: the CUDA context and allocator slack that torch's counters do not show (measured on an H100:
# about 0.5 GiB). Only GPU memory below this share of the card is planned for.
CUDA_CONTEXT_BYTES = 768 * 1024**2
USABLE_GPU_MEMORY = 0.9


def _autoscaler_spec() -> dict:
    """The node types of an autoscaling cluster: the config `ray up` leaves on the head (~/ray_bootstrap_config.yaml,
    or $UNLEARN_AUTOSCALER_CONFIG, which raytasks/local_cluster.py sets for its fake cluster), else {}."""
    bootstrap = Path(os.environ.get("UNLEARN_AUTOSCALER_CONFIG") or Path.home() / "ray_bootstrap_config.yaml")
    if not bootstrap.is_file():
        return {}
    import yaml

    return yaml.safe_load(bootstrap.read_text()) or {}


def node_shapes() -> list[dict[str, float]]:
    """The resources of each node (type) the cluster has or can launch: the autoscaler's node types, else the
    live nodes."""
    import ray

    shapes = [dict(node.get("resources") or {}) for node in (_autoscaler_spec().get("available_node_types") or {}).values()]
    return shapes if any(shapes) else [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def cluster_capacity() -> dict[str, float]:
    """Resources the cluster can ever hold: the autoscaler's maximum on a cluster, else what is there."""
    import ray

    spec = _autoscaler_spec()
    total: dict[str, float] = {}
    for name, node in (spec.get("available_node_types") or {}).items():
        count = 1 if name == spec.get("head_node_type") else node.get("max_workers", 0)
        for res, amount in (node.get("resources") or {}).items():
            total[res] = total.get(res, 0.0) + amount * count
    return total or dict(ray.cluster_resources())


@dataclass
class TrialPlan:
    resources: dict[str, float]  # what one Tune trial asks for
    concurrency: int  # trials in flight at once
    trials_per_gpu: int  # 1 unless one-worker trials share a GPU
    peak_gpu_bytes: int | None  # the measured peak of one trial (None: not measured)


def measure_trial_peak(prepared, method: str) -> int:
    """Peak GPU bytes of one short trial of `method` on the prepared data (allocator peak, plus the CUDA context)."""
    from unlearn.methods import hyperparameters
    from unlearn.pipeline import audit_result, unlearn

    # a short run: every declared step count cut to a few steps (the peak is reached in the first ones)
    settings = prepared.config.unlearn.model_copy(
        update={hp.field: min(getattr(prepared.config.unlearn, hp.field), 4) for hp in hyperparameters().values()
                if hp.kind is int})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    audit_result(prepared, unlearn(prepared, method, settings))
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_reserved()) + CUDA_CONTEXT_BYTES


def plan_trials(config: Config, workers: int, use_gpu: bool, capacity: dict[str, float],
                shapes: list[dict[str, float]], peak_gpu_bytes: int | None, gpu_bytes: int | None) -> TrialPlan:
    """Resources per trial and concurrency; ConfigError (exit 2) for requests no node can hold."""
    sweep = config.sweep
    cpus = sweep.cpus_per_trial
    most_cpus = max((s.get("CPU", 0.0) for s in shapes), default=0.0)
    if workers == 1 and cpus > most_cpus:
        raise ConfigError(f"sweep.cpus_per_trial {cpus:g} is more than any node has (at most {most_cpus:g} CPUs)")
    if sweep.gpus_per_trial is not None and workers > 1 and sweep.gpus_per_trial != 1:
        raise ConfigError(f"sweep.gpus_per_trial {sweep.gpus_per_trial:g} with {workers} workers per trial: multi-worker "
                          "trials hold whole GPUs (one per rank); leave it unset or 1")
    if sweep.gpus_per_trial is not None and sweep.gpus_per_trial > 1:
        raise ConfigError(f"sweep.gpus_per_trial {sweep.gpus_per_trial:g} is above 1: a one-worker trial uses one GPU "
                          "at most (use --workers for more)")
    unit = "GPU" if use_gpu else "CPU"
    have = capacity.get(unit, 0.0)
    if workers > 1:
        if workers > have:
            raise ConfigError(f"{workers} workers per trial need {workers} {unit}s; this cluster can hold at most {have:g}")
        return TrialPlan({"CPU": 0.01}, max(1, int(have // workers)), 1, None)  # the Ray Train workers hold the rest
    if not use_gpu:
        return TrialPlan({"CPU": cpus}, max(1, int(have // cpus)), 1, None)
    if have < 1:
        raise ConfigError(f"device cuda: this cluster has no GPU (at most {have:g})")
    gpu_node_cpus = max((s.get("CPU", 0.0) for s in shapes if s.get("GPU")), default=most_cpus)
    if cpus > gpu_node_cpus:
        raise ConfigError(f"sweep.cpus_per_trial {cpus:g} is more than any GPU node has (at most {gpu_node_cpus:g} CPUs)")
    if sweep.gpus_per_trial is not None:
        share = sweep.gpus_per_trial
    else:
        per_gpu_cpus = min((s.get("CPU", 0.0) / s["GPU"] for s in shapes if s.get("GPU")), default=cpus)
        by_cpu = max(1, int(per_gpu_cpus // cpus))
        by_memory = max(1, int(USABLE_GPU_MEMORY * gpu_bytes // peak_gpu_bytes)) if peak_gpu_bytes and gpu_bytes else 1
        share = 1.0 / min(by_cpu, by_memory)
    share = math.floor(share * 10_000) / 10_000  # Ray accepts GPU fractions to four decimals
    per_gpu = max(1, int(1 / share + 1e-9))
    concurrency = min(int(have) * per_gpu, max(1, int(capacity.get("CPU", cpus) // cpus)))
    return TrialPlan({"CPU": cpus, "GPU": share}, concurrency, per_gpu, peak_gpu_bytes)
