"""Benchmarks, measured side by side in one run: unlearning vs retraining, orchestration and sweep overhead, CPU
threads vs processes, evaluation throughput. Prints small tables and writes DIR/bench.json.

    python analysis/bench.py --out bench-out                 # CPU, default preset (a few minutes)
    python analysis/bench.py --out bench-out --device cuda   # the same on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from unlearn.config import Config, ConfigError, load_config, with_overrides  # noqa: E402
from unlearn.methods import METHODS  # noqa: E402

WARMUP_STEPS = 20


# --- the measured loop, identical in every environment ----------------------------------------------------
def timed_loop(config_dict: dict, steps: int, rank: int = 0, world: int = 1, sync=None) -> dict[str, float]:
    """Prepare from the cache and run `steps` fine-tuning steps; wall-clock stamps of each step."""
    from unlearn.config import validate_config
    from unlearn.pipeline import prepare, unlearn

    entered = time.time()
    config = validate_config(config_dict)
    prepared = prepare(config, log=lambda _: None)
    stamps: list[float] = []
    settings = with_overrides(config, {"unlearn.ft_steps": steps}).unlearn
    unlearn(prepared, "finetune", settings, rank, world, sync, on_step=lambda *_: stamps.append(time.time()))
    steady = (len(stamps) - 1 - WARMUP_STEPS) / (stamps[-1] - stamps[WARMUP_STEPS])
    return {"entered": entered, "first_step": stamps[0], "steady_steps_per_second": steady}


def _tune_trainable(config: dict) -> None:
    from ray import tune

    torch.set_num_threads(1)
    tune.report(timed_loop(config["config"], config["steps"]))


def _train_worker(config: dict) -> None:
    import ray.train

    from raytasks.distributed import AllReduceSync

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    out = timed_loop(config["config"], config["steps"], ctx.get_world_rank(), ctx.get_world_size(), AllReduceSync())
    # Ray Train V2 keeps a result's metrics only together with a checkpoint: rank 0 attaches a tiny one.
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "timing.json").write_text(json.dumps(out))
        checkpoint = ray.train.Checkpoint.from_directory(folder) if ctx.get_world_rank() == 0 else None
        ray.train.report(out, checkpoint=checkpoint)


def orchestration(config: Config, steps: int, storage: str) -> dict[str, Any]:
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = config.model_dump(mode="json", by_alias=True)
    rows: dict[str, Any] = {}
    torch.set_num_threads(1)  # every variant runs its loop on one thread: a like-for-like comparison
    launched = time.time()
    bare = timed_loop(cfg, steps)
    rows["bare"] = {**bare, "launched": launched}

    launched = time.time()
    trainable = tune.with_resources(_tune_trainable, {"CPU": 1})
    grid = tune.Tuner(trainable, param_space={"config": cfg, "steps": steps},
                      run_config=tune.RunConfig(name="bench-tune", storage_path=storage, verbose=0)).fit()
    rows["tune_trial"] = {**grid[0].metrics, "launched": launched}

    backend = "nccl" if config.device == "cuda" else "gloo"
    skipped: dict[str, Any] = {}
    for workers in (1, 2):
        if config.device == "cuda" and workers > torch.cuda.device_count():
            # NCCL ranks hold a whole GPU each: never wait for resources this machine does not have
            skipped[f"ray_train_{workers}"] = {"skipped": f"needs {workers} GPUs, this machine has {torch.cuda.device_count()}"}
            continue
        launched = time.time()
        trainer = TorchTrainer(_train_worker, train_loop_config={"config": cfg, "steps": steps},
                               torch_config=TorchConfig(backend=backend),
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.device == "cuda"),
                               run_config=RunConfig(name=f"bench-train-{workers}", storage_path=storage))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            timing = json.loads((Path(folder) / "timing.json").read_text())
        rows[f"ray_train_{workers}"] = {**timing, "launched": launched}
    table: dict[str, Any] = {}
    for name, r in rows.items():
        table[name] = {"startup_seconds": r["first_step"] - r["launched"],
                       "steady_steps_per_second": r["steady_steps_per_second"]}
    return {**table, **skipped}


def _loop_with_threads(config_dict: dict, steps: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    return timed_loop(config_dict, steps)


def cpu_threads(config: Config, steps: int) -> dict[str, Any]:
    """The fine-tuning loop on this machine's cores, two ways: one process with a torch thread per core, and one
    1-thread process per core at once (what 1-CPU sweep trials and the test suite's workers do). Summed steady
    steps per second; the ratio says which way uses the cores better."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # usable ones
    cfg = config.model_dump(mode="json", by_alias=True)
    spawn = multiprocessing.get_context("spawn")  # fresh processes: no thread pool inherited from this one
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        alone = pool.submit(_loop_with_threads, cfg, steps, cores).result()["steady_steps_per_second"]
    with ProcessPoolExecutor(cores, mp_context=spawn) as pool:
        each = [f.result()["steady_steps_per_second"]
                for f in [pool.submit(_loop_with_threads, cfg, steps, 1) for _ in range(cores)]]
    return {"cores": cores, "one_process_steps_per_second": alone, "one_thread_processes_steps_per_second": sum(each),
            "processes_over_threads": sum(each) / alone}


def unlearning_vs_retraining(config: Config, prepared, best: dict[str, Any]) -> dict[str, Any]:
    """Retrain from scratch and every method, timed in this process (same data, machine, run)."""
    from unlearn.methods import objectives as obj
    from unlearn.methods.loop import Phase
    from unlearn.models import build_model
    from unlearn.pipeline import audit_result, unlearn
    from unlearn.runtime import import_before_timing
    from unlearn.stages import _epoch_steps, _train

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    s = config.stages
    steps = _epoch_steps(len(prepared.data.retain_train), s.batch_size, s.epochs)
    torch.manual_seed(config.seed)
    model = build_model(config).to(prepared.device)
    import_before_timing()  # with cached stages, this retrain is the process's first optimiser
    start = time.perf_counter()
    samples = _train(config, model, prepared.data, Phase("retrain", obj.fit("retain"), ("retain",), steps, s.lr),
                     {"retain": prepared.data.retain_train}, config.seed + 2)
    retrain_seconds = time.perf_counter() - start
    rows = {"retrain": {"seconds": retrain_seconds, "samples": samples}}
    for name, method in METHODS.items():
        if method.reference_stage:
            continue
        settings = with_overrides(config, {f"unlearn.{k}": v for k, v in best.items()}).unlearn if name == "realistic" else None
        result = unlearn(prepared, name, settings)
        metrics = audit_result(prepared, result)
        rows[name] = {"seconds": result.seconds, "samples": metrics["unlearn_samples"],
                      "forget_marker_strength": metrics.get("forget_marker_strength"),
                      "forget_marker": metrics.get("forget_marker"), "retain_mse": metrics.get("retain_mse"),
                      "feasible": metrics.get("feasible")}
    for row in rows.values():
        row["time_ratio_vs_retrain"] = row["seconds"] / retrain_seconds
        row["sample_ratio_vs_retrain"] = row["samples"] / samples
    return rows


def sweep_efficiency(config: Config, prepared, out: Path, methods: str | None, trials: int | None) -> dict[str, Any]:
    """The sweep as users run it (default: every method, sweep.trials each, plus the confirmation trials), timed end
    to end; then every trial it ran is re-run alone here on the idle device.

    sweep_efficiency = summed unlearning seconds of those solo re-runs / (sweep wall time x slots), where slots are
    the GPUs on a GPU and the concurrent trial slots on a CPU: the share of the sweep's device time spent unlearning.
    """
    from ray.tune import ExperimentAnalysis

    from raytasks.driver import EXPERIMENT
    from raytasks.sweep import parse_args, run_sweep
    from unlearn.pipeline import unlearn

    cache = config.resolved_cache_dir()
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("tensors.pt")}
    argv = ["--name", "bench-sweep", "--out", str(out / "bench-sweep"), "--tracking-uri", f"sqlite:///{out}/bench-mlflow.db",
            "--no-report", "--set", f"cache_dir={cache}", "--set", f"device={config.device}"]
    argv += ["--methods", methods] if methods else []
    argv += ["--trials", str(trials)] if trials else []
    import ray

    ray.shutdown()  # the sweep starts its own Ray, sized to this machine, as `python raytasks/sweep.py` does
    os.environ["UNLEARN_LOCAL_RAY"] = "1"
    started = time.time()
    driver = run_sweep(parse_args(argv))
    sweep_seconds = time.time() - started
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("tensors.pt")}
    written: dict[str, int] = {}
    for path in after:
        if before.get(path) != after[path]:  # new or rewritten cache entries, by kind (stages, references, ...)
            written[path.parent.parent.name] = written.get(path.parent.parent.name, 0) + 1
    results = [t.last_result for t in ExperimentAnalysis(f"{driver.storage}/{EXPERIMENT}").trials if t.last_result]
    torch.set_num_threads(max(1, int(driver.plan.resources["CPU"])))  # as each trial ran
    solo = 0.0
    for result in results:
        point = dict(result["config"])
        method = point.pop("method")
        point.pop("confirms", None)
        solo += unlearn(prepared, method, with_overrides(config, {f"unlearn.{k}": v for k, v in point.items()}).unlearn).seconds
    slots = int(ray.cluster_resources().get("GPU", 0)) if driver.use_gpu else driver.concurrency  # devices or slots
    return {
        "trials": len(results),
        "sweep_seconds": sweep_seconds,
        "slots": slots,
        "concurrency": driver.concurrency,
        "trials_per_gpu": driver.plan.trials_per_gpu,
        "peak_in_flight": driver.progress.peak_in_flight,
        "solo_unlearn_seconds": solo,
        "sweep_efficiency": solo / (sweep_seconds * slots),
        "mean_trial_seconds": statistics.mean(r["time_total_s"] for r in results),
        "cache_entries_written": written,  # {} on a warm cache: no stage, reference or calibration recomputed
    }


