"""Benchmarks, measured side by side in one run: unlearning vs retraining, orchestration and sweep overhead, CPU
threads vs processes, evaluation throughput, and the data path. Prints small tables and writes DIR/bench.json.

    python analysis/bench.py --out bench-out                 # CPU, default preset (a few minutes)
    python analysis/bench.py --out bench-out --device cuda   # the same on a GPU machine
    python analysis/bench.py --only data --out bench-out --config imagenet-vqgan \
        --set data.root=ROOT --set data.forget_classes=[0-9] --set data.retain_classes=[10-39] ...
        # the image store and trial processes on any ImageFolder (without data.root: a generated one, --images)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unlearn.config import Config, load_config, with_overrides  # noqa: E402
from unlearn.errors import ConfigError  # noqa: E402
from unlearn.logs import configure as configure_logging  # noqa: E402
from unlearn.methods import METHODS  # noqa: E402

WARMUP_STEPS = 20


# --- the measured loop, identical in every environment ----------------------------------------------------
def timed_loop(config_dict: dict, steps: int, rank: int = 0, world: int = 1, sync=None) -> dict[str, float]:
    """Prepare from the cache and run `steps` fine-tuning steps; wall-clock stamps of each step."""
    from unlearn.config import validate_config
    from unlearn.pipeline import prepare, unlearn

    entered = time.time()
    config = validate_config(config_dict)
    prepared = prepare(config)
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
    from unlearn.models import build_model
    from unlearn.pipeline import audit_result, unlearn
    from unlearn.runtime import import_before_timing
    from unlearn.stages import train_retrain

    torch.manual_seed(config.seed)
    model = build_model(config).to(prepared.device)
    import_before_timing()  # with cached stages, this retrain is the process's first optimiser
    start = time.perf_counter()
    samples = train_retrain(config, model, prepared.data)
    retrain_seconds = time.perf_counter() - start
    rows = {"retrain": {"seconds": retrain_seconds, "samples": samples}}
    for name in METHODS:
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


# --- the data path ---------------------------------------------------------------------------------------
DATA_SAMPLE_S = 0.02  # how often a sampled process's /proc/PID/status is read
DATA_SLOW_SAMPLE_S = 0.25  # how often its Pss and its process tree are


def _decode_share(root: str, items: list[str], size: int) -> float:
    """Decode and resize `items` in a tight loop, nothing else (what preparation is measured against)."""
    from unlearn.data.sources import decode

    started = time.perf_counter()
    for _ in decode("imagefolder", root, items, size):
        pass
    return time.perf_counter() - started


def decode_limit(root: str, items: list[str], size: int, cores: int) -> float:
    """Images per second: the same decode and resize of the same files, on every usable core at once (one warm
    process per core, each with an equal share)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_decode_share, [root] * cores, [items[i : i + 1] for i in range(cores)], [size] * cores))  # warm
        started = time.perf_counter()
        list(pool.map(_decode_share, [root] * cores, [items[i::cores] for i in range(cores)], [size] * cores))
        return len(items) / (time.perf_counter() - started)


def _status(pid: int, pss: bool) -> dict[str, int]:
    """RssAnon, VmRSS (kB, /proc/PID/status) and, with `pss`, Pss and its file-backed part Pss_File (kB,
    /proc/PID/smaps_rollup) of a live process, else {}."""
    figures: dict[str, int] = {}
    sources = [(f"/proc/{pid}/status", ("RssAnon:", "VmRSS:"))] + [(f"/proc/{pid}/smaps_rollup", ("Pss:", "Pss_File:"))] * pss
    try:
        for path, keys in sources:
            for line in Path(path).read_text().splitlines():
                if line.startswith(keys):
                    figures[line.split(":")[0]] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return figures


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        out.append(stack.pop())
        stack.extend(children.get(out[-1], []))
    return out


