"""The cluster path on one machine: `cluster.yaml` turned into a fake autoscaling cluster, and a run against it.

    python raytasks/local_cluster.py config              # print cluster-local.yaml, made from cluster.yaml
    python raytasks/local_cluster.py run --kill -- --methods realistic --trials 3 --set sweep.max_concurrent=2
    python raytasks/local_cluster.py down                # stop what `run` left behind after a crash

`cluster-local.yaml` is generated from cluster.yaml at every run, so the two cannot drift; it keeps cluster.yaml's
node types and resources (a test checks that they agree): each GPU becomes
the custom resource `fake_gpu`, so nothing asks for CUDA on a CPU machine; the head keeps no CPU for trials; worker
nodes scale from zero to at most 2, idle ones leave after 30 s. Ray's fake provider starts each "node" as a raylet on
this machine. `ray submit` cannot drive it (it needs ssh to a launched head), so `run` does by hand what
`ray up` + `ray submit` do: start the head with the autoscaling config, start `mlflow server` on localhost, run
raytasks/sweep.py against both (`--address auto`, `--tracking-uri http://127.0.0.1:PORT`, `--storage` in a folder
every fake node shares), record the nodes every second, optionally kill a worker node while a trial runs on it, and
stop everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

ROOT = Path(__file__).resolve().parent.parent
FAKE_HEAD = "ray.head.default"  # the head's node type name Ray's fake provider insists on
FAKE_GPU = "fake_gpu"
LOCAL_MAX_WORKERS = 2
# Ray's wheels leave out the fake provider's defaults file (fake_multi_node/example.yaml), which
# `type: fake_multinode` reads: the same provider, named as an external module, needs no such file.
PROVIDER = {"type": "external", "module": "raytasks.local_cluster.LosableNodeProvider",
            "use_node_id_as_ip": True, "disable_launch_config_check": True, "disable_node_updaters": True}


class LosableNodeProvider(FakeMultiNodeProvider):
    """Ray's FakeMultiNodeProvider, where a worker node whose raylet was killed counts as lost (terminated)."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # A real machine has its own temp folder (sockets, logs, spilled objects, runtime envs): so does each fake
        # node, so that a node-local path handed to another node fails here as it would on the cluster. Ray's fake
        # provider gives every node the head's; its RayParams get a `temp_dir` of their own for this one call.
        import ray._private.parameter as parameter

        root = Path(self.provider_config.get("node_temp_root") or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        # Everything under the provider's (re-entrant) lock: the autoscaler launches nodes from several threads, and
        # the patch must neither be seen by another launch nor outlive this one.
        with self.lock:
            folder = tempfile.mkdtemp(prefix="n", dir=root)  # short: Ray's socket paths must fit in 107 bytes
            real = parameter.RayParams
            parameter.RayParams = lambda **kwargs: real(**kwargs, temp_dir=folder)
            try:
                before = set(self._nodes)
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
                created = set(self._nodes) - before
            finally:
                parameter.RayParams = real
            index = root / "nodes.json"  # node id -> its temp folder, for the run's summary
            known = json.loads(index.read_text()) if index.is_file() else {}
            index.write_text(json.dumps({**known, **{node: folder for node in created}}, indent=2))

    def non_terminated_nodes(self, tag_filters):
        # What a cloud reports for a reclaimed instance: a node whose raylet died is terminated (Ray's fake provider
        # keeps listing it, and the autoscaler would wait for it to come up instead of replacing it).
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")
                if node is not None and any(kind == "raylet" for kind, _ in node.dead_processes()):
                    node.kill_all_processes(check_alive=False, allow_graceful=False)
                    del self._nodes[node_id]
        return super().non_terminated_nodes(tag_filters)


def local_resources(resources: dict[str, float]) -> dict[str, float]:
    return {(FAKE_GPU if name == "GPU" else name): amount for name, amount in resources.items()}


def local_config(cluster: dict[str, Any], max_workers: int = LOCAL_MAX_WORKERS,
                 node_temp_root: str | None = None) -> dict[str, Any]:
    """The fake autoscaling cluster of `cluster` (cluster.yaml): same node types and resources; each worker node's
    temp folder under `node_temp_root` (default: the system's temp folder)."""
    head = cluster["head_node_type"]
    types = {}
    for name, node in cluster["available_node_types"].items():
        local = {"resources": local_resources(node.get("resources") or {}), "node_config": {}}
        if name == head:
            local["max_workers"] = 0
        else:
            local.update(min_workers=0, max_workers=min(node.get("max_workers", max_workers), max_workers))
        types[FAKE_HEAD if name == head else name] = local
    return {
        "cluster_name": f"{cluster['cluster_name']}-local",
        "max_workers": min(cluster.get("max_workers", max_workers), max_workers),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": 0.5,
        "provider": {**PROVIDER, **({"node_temp_root": node_temp_root} if node_temp_root else {})},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


HEADER = ("# Generated from cluster.yaml by raytasks/local_cluster.py: the same node types and resources on Ray's\n"
          f"# fake provider, GPUs as the custom resource {FAKE_GPU}.\n")


def render(cluster_yaml: Path = ROOT / "cluster.yaml", node_temp_root: str | None = None) -> str:
    config = local_config(yaml.safe_load(cluster_yaml.read_text()), node_temp_root=node_temp_root)
    return HEADER + yaml.safe_dump(config, sort_keys=False)


def _env() -> dict[str, str]:
    # RAY_FAKE_CLUSTER: the fake provider refuses to start without it; token auth off for a local cluster
    # UNLEARN_LOCAL_RAY=0: the sweep joins this cluster even when the caller asked sweeps for a local Ray
    return {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
            "UNLEARN_LOCAL_RAY": "0"}


def _sweep_env(config_path: Path) -> dict[str, str]:
    # the capacity check reads the node types from where `ray up` leaves them on a real head
    return {**_env(), "UNLEARN_AUTOSCALER_CONFIG": str(config_path)}


def _wait_http(uri: str, seconds: float) -> None:
    from raytasks.tracking import reachable

    deadline = time.monotonic() + seconds
    while not reachable(uri):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{uri} did not answer within {seconds:.0f} s")
        time.sleep(1)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def down() -> None:
    subprocess.run(["ray", "stop", "--force"], env=_env(), capture_output=True)


class Recorder:
    """The cluster's alive nodes every second, from a driver connected to the head (a thread)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, list[str]]] = []  # (seconds since start, alive worker node ids)
        self.head = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.start = time.monotonic()

    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self.head = self.head or next((n["NodeID"] for n in nodes if n.get("Resources", {}).get("CPU", 0) == 0), "")
            self.samples.append((round(time.monotonic() - self.start, 1),
                                 sorted(n["NodeID"] for n in nodes if n["NodeID"] != self.head)))
            self._stop.wait(1.0)

    def workers_now(self) -> list[str]:
        return self.samples[-1][1] if self.samples else []

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _trial_runs(work: Path, uri: str) -> int:
    """Trial runs logged so far (0 before the sweep wrote its state)."""
    from mlflow.tracking import MlflowClient

    state_path = work / "sweep" / "sweep.json"
    if not state_path.is_file():
        return 0
    try:
        runs = MlflowClient(uri).search_runs([json.loads(state_path.read_text())["experiment_id"]], max_results=1000)
    except Exception:  # noqa: BLE001 - not answering or state half-written: try again next second
        return 0
    return sum("ray.trial_id" in run.data.tags for run in runs)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def _raylet_pid(node_id: str) -> int | None:
    """The pid of the raylet of fake node `node_id` (what dies when a cloud node is lost)."""
    # -ww: whole command lines (without it ps cuts them to the terminal's or $COLUMNS' width, losing the node id)
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "raylet" in line and node_id in line:
            return int(line.split()[0])
    return None


def _running_trial_nodes() -> dict[str, str]:
    """node id -> the class of an actor alive on it (on this cluster, a Tune trial). From the GCS: the head runs
    without a dashboard, which Ray's state API needs."""
    from ray._private.state import actors

    nodes: dict[str, str] = {}
    for actor in actors().values():
        name = actor.get("ActorClassName", "")
        if actor.get("State") != "ALIVE" or "Queue" in name:
            continue
        node = actor["Address"]["NodeID"]
        if node not in nodes or "RayTrainWorker" in name:
            nodes[node] = name
    # nodes of a multi-worker trial's Ray Train workers first: losing one is what its phase checkpoints are for
    return dict(sorted(nodes.items(), key=lambda item: "RayTrainWorker" not in item[1]))


class _Faults:
    """What `run` does to the cluster while the sweep runs, one `step` a second: a worker node's raylet killed
    (`kill`), the tracking server stopped for `outage` seconds and started again on the same port and store."""

    def __init__(self, work: Path, shared: Path, uri: str, server: subprocess.Popen,
                 start_server: Callable[[], subprocess.Popen], recorder: Recorder, kill: bool, kill_delay: float,
                 kill_after_checkpoint: bool, outage: float | None) -> None:
        self.work, self.shared, self.uri, self.recorder = work, shared, uri, recorder
        self.server, self.start_server = server, start_server  # a restart: a new server on the same port and store
        self.kill, self.kill_delay, self.kill_after_checkpoint = kill, kill_delay, kill_after_checkpoint
        self.outage_seconds = outage
        self.killed: dict[str, Any] = {}
        self.outage: dict[str, Any] = {}
        self._seen: tuple[str, float] | None = None  # (worker node running a trial, when first seen)

    def step(self) -> None:
        if self.kill and not self.killed:
            self._kill_a_trial_node()
        if self.outage_seconds and not self.outage and _trial_runs(self.work, self.uri) >= 1:
            self._tracking_outage()

    def _kill_a_trial_node(self) -> None:
        running = [n for n in _running_trial_nodes() if n != self.recorder.head]
        # any multi-worker trial's committed checkpoint: the sweeps this is for run one such trial at a time
        committed = any((self.shared / "ray").glob("*/*-train/checkpoint_manager_snapshot.json"))
        if running and self._seen is None and (committed or not self.kill_after_checkpoint):
            self._seen = (running[0], time.monotonic())
        if self._seen and time.monotonic() - self._seen[1] >= self.kill_delay and (pid := _raylet_pid(self._seen[0])):
            os.kill(pid, signal.SIGKILL)
            self.killed = {"node_id": self._seen[0], "at_s": round(time.monotonic() - self.recorder.start, 1),
                           "actor": _running_trial_nodes().get(self._seen[0], "")}

    def _tracking_outage(self) -> None:
        _stop(self.server)  # mid-sweep: the first trial is logged, the others are still running
        self.outage["down_at_s"] = round(time.monotonic() - self.recorder.start, 1)
        time.sleep(self.outage_seconds or 0.0)
        self.server = self.start_server()
        _wait_http(self.uri, 120)
        self.outage["up_at_s"] = round(time.monotonic() - self.recorder.start, 1)


def run(work: Path, sweep_args: list[str], kill: bool = False, kill_delay: float = 3.0,
        tracking_outage: float | None = None, scale_down_wait: float = 150.0,
        kill_after_checkpoint: bool = False) -> dict[str, Any]:
    """Head + mlflow server + the sweep against them; returns (and writes to <work>/cluster-run.json) what happened.
    `kill`: `kill_delay` seconds after a trial is first seen running on a worker node, that node's raylet is killed
    (SIGKILL: what a reclaimed spot node looks like to Ray); with `kill_after_checkpoint` the clock starts only once
    a multi-worker trial's Ray Train run has committed a phase checkpoint to the shared storage. `tracking_outage`:
    once the first trial is logged, the tracking server is stopped for that many seconds and started again on the
    same port and store."""
    import ray

    work.mkdir(parents=True, exist_ok=True)
    shared = work / "shared"  # what a bucket mount is on the real cluster: every fake node sees it
    config_path = work / "cluster-local.yaml"
    nodes_root = Path(tempfile.mkdtemp(prefix="un-", dir="/tmp"))  # the worker nodes' own temp folders (short paths)
    config_path.write_text(render(node_temp_root=str(nodes_root)))
    down()
    started = time.monotonic()
    subprocess.run(["ray", "start", "--head", f"--autoscaling-config={config_path}", "--num-cpus=0", "--port=6379",
                    "--include-dashboard=false", "--disable-usage-stats"], env=_env(), check=True, capture_output=True)
    port = _free_port()
    mlflow_log = (work / "mlflow-server.log").open("a")

    def tracking_server() -> subprocess.Popen:
        return subprocess.Popen(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination",
                                 str(work / "mlartifacts")], stdout=mlflow_log, stderr=subprocess.STDOUT, env=_env())

    uri = f"http://127.0.0.1:{port}"
    faults: _Faults | None = None
    server = tracking_server()  # until the faults take it over
    try:
        _wait_http(uri, 120)
        os.environ.update(RAY_AUTH_MODE="disabled")
        ray.init(address="auto", log_to_driver=False, configure_logging=False)
        with Recorder() as recorder:
            faults = _Faults(work, shared, uri, server, tracking_server, recorder, kill, kill_delay, kill_after_checkpoint,
                             tracking_outage)
            time.sleep(1.5)  # a first sample of the nodes
            at_start = recorder.workers_now()
            sweep_log = (work / "sweep.log").open("w")
            sweep = subprocess.Popen([sys.executable, str(ROOT / "raytasks" / "sweep.py"), "--address", "auto",
                                      "--tracking-uri", uri, "--storage", str(shared / "ray"), "--out", str(work / "sweep"),
                                      "--set", f"cache_dir={shared / 'cache'}", "--set", "device=cpu", "--no-report",
                                      *sweep_args], stdout=sweep_log, stderr=subprocess.STDOUT, env=_sweep_env(config_path),
                                     cwd=work)
            sweep_started = time.monotonic()
            while sweep.poll() is None:
                faults.step()
                time.sleep(1)
            sweep_seconds = time.monotonic() - sweep_started
            deadline = time.monotonic() + scale_down_wait
            while recorder.workers_now() and time.monotonic() < deadline:
                time.sleep(2)
            samples = list(recorder.samples)
            head = recorder.head
        ray.shutdown()
        summary = _summarise(work, uri, samples, head, at_start, faults.killed, sweep.returncode, sweep_seconds,
                             time.monotonic() - started)
        summary["tracking_outage"] = faults.outage
        summary["node_temp_dirs"] = _node_temp_dirs(nodes_root)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        _stop(faults.server if faults is not None else server)
        if ray.is_initialized():
            ray.shutdown()
        down()
        shutil.rmtree(nodes_root, ignore_errors=True)
    (work / "cluster-run.json").write_text(json.dumps(summary, indent=2))
    return summary


def _node_temp_dirs(root: Path) -> dict[str, dict[str, Any]]:
    """Worker node id -> its temp folder and whether that node's raylet wrote its logs there."""
    index = root / "nodes.json"
    folders = json.loads(index.read_text()) if index.is_file() else {}
    return {node: {"folder": folder, "raylet_logs_there": any(Path(folder).glob("session_*/logs/raylet.out"))}
            for node, folder in folders.items()}


def _summarise(work: Path, uri: str, samples: list, head: str, at_start: list[str], killed: dict, code: int,
               sweep_seconds: float, wall: float) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    state = json.loads((work / "sweep" / "sweep.json").read_text()) if (work / "sweep" / "sweep.json").is_file() else {}
    client = MlflowClient(uri)
    runs = client.search_runs([state["experiment_id"]], max_results=10000) if state else []
    trial_runs = [r for r in runs if "ray.trial_id" in r.data.tags]
    per_trial: dict[str, int] = {}
    per_node: dict[str, int] = {}
    for run in trial_runs:
        per_trial[run.data.tags["ray.trial_id"]] = per_trial.get(run.data.tags["ray.trial_id"], 0) + 1
        node = run.data.tags.get("node_id", "?")
        per_node[node] = per_node.get(node, 0) + 1
    parent = client.get_run(state["parent_run_id"]) if state else None
    changes = []  # the node count each time it changed
    for seconds, workers in samples:
        if not changes or changes[-1][1] != len(workers):
            changes.append((seconds, len(workers)))
    ever = sorted({n for _, workers in samples for n in workers})
    return {
        "sweep_exit_code": code, "sweep_seconds": round(sweep_seconds, 1), "wall_seconds": round(wall, 1),
        "head_node": head, "workers_at_start": len(at_start), "workers_ever": len(ever), "worker_nodes": ever,
        "workers_at_end": len(samples[-1][1]) if samples else None, "node_count_changes": changes,
        "prepared_on_node": parent.data.tags.get("prepared_on_node") if parent else None,
        "trials_per_node": per_node, "mlflow_trial_runs": len(trial_runs), "mlflow_runs_per_trial": per_trial,
        "killed": killed, "retried_trials": state.get("retried_trials", {}),
        # multi-worker trials whose Ray Train group restarted from a phase checkpoint: trial id -> that phase
        "resumed_from_phase": {r.data.tags["ray.trial_id"]: r.data.metrics["resumed_from_phase"] for r in trial_runs
                               if r.data.metrics.get("resumed_from_phase", 0.0) > 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="print cluster-local.yaml, the fake cluster made from cluster.yaml")
    config.add_argument("--out", default=None, help="write it there instead")
    go = sub.add_parser("run", help="fake autoscaling head + mlflow server + the sweep; then stop everything")
    go.add_argument("--work", default="local-cluster", help="folder for the run (default: ./local-cluster)")
    go.add_argument("--kill", action="store_true", help="kill the worker node of the first running trial (a lost node)")
    go.add_argument("--kill-delay", type=float, metavar="SECONDS", default=3.0,
                    help="with --kill: how long after the trial is first seen on its node (default 3)")
    go.add_argument("--kill-after-checkpoint", action="store_true",
                    help="with --kill: start the delay once a multi-worker trial committed a phase checkpoint")
    go.add_argument("--tracking-outage", type=float, metavar="SECONDS", default=None,
                    help="once the first trial is logged, stop the tracking server for SECONDS")
    go.add_argument("sweep_args", nargs="*", help="after --: arguments for raytasks/sweep.py")
    sub.add_parser("down", help="stop the local cluster (ray stop --force)")
    args = parser.parse_args(argv)
    if args.command == "config":
        if args.out:
            Path(args.out).write_text(render())
        else:
            print(render(), end="")
        return 0
    if args.command == "down":
        down()
        return 0
    summary = run(Path(args.work).resolve(), args.sweep_args, args.kill, args.kill_delay, args.tracking_outage,
                  kill_after_checkpoint=args.kill_after_checkpoint)
    print(json.dumps(summary, indent=2))
    return 0 if summary["sweep_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
