"""Ray connection and the multi-node cluster definition."""

from pathlib import Path

import pytest
import yaml

from cluster.runtime import _local_cpus

REPO = Path(__file__).resolve().parent.parent


def test_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_local_cpu_count_must_be_positive():
    with pytest.raises(ValueError, match="num_cpus must be at least 1, got 0"):
        _local_cpus(0)
    assert _local_cpus(3) == 3


def test_local_instance_binds_loopback_only(ray_local):
    import ray

    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert addresses == {"127.0.0.1"}
    assert ray_local["cpus"] == 2.0
    assert ray_local["address"].startswith("127.0.0.1:")


def test_local_instance_reports_no_usage_statistics(ray_local):
    from ray._common.usage import usage_lib

    assert not usage_lib.usage_stats_enabled()