def _sampled(procs: list, tree: bool = False, pss: bool = False) -> dict[str, float]:
    """Sample processes (Popen or multiprocessing) until they exit; peak MB of each figure, per process and summed
    over them at each instant (`tree`: each with its descendants, summed; `pss`: Pss too).

    The sampler must not take the cores it measures: /proc/PID/status is cheap and read every DATA_SAMPLE_S, but a
    torch process's smaps_rollup costs ~17 ms of CPU and a walk of /proc ~3 ms, so those are read every
    DATA_SLOW_SAMPLE_S (Pss and the process tree change slowly: page cache, worker start)."""
    peaks: dict[str, float] = {}
    pids: list[list[int]] = []
    slow_due = 0.0
    while any((p.poll() if hasattr(p, "poll") else p.exitcode) is None for p in procs):
        slow = time.perf_counter() >= slow_due
        if slow:
            slow_due = time.perf_counter() + DATA_SLOW_SAMPLE_S
            pids = [(_tree(proc.pid) if tree else [proc.pid]) for proc in procs]
        total: dict[str, float] = {}
        for i, tree_pids in enumerate(pids):
            for pid in tree_pids:
                for key, kb in _status(pid, pss and slow).items():
                    total[key] = total.get(key, 0.0) + kb / 1024
                    if not tree:
                        peaks[f"{key}{i}"] = max(peaks.get(f"{key}{i}", 0.0), kb / 1024)
        for key, mb in total.items():
            peaks[f"{key}sum"] = max(peaks.get(f"{key}sum", 0.0), mb)
        time.sleep(DATA_SAMPLE_S)
    return peaks


def prepare_store_process(args: list[str], cache: Path) -> dict[str, float]:
    """`unlearn prepare --data-only` in a fresh process (as a user runs it): its own figures, and the peak RSS of its
    process tree (the command and its decoding workers) sampled meanwhile."""
    import subprocess

    argv = [sys.executable, "-m", "unlearn.cli", "prepare", "--data-only", "--json", *args, "--set", f"cache_dir={cache}"]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        peaks = _sampled([proc], tree=True)
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(argv)} failed with exit code {proc.returncode}")
        out.seek(0)
        figures = json.loads(out.read().strip().splitlines()[-1])
    return {**figures, "peak_rss_mb": peaks.get("VmRSSsum", math.nan)}


def _prepare_setup(config_dict: dict) -> None:
    from unlearn.config import validate_config
    from unlearn.pipeline import prepare

    prepare(validate_config(config_dict))


def _prepare_process(config: Config) -> None:
    """`prepare` in a process of its own: the bench's process must not map the store, or the pages it read would
    count in the trials' PSS as shared with it (one trial's share of them halved, two trials' a third each)."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_prepare_setup,
                                                        args=(config.model_dump(mode="json", by_alias=True),))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"preparing the trials' setup failed (exit code {proc.exitcode})")


def _trial_process(config_dict: dict, method: str, result_path: str) -> None:
    """One sweep trial in a fresh process on a warm cache: prepare_warm, unlearn, audit. Imports come first (a trial
    worker process has them already); its first step is timed from the trial's start."""
    torch.set_num_threads(1)
    from unlearn.config import validate_config
    from unlearn.pipeline import audit_result, prepare_warm, unlearn
    from unlearn.runtime import import_before_timing

    import_before_timing(audit=True)
    imports_private_mb = _status(os.getpid(), False)["RssAnon"] / 1024  # the runtime's own: torch, the libraries
    entered = time.perf_counter()
    prepared = prepare_warm(validate_config(config_dict))
    if trained := [name for name, stage in prepared.stages.items() if not stage.reused]:
        raise RuntimeError(f"the trial trained {trained}: its setup was not prepared, so its figures would be a build's")
    first: list[float] = []
    result = unlearn(prepared, method, on_step=lambda *_: first or first.append(time.perf_counter()))
    metrics = audit_result(prepared, result)
    Path(result_path).write_text(json.dumps({"first_step_seconds": first[0] - entered, "imports_private_mb": imports_private_mb,
                                             "images_read": metrics["unlearn_images_read_per_rank"]}))


