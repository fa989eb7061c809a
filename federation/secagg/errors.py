"""Errors raised by the secure aggregation protocols.

Each error says which hospital, value or share was wrong and what to do; a
round that cannot be completed safely raises ``AggregationAborted`` and
returns nothing, never a partial or wrong sum.
"""

from __future__ import annotations


class AggregationAborted(RuntimeError):
    """The round cannot produce a correct sum without breaking privacy.

    Raised when too many hospitals dropped to rebuild a needed secret, when
    too few masked inputs arrived, or when a rebuilt secret does not match
    its commitment. ``reason`` holds the human sentence, ``details`` the
    numbers behind it.
    """

    def __init__(self, reason: str, details: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = {} if details is None else details


class InvalidAdvert(ValueError):
    """A key advertisement failed signature, round or identity checks."""


class InvalidShare(ValueError):
    """An encrypted share failed authentication or was not addressed here."""


class OutOfRange(ValueError):
    """An update value lies outside the declared quantisation range.

    ``index`` and ``value`` name the first offending coordinate; ``count`` is
    the number of offending coordinates.
    """

    def __init__(self, message: str, index: int, value: float, count: int) -> None:
        super().__init__(message)
        self.index = index
        self.value = value
        self.count = count
