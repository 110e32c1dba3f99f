"""The training service end to end on a real local Ray, real MLflow, real FFCV files (digits)."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from clitools import one_paragraph, ray_started, run_cli
from PIL import Image
from servers import free_port, wait_until_up
from trained import images

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


def cli(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m raysnet.train ARGS` with `env` (the session's Ray head: it connects to it)."""
    return subprocess.run([sys.executable, "-m", "raysnet.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)


def step_points(uri: str, run_name: str, epochs: int, experiment: str = "raysnet-digits") -> tuple[list, list]:
    """(the global steps MLflow holds for iter/train_loss, the steps it should hold: every
    tracking.step_every steps of each epoch and each epoch's last, numbered from the run's start)."""
    from raysnet import tracking
    from raysnet.train.progress import step_every

    mlflow = tracking.client(uri)
    run = tracking.find_run(mlflow, experiment, tracking.RUN_NAME_TAG, run_name)
    steps = int(run.data.params[tracking.STEPS_PARAM])
    every = step_every(load_config([]), steps)
    expected = [e * steps + s for e in range(epochs) for s in range(1, steps + 1) if s % every == 0 or s == steps]
    got = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, tracking.STEP_METRICS[0]))
    return got, expected


def train_workers(head_pid: int) -> list:
    """The Ray Train worker processes of the session's Ray head."""
    found = []
    for p in psutil.Process(head_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that ends meanwhile (Ray's set-up processes come and go)
            if "RayTrainWorker" in " ".join(p.cmdline()) and "train_fn" not in p.name():
                found.append(p)
    return found


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, digits, ray_head):
    """One run, as a cluster's user runs it: `ray job submit --working-dir . -- python -m raysnet.train`
    to the session's Ray head (token authentication on), with everything recorded: the model logged
    and registered, system metrics every second. After its first checkpoint one training worker is
    killed: the run restarts its workers from that checkpoint and finishes.
    -> (run.storage, tracking uri, the submitter's output)"""
    tmp_path = tmp_path_factory.mktemp("recorded")
    args = [*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=e2e", "epochs=3",
            "run.max_failures=2", "tracking.log_model=true", "tracking.register=digits-e2e",
            "tracking.system_metrics_s=1"]
    submit = ["ray", "job", "submit", "--address", ray_head["DASHBOARD"], "--working-dir", ".", "--",
              "python", "-m", "raysnet.train", *args]
    for _ in range(30):  # the dashboard answers before its job agent is up
        job = subprocess.Popen(submit, cwd=REPO, env=ray_head, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not list((tmp_path / "e2e").glob("checkpoint_*")) and time.time() < deadline \
                    and job.poll() is None:
                time.sleep(0.2)
            if job.poll() is None:
                workers = train_workers(int(ray_head["HEAD_PID"]))
                assert workers, "no Ray Train worker process found"
                workers[-1].kill()
            out, err = job.communicate(timeout=600)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        if "No available agent" not in err:
            break
        time.sleep(2)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    return tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", out


RECORDED = "the recorded scenario's set-up: Ray's job agent, a run whose killed worker restarts from its checkpoint"


@pytest.mark.e2e
@pytest.mark.budget(300, RECORDED)
def test_a_submitted_job_survives_a_killed_worker_and_records_everything(recorded, digits):
    tmp_path, uri, out = recorded
    assert "succeeded" in out and "raysnet: done" in out
    assert "resuming" not in out  # a worker's loss is not a driver's rerun
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
    # Step-level curves against global iterations, each step once (the steps trained again after the
    # worker's loss are not logged twice); the epochs' stay at step = epoch.
    got, expected = step_points(uri, "e2e", 3)
    assert got == expected
    # System metrics of the one node that hosts both workers: one series per metric.
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {k.split("/")[1] for k in system} == {"node0"}, system
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= system
    assert len(client.get_metric_history(run.info.run_id, "system/node0/cpu_utilization_percentage")) >= 2
    assert client.get_experiment_by_name("raysnet-digits").tags["mlflow.experimentKind"] == "custom_model_development"
    version = client.get_model_version("digits-e2e", "1")
    assert version.run_id == run.info.run_id
    assert f"val_err {run.data.metrics['val_err']:.2f}%" in version.description
    # The registered model is the classifier (raysnet.serving): an image in, class names out; the
    # bare network is logged beside it.
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert sorted(m.name for m in logged if m.source_run_id == run.info.run_id) == ["model", "network"]
    assert version.source == f"models:/{next(m.model_id for m in logged if m.name == 'model')}"
    import mlflow

    from raysnet import tracking

    png = io.BytesIO()
    Image.fromarray(images(digits, "val")[0][0]).save(png, "PNG")
    with tracking.fluent_uri(uri):
        row = mlflow.pyfunc.load_model("models:/digits-e2e/1").predict([png.getvalue()]).iloc[0]
    assert row["error"] == "" and len(row["classes"]) == 5 and set(row["classes"]) <= set("0123456789")


def _browser():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver: install.sh test)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium") or shutil.which("google-chrome"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1200"):
        options.add_argument(arg)
    options.binary_location = browser
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.e2e
@pytest.mark.budget(300, RECORDED)  # when it runs alone
def test_the_mlflow_ui_shows_the_runs_charts_and_system_metrics(recorded):
    """The UI command raysnet prints opens on the runs table; the run's pages draw its metric charts
    (per epoch and per iteration) and its node's system metrics."""
    from selenium.webdriver.support.ui import WebDriverWait

    from raysnet import tracking

    _, uri, _ = recorded
    mlflow = tracking.client(uri)
    run = tracking.find_run(mlflow, "raysnet-digits", tracking.RUN_NAME_TAG, "e2e")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    browser = None
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/health", 120)
        browser = _browser()
        wait = WebDriverWait(browser, 120, poll_frequency=1)

        def shows(*words: str, charts: int = 0):
            return lambda b: all(w in b.find_element("tag name", "body").text for w in words) and \
                len(b.find_elements("css selector", ".js-plotly-plot")) >= charts

        browser.get(tracking.ui_url(base, run.info.experiment_id))
        wait.until(shows("Run Name", "e2e"))  # the runs table, not the GenAI overview
        assert "/runs" in browser.current_url
        # On to the run's tabs inside the page (a new load would parse the UI's scripts again).
        page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        browser.execute_script(f"window.location.hash = '{page}/model-metrics'")
        # The charts are drawn as they scroll into view: those of the first rows.
        wait.until(shows("iter/train_loss", "iter/train_err", "Model metrics", charts=4))
        browser.execute_script(f"window.location.hash = '{page}/system-metrics'")
        wait.until(shows("system/node0/cpu_utilization_percentage", charts=2))
    finally:
        if browser is not None:
            browser.quit()
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)


