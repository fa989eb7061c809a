"""DataError: the one error type the clinical package raises for bad data."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or not the expected data set.

    The message names the file and the problem, and says what to do (for a
    missing file: ``medfed data fetch``). It subclasses ``ValueError`` so the
    CLI prints it as one line without a traceback.
    """
