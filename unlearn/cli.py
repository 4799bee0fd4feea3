"""The `unlearn` console script: run, prepare, audit, purge, methods, report (the composition root)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import NoReturn

from unlearn.errors import ConfigError, exit_with
from unlearn.logs import configure as configure_logging

# Nothing here imports torch at module level: `unlearn prepare` decodes in a forkserver pool whose server imports
# this module (the process's __main__) once, and its decoding workers need only PIL and numpy.
logger = logging.getLogger("unlearn.cli")  # also when run as `python -m unlearn.cli`


def _format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.6g}" for k, v in metrics.items())


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        # One flat JSON object on the last line; NaN becomes null so that any JSON parser reads it.
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}))
    else:
        print(_format_table({k: v for k, v in metrics.items() if not isinstance(v, str)}))


def _cmd_run(args: argparse.Namespace) -> int:
    from unlearn.methods import METHODS, REFERENCE_MODELS
    from unlearn.pipeline import evaluate_reference, run_model, run_seeds

    if args.method not in METHODS and args.method not in REFERENCE_MODELS:
        raise ConfigError(f"unknown method {args.method!r}; methods: {', '.join([*METHODS, *REFERENCE_MODELS])}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    reference = args.method in REFERENCE_MODELS
    if args.seeds > 1 and reference:
        raise ConfigError(f"{args.method} is a reference model (trained once per stage key): "
                          "--seeds applies to unlearning methods")
    from unlearn.config import load_config

    config = load_config(args.config, args.set)
    out = None
    if args.out is not None:
        from unlearn.export import check_out_folder

        out = check_out_folder(args.out)
    spread = None
    if args.seeds > 1:
        from unlearn.audit.catalogue import nearest_to_mean, seed_summary

        prepared, models, runs = run_seeds(config, args.method, args.seeds)
        spread = seed_summary(runs)
        chosen = nearest_to_mean(runs, spread, list(config.objectives))
        model, metrics = models[chosen], runs[chosen]
        shown = spread
    else:
        prepared, model, metrics = run_model(config, args.method)
        shown = metrics
    if out is not None:
        from unlearn.export import write_bundle

        references = {name: evaluate_reference(prepared, name) for name in ("retrain", "attack") if name in prepared.stages}
        write_bundle(out, prepared, model, args.method, metrics, references, spread)
        logger.info(f"saved the model, config.yaml, metrics.json and certificate.md to {out}"
                   + (f" (unlearning seed {int(metrics['unlearn_seed'])}, the one nearest the mean)" if spread else ""))
    _print_metrics({"method": args.method, **shown}, args.json)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Everything the runs of a config share, and nothing else: the image store (decoded once in parallel, or
    reused and verified against its checksums), the split, the stages, the audit backbone and references, and the
    audit's calibration. What a cluster user runs once before many sweeps."""
    import time

    from unlearn.config import load_config
    from unlearn.pipeline import audit_warnings, prepare

    config = load_config(args.config, args.set)
    started = time.perf_counter()
    if args.data_only:
        from unlearn.pipeline import load_data

        prepared, store = None, load_data(config, verify=True).store
    else:
        prepared = prepare(config, verify=True)
        store = prepared.data.store
    seconds = time.perf_counter() - started
    figures = {"data_images": float(len(store)), "data_store_bytes": float(store.nbytes),
               "data_store_built": float(store.built_seconds is not None), "prepare_seconds": seconds}
    if store.built_seconds is not None:
        figures.update(data_prepare_seconds=store.built_seconds,
                       data_prepare_images_per_second=len(store) / max(store.built_seconds, 1e-9))
    if store.skipped_count:
        figures["data_skipped_images"] = float(store.skipped_count)
    if prepared is not None:
        for name, stage in prepared.stages.items():
            logger.info(f"stage {name}: {stage.key} ({'reused' if stage.reused else f'trained in {stage.seconds:.1f} s'})")
        logger.info(f"audit references: {prepared.auditor.key}; calibration: ood_delta {prepared.auditor.ood_delta:.4g}"
                   + "".join(f"; {line}" for line in audit_warnings(prepared)))
    _print_metrics({"config": config.name, "store": store.key, **figures}, args.json)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from unlearn.export import audit_saved

    if not args.model.startswith(("runs:/", "models:/")):
        metrics = audit_saved(args.model)
    else:  # a model logged or registered by a sweep: fetch its bundle from MLflow, then the same audit
        import tempfile
        from pathlib import Path

        from raytasks.registry import fetch_bundle
        from raytasks.tracking import resolve_uri

        with tempfile.TemporaryDirectory() as folder:
            metrics = audit_saved(fetch_bundle(args.model, resolve_uri(args.tracking_uri), Path(folder)))
    _print_metrics({"model": str(args.model), **metrics}, args.json)
    return 0


