import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())  # shipped inside Ray
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)  # GPU workers autoscale from zero
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in workers)
    assert "mlflow server" in " ".join(config["head_start_ray_commands"])


def test_the_local_cluster_has_cluster_yamls_node_types_and_resources(tmp_path, monkeypatch):
    """cluster-local.yaml is made from cluster.yaml: same worker types, resources (GPU -> fake_gpu), a head that
    holds no trial, workers from zero; valid for Ray's autoscaler; and the capacity check reads its maximum."""
    import ray.autoscaler

    from raytasks.local_cluster import FAKE_GPU, FAKE_HEAD, render
    from raytasks.resources import _autoscaler_spec

    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    local = yaml.safe_load(render())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(local, schema)
    renamed = {FAKE_HEAD if n == real["head_node_type"] else n: t for n, t in real["available_node_types"].items()}
    assert set(local["available_node_types"]) == set(renamed) and local["head_node_type"] == FAKE_HEAD
    for name, node in renamed.items():
        resources = {(FAKE_GPU if k == "GPU" else k): v for k, v in node["resources"].items()}
        assert local["available_node_types"][name]["resources"] == resources, name
        if name != FAKE_HEAD:
            assert local["available_node_types"][name]["min_workers"] == 0
            assert 1 <= local["available_node_types"][name]["max_workers"] <= node["max_workers"]
    assert local["available_node_types"][FAKE_HEAD]["resources"].get("CPU") == 0  # the head runs no trial
    path = tmp_path / "cluster-local.yaml"
    path.write_text(render())
    monkeypatch.setenv("UNLEARN_AUTOSCALER_CONFIG", str(path))
    assert _autoscaler_spec() == local


def test_capacity_is_what_the_autoscaler_can_grow_to(tmp_path, monkeypatch):
    """A head with no work resources and no worker yet: the capacity is the node types' maximum, and a trial no node
    type can hold even at full scale is a config error."""
    from raytasks.local_cluster import render
    from raytasks.resources import cluster_capacity, node_shapes, plan_trials
    from unlearn.config import load_config
    from unlearn.errors import ConfigError

    path = tmp_path / "cluster-local.yaml"
    path.write_text(render())
    monkeypatch.setenv("UNLEARN_AUTOSCALER_CONFIG", str(path))
    capacity, shapes = cluster_capacity(), node_shapes()
    assert capacity == {"CPU": 16, "fake_gpu": 2}  # head CPU 0 + 2 workers x (8 CPUs, 1 GPU as fake_gpu)
    config = load_config("digits-ae", [f"cache_dir={tmp_path}"])
    plan = plan_trials(config, 1, False, capacity, shapes, None, None)
    assert plan.resources == {"CPU": 1.0} and plan.concurrency == 16
    with pytest.raises(ConfigError, match="more than any node has"):
        plan_trials(load_config("digits-ae", [f"cache_dir={tmp_path}", "sweep.cpus_per_trial=12"]), 1, False, capacity, shapes,
                    None, None)
    with pytest.raises(ConfigError, match="can hold at most 16"):
        plan_trials(config, 17, False, capacity, shapes, None, None)
