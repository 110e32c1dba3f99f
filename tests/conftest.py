"""Shared fixtures: a real local Ray (loopback only) started and stopped by the tests."""

from __future__ import annotations

import os

# Ray 2.60 swaps 127.0.0.1 for the routable address unless this is set; it must precede `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 4 logical CPUs so two 1-CPU workers and a trainer fit on 2 cores."""
    import shutil
    import tempfile

    import ray

    # A short temp dir of our own: Ray's socket paths must stay under the 107-byte Unix limit.
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")

    if ray.is_initialized():
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             _temp_dir=tmp, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
