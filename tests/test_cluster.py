import json
from pathlib import Path

import jsonschema
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
