"""Merkle trees with RFC 6962 hashing: roots, inclusion paths and their check.

Leaves are hashed as SHA-256(0x00 || data) and inner nodes as
SHA-256(0x01 || left || right), so a leaf can never pass for a node. A tree of
n leaves splits at the largest power of two below n (RFC 6962 section 2.1);
the empty tree's root is SHA-256 of nothing.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _root(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_root(hashes[:k]), _root(hashes[k:]))


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of the leaf data ``leaves``."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _root([leaf_hash(d) for d in leaves])


def _path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if m < k:
        return _path(m, hashes[:k]) + [_root(hashes[k:])]
    return _path(m - k, hashes[k:]) + [_root(hashes[:k])]


def inclusion_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """Audit path of leaf ``index``: sibling hashes from the leaf up to the root."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} is outside a tree of {len(leaves)}")
    return _path(index, [leaf_hash(d) for d in leaves])


def verify_inclusion(
    data: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes
) -> bool:
    """True when leaf ``data`` at ``index`` of a ``size``-leaf tree has this root.

    The algorithm of RFC 9162 section 2.1.3.2.
    """
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    result = leaf_hash(data)
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and result == expected_root
