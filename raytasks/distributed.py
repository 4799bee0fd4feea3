"""Data-parallel unlearning in a Ray Train `TorchTrainer` (gloo on CPU, nccl on GPU).

Each worker draws the same global batches and keeps its shard (unlearn.data.BatchStream); gradients are
averaged with one all-reduce per step, which is DDP's semantics: W workers take exactly the step one worker
takes on the global batch (up to float summation order). The objectives call several model methods per step
(encode, loss, a frozen reference), so the averaging is done on the flattened gradients directly rather
than through `DistributedDataParallel`'s forward hooks.

Phase boundaries are checkpointed; after a worker failure Ray restarts the group from the last one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unlearn.config import Config, validate_config
from unlearn.methods import GradientSync

STATE_FILE = "state.pt"


class AllReduceSync(GradientSync):
    def __init__(self) -> None:
        self.world_size = dist.get_world_size()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:  # nothing to average: a one-worker group runs the bare loop
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_sync_device())
        dist.all_reduce(t)
        return float(t) / self.world_size

    def max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_sync_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def _sync_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, unlearn its shard, rank 0 audits and reports."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from raytasks.trial_outcome import finish_trial
    from unlearn.pipeline import prepare, unlearn

    torch.set_num_threads(loop_config.get("threads", 1))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config: Config = validate_config(loop_config["config"])
    prepared = prepare(config)  # every stage and reference comes from the shared cache
    prepared.device = ray.train.torch.get_device()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state_path = Path(folder) / STATE_FILE
            if state_path.is_file():
                resume = torch.load(state_path, map_location="cpu", weights_only=True)

    def on_checkpoint(state: dict[str, Any]) -> None:
        # Every rank holds the same state; rank 0 uploads it, all ranks report (the call is collective).
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            ckpt = Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report({"phase_done": state["next_phase"]}, checkpoint=ckpt)

    result = unlearn(prepared, loop_config["method"], config.unlearn, rank, world, AllReduceSync(),
                     on_checkpoint=on_checkpoint, resume=resume)
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            metrics, _ = finish_trial(prepared, result, loop_config["method"], Path(folder))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    else:
        ray.train.report({}, checkpoint=None)


def stage_worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: train the stages the cache lacks on this rank's shard of each global batch
    (gradients averaged every step: the one-worker run's steps); rank 0 writes them into the shared cache."""
    import ray.train
    import ray.train.torch

    from unlearn.pipeline import load_data
    from unlearn.stages import Shard, prepare_stages

    torch.set_num_threads(loop_config.get("threads", 1))
    context = ray.train.get_context()
    config: Config = validate_config(loop_config["config"])
    data = load_data(config)  # the store and split the sweep prepared before: nothing is decoded here
    shard = Shard(context.get_world_rank(), context.get_world_size(), AllReduceSync())
    prepare_stages(config, data, ray.train.torch.get_device(), shard=shard)
    ray.train.report({}, checkpoint=None)


def train_stages_data_parallel(config: Config, workers: int, storage_path: str, name: str, use_gpu: bool = False,
                               max_failures: int = 2) -> None:
    """Train the original, attack and retrain stages (those not cached) on `workers` Ray Train workers; a worker
    group restarted after a failure retrains the stage it was in (the finished ones are in the cache)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        stage_worker_loop,
        train_loop_config={"config": config.model_dump(mode="json", by_alias=True), "threads": 1},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)),
    ).fit()


def run_data_parallel(
    config: Config,
    method: str,
    workers: int,
    storage_path: str,
    name: str,
    folder: Path,
    use_gpu: bool = False,
    max_failures: int = 2,
) -> dict[str, Any]:
    """Run one unlearning method on `workers` Ray Train workers; return its metrics, its artifacts copied into
    `folder`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.model_dump(mode="json", by_alias=True), "method": method, "threads": 1},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is not None:
        result.checkpoint.to_directory(str(folder))
    return dict(result.metrics)
