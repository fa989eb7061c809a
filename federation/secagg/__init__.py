"""Secure aggregation: pairwise masking with Shamir recovery, and CKKS homomorphic sums.

Masking (SecAgg+): ``MaskingConfig``, ``MaskingClient`` (hospital side),
``MaskingServer`` (coordinator side) and ``run_masked_round`` (drives the
stages in one process). CKKS: ``federation.secagg.ckks``. Both return the sum
of weight * update and the total weight, for
``strategy.apply(global_weights, summed_weighted_delta, total_weight)``.
"""

from federation.secagg.client import MaskingClient
from federation.secagg.config import MaskingConfig
from federation.secagg.errors import (
    AggregationAborted,
    InvalidAdvert,
    InvalidShare,
    OutOfRange,
)
from federation.secagg.messages import (
    EncryptedShare,
    MaskedInput,
    SignedAdvert,
    UnmaskResponse,
)
from federation.secagg.round import run_masked_round
from federation.secagg.server import MaskingServer

__all__ = [
    "AggregationAborted",
    "EncryptedShare",
    "InvalidAdvert",
    "InvalidShare",
    "MaskedInput",
    "MaskingClient",
    "MaskingConfig",
    "MaskingServer",
    "OutOfRange",
    "SignedAdvert",
    "UnmaskResponse",
    "run_masked_round",
]
