"""Drives one masked round in-process, stage by stage.

The same stage methods are what a distributed deployment calls remotely;
this helper runs them in one process for tests and benchmarks, and can make
chosen hospitals drop at a chosen stage.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

import numpy as np

from federation.secagg.client import MaskingClient
from federation.secagg.server import MaskingServer


def run_masked_round(
    clients: Sequence[MaskingClient],
    values: Sequence[np.ndarray],
    weights: Sequence[int],
    drop_after_masking: Collection[int] = (),
    drop_before_masking: Collection[int] = (),
    drop_before_sharing: Collection[int] = (),
    server: MaskingServer | None = None,
    device: str = "auto",
) -> tuple[np.ndarray, int, dict]:
    """Runs all stages; returns ``MaskingServer.aggregate()``'s result.

    clients: one per hospital, all for the same config and round; ``values[i]``
        and ``weights[i]`` belong to ``clients[i]``. ``values`` may be any
        sequence, e.g. one that builds each vector on access.
    drop_before_sharing: hospital ids that advertise and then vanish.
    drop_before_masking: ids that share keys but send no masked input; their
        values are not in the sum, their pairwise masks are removed.
    drop_after_masking: ids whose masked input arrives but which never answer
        the unmasking request; their values are in the sum.
    server: the coordinator; None builds one from the first client's
        config, round and directory on ``device``.

    The report gains ``client_seconds`` (per hospital, all its stages),
    ``client_bytes_out`` (per hospital) and ``server_seconds`` (all
    coordinator stages).
    """
    first = clients[0]
    if server is None:
        server = MaskingServer(first.config, first.round, first.directory, device)
    client_seconds = {c.hospital_id: 0.0 for c in clients}
    client_bytes = {c.hospital_id: 0 for c in clients}
    server_seconds = 0.0

    def timed(client: MaskingClient, method, *args):
        start = time.perf_counter()
        result = method(*args)
        client_seconds[client.hospital_id] += time.perf_counter() - start
        return result

    def serve(method, *args):
        nonlocal server_seconds
        start = time.perf_counter()
        result = method(*args)
        server_seconds += time.perf_counter() - start
        return result

    adverts = []
    for c in clients:
        advert = timed(c, c.advertise)
        client_bytes[c.hospital_id] += advert.nbytes()
        adverts.append(advert)
    serve(server.receive_adverts, adverts)

    sharing = [c for c in clients if c.hospital_id not in drop_before_sharing]
    bundles = []
    for c in sharing:
        relay = serve(server.relay_for, c.hospital_id)
        bundle = timed(c, c.share_keys, relay)
        client_bytes[c.hospital_id] += sum(s.nbytes() for s in bundle)
        bundles.append(bundle)
    routed = serve(server.route_shares, bundles)

    by_id = {c.hospital_id: i for i, c in enumerate(clients)}
    masking = [c for c in sharing if c.hospital_id not in drop_before_masking]
    for c in masking:
        i = by_id[c.hospital_id]
        masked = timed(
            c, c.masked_input, values[i], weights[i], routed.get(c.hospital_id, [])
        )
        client_bytes[c.hospital_id] += masked.nbytes()
        serve(server.receive_masked_input, masked)
        del masked

    survivors, dropped = serve(server.unmask_request)
    for c in masking:
        if c.hospital_id in drop_after_masking:
            continue
        response = timed(c, c.unmask_response, survivors, dropped)
        client_bytes[c.hospital_id] += response.nbytes()
        serve(server.receive_unmask, response)

    total, weight, report = serve(server.aggregate)
    report["client_seconds"] = client_seconds
    report["client_bytes_out"] = client_bytes
    report["server_seconds"] = server_seconds
    return total, weight, report
