"""Conversion of results and records to plain JSON values.

Shared by everything that writes JSON a person or another replica reads back
(``metrics.json``, checkpoints): numpy scalars and arrays become Python
numbers and lists, non-finite floats become ``null`` so the file is strict
JSON, and anything else that is not a JSON value is refused rather than
written as something that cannot be read back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(value: Any, what: str = "JSON") -> Any:
    """Returns ``value`` as JSON values: dicts, lists, numbers, strings, None.

    Dict keys become strings, tuples lists, Paths strings, numpy types Python
    ones and non-finite floats None. ``what`` names the destination in the
    error raised for a value of any other type.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, what) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), what)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(
        f"cannot write {type(value).__name__} {value!r} to {what}; convert it "
        "to numbers, strings, lists or dicts first"
    )
