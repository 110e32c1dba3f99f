"""The training service end to end on a real local Ray, real MLflow, real FFCV files (digits)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from clitools import one_paragraph, ray_started, run_cli
from servers import free_port, wait_until_up

from raysnet.config import load_config

REPO = Path(__file__).resolve().parent.parent
FAST = ["arch=resnet20", "batch_size=64", "run.workers=2", "tracking.log_model=false"]


def history(uri: str, run_name: str, experiment: str = "raysnet-digits") -> dict[str, list]:
    """metric -> [(step, value)] of the one MLflow run named `run_name`."""
    from raysnet import tracking

    mlflow = tracking.client(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, found {len(runs)}"
    return tracking.history(mlflow, runs[0].info.run_id)


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysnet.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.e2e
def test_trains_and_records_in_sqlite(ray_local, tmp_path, digits):
    from raysnet.lifecycle import run_one

    cfg = load_config([*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=e2e", "epochs=3",
                       "tracking.log_model=true"])
    assert run_one(cfg) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    h = history(uri, "e2e")
    assert [s for s, _ in h["train_err"]] == [0, 1, 2]  # MLflow step = epoch index, each once
    assert all(len(v) == 3 for v in h.values())
    assert h["train_loss"][-1][1] < h["train_loss"][0][1]  # it learns
    # The checkpoint holds everything a resume needs and loads into the model.
    ckpts = sorted((tmp_path / "e2e").glob("checkpoint_*/checkpoint.pt"))
    state = torch.load(ckpts[-1], weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "mlflow_run_id"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["run"]["name"] == "e2e"
    from raysnet.models import build_model

    build_model("resnet20", num_classes=10).load_state_dict(state["model"])
    # MLflow holds the resolved config, the last checkpoint and the model.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("raysnet-digits").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["residual"] == "residual"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["run.name"] == "e2e"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoint"} <= artifacts


@pytest.mark.e2e
@pytest.mark.slow  # an MLflow server in the default suite: tests/test_storage.py and tests/test_cluster.py
def test_records_to_an_mlflow_server(ray_local, tmp_path, digits):
    from raysnet.lifecycle import run_one

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_up(uri + "/health", 180)  # it migrates its new SQLite store first: slow on 2 busy cores
        cfg = load_config([*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=srv",
                           "epochs=2", f"tracking.uri={uri}"])
        assert run_one(cfg) == 0
        h = history(uri, "srv")
        assert [s for s, _ in h["val_err"]] == [0, 1]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_unreachable_tracking_server_fails_fast(capsys, tmp_path, digits):
    start = time.time()
    out = run_cli(capsys, "raysnet.train", f"data.root={digits}", f"run.storage={tmp_path}",
                  f"tracking.uri=http://127.0.0.1:{free_port()}")
    msg = one_paragraph(out)
    assert "unreachable" in msg and "tracking.uri" in msg
    assert time.time() - start < 60
    assert not (tmp_path / "mlflow.db").exists()  # nothing started, nothing written
    assert not ray_started()


@pytest.mark.e2e
def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(ray_local, tmp_path, digits):
    from raysnet.lifecycle import run_one

    steps = json.loads((Path(digits) / "meta.json").read_text())["splits"]["train"]["samples"] // 64
    # Epoch 0 trains at lr 1e30 * 1e-31 = 0.1 (warm-up); epoch 1 at 1e30 overflows.
    cfg = load_config([*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=nan", "epochs=3",
                       "optim.lr=1e30", f"optim.warmup_iters={steps}", "optim.warmup_factor=1e-31"])
    assert run_one(cfg) == 1
    ckpts = sorted((tmp_path / "nan").glob("checkpoint_*/checkpoint.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["epoch"] == 0


def _train_workers() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline()) and "train_fn" not in p.name()]


@pytest.mark.e2e
def test_survives_a_killed_worker(ray_local, tmp_path, digits):
    """Kill one training worker after the first checkpoint: the run resumes and finishes every epoch,
    and MLflow holds each epoch exactly once."""
    from raysnet.lifecycle import run_one

    cfg = load_config([*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=ft", "epochs=4",
                       "run.max_failures=2"])
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", run_one(cfg)))
    thread.start()
    deadline = time.time() + 300
    while not list((tmp_path / "ft").glob("checkpoint_*")) and time.time() < deadline:
        time.sleep(0.2)
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    workers[-1].kill()
    thread.join(600)
    assert result.get("rc") == 0
    h = history(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft")
    assert [s for s, _ in h["train_loss"]] == [0, 1, 2, 3]


def listening_sockets(pid: int) -> dict[str, set[str]]:
    """Process name -> the addresses its listening TCP sockets are bound to, for `pid` and every
    process below it (a local run's Ray processes and its Ray Train workers)."""
    import psutil

    root = psutil.Process(pid)
    found: dict[str, set[str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(proc.cmdline()[:1]) or proc.name()  # Ray's workers retitle themselves ray::...
            sockets = proc.net_connections(kind="inet")
        except psutil.Error:  # gone meanwhile
            continue
        for s in sockets:
            if s.status == psutil.CONN_LISTEN:
                found.setdefault(name, set()).add(s.laddr.ip)
    return found


def loopback(ip: str) -> bool:
    """127.0.0.1, ::1, or 127.0.0.1 as an IPv6 socket shows it (::ffff:127.0.0.1); not "::" or 0.0.0.0."""
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


@pytest.mark.e2e
def test_resumes_after_the_driver_is_killed(tmp_path, digits):
    """Also: while it trains, every socket of the local run listens on loopback only (issue 13)."""
    args = [*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=again", "epochs=4"]
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}
    driver = subprocess.Popen([sys.executable, "-m", "raysnet.train", *args], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "again").glob("checkpoint_*/checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.2)
        sockets = listening_sockets(driver.pid)  # epoch 2 is training: the process group is up
        time.sleep(1)  # let Ray register the checkpoint it just wrote
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, by process group
        driver.wait(30)
    assert any("RayTrainWorker" in name for name in sockets), sockets  # the workers, with the store and Gloo
    assert all(loopback(ip) for ips in sockets.values() for ip in ips), sockets
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    h = history(f"sqlite:///{tmp_path / 'mlflow.db'}", "again")
    assert [s for s, _ in h["train_loss"]] == [0, 1, 2, 3]


@pytest.mark.e2e
def test_gpus_a_local_machine_lacks_fail_fast(tmp_path, digits):
    start = time.time()
    out = cli(*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.gpus_per_worker=1", "run.max_failures=0")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "run.gpus_per_worker=1" in out.stderr and "Traceback" not in out.stderr
    assert time.time() - start < 120  # not Ray's endless wait for resources
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any MLflow run was opened


def test_a_changed_config_does_not_resume_silently(capsys, tmp_path, digits):
    (tmp_path / "x").mkdir()
    from raysnet.config import to_yaml

    saved = to_yaml(load_config([f"data.root={digits}", f"run.storage={tmp_path}", "run.name=x", "epochs=9"]))
    (tmp_path / "x" / "raysnet-config.yaml").write_text(saved)
    out = run_cli(capsys, "raysnet.train", f"data.root={digits}", f"run.storage={tmp_path}", "run.name=x", "epochs=3")
    msg = one_paragraph(out)
    assert "epochs" in msg and "different config" in msg
    assert (tmp_path / "x" / "raysnet-config.yaml").read_text() == saved  # the run's config is untouched
    assert not ray_started()


@pytest.mark.e2e
def test_ray_job_submit(tmp_path, digits):
    """`ray job submit --working-dir . -- python -m raysnet.train` against `ray start --head` on 127.0.0.1."""
    port, dash = free_port(), free_port()
    # Token authentication on, with a token of this test's own (not the shared ~/.ray/auth_token).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    temp = Path("/tmp") / f"rj{port}"  # short: Ray's socket paths have a 107-byte limit
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # Ports of our own: another Ray on this machine (the session's) holds the default agent ports.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_until_up(address + "/api/version", 120)
        for _ in range(30):  # the dashboard answers before its job agent is up
            out = subprocess.run(
                ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                 "python", "-m", "raysnet.train", *FAST, "epochs=1", f"data.root={digits}",
                 f"run.storage={tmp_path}", "run.name=job"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "succeeded" in out.stdout and "raysnet: done" in out.stdout
        assert len(history(f"sqlite:///{tmp_path / 'mlflow.db'}", "job")["val_err"]) == 1
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