@pytest.mark.e2e
@pytest.mark.slow  # an MLflow server in the default suite: tests/test_storage.py and tests/test_cluster.py
def test_records_to_an_mlflow_server(ray_head, tmp_path, digits):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_up(uri + "/health", 180)  # it migrates its new SQLite store first: slow on 2 busy cores
        out = cli(*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=srv", "epochs=2",
                  f"tracking.uri={uri}", env=ray_head)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
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
def test_nonfinite_loss_stops_with_message_and_keeps_checkpoint(ray_head, tmp_path, digits):
    steps = 4  # run.max_steps
    # Epoch 0 trains at lr 1e30 * 1e-31 = 0.1 (warm-up); epoch 1 at 1e30 overflows.
    out = cli(*FAST, "run.workers=1", f"data.root={digits}", f"run.storage={tmp_path}", "run.name=nan", "epochs=3",
              "optim.lr=1e30", f"run.max_steps={steps}", f"optim.warmup_iters={steps}", "optim.warmup_factor=1e-31", env=ray_head)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the training loss became non-finite at epoch 2/3" in out.stderr
    ckpts = sorted((tmp_path / "nan").glob("checkpoint_*/checkpoint.pt"))
    assert len(ckpts) == 1 and torch.load(ckpts[0], weights_only=False)["epoch"] == 0