def _cmd_purge(args: argparse.Namespace) -> int:
    import datetime
    import os
    from pathlib import Path

    from unlearn.config import Config
    from unlearn.purge import append_to_certificate, check_digest, purge_cache

    digest = check_digest(args.forget_digest)
    if args.model is not None and not (Path(args.model).expanduser() / "certificate.md").is_file():
        raise ConfigError(f"--model {args.model} has no certificate.md (not a folder written by `unlearn run --out`)")
    root = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else Config().resolved_cache_dir()
    removed, remaining = purge_cache(root, digest, args.weights)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri or Path("mlflow.db").is_file():  # the sweep's default store, when there is one here
        from raytasks.tracking import connect, purge_runs, resolve_uri

        more_removed, more_remaining = purge_runs(connect(resolve_uri(uri)), digest)
        removed += more_removed
        remaining += more_remaining
    else:
        remaining.append("MLflow: no tracking store given (--tracking-uri) and no ./mlflow.db: not searched")
    for line in removed:
        print(f"removed  {line}")
    for line in remaining:
        print(f"remains  {line}")
    if args.model is not None:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"certificate: {append_to_certificate(Path(args.model), digest, removed, remaining, when)}")
    return 0


NOT_CERTIFIED = 3  # `unlearn request`: the request ran, but nothing was certified (1 is Python's exit on an error)


def _cmd_request(args: argparse.Namespace) -> int:
    """One deletion request on the current model of a chain: unlearn, audit (every earlier request re-checked),
    write the bundle, register a new version; the alias moves only onto a feasible one. Exit 0: certified (and the
    alias moved); 3 (NOT_CERTIFIED): the request ran, but the model is not feasible or the alias was moved by another
    request meanwhile (registered without the alias, when registering); 2: bad input; 1: an error (a traceback)."""
    import tempfile
    from pathlib import Path

    from unlearn.chain import finish_request, parent_lineage, read_entries, registry_tags, request_config, run_request
    from unlearn.config import parse_override
    from unlearn.export import check_out_folder, load_saved
    from unlearn.methods import METHODS

    if args.method not in METHODS:
        raise ConfigError(f"unknown method {args.method!r}; methods: {', '.join(METHODS)}")
    overrides = dict(parse_override(assignment) for assignment in args.set)
    entries = read_entries(args.forget_list)
    out = check_out_folder(args.out) if args.out is not None else None
    target = None
    if args.model.startswith("models:/") or args.name:  # the registry, checked before any work
        from raytasks.request_registry import RequestTarget

        target = RequestTarget(args.model, args.name, args.alias, args.tracking_uri)
    elif out is None:
        raise ConfigError("--model is a folder and no --name is given: nothing would be registered; give --name NAME "
                          "(register the request's model) or --out DIR (keep it in a folder)")
    with tempfile.TemporaryDirectory() as tmp:
        parent_config, parent = load_saved(target.fetch_parent(Path(tmp)) if target and target.parent_version else args.model)
        lineage = parent_lineage(parent, parent_config)
        if lineage.requests and target is not None and lineage.requests[-1].version is None:
            lineage.requests[-1].version = target.parent_version
        config = request_config(parent, parent_config, lineage, entries, overrides)
        prepared, model, metrics = run_request(config, lineage, args.method)
        bundle = out or Path(tmp) / "bundle"
        run_id, location = target.start_run(len(lineage.requests) + 1) if target is not None else (None, None)
        try:
            request = finish_request(bundle, prepared, model, args.method, metrics, lineage, location).requests[-1]
            feasible = metrics.get("feasible") == 1.0
            regressed = [str(n) for n in range(1, request.number) if metrics.get(f"request{n}_regressed") == 1.0]
            logger.info(f"request {request.number}: {'feasible' if feasible else 'NOT feasible'}"
                        + (f"; it brings back request {', '.join(regressed)}" if regressed else "")
                        + (f"; bundle in {out}" if out is not None else ""))
            moved = False
            if target is not None:
                version, moved = target.register(run_id, bundle, registry_tags(bundle, request, metrics), metrics)
                logger.info(f"registered models:/{target.name}/{version} ({location}); alias {target.alias!r} "
                            + ("moved to it" if moved else "not moved"))
                metrics = {**metrics, "version": float(version)}
        except BaseException:
            if target is not None:  # no run left RUNNING (or FINISHED without its model)
                target.client.set_terminated(run_id, "FAILED")
            raise
    _print_metrics({"request": request.number, **metrics}, args.json)
    return 0 if feasible and (moved or target is None) else NOT_CERTIFIED


