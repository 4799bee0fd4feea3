"""SweepDriver: prepares once, logs the references, runs (or restores) the one Tune experiment of every method's
search and confirmation trials, summarises and delivers the unlearned models."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient
from ray import tune

from raytasks import tracking
from raytasks.distributed import train_stages_data_parallel
from raytasks.preparation import Preparation, prepare_data_on_worker, prepare_on_worker
from raytasks.progress import ProgressCallback
from raytasks.resources import TrialPlan
from raytasks.search import CONFIRMS_KEY, METHOD_KEY, SweepSearch, confirmation_points, make_searcher
from raytasks.trial_outcome import WEIGHTS_FOLDER
from unlearn.audit.best import best_per_method, confirmed, mean_pm_std, pareto_front
from unlearn.audit.catalogue import shown_in
from unlearn.audit.verdict import violation_counts
from unlearn.config import Config
from unlearn.export import weights_digest, write_certificate
from unlearn.methods import METHODS, REFERENCE_MODELS
from unlearn.pipeline import load_data
from unlearn.stages import missing_stages

logger = logging.getLogger(__name__)


def summary_columns(objectives: list[str]) -> list[str]:
    return ["method", "trial_id", *objectives, *[c for c in shown_in("summary") if c not in objectives], "feasible", "failed"]


def _drop_weights(checkpoint: Any) -> None:
    """Remove a trial's kept weights from Ray storage (local or remote), keeping its other files."""
    import pyarrow.fs

    path = f"{checkpoint.path.rstrip('/')}/{WEIGHTS_FOLDER}"
    if checkpoint.filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        checkpoint.filesystem.delete_dir(path)


EXPERIMENT = "trials"  # the Tune experiment's folder under the sweep's Ray storage


TRACKING_WAIT_S = 600.0  # how long the end of a sweep waits for a tracking server that went away
TRACKING_POLL_S = 10.0


class SweepInterrupted(RuntimeError):
    pass


def _trial_id_from_path(path: str) -> str:
    """Tune names trial folders <trainable>_<trial_id>_<index>_<params>, e.g. run_trial_564a3dff_2_ft_lr=..."""
    match = re.search(r"^run_trial_([0-9a-f]+)_\d+_", Path(path).name)
    return match.group(1) if match else Path(path).name


