"""Shamir secret sharing over the prime field of the Mersenne prime 2^521 - 1.

A secret integer below ``PRIME`` becomes the constant term of a random
polynomial of degree ``threshold - 1``; each holder gets the polynomial's value
at its own non-zero x. Any ``threshold`` shares rebuild the secret by Lagrange
interpolation at zero; fewer reveal nothing about it. The field is large
enough for 32-byte keys and seeds, which are shared as integers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

PRIME = 2**521 - 1
"""Field modulus: a Mersenne prime, so 32-byte secrets fit with room to spare."""

SHARE_BYTES = 66
"""Bytes of one encoded share value (521 bits rounded up)."""


def _random_element(randbytes: Callable[[int], bytes]) -> int:
    """Returns a uniform field element, drawing 521-bit candidates."""
    while True:
        candidate = int.from_bytes(randbytes(SHARE_BYTES), "big") & PRIME

        # PRIME is all ones in 521 bits, so only the value PRIME itself is
        # outside the field; rejecting it keeps the draw exactly uniform.
        if candidate < PRIME:
            return candidate


def split(
    secret: int,
    threshold: int,
    xs: Sequence[int],
    randbytes: Callable[[int], bytes],
) -> dict[int, int]:
    """Splits ``secret`` into one share per x in ``xs``; ``threshold`` rebuild it.

    xs: distinct non-zero field points, one per holder.
    randbytes: a source of secret random bytes (``os.urandom`` in production).
    Returns ``{x: y}``.
    """
    if not 0 <= secret < PRIME:
        raise ValueError(
            f"secret must lie in [0, 2^521 - 1), got {secret.bit_length()} bits"
        )
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold {threshold} must lie between 1 and the {len(xs)} holders"
        )
    if len(set(xs)) != len(xs) or any(x % PRIME == 0 for x in xs):
        raise ValueError(f"share points must be distinct and non-zero, got {list(xs)}")

    coefficients = [secret] + [_random_element(randbytes) for _ in range(threshold - 1)]

    shares = {}
    for x in xs:
        # Horner's rule from the highest coefficient down.
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def reconstruct(shares: Mapping[int, int]) -> int:
    """Rebuilds the secret from shares ``{x: y}`` by interpolation at zero.

    Contract: the caller passes at least ``threshold`` shares of one sharing;
    with fewer, the result is a meaningless field element (not an error), so
    callers verify the result against a commitment.
    """
    if not shares:
        raise ValueError("cannot reconstruct a secret from no shares")

    secret = 0
    points = list(shares.items())
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def encode(value: int) -> bytes:
    """Encodes a field element as ``SHARE_BYTES`` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode(data: bytes) -> int:
    """Decodes ``SHARE_BYTES`` bytes into a field element; rejects non-elements."""
    value = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or value >= PRIME:
        raise ValueError(f"not an encoded share: {len(data)} bytes")
    return value
