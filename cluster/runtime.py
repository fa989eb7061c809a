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
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Seconds a joined cluster's address has to accept a TCP connection.
PROBE_TIMEOUT_S = 5.0


class RayStartError(RuntimeError):
    """Ray could not be started or joined; the message says what to try."""


def _host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; ValueError else."""
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379) or "
            "'auto'"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raises RayStartError unless something accepts TCP at ``address``.

    Ray's own connect retries for minutes and ignores Ctrl-C when nothing
    listens; this probe answers in at most ``timeout_s`` seconds. A listener
    that is not Ray is still left for ``ray.init`` to find out.
    """
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayStartError(
            f"no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
            "start one with `ray start --head --node-ip-address 127.0.0.1 "
            "--port PORT`, check --address, or leave --address out for a local "
            "instance"
        ) from exc


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
        ``"auto"`` or ``"HOST:PORT"`` joins an existing cluster. A
        ``HOST:PORT`` must accept a TCP connection within
        ``PROBE_TIMEOUT_S`` seconds; a loopback host keeps the driver on
        127.0.0.1 too.
    Raises RayStartError (one line on what to try) when Ray cannot be
    started or joined.
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
        try:
            ray.init(**kwargs)
        except Exception as exc:  # Ray raises bare Exception on a failed start
            ray.shutdown()
            raise RayStartError(
                f"Ray could not start a local instance: {_first_line(exc)}. Try "
                "again; if it persists, check free memory and free space in "
                "/tmp (Ray's session folder), stop a stale instance with `ray "
                "stop`, or give fewer --num-cpus"
            ) from exc
    else:
        if address != "auto":
            check_address(address)
            if is_loopback(_host_port(address)[0]):
                # Ray rewrites a loopback address to the machine's network
                # address unless told the cluster is local.
                _pin_to_loopback()
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as exc:
            ray.shutdown()
            raise RayStartError(
                f"could not join the Ray cluster at {address}: "
                f"{_first_line(exc)}; check that it runs (`ray status`) and "
                "that this machine's Ray version matches it"
            ) from exc

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


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