class SweepDriver:
    def __init__(self, config: Config, name: str, out: Path, client: MlflowClient, uri: str, methods: list[str],
                 trials: int, workers: int, use_gpu: bool, storage: str, plan: TrialPlan,
                 replan: Callable[[int, int], TrialPlan] | None = None) -> None:
        self.config, self.name, self.out, self.client, self.uri = config, name, out, client, uri
        self.methods, self.trials, self.workers, self.use_gpu = methods, trials, workers, use_gpu
        self.plan = plan  # one trial's resources and the concurrency (raytasks.resources)
        self.replan = replan  # (peak GPU bytes of one trial, free GPU bytes) -> plan, when the share is measured
        self.searchers: dict[str, Any] = {}  # method -> its Optuna searcher, after the run (tests inspect the studies)
        self.progress: ProgressCallback | None = None
        self.storage = storage  # a local folder, or shared storage (a mount, s3://...) on a cluster
        self.report_path: Path | None = None

    def _logged_references(self) -> dict[str, str]:
        """Reference model -> its finished MLflow run (a resumed sweep): read back, not evaluated again."""
        found = {}
        for ref in REFERENCE_MODELS:
            run_id = tracking.find_run(self.client, self.experiment, {"sweep": self.name, "reference": ref, "method": ref})
            if run_id is not None and self.client.get_run(run_id).info.status == "FINISHED":
                found[ref] = run_id
        return found

    def _log_references(self, prep: Preparation, logged: dict[str, str]) -> dict[str, dict[str, float]]:
        refs = {ref: dict(self.client.get_run(run_id).data.metrics) for ref, run_id in logged.items()
                if ref in prep.stage_keys}
        for ref, metrics in prep.references.items():
            tags = {"sweep": self.name, "reference": ref, "method": ref}
            refs[ref] = metrics
            with tempfile.TemporaryDirectory() as folder:
                for name, payload in prep.reference_files[ref].items():
                    (Path(folder) / name).write_bytes(payload)
                tracking.log_child(self.client, self.experiment, self.parent, tags, {"stage_key": prep.stage_keys[ref]},
                                   metrics, Path(folder))
        with tempfile.TemporaryDirectory() as folder:
            for name, payload in prep.grid_rows.items():
                (Path(folder) / name).write_bytes(payload)
            self.client.log_artifacts(self.parent, folder, "grid")
        return refs

    # --- Tune -------------------------------------------------------------------------------------
    def _log_calibration(self, prep: Preparation) -> None:
        """The audit's self-check on the parent run: figures as metrics, validity and its reasons as tags."""
        figures = {k: prep.calibration[k] for k in shown_in("calibration") if k in prep.calibration}
        tracking.log_metrics(self.client, self.parent, figures)
        warnings = prep.warnings
        # no marker audit on a model brought by the user (stages.theta0): "n/a", not a verdict
        self.client.set_tag(self.parent, "audit_valid", str(int(figures["audit_valid"])) if "audit_valid" in figures else "n/a")
        self.client.set_tag(self.parent, "audit_notes", " | ".join(warnings) if warnings else "none")  # prepare() logged them

    def _tuner(self, resume: bool) -> tune.Tuner:
        """One experiment for every method's search and confirmation (`SweepSearch`): slots never idle between
        methods, and actors are reused, so a trial finds the prepared data already loaded in its process."""
        from raytasks.trial import run_trial

        spec = {"config": self.config.model_dump(mode="json", by_alias=True), "workers": self.workers,
                "use_gpu": self.use_gpu, "threads": max(1, int(self.plan.resources["CPU"])), "storage_path": self.storage}
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), self.plan.resources)
        path = f"{self.storage}/{EXPERIMENT}"
        if resume and tune.Tuner.can_restore(path):
            # resume_errored=False: an errored trial is final (the searcher already counted it as failed); re-running
            # it would hand the driver a result the searcher never sees
            return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        objectives = list(self.config.objectives)
        self.searchers = {m: make_searcher(self.config, m, self.trials) for m in self.methods}
        search = SweepSearch(self.searchers, self.trials, self.config.sweep.confirm_seeds, objectives)
        self.progress = ProgressCallback(self.config)  # the bench reads its peak_in_flight
        callbacks = [tracking.TrialLoggingCallback(self.trial_logger), self.progress]
        return tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=search, num_samples=-1, reuse_actors=True,
                                                                 max_concurrent_trials=self.concurrency),
                          run_config=tune.RunConfig(name=EXPERIMENT, storage_path=self.storage, verbose=0, callbacks=callbacks,
                                                    failure_config=tune.FailureConfig(max_failures=self.config.sweep.trial_retries)))

    def run(self, resume: bool) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / "sweep.json"
        state = json.loads(state_path.read_text()) if resume else {}
        self.experiment = tracking.experiment_id(self.client, self.name)
        self.parent = tracking.start_parent(self.client, self.experiment, self.name,
                                            self.config.model_dump(mode="json", by_alias=True), state.get("parent_run_id"))
        state.update(name=self.name, parent_run_id=self.parent, experiment_id=self.experiment, tracking_uri=self.uri,
                     methods=self.methods, trials=self.trials, workers=self.workers,
                     confirm_seeds=self.config.sweep.confirm_seeds)
        state_path.write_text(json.dumps(state, indent=2))
        self.trial_logger = tracking.MLflowTrialLogger(self.uri, self.experiment, self.parent, self.name, self.workers)

        logged = self._logged_references()
        prep = self._prepare(frozenset(logged))
        self._log_calibration(prep)
        refs = self._log_references(prep, logged)
        # What `unlearn purge --forget-digest` looks for: the sweep holds forget images (grids, trial strips).
        self.client.set_tag(self.parent, "forget_digest", prep.forget_digest)
        self.client.set_tag(self.parent, "ray_storage", self.storage)
        self.client.set_tag(self.parent, "prepared_on_node", prep.node_id)
        logger.info(f"sweep {self.name}: {', '.join(self.methods)}: {self.trials} trials each "
                   f"(+ {self.config.sweep.confirm_seeds} confirmation seed(s) of each best), {self.concurrency} at a time, "
                   f"each with {self.plan.resources}")
        grid = self._tuner(resume).fit()
        if resume and "://" not in self.storage:  # the studies as the restored experiment left them
            restored = SweepSearch({m: make_searcher(self.config, m, self.trials) for m in self.methods}, self.trials,
                                   self.config.sweep.confirm_seeds, list(self.config.objectives))
            restored.restore_from_dir(f"{self.storage}/{EXPERIMENT}")  # Tune's searcher checkpoint, latest
            self.searchers = restored.searchers
        rows, confirmations, checkpoints = self._collect(grid)
        if self.progress is not None and self.progress.retried:  # trials rerun after their process or node died
            state_path.write_text(json.dumps({**state, "retried_trials": self.progress.retried}, indent=2))
        return self._summarise(rows, refs, checkpoints, prep, confirmations)

    @property
    def concurrency(self) -> int:
        return min(self.plan.concurrency, self.config.sweep.max_concurrent or self.plan.concurrency)

    def _prepare(self, logged: frozenset[str]) -> Preparation:
        """Stages, backbone, references and calibration, prepared once as Ray work on a worker with one trial's CPUs
        (and a whole GPU when trials use GPUs); the driver, maybe a CPU-only head, trains nothing. With
        `sweep.gpus_per_trial` unset on GPUs, that worker also measures one short trial of each method, and as many
        trials share each GPU as the largest peak allows."""
        measure = (self.use_gpu and self.workers == 1 and self.config.sweep.gpus_per_trial is None
                   and self.replan is not None)
        logger.info(f"sweep {self.name}: preparing the image store (Ray tasks) ...")
        prepare_data_on_worker(self.config)
        if self.workers > 1 and (missing := missing_stages(self.config)):  # data-parallel too, as the trials
            logger.info(f"sweep {self.name}: training the {', '.join(missing)} stage(s) on {self.workers} Ray Train "
                       "workers ...")
            train_stages_data_parallel(self.config, self.workers, self.storage, "stages", self.use_gpu)
        logger.info(f"sweep {self.name}: preparing stages and reference features once, on a worker ...")
        prep = prepare_on_worker(self.config, self.methods, self.use_gpu, self.config.sweep.cpus_per_trial, measure,
                                 logged)
        logger.info(f"sweep {self.name}: prepared on node {prep.node_id[:12]}")
        if measure and prep.peak_gpu_bytes and self.replan is not None:
            self.plan = self.replan(prep.peak_gpu_bytes, prep.free_gpu_bytes)
            logger.info(f"sweep {self.name}: one trial peaks at {prep.peak_gpu_bytes / 1024**3:.2f} GiB of GPU memory: "
                       f"{self.plan.trials_per_gpu} trials per GPU")
        return prep

    def _collect(self, grid) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple[str, str], Any]]:
        """Search rows, confirmation rows and kept checkpoints of a finished experiment. Trials that finished while
        the driver was down are logged now (deduplicated); an interrupted experiment raises SweepInterrupted."""
        rows, confirmations, checkpoints = [], [], {}
        unfinished = 0
        for result in grid:
            metrics, config = dict(result.metrics or {}), dict(result.config or {})
            if not tracking.reported(metrics) and result.error is None:
                unfinished += 1  # interrupted before it reported (Tune's default result at most): --resume runs it
                continue
            trial_id = metrics.get("trial_id") or _trial_id_from_path(result.path)
            folder = result.path if result.error is not None else (result.checkpoint.path if result.checkpoint else None)
            self._log_when_reachable(trial_id, config, metrics or {"failed": 1.0}, folder, result.error is not None)
            row = {"trial_id": trial_id, **metrics, **config}  # the searched values win over figures of their name
            if CONFIRMS_KEY in config:
                confirmations.append(row)
                if result.checkpoint is not None and self.config.sweep.keep_weights != "all":
                    _drop_weights(result.checkpoint)  # a confirmation is evidence, not a model to deliver
                continue
            rows.append(row)
            if result.checkpoint is not None:
                checkpoints[(config[METHOD_KEY], trial_id)] = result.checkpoint
        expected = len(self.methods) * self.trials + len(
            confirmation_points(pd.DataFrame(rows), list(self.config.objectives), self.config.sweep.confirm_seeds)
            if len(rows) == len(self.methods) * self.trials and self.config.sweep.confirm_seeds else [])
        unfinished = max(unfinished, expected - len(rows) - len(confirmations))
        if unfinished:  # Tune returns normally after Ctrl-C: stop here, the parent stays open for --resume
            raise SweepInterrupted(f"sweep {self.name!r} interrupted with {unfinished} trial(s) unfinished; "
                                   f"continue with --resume --name {self.name}")
        return rows, confirmations, checkpoints

    def _log_when_reachable(self, trial_id: str, *args) -> None:
        """Log a finished trial; while the tracking server does not answer, wait for it (saying so) up to
        `TRACKING_WAIT_S`, then stop with the parent left open: --resume logs the results kept in Ray storage."""
        deadline = time.monotonic() + TRACKING_WAIT_S
        said = False
        while True:
            try:
                self.trial_logger.log(trial_id, *args)
                return
            except tracking.TRACKING_ERRORS:
                if tracking.reachable(self.uri):
                    raise
                if time.monotonic() > deadline:
                    raise SweepInterrupted(f"tracking server {self.uri} unreachable for {TRACKING_WAIT_S:.0f} s: the trials' "
                                           f"results are kept in Ray storage; once it answers, run --resume --name "
                                           f"{self.name} to log them") from None
                if not said:
                    logger.info(f"sweep {self.name}: tracking server {self.uri} unreachable: waiting for it to log the "
                               f"trials (up to {TRACKING_WAIT_S:.0f} s) ...")
                    said = True
                time.sleep(TRACKING_POLL_S)

    # --- the deliverable ---------------------------------------------------------------------------
    def _deliver(self, best: pd.DataFrame, checkpoints: dict[tuple[str, str], Any], prep: Preparation,
                 refs: dict[str, dict[str, float]]) -> list[str]:
        """Log each method's best trial as a model (with its certificate) on its run, register the selected
        one (alias `unlearned`), and drop the weights that `sweep.keep_weights` does not keep."""
        from raytasks import registry

        lines, chosen = [], set()
        select = self.config.sweep.select
        data = load_data(self.config)  # the split, from the cache the preparing worker filled (no training here)
        for row in best.to_dict("records"):
            method, trial_id = row["method"], str(row["trial_id"])
            checkpoint = checkpoints.get((method, trial_id))
            run_id = tracking.find_run(self.client, self.experiment,
                                       {"sweep": self.name, "method": method, "ray.trial_id": trial_id})
            if checkpoint is None or run_id is None:
                lines.append(f"- {method}: trial {trial_id} has no stored weights; nothing logged")
                continue
            chosen.add((method, trial_id))
            with tempfile.TemporaryDirectory() as folder:
                bundle = Path(checkpoint.to_directory(folder)) / WEIGHTS_FOLDER
                if not (bundle / "config.yaml").is_file():
                    lines.append(f"- {method}: trial {trial_id} kept no weights; nothing logged")
                    continue
                metrics = json.loads((bundle / "metrics.json").read_text())
                write_certificate(bundle, data, prep.stage_keys, method, metrics, refs,
                                  location=f"runs:/{run_id}/{registry.MODEL_NAME}")
                model_uri = registry.log_model(self.client, self.uri, run_id, bundle)
                line = f"- {method}: runs:/{run_id}/{registry.MODEL_NAME} (trial {trial_id})"
                if method == select:
                    tags = {"trial_id": trial_id, "sweep": self.name, "method": method,
                            "forget_digest": prep.forget_digest,
                            "weights_sha256": weights_digest(bundle),
                            "config_sha256": hashlib.sha256((bundle / "config.yaml").read_bytes()).hexdigest(),
                            **{k: f"{metrics[k]:.6g}" for k in shown_in("registry") if k in metrics}}
                    version = registry.register(self.client, self.uri, self.name, model_uri, run_id, tags)
                    line += f"; registered as models:/{self.name}@{registry.ALIAS} (version {version})"
                lines.append(line)
        if select not in self.methods:
            lines.append(f"- nothing registered: sweep.select {select!r} was not swept (--methods {','.join(self.methods)})")
        elif select not in set(best["method"]):
            lines.append(f"- nothing registered: {select} (sweep.select) has no feasible trial")
        if self.config.sweep.keep_weights == "best":
            for key, checkpoint in checkpoints.items():
                if key not in chosen:
                    _drop_weights(checkpoint)
        return lines

    def _summarise(self, rows: list[dict[str, Any]], refs: dict[str, dict[str, float]],
                   checkpoints: dict[tuple[str, str], Any], prep: Preparation, confirmations: list[dict[str, Any]]) -> str:
        """The sweep's tables (written and uploaded), its deliverables, the parent run closed; the summary text."""
        objectives = list(self.config.objectives)
        frame = pd.DataFrame(rows)
        for col in summary_columns(objectives):
            if col not in frame:
                frame[col] = float("nan")
        front = pareto_front(frame, objectives)
        best = best_per_method(frame, objectives)
        hp_cols = sorted({hp.name for m in self.methods for hp in METHODS[m].hyperparameters} & set(frame.columns))
        cols = [*summary_columns(objectives), *hp_cols]
        checked = confirmed(pd.DataFrame(confirmations), shown_in("confirmed"))
        self._write_tables(frame[cols], front[cols], best[cols], checked)
        delivered = self._deliver(best, checkpoints, prep, refs)
        self.client.set_terminated(self.parent, "FINISHED")
        return "\n".join([*self._header_lines(frame, refs), "", *self._table_lines(frame, front[cols], best[cols], checked),
                          "", "Unlearned models (each method's best, with its certificate; re-audit: unlearn audit --model URI):",
                          *delivered, "", f"parent MLflow run: {self.parent} in experiment {self.name!r}"])

    def _write_tables(self, trials: pd.DataFrame, front: pd.DataFrame, best: pd.DataFrame, checked: pd.DataFrame) -> None:
        """trials.csv, pareto.csv, best.csv, confirmed.csv (and pareto.md) on the parent run and in the out folder."""
        with tempfile.TemporaryDirectory() as folder:
            trials.to_csv(Path(folder) / "trials.csv", index=False)
            front.to_csv(Path(folder) / "pareto.csv", index=False)
            best.to_csv(Path(folder) / "best.csv", index=False)
            (Path(folder) / "pareto.md").write_text(front.to_markdown(index=False, floatfmt=".4g"))
            checked.to_csv(Path(folder) / "confirmed.csv", index=False)
            self.client.log_artifacts(self.parent, folder, "summary")
            for name in ("trials.csv", "pareto.csv", "best.csv", "confirmed.csv"):
                (self.out / name).write_text((Path(folder) / name).read_text())

    def _header_lines(self, frame: pd.DataFrame, refs: dict[str, dict[str, float]]) -> list[str]:
        """Trial counts, the marker audit's validity, the OOD threshold and the references' figures."""
        attack, retrain = refs["attack"], refs.get("retrain", {})
        valid = attack.get("audit_valid", 0.0) == 1.0
        marker = (f"marker audit: {'valid' if valid else 'NOT VALID (cannot tell unlearning from fine-tuning; see above)'} "
                  f"(attack strength {attack.get('audit_attack_strength', float('nan')):.3f}, null method "
                  f"{attack.get('audit_null_strength', float('nan')):.3f})" if "audit_valid" in attack
                  else "marker audit: not applicable (theta0 brought by the user)")
        return [f"sweep {self.name}: {len(frame)} trials, {int(frame['feasible'].fillna(0).sum())} feasible",
                f"{marker}; ood_delta {attack.get('ood_delta', float('nan')):.4g} "
                f"(retrain's distance {attack.get('retrain_ood_distance', float('nan')):.4g})",
                f"references: attack strength={attack.get('forget_marker_strength', float('nan')):.3f} "
                f"retain_mse={attack.get('retain_mse', float('nan')):.5f}; "
                f"retrain strength={retrain.get('forget_marker_strength', float('nan')):.3f}"]

    def _table_lines(self, frame: pd.DataFrame, front: pd.DataFrame, best: pd.DataFrame, checked: pd.DataFrame) -> list[str]:
        """The Pareto front, each method's best, the violations of methods without a feasible trial, the confirmation."""
        objectives = list(self.config.objectives)
        lines = [f"Pareto front (feasible, minimising {', '.join(objectives)}):",
                 front.to_markdown(index=False, floatfmt=".4g") if len(front) else "(no feasible trial)",
                 "", "Best feasible configuration per method:",
                 best.to_markdown(index=False, floatfmt=".4g") if len(best) else "(no feasible trial)"]
        without = [m for m in self.methods if m not in set(best["method"])]
        if without:
            lines += ["", "Methods without a feasible trial (violated constraints, counted over their trials):"]
            for method in without:
                counts = violation_counts(frame[frame["method"] == method].to_dict("records"), self.config)
                lines.append(f"- {method}: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
        if len(checked):
            lines += ["", f"Each method's best configuration on {self.config.sweep.confirm_seeds} fresh unlearning seeds "
                      "(mean ± std; the report and the Pareto plot use these):",
                      mean_pm_std(checked, shown_in("confirmed")).to_markdown(index=False, floatfmt=".4g")]
        return lines
