"""The cluster path end to end on one machine (raytasks/local_cluster.py): Ray's fake autoscaler made from
cluster.yaml, `mlflow server` on localhost, the sweep against both, a worker node killed while a trial runs on it,
the tracking server stopped for 40 s once the first trial is logged.

Not in the default run (it starts its own Ray head, which must not meet the session's Ray instance, and takes
about 8 minutes with the stages trained by the session fixture): `pytest -m cluster tests/test_local_cluster.py`.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster


def test_sweep_on_an_autoscaling_cluster_survives_a_lost_node_and_a_tracking_outage(prepared, default_config, tmp_path):
    from raytasks.local_cluster import run

    work = tmp_path / "cluster"
    out = run(work, ["--methods", "realistic", "--trials", "3", "--set", "sweep.confirm_seeds=1",
                     "--set", "sweep.max_concurrent=2", "--set", f"cache_dir={default_config.resolved_cache_dir()}"],
              kill=True, tracking_outage=40.0)
    assert out["sweep_exit_code"] == 0, (work / "sweep.log").read_text()[-3000:]
    assert out["workers_at_start"] == 0 and out["workers_ever"] >= 1
    assert out["workers_at_end"] == 0  # scaled down after the sweep (idle timeout)
    assert out["prepared_on_node"] in out["worker_nodes"]  # the stages were prepared on a worker, not the head
    assert out["trials_per_node"] and set(out["trials_per_node"]) <= set(out["worker_nodes"])
    assert out["killed"], "no worker node was running a trial to kill"
    assert sum(out["retried_trials"].values()) >= 1
    assert out["tracking_outage"].get("up_at_s")
    # each worker node had a temp folder of its own (as a machine has), and its raylet used it
    temps = out["node_temp_dirs"]
    assert set(out["worker_nodes"]) <= set(temps)
    assert len({t["folder"] for t in temps.values()}) == len(temps) and all(t["raylet_logs_there"] for t in temps.values())
    assert out["mlflow_trial_runs"] == 4 and set(out["mlflow_runs_per_trial"].values()) == {1}  # 3 + 1 confirmation
