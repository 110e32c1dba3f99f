"""Shared fixtures: a real Ray head (loopback only), the prepared digits, a real S3 server, all started
and stopped by the tests themselves; and the time limit of every test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

# Ray 2.60 swaps 127.0.0.1 for the routable address unless this is set; it must precede `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Two xdist workers share the machine's cores: one compute thread per process (torch's and OpenMP's
# pools, and those of the processes the tests start), or each worker's pool of one thread per core
# oversubscribes them (the quick loop took 125 s instead of 102 s on 2 cores). Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from servers import free_port, recording_env, wait_until_up


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3):
    """One Ray head for the whole session, as a cluster runs it: `ray start --head` in a process of
    its own, on 127.0.0.1, with token authentication (a token of its own, not ~/.ray's). -> the
    environment a client needs (RAY_ADDRESS, the token, the dashboard's address as DASHBOARD);
    `python -m raysnet.train` and `raysnet.tune` run with it connect instead of starting a Ray.

    The test process itself never holds a Ray driver: it forks (FFCV's writer, prepare's checks),
    and Ray does not support forking a process that holds one (the session's Ray stopped answering
    minutes later). Every driver is a subprocess.

    Its workers inherit the head's environment, as on a cluster's node: the S3 server's AWS_*
    variables (the `s3` fixture) and a dataset cache of the session's own (RAYSNET_CACHE)."""
    import secrets

    port, dash = free_port(), free_port()
    temp = Path("/tmp") / f"rh{port}"  # short: Ray's socket paths have a 107-byte limit
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": "/tmp",
           # Its processes ask this head's state API, not "the newest Ray on this machine": other
           # Rays run beside it (the killed-driver test's, the cluster's), and Ray Train's
           # placement-group cleaner printed a traceback when it asked one of those.
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}",
           "RAYSNET_CACHE": str(tmp_path_factory.mktemp("node-cache"))}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # Ports of our own: a Ray of the killed-driver test, or another user's, holds the default ones.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=open(tmp_path_factory.mktemp("ray") / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{dash}/api/version", 180)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "DASHBOARD": f"http://127.0.0.1:{dash}",
               "HEAD_PID": str(head.pid)}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(3)
        except subprocess.TimeoutExpired:  # its graceful stop waits 10 s and more on its workers: not needed here
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


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
def trained_digits(tmp_path_factory, digits) -> Path:
    """A raysnet checkpoint of a ResNet-20 trained on the digits in-process (tests/trained.py), once
    a run: the first xdist worker to need it trains it into the run's shared base directory, under a
    lock, and the other reads it (training twice cost the quick loop 25 s)."""
    from filelock import FileLock
    from trained import train_digits

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained-digits"  # the run's own
    with FileLock(f"{shared}.lock"):
        done = shared / "checkpoint.pt"
        return done if done.is_file() else train_digits(shared, digits)


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


@pytest.fixture
def mlflow_db(tmp_path, _empty_mlflow_db) -> str:
    """The URI of a fresh SQLite MLflow store of this test's own: a copy of one made once per
    session (MLflow creating and migrating its tables takes 2-3 s each time)."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, digits, ray_head):
    """plain20 vs resnet20 on digits through `python -m raysnet.tune`, killed after its first trial
    and run again to the end (see tests/sweep_helpers.py)."""
    from sweep_helpers import interrupted_sweep

    return interrupted_sweep(tmp_path_factory.mktemp("sweep"), digits, ray_head)


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


# --- two workers ---------------------------------------------------------------------------------
# Every run takes two pytest-xdist workers (`-n 2` in pyproject.toml): the in-process tests use one
# core each, so two of them run side by side. What starts Ray comes after every in-process test:
# beside a worker of in-process tests Ray's node start-up (a fixed 30 s for the raylet to register)
# timed out. Then two groups, one test after another in each: the session head's scenarios (and a
# driver's local Ray) on one worker, and the multi-node cluster on the other, beside them. Each of
# those tests runs slower so (docs/DESIGN.md, "How the suite is built"), but the whole suite took
# 14 min 36 s of tests instead of 15 min 52 s one group after the other (2026-12-03, the same code
# but for this line). The end-to-end tests that start no Ray (commands, prepares, spawned processes)
# come last, on whichever worker is free.

STARTS_RAY = {"ray_head", "world"}


def _starts_ray(item) -> bool:
    return bool(STARTS_RAY & set(item.fixturenames) or item.get_closest_marker("local_ray"))


def _phase(item) -> int:
    if _starts_ray(item):
        return 2 if "world" in item.fixturenames else 1
    return 3 if item.get_closest_marker("e2e") else 0


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _starts_ray(item):
            item.add_marker(pytest.mark.xdist_group("cluster" if "world" in item.fixturenames else "ray"))
    items[:] = sorted(items, key=_phase)  # stable: each file's tests keep their order


# --- time limits ----------------------------------------------------------------------------------
# A test over its limit fails, so that the suite's time grows by decision rather than by drift. The
# limits hold on a 2-core machine with room to spare, also under the quick loop's two workers. The
# test's own call is held to its limit, its
# set-up (the session's servers, or a scenario's shared run) to the e2e limit. A test that needs
# longer in either says so, with the reason:
#     @pytest.mark.budget(300, "two ray job submissions and a node loss on four Ray nodes")

LIMIT_S = {"e2e": 150.0, "slow": 900.0, "unit": 30.0}


def pytest_configure(config):
    config.addinivalue_line("markers", "budget(seconds, reason): a time limit above the default one, and why")
    config.addinivalue_line("markers", "local_ray: its driver starts a local Ray of its own (see STARTS_RAY)")


def _limit(item) -> tuple[float, str]:
    mark = item.get_closest_marker("budget")
    if mark is not None:
        seconds, reason = mark.args
        return float(seconds), f"its budget ({reason})"
    kind = next((k for k in ("slow", "e2e") if item.get_closest_marker(k)), "unit")
    return LIMIT_S[kind], f"the limit of a{'n' if kind != 'slow' else ''} {kind} test"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when in ("setup", "call") and report.passed:
        seconds, what = _limit(item)
        if call.when == "setup" and not item.get_closest_marker("budget"):
            seconds, what = max(seconds, LIMIT_S["e2e"]), "the limit of a set-up"
        if call.duration > seconds:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {call.duration:.1f} s in its {call.when}, over {what} of "
                               f"{seconds:.0f} s. Make it cheaper, or mark it "
                               f"@pytest.mark.budget(SECONDS, 'why') if it must take that long.")