def cli_overhead(config: Config) -> dict[str, float]:
    """`unlearn run --method realistic --json` as a user types it: wall time beyond the unlearning and the audit
    (interpreter start, imports, loading the cached setup, printing)."""
    import subprocess

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "unlearn.cli", "run", "--method", "realistic", "--json",
                           "--set", f"cache_dir={config.resolved_cache_dir()}", "--set", f"device={config.device}"],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    work = metrics["unlearn_seconds"] + metrics["audit_seconds"]
    return {"wall_seconds": wall, "unlearn_seconds": metrics["unlearn_seconds"], "audit_seconds": metrics["audit_seconds"],
            "overhead_seconds": wall - work}


def evaluation_throughput(prepared, models: int = 4) -> dict[str, float]:
    """The whole catalogue on `models` distinct models (theta0 with seeded weight noise: nothing can be reused
    between them), after one warm-up; images = the evaluated splits' images per catalogue."""
    import copy

    base = prepared.stages["attack"].model
    distinct = []
    for i in range(models):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1e-3 * torch.randn(param.shape, generator=generator).to(param.device))
        distinct.append(model)
    prepared.auditor.evaluate(base)  # warm-up
    images = sum(len(s) for s in prepared.data.eval_splits().values())
    if prepared.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for model in distinct:
        prepared.auditor.evaluate(model)
    seconds = (time.perf_counter() - start) / models
    return {"images": images, "models": models, "seconds_per_catalogue": seconds, "eval_images_per_second": images / seconds}


