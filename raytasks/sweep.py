"""The sweep: Ray Tune + Optuna over unlearning hyperparameters, every run tracked in MLflow.

    python raytasks/sweep.py                               # embedded defaults: digits, local Ray, ./mlflow.db
    python raytasks/sweep.py --methods realistic,finetune,max_loss --trials 12
    python raytasks/sweep.py --name my-sweep --resume     # continue an interrupted sweep
    ray submit cluster.yaml raytasks/sweep.py -- --config <name or file> [--set key=value ...]

The image store, the stages and the reference features are prepared once, as Ray work on a worker (never the
CPU-only head), into the shared cache; trials only load them. Optuna minimises `sweep.objectives` (default:
forget_marker_strength and the retain degradation) subject to the feasibility constraints of
`unlearn.audit.verdict`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`ray submit` does): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unlearn.config import Config, load_config, with_overrides  # noqa: E402
from unlearn.errors import ConfigError  # noqa: E402
from unlearn.logs import configure as configure_logging  # noqa: E402
from unlearn.methods import METHODS, REFERENCE_MODELS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep", description="Ray Tune + Optuna sweep of unlearning hyperparameters")
    p.add_argument("--config", default="digits-ae", help="preset name or YAML file (default: digits-ae)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: sweep.methods of the config)")
    p.add_argument("--trials", type=int, default=None, help="trials per method (default: sweep.trials)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial (default: unlearn.workers)")
    p.add_argument("--name", default=None, help="sweep name = MLflow experiment (default: <config name>-sweep)")
    p.add_argument("--out", default=None, help="output folder (default: ./sweeps/<name>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")
    p.add_argument("--address", default=None, help="Ray address (default: a running cluster on this node, else local)")
    p.add_argument("--storage", default=None,
                   help="Ray storage for trial results and checkpoints, shared by all nodes on a cluster "
                        "(default: $UNLEARN_RAY_STORAGE or <out>/ray)")
    p.add_argument("--no-report", action="store_true", help="skip rendering report.md at the end")
    loudness = p.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress lines)")
    return p.parse_args(argv)


def _methods(args: argparse.Namespace, config: Config) -> list[str]:
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(config.sweep.methods)
    if not names:
        raise ConfigError("--methods names no method")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods repeats a method: {','.join(names)}")
    for name in names:
        if name in REFERENCE_MODELS:
            raise ConfigError(f"{name} is a reference model, not an unlearning method to sweep")
        if name not in METHODS:
            raise ConfigError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return names


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # UNLEARN_LOCAL_RAY=1: start a local Ray even beside a running cluster (the benchmark measures a sweep alone)
    if address or Path("/tmp/ray/ray_current_cluster").exists() and os.environ.get("UNLEARN_LOCAL_RAY") != "1":
        try:
            ray.init(address=address or "auto", log_to_driver=False)
            return
        except ConnectionError:
            if address:
                raise ConfigError(f"cannot connect to the Ray cluster at {address}") from None
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2)


def run_sweep(args: argparse.Namespace):
    """Validate everything that can be checked before a trial starts, then run the sweep; return the driver."""
    config = load_config(args.config, args.set)
    methods = _methods(args, config)
    trials = args.trials or config.sweep.trials
    if trials < 1:
        raise ConfigError("--trials must be at least 1")
    workers = args.workers or config.unlearn.workers
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if config.unlearn.batch_size % workers:
        raise ConfigError(f"unlearn.batch_size {config.unlearn.batch_size} must be divisible by {workers} workers")
    name = args.name or f"{config.name}-sweep"
    out = Path(args.out or Path("sweeps") / name).resolve()
    state_path = out / "sweep.json"
    if args.resume and not state_path.is_file():  # the driver's state lives on the head, in <out>
        raise ConfigError(f"nothing to resume: no sweep {name!r} in {out}")
    if not args.resume and state_path.is_file():
        raise ConfigError(f"sweep {name!r} already exists in {out}: pass --resume to continue it, or choose another --name")
    if args.resume:  # the restored experiment's searcher runs the methods and trials it was started with
        stored = json.loads(state_path.read_text())
        methods = methods if args.methods else stored.get("methods", methods)
        trials = trials if args.trials else stored.get("trials", trials)
        if (methods, trials) != (stored.get("methods", methods), stored.get("trials", trials)):
            raise ConfigError(f"sweep {name!r} was started with --methods {','.join(stored['methods'])} --trials "
                              f"{stored['trials']}; resume it with those, or without --methods/--trials")
        # and queues the confirmation seeds it was started with
        config = with_overrides(config, {"sweep.confirm_seeds": stored.get("confirm_seeds", config.sweep.confirm_seeds)})

    from raytasks import tracking

    # A tracking server that goes away is waited for by the sweep, which says so (raytasks.tracking); MLflow's own
    # retries (7, with back-off: minutes per call) would only stall it silently.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    uri = tracking.resolve_uri(args.tracking_uri)
    client = tracking.connect(uri)

    from raytasks.resources import cluster_capacity, node_shapes, plan_trials

    _init_ray(args.address)
    capacity, shapes = cluster_capacity(), node_shapes()
    use_gpu = config.device == "cuda" or (config.device == "auto" and capacity.get("GPU", 0) > 0)
    plan = plan_trials(config, workers, use_gpu, capacity, shapes, None, None)  # exit 2 here, before any work
    # The logged config states what actually runs (methods and trials from the flags included).
    config = with_overrides(config, {"cache_dir": str(config.resolved_cache_dir()), "device": "cuda" if use_gpu else "cpu",
                                     "unlearn.workers": workers, "sweep.methods": methods, "sweep.trials": trials})

    from raytasks.driver import SweepDriver

    storage = args.storage or os.environ.get("UNLEARN_RAY_STORAGE")
    storage = f"{storage.rstrip('/')}/{name}" if storage else str(out / "ray")
    driver = SweepDriver(config, name, out, client, uri, methods, trials, workers, use_gpu, storage, plan,
                         lambda peak, free: plan_trials(config, workers, use_gpu, capacity, shapes, peak, free))
    print(driver.run(resume=args.resume))
    if not args.no_report:
        from analysis.report import render_report  # the report lives in analysis; imported at the very end

        driver.report_path = render_report(name, out / "report", tracking_uri=uri)
        driver.client.set_tag(driver.parent, "report_dir", str(out / "report"))  # unlearn purge finds its images
        print(f"report: {driver.report_path}")
    print(f"MLflow: mlflow ui --backend-store-uri {uri}  (experiment {name!r})")
    return driver


def main(argv: list[str] | None = None) -> int:
    from raytasks.driver import SweepInterrupted

    args = parse_args(argv)
    configure_logging(1 if args.verbose else -1 if args.quiet else 0)
    try:
        run_sweep(args)
        return 0
    except ConfigError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from unlearn.errors import exit_with

    exit_with(main())