def _cmd_methods(args: argparse.Namespace) -> int:
    from unlearn.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
        for hp in method.hyperparameters:
            print(f"{'':<{width}}    unlearn.{hp.name} ({hp.kind.__name__}, default {hp.default:g}, searched {hp.scale} in "
                  f"[{hp.low:g}, {hp.high:g}]): {hp.description}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import render_report

    path = render_report(args.experiment, args.out, tracking_uri=args.tracking_uri)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Realistic image-to-image machine unlearning")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress lines)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="prepare or reuse the stages, unlearn, audit, print the metric catalogue")
    run.add_argument("--method", required=True, help="a registry method, or original|attack|retrain")
    run.add_argument("--config", default="digits-ae", help="preset name or YAML file (default: digits-ae)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    run.add_argument("--seeds", type=int, default=1, metavar="K",
                     help="run K unlearning seeds (unlearn.seed, +1, ...) and print means with *_std (no stage is retrained)")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="save the model (safetensors), config.yaml, metrics.json and certificate.md into DIR (new or empty)")
    run.set_defaults(func=_cmd_run)
    prepare = sub.add_parser("prepare", help="prepare (or verify) the image store, stages and audit references of a config; "
                                             "nothing is unlearned")
    prepare.add_argument("--config", default="digits-ae", help="preset name or YAML file (default: digits-ae)")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    prepare.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    prepare.add_argument("--data-only", action="store_true",
                         help="only the image store and the split (e.g. on a CPU node, before the GPU nodes start)")
    prepare.set_defaults(func=_cmd_prepare)
    audit = sub.add_parser("audit", help="re-audit a model saved with `run --out` from its weights alone")
    audit.add_argument("--model", required=True, metavar="DIR|URI",
                       help="a folder written by `unlearn run --out`, or runs:/RUN_ID/model, models:/NAME@unlearned, "
                            "models:/NAME/VERSION")
    audit.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    audit.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    audit.set_defaults(func=_cmd_audit)
    purge = sub.add_parser("purge", help="remove what the cache and MLflow hold of a forget set (by its certificate's digest)")
    purge.add_argument("--forget-digest", required=True, metavar="SHA256", help="the forget-set digest of certificate.md")
    purge.add_argument("--weights", action="store_true",
                       help="also remove the weights trained on D_f (original and attack stages, the domain backbone)")
    purge.add_argument("--cache-dir", default=None, help="the cache (default: $UNLEARN_CACHE or ~/.cache/unlearn)")
    purge.add_argument("--tracking-uri", default=None,
                       help="MLflow store to purge (default: $MLFLOW_TRACKING_URI, else ./mlflow.db when present)")
    purge.add_argument("--model", default=None, metavar="DIR",
                       help="append what was purged and what remains to DIR/certificate.md")
    purge.set_defaults(func=_cmd_purge)
    request = sub.add_parser("request", help="honour a deletion request on the current model of a chain: unlearn, re-check "
                                             "every earlier request, register a new version (the alias moves if feasible)")
    request.add_argument("--model", required=True, metavar="URI|DIR",
                         help="the current model: models:/NAME@ALIAS, models:/NAME/VERSION, or a folder written by "
                              "`unlearn run --out` / `unlearn request --out` (the start of a chain)")
    request.add_argument("--forget-list", required=True, metavar="FILE",
                         help="the images to forget, one per line (as data.forget_list)")
    request.add_argument("--method", default="realistic", help="the unlearning method (default: realistic)")
    request.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key of the parent's config (not the ones the lineage decides)")
    request.add_argument("--name", default=None, help="the registered model's name when --model is a folder")
    request.add_argument("--alias", default=None,
                         help="the alias to move onto a feasible version (default: the one in --model, else 'unlearned')")
    request.add_argument("--out", default=None, metavar="DIR", help="also keep the bundle in DIR (new or empty)")
    request.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    request.add_argument("--json", action="store_true", help="print one flat JSON object as the last line")
    request.set_defaults(func=_cmd_request)
    methods = sub.add_parser("methods", help="list the unlearning methods")
    methods.set_defaults(func=_cmd_methods)
    report = sub.add_parser("report", help="render tables and figures of a sweep from MLflow")
    report.add_argument("--experiment", required=True)
    report.add_argument("--out", default=None, help="output folder (default: reports/<experiment>)")
    report.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(1 if args.verbose else -1 if args.quiet else 0)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"unlearn: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> NoReturn:
    """The `unlearn` console script."""
    exit_with(main())


if __name__ == "__main__":
    console_main()