def trial_processes(config: Config, method: str, count: int, folder: Path) -> dict[str, Any]:
    """`count` trial processes started together, sampled: each one's peak private memory (RssAnon) and the peak of
    their summed PSS (pages shared through the page cache count once, split between the processes), in all and its
    file-backed part (the store's pages, the libraries' code)."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    paths = [folder / f"trial-{i}.json" for i in range(count)]
    procs = [spawn.Process(target=_trial_process, args=(config.model_dump(mode="json", by_alias=True), method, str(p)))
             for p in paths]
    for proc in procs:
        proc.start()
    peaks = _sampled(procs, pss=True)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a trial process failed (exit code {proc.exitcode})")
    results = [json.loads(p.read_text()) for p in paths]
    return {"private_mb": [peaks[f"RssAnon{i}"] for i in range(count)], "pss_mb_sum": peaks["Psssum"],
            "file_pss_mb_sum": peaks["Pss_Filesum"], "first_step_seconds": [r["first_step_seconds"] for r in results],
            "imports_private_mb": [r["imports_private_mb"] for r in results]}


def _store_bytes(cache: Path) -> tuple[int, int]:
    """(bytes of every file of the one store under `cache`, its pixel bytes)."""
    entry = next((cache / "stores").glob("*/meta.json")).parent
    meta = json.loads((entry / "meta.json").read_text())
    size = meta["image_size"]
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()), meta["count"] * 3 * size * size


def data_path(config: Config, args: list[str], out: Path, reps: int, method: str) -> dict[str, Any]:
    """The image store's preparation against the decode limit (side by side, alternating, `reps` times each), its
    size, and trial processes on a warm store: a quarter of the images per class against all, and two at once."""
    import shutil

    from unlearn.data.sources import list_images
    from unlearn.data.store import usable_cores

    listing = list_images(config.data)
    cores, size = usable_cores(), config.data.image_size
    limits, prepares = [], []
    for rep in range(reps):
        limits.append(decode_limit(listing.root, listing.items, size, cores))
        cache = out / f"data-cache-{rep}"
        shutil.rmtree(cache, ignore_errors=True)
        prepares.append(prepare_store_process(args, cache))
        if rep + 1 < reps:
            shutil.rmtree(cache)
    limit, prepared = statistics.median(limits), statistics.median(p["data_prepare_images_per_second"] for p in prepares)
    # each preparation against the limit measured just before it: this machine's speed drifts over minutes (the
    # same decode loop measured 380-540 us an image in consecutive processes), so pairs are compared, not medians
    paired = statistics.median(p["data_prepare_images_per_second"] / lim for p, lim in zip(prepares, limits, strict=True))
    store_bytes, pixel_bytes = _store_bytes(out / f"data-cache-{reps - 1}")
    rows: dict[str, Any] = {
        "images": len(listing.items), "image_size": size, "cores": cores,
        "data_decode_limit_images_per_second": limit, "data_prepare_images_per_second": prepared,
        "prepare_over_limit": paired, "data_prepare_peak_rss_mb": max(p["peak_rss_mb"] for p in prepares),
        "store_bytes_over_pixel_bytes": store_bytes / pixel_bytes,
        "runs": {"decode_limit_images_per_second": limits,
                 "prepare_images_per_second": [p["data_prepare_images_per_second"] for p in prepares]},
    }
    # trial processes: everything prepared once per setup (store reused, stages, references), then measured
    per_class = int(np.bincount(listing.labels).max())
    cache = out / "data-cache-trials"
    shutil.copytree(out / f"data-cache-{reps - 1}", cache, dirs_exist_ok=True)  # the full store, warm
    full = with_overrides(config, {"cache_dir": str(cache)})
    setups = {"quarter": with_overrides(full, {"data.max_per_class": max(2, per_class // 4)}), "full": full}
    trials: dict[str, Any] = {}
    for name, setup in setups.items():
        _prepare_process(setup)  # stages, backbone, references, calibration: trials only load them
        trials[name] = trial_processes(setup, method, 1, out)
    trials["two"] = trial_processes(setups["full"], method, 2, out)
    rows.update(
        trial_private_mb_quarter=trials["quarter"]["private_mb"][0], trial_private_mb_full=trials["full"]["private_mb"][0],
        trial_first_step_seconds=trials["full"]["first_step_seconds"][0],
        two_trials_pss_over_one=trials["two"]["pss_mb_sum"] / trials["full"]["pss_mb_sum"],
        # what the total is made of: the file-backed part (1.0: the second trial maps the same pages; 2.0: its own
        # copy) and each trial's private memory before its first step (the runtime: torch and the libraries)
        two_trials_file_pss_over_one=trials["two"]["file_pss_mb_sum"] / trials["full"]["file_pss_mb_sum"],
        trial_imports_private_mb=trials["full"]["imports_private_mb"][0],
        trials=trials,
    )
    rows["private_full_over_quarter"] = rows["trial_private_mb_full"] / rows["trial_private_mb_quarter"]
    return rows


def _best_realistic(config: Config, experiment: str | None, uri: str | None) -> dict[str, Any]:
    """The best feasible realistic configuration of a sweep in MLflow, else the preset's own values."""
    if experiment:
        from analysis.runs import load_sweep

        best = load_sweep(experiment, uri).best_trials().set_index("method")
        if "realistic" in best.index:
            row = best.loc["realistic"]
            return {hp.name: hp.cast(row[f"params.{hp.name}"]) for hp in METHODS["realistic"].hyperparameters}
    return METHODS["realistic"].values(config.unlearn)


