"""Ray connection for every medfed job: a local instance on loopback, or a cluster.

`ray_session` is the one place that starts or joins Ray. A local instance
binds 127.0.0.1 only and gets an explicit CPU count, so a laptop run never
exposes Ray on the network and never oversubscribes a small machine; it
reports no usage statistics (see ``_quiet_local_instance``). Joining
an existing cluster (``address`` or ``$RAY_ADDRESS``) leaves that cluster
running when the job ends; a local instance started here is always shut
down, on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def _local_cpus(requested: int | None) -> int:
    """Returns the CPU count to declare for a local instance (at least 1)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_cpus must be at least 1, got {requested}")
        return requested
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
) -> Iterator[dict]:
    """Starts or joins Ray for the duration of a ``with`` block.

    address: ``None`` reads ``$RAY_ADDRESS``; if that is unset too, a local
        instance is started on 127.0.0.1 with ``num_cpus`` CPUs (default:
        all cores) and ``num_gpus`` GPUs (default: what Ray detects).
        ``"auto"`` or ``"HOST:PORT"`` joins an existing cluster.
    Yields a summary: ``{"address", "local", "nodes", "cpus", "gpus"}``.
    If Ray is already initialised in this process, it is reused and left
    running.
    """
    import ray

    if ray.is_initialized():
        yield _summary(ray, local=False, started=False)
        return

    address = address or os.environ.get("RAY_ADDRESS") or None
    started_local = address is None
    if started_local:
        _pin_to_loopback()
        _quiet_local_instance()
        kwargs = dict(
            # "local" always starts a new instance; without it ray.init
            # attaches to any instance that `ray start` left on this machine.
            address="local",
            num_cpus=_local_cpus(num_cpus),
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        ray.init(**kwargs)
    else:
        ray.init(address=address, logging_level=logging.WARNING)

    try:
        info = _summary(ray, local=started_local, started=True)
        log.info(
            "ray %s: %d node(s), %.0f CPU, %.0f GPU",
            "local instance on 127.0.0.1" if started_local else f"cluster {address}",
            info["nodes"], info["cpus"], info["gpus"],
        )
        yield info
    finally:
        ray.shutdown()


def _pin_to_loopback() -> None:
    """Makes a local instance bind 127.0.0.1 instead of the routable address.

    Ray picks the machine's network address for the GCS and raylet even with
    ``_node_ip_address`` set. Its own switch for "local only" is an
    environment variable read once at import, so it is set for the child
    processes Ray spawns and patched into the already imported constant.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _quiet_local_instance() -> None:
    """Turns off Ray's usage-statistics reporting for a local instance.

    A job on patient data has no business sending anything off the machine,
    and with the dashboard off, usage reporting is all the dashboard process
    would do. Ray reads the switch from the environment of every process it
    starts; an explicit ``RAY_USAGE_STATS_ENABLED`` set by the user is kept.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _summary(ray, local: bool, started: bool) -> dict:
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "address": ray.get_runtime_context().gcs_address,
        "local": local,
        "started": started,
        "nodes": len(nodes),
        "node_addresses": sorted({n["NodeManagerAddress"] for n in nodes}),
        "cpus": float(res.get("CPU", 0.0)),
        "gpus": float(res.get("GPU", 0.0)),
    }


def cluster_has_gpu() -> bool:
    """True when the connected Ray cluster advertises at least one GPU."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) >= 1.0