def listening_sockets(pid: int) -> dict[str, set[str]]:
    """Process name -> the addresses its listening TCP sockets are bound to, for `pid` and every
    process below it (a local run's Ray processes and its Ray Train workers)."""
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


# Rank 0's progress line (raysnet.train.progress): where the epoch is, and the two ETAs.
PROGRESS = re.compile(r"raysnet: epoch (\d+)/\d+ step \d+/\d+ at ([\d.]+) s: .*epoch ETA (.+), run ETA (.+)$")


def seconds(text: str) -> float:
    """An ETA as raysnet prints it (12 s, 4 min 05 s, 3 h 12 min, 2 d 04 h) -> seconds."""
    units = {"s": 1, "min": 60, "h": 3600, "d": 86400}
    parts = text.split()
    return sum(float(n) * units[u] for n, u in zip(parts[::2], parts[1::2]))


class TimedLines:
    """A process's output, read as it comes, each line with the time it arrived."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (one left unreaped, here by a PID 1 that does not reap, has ended)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def popen(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raysnet.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def check_cadence(lines: list[tuple[float, str]], every: float) -> None:
    """Progress lines come within the first epoch, `every` seconds apart (plus at most a few steps)."""
    first = [m for _, line in lines if (m := PROGRESS.search(line)) and m[1] == "1"]
    assert len(first) >= 2, "\n".join(line for _, line in lines)
    at = [float(m[2]) for m in first]
    assert all(every - 0.05 <= b - a <= every + 3 for a, b in itertools.pairwise(at)), at


def check_etas(lines: list[tuple[float, str]], epochs: int) -> None:
    """On a steady run (after the process's first epoch), each run ETA is within a factor of two
    of the time the run really took from there to its last epoch."""
    end = next(t for t, line in lines if f"epoch {epochs}/{epochs}:" in line)
    progress = [(t, m) for t, line in lines if (m := PROGRESS.search(line))]
    steady = [(t, m) for t, m in progress if int(m[1]) > int(progress[0][1][1]) and end - t >= 3]
    ratios = [seconds(m[4]) / (end - t) for t, m in steady]
    assert ratios and all(0.5 <= r <= 2 for r in ratios), [(m[0], round(end - t, 1)) for t, m in steady]


@pytest.mark.e2e
@pytest.mark.local_ray
@pytest.mark.budget(300, "two drivers that each start a local Ray, and five epochs, for steady ETAs")
def test_resumes_after_the_driver_is_killed(tmp_path, digits):
    """The driver that starts a local Ray of its own (the quickstart's way), killed (SIGKILL) and run
    again; the killed driver's Ray does not outlive it. Also: while it trains, every socket of the local run listens on loopback only; the progress
    lines come at their cadence within the first epoch, with ETAs that hold; and the console of the
    rerun (resuming) has no line that says "error"."""
    args = [*FAST, f"data.root={digits}", f"run.storage={tmp_path}", "run.name=again", "epochs=5",
            "run.progress_s=0.5"]  # several lines in an epoch of 3 s (the digits' 22 steps on an idle machine)
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}
    driver = popen(args, env)
    first = TimedLines(driver)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "again").glob("checkpoint_*/checkpoint.pt")) and time.time() < deadline:
            time.sleep(0.2)
        sockets = listening_sockets(driver.pid)  # epoch 2 is training: the process group is up
        started = psutil.Process(driver.pid).children(recursive=True)  # its local Ray's processes
        time.sleep(1)  # let Ray register the checkpoint it just wrote
        driver.kill()  # SIGKILL, the driver alone: nothing of it can stop its Ray
        driver.wait(30)
        _, outlived = psutil.wait_procs(started, timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # whatever is left of the first run, by process group
    # Its Ray ended with it, within seconds (raysnet.reaper): no agent re-parented to PID 1 lives on.
    assert not [p for p in outlived if alive(p)], [(p.pid, p.name()) for p in outlived if alive(p)]
    assert any("RayTrainWorker" in name for name in sockets), sockets  # the workers, with the store and Gloo
    assert all(loopback(ip) for ips in sockets.values() for ip in ips), sockets
    first.thread.join(30)
    check_cadence(first.lines, every=0.5)
    rerun = popen(args, env)
    out = TimedLines(rerun)
    assert rerun.wait(600) == 0, out.text()[-3000:]
    out.thread.join(30)
    assert "resuming" in out.text()
    assert not [line for _, line in first.lines + out.lines if "error" in line.lower()], out.text()
    assert "PreemptionWatcher" not in out.text() and "Token authentication is enabled" not in out.text()
    check_etas(out.lines, epochs=5)  # five: a steady epoch after the rerun's first, however late the kill
    h = history(f"sqlite:///{tmp_path / 'mlflow.db'}", "again")
    assert [s for s, _ in h["train_loss"]] == [0, 1, 2, 3, 4]
    got, expected = step_points(f"sqlite:///{tmp_path / 'mlflow.db'}", "again", 5)
    assert got == expected


def test_gpus_a_local_machine_lacks_fail_fast(capsys, tmp_path, digits, monkeypatch):
    """On a local Ray (the driver's own: no RAY_ADDRESS) a request no node can ever hold is an error
    before Ray starts; a cluster's autoscaler may still add GPU nodes, so there Ray waits."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = run_cli(capsys, "raysnet.train", *FAST, f"data.root={digits}", f"run.storage={tmp_path}",
                  "run.gpus_per_worker=1", "run.max_failures=0")
    assert out.code == 2 and "run.gpus_per_worker=1" in out.err and "Traceback" not in out.err, out.err
    assert not ray_started()
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any MLflow run was opened


def test_only_rays_known_harmless_lines_are_left_out():
    from raysnet.lifecycle import HARMLESS_RAY_LINES

    preemption = ("[2026-11-30 00:35:30,225 E 10040 10087] core_worker.cc:2465: Actor with class name: "
                  "'PreemptionWatcher' and ID: 'bf635d64a1cf3b2568837aa401000000' has constructor arguments in the "
                  "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
                  "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
                  "details.")
    other = "[2026-11-30 00:35:30,225 E 10040 10087] core_worker.cc:1234: Actor 'RayTrainWorker' died unexpectedly"
    assert [any(p.search(line) for p in HARMLESS_RAY_LINES) for line in (preemption, other)] == [True, False]


def test_an_elastic_groups_placement_retry_is_one_line():
    """Ray's controller logs an elastic group it could not place with a traceback (it then tries the
    size that fits: tests/test_cluster.py); the driver shows one line, however the lines arrive."""
    from raysnet.lifecycle import _placement_retries

    error = ["Error in control loop iteration: The worker group startup timed out after 10.0 seconds waiting for 3 "
             "workers. Potential causes include: (1) temporary insufficient cluster resources",
             "Traceback (most recent call last):", '  File "controller.py", line 914, in _run_control_loop_iteration',
             "    result = await self._step()",
             "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError: The worker group startup timed out"]
    after = ["raysnet: 2 worker(s) up"]
    pending: set = set()
    whole = _placement_retries(error + after, pending, 1)
    split = _placement_retries(error[:3], pending, 1) + _placement_retries(error[3:] + after, pending, 1)
    assert whole == split and len(whole) == 2 and "a group of 3 workers could not be placed in 10 s" in whole[0]
    assert whole[1] == after[0] and not pending
    other = ["Error in control loop iteration: something else", "Traceback (most recent call last):"]
    assert _placement_retries(other, pending, 2) == other


def test_a_changed_config_does_not_resume_silently(capsys, tmp_path, digits):
    (tmp_path / "x").mkdir()
    from raysnet.config import to_yaml

    saved = to_yaml(load_config([f"data.root={digits}", f"run.storage={tmp_path}", "run.name=x", "epochs=9"]))
    (tmp_path / "x" / "raysnet-config.yaml").write_text(saved)
    (tmp_path / "x" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # it has trained: its config holds
    out = run_cli(capsys, "raysnet.train", f"data.root={digits}", f"run.storage={tmp_path}", "run.name=x", "epochs=3")
    msg = one_paragraph(out)
    assert "epochs" in msg and "different config" in msg
    assert (tmp_path / "x" / "raysnet-config.yaml").read_text() == saved  # the run's config is untouched
    assert not ray_started()