def _print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    cols = sorted({k for r in rows.values() for k in r})
    print("| name | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for name, row in rows.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


SECTIONS = ("cost", "orchestration", "threads", "sweep", "cli", "eval", "data")
GENERATED_CLASSES = 40  # a generated ImageFolder: forget classes 0-9, retain 10-39 (as issue 24 measured)


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
    p.add_argument("--only", default="cost,orchestration,threads,sweep,cli,eval",
                   help=f"comma-separated subset of {','.join(SECTIONS)} (data: only on an ImageFolder config)")
    p.add_argument("--images", type=int, default=2000,
                   help="data: without data.root, generate this many 256-px JPEGs in 40 classes under OUT/imagefolder")
    p.add_argument("--reps", type=int, default=2, help="data: preparation and decode-limit runs, alternating")
    p.add_argument("--trial-method", default="realistic", help="data: the method the measured trial processes run")
    args = p.parse_args(argv)
    configure_logging()
    only = set(args.only.split(","))
    if unknown := sorted(only - set(SECTIONS)):
        print(f"bench: error: --only {','.join(unknown)}: unknown (known: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    # the steady rate of the looped variants is measured after the warm-up steps
    if only & {"orchestration", "threads"} and args.steps < WARMUP_STEPS + 2:
        print(f"bench: error: --steps must be at least {WARMUP_STEPS + 2} ({WARMUP_STEPS} warm-up steps)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    sets = list(args.set)
    try:
        config = load_config(args.config, [*sets, f"device={args.device}"])
        if "data" in only:
            if config.data.dataset != "imagefolder":
                raise ConfigError(f"--only data measures an ImageFolder; {args.config} reads {config.data.dataset} "
                                  "(use --config imagenet-vqgan or places365-diffusion with --set data.root=ROOT)")
            if not config.data.root and not (config.data.root_env and os.environ.get(config.data.root_env)):
                from analysis.imagefolder import make_imagefolder

                if args.images < GENERATED_CLASSES * 4:
                    raise ConfigError(f"--images {args.images}: at least {GENERATED_CLASSES * 4} (4 per class)")
                root = out / "imagefolder"
                if not root.is_dir():
                    make_imagefolder(root, GENERATED_CLASSES, args.images // GENERATED_CLASSES, 256)
                sets = [f"data.root={root}", "data.forget_classes=[0-9]", "data.retain_classes=[10-39]", *sets]
                config = load_config(args.config, [*sets, f"device={args.device}"])
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    config = with_overrides(config, {"cache_dir": str(config.resolved_cache_dir())})

    from unlearn.pipeline import prepare

    if only & {"orchestration", "sweep"}:  # Ray only where measured: `--only cost,eval` runs without it
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 num_gpus=torch.cuda.device_count() if args.device == "cuda" else 0)
    prepared = prepare(config) if only - {"data"} else None  # the data benchmark prepares in its own processes
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
        results["train_overhead_ratio"] = (table["bare"]["steady_steps_per_second"]
                                           / table["ray_train_1"]["steady_steps_per_second"])
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
    if "data" in only:
        cli_args = ["--config", args.config, *[a for value in [*sets, f"device={args.device}"] for a in ("--set", value)]]
        results["data"] = data_path(config, cli_args, out, max(1, args.reps), args.trial_method)
        _print_table("Data path: the image store against the decode limit; trial processes on a warm store",
                     {"data": {k: v for k, v in results["data"].items() if not isinstance(v, (dict, list))}})
        results.update({k: v for k, v in results["data"].items() if k.startswith(("data_", "trial_", "store_", "two_"))})
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    from unlearn.errors import exit_with

    exit_with(main())
