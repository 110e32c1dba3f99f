"""Shared fixtures: a real local Ray (loopback only), the prepared digits, a real S3 server, all started
and stopped by the tests themselves."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

# Ray 2.60 swaps 127.0.0.1 for the routable address unless this is set; it must precede `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
from servers import free_port, recording_env, wait_until_up


@contextlib.contextmanager
def local_ray():
    """A local Ray (loopback only, 4 logical CPUs so two 1-CPU workers and a trainer fit on 2
    cores), started for one test and shut down right after it. Not one Ray for the whole session:
    this test process forks (FFCV's writer, prepare's checks) between the tests that use Ray, and
    in full CI runs the session's Ray stopped answering minutes later (ray.cluster_resources()
    waited for ever on GCS), while a Ray started just before it is used works."""
    import shutil
    import socket
    import tempfile

    import ray

    # A short temp dir of our own: Ray's socket paths must stay under the 107-byte Unix limit.
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as s:  # the dashboard serves the state API Ray Train's clean-up polls
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _temp_dir=tmp, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ray_local():
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    """The embedded digits, prepared once for the whole session as training does it (on first use).
    Every test file reads this one directory; a test that damages a dataset copies it first."""
    from raysnet.config import load_config
    from raysnet.data import ensure_dataset

    root = str(tmp_path_factory.mktemp("data") / "digits")
    ensure_dataset(load_config([f"data.root={root}"]).data)
    return root


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, digits):
    """plain20 vs resnet20 on digits through `python -m raysnet.tune`, killed after its first trial
    and run again to the end (see tests/sweep_helpers.py)."""
    from sweep_helpers import interrupted_sweep

    return interrupted_sweep(tmp_path_factory.mktemp("sweep"), digits)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (moto's) on loopback with a bucket `data`; the AWS_* variables point pyarrow,
    boto3 and the processes the tests start at it. -> the file where it records each request
    (`servers.recorded_requests` reads it)"""
    if shutil.which("moto_server") is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    folder = tmp_path_factory.mktemp("s3")
    recording = folder / "requests.jsonl"
    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=open(folder / "moto.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **recording_env(recording)})
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_until_up(env["AWS_ENDPOINT_URL"], 30)
        import boto3

        boto3.client("s3").create_bucket(Bucket="data")
        yield recording
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
