"""Shared fixtures: one local Ray instance per test session, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    env = os.environ.get("MEDFED_DATA_DIR")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data" / "diabetes130"


@pytest.fixture(scope="session")
def diabetes_zip() -> Path:
    """Path of the official Diabetes 130 zip; skips where the data is absent."""
    path = _data_dir() / "dataset_diabetes.zip"
    if not path.exists():
        pytest.skip(f"Diabetes 130 data not found at {path}; set MEDFED_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance on 127.0.0.1 with 2 CPUs, shared by the session."""
    from cluster.runtime import ray_session

    with ray_session(num_cpus=2) as info:
        assert info["node_addresses"] == ["127.0.0.1"], info
        yield info