def _best_realistic(config: Config, experiment: str | None, uri: str | None) -> dict[str, Any]:
    """The best feasible realistic configuration of a sweep in MLflow, else the preset's own values."""
    if experiment:
        from analysis.runs import load_sweep

        best = load_sweep(experiment, uri).best_trials().set_index("method")
        if "realistic" in best.index:
            row = best.loc["realistic"]
            return {hp: (int(float(row[f"params.{hp}"])) if hp.endswith("steps") else float(row[f"params.{hp}"]))
                    for hp in METHODS["realistic"].hyperparameters}
    values = config.unlearn.model_dump()
    return {hp: values[hp] for hp in METHODS["realistic"].hyperparameters}


def _print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    cols = sorted({k for r in rows.values() for k in r})
    print("| name | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, row in rows.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="digits-ae")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=300, help="loop steps per orchestration variant")
    p.add_argument("--sweep-methods", default=None, help="the measured sweep's methods (default: sweep.methods)")
    p.add_argument("--sweep-trials", type=int, default=None, help="its trials per method (default: sweep.trials)")
    p.add_argument("--experiment", default=None, help="take realistic's best feasible configuration from this sweep")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--only", default="cost,orchestration,threads,sweep,cli,eval", help="comma-separated subset to run")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    # the steady rate of the looped variants is measured after the warm-up steps
    if only & {"orchestration", "threads"} and args.steps < WARMUP_STEPS + 2:
        print(f"bench: error: --steps must be at least {WARMUP_STEPS + 2} ({WARMUP_STEPS} warm-up steps)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, [*args.set, f"device={args.device}"])
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = with_overrides(config, {"cache_dir": str(config.resolved_cache_dir())})

    from unlearn.pipeline import prepare

    if only & {"orchestration", "sweep"}:  # Ray only where measured: `--only cost,eval` runs without it
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0)
    prepared = prepare(config)
    results: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "config": config.name,
                               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    if "cost" in only:
        best = _best_realistic(config, args.experiment, args.tracking_uri)
        rows = unlearning_vs_retraining(config, prepared, best)
        _print_table("Unlearning vs retraining (same data, machine, run)", rows)
        results["unlearning_vs_retraining"] = rows
        results["realistic_config"] = best
        results["cost_ratio"] = rows["realistic"]["time_ratio_vs_retrain"]
    if "orchestration" in only:
        with tempfile.TemporaryDirectory() as storage:
            table = orchestration(config, args.steps, storage)
        _print_table(f"Orchestration overhead ({args.steps} fine-tuning steps, steady state after {WARMUP_STEPS})", table)
        results["orchestration"] = table
        results["train_overhead_ratio"] = table["bare"]["steady_steps_per_second"] / table["ray_train_1"]["steady_steps_per_second"]
    if "threads" in only and args.device == "cpu":
        results["cpu_threads"] = cpu_threads(config, args.steps)
        _print_table(f"CPU threads: one process on every core vs one 1-thread process per core ({args.steps} fine-tuning "
                     "steps each)", {"fine-tuning": results["cpu_threads"]})
        results["processes_over_threads"] = results["cpu_threads"]["processes_over_threads"]
    if "sweep" in only:
        results["sweep"] = sweep_efficiency(config, prepared, out, args.sweep_methods, args.sweep_trials)
        _print_table("Sweep (as users run it) and its trials re-run alone", {"sweep": results["sweep"]})
        results["sweep_seconds"] = results["sweep"]["sweep_seconds"]
        results["sweep_efficiency"] = results["sweep"]["sweep_efficiency"]
    if "cli" in only:
        results["cli"] = cli_overhead(config)
        _print_table("unlearn run --method realistic --json (wall time beyond unlearning and audit)", {"cli": results["cli"]})
        results["cli_overhead_seconds"] = results["cli"]["overhead_seconds"]
    if "eval" in only:
        results["evaluation"] = evaluation_throughput(prepared)
        _print_table("Evaluation throughput (cached reference features)", {"catalogue": results["evaluation"]})
        results["eval_images_per_second"] = results["evaluation"]["eval_images_per_second"]
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    from unlearn.cli import exit_with

    exit_with(main())
