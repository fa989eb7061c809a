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


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_fails_fast():
    import time

    from cluster.runtime import RayStartError, check_address

    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(RayStartError, match=f"no Ray cluster answers at "
                       f"127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    with pytest.raises(ValueError, match="not HOST:PORT"):
        check_address("127.0.0.1")


def test_joining_a_loopback_address_pins_ray_to_loopback(monkeypatch):
    import socket

    import ray
    from ray._private import ray_constants

    from cluster import runtime

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(
        (kw, ray_constants.ENABLE_RAY_CLUSTER)))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runtime, "_summary", lambda ray, local, started: {
        "nodes": 1, "cpus": 1.0, "gpus": 0.0})
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with runtime.ray_session(address=f"127.0.0.1:{port}"):
            pass
    [(kwargs, cluster_mode)] = calls
    assert kwargs["address"] == f"127.0.0.1:{port}"
    assert cluster_mode is False


def test_a_local_instance_that_fails_to_start_is_one_clear_error(monkeypatch):
    import ray

    from cluster import runtime

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could "
                        "happen because some of the raylet failed to startup")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(runtime.RayStartError) as caught:
        with runtime.ray_session(num_cpus=1):
            pass
    message = str(caught.value)
    assert message.startswith("Ray could not start a local instance: The current "
                              "node timed out during startup.")
    assert "ray stop" in message and "\n" not in message
