"""A real smoke sweep on the embedded digits, interrupted once and resumed, shared by the sweep and
report tests (a sweep costs minutes on 2 cores, so it runs once a session)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMOKE_SWEEP = """\
name: smoke
description: plain-20 vs ResNet-20 on digits, a test's sweep
recipe: digits
grid:
  arch: [plain20, resnet20]
max_concurrent_trials: 1
"""


@dataclass
class SmokeSweep:
    file: Path
    args: list[str]  # the command line after the sweep file
    storage: Path
    uri: str
    experiment: str
    first_run_id: str  # the child that had FINISHED when the sweep was killed
    first_start_time: int
    first_history: dict[str, list[tuple[int, float]]]
    children_at_kill: int
    rerun: subprocess.CompletedProcess


def child_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    from raysnet.tracking import METRICS

    client = MlflowClient(uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in METRICS}


def tune_cli(file: Path, args: list[str], **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": "/tmp"}  # short: Ray's socket paths have a 107-byte limit
    cmd = [sys.executable, "-m", "raysnet.tune", str(file), *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **kw)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, **kw)


def interrupted_sweep(tmp: Path, digits_root: str) -> SmokeSweep:
    """Run the smoke sweep as `python -m raysnet.tune`, SIGKILL it (the driver and the local Ray it
    started, by process group) once its first trial's MLflow run is FINISHED, then run the same
    command again to the end."""
    file = tmp / "smoke.yaml"
    file.write_text(SMOKE_SWEEP)
    storage = tmp / "out"
    args = [f"data.root={digits_root}", f"run.storage={storage}", "epochs=1", "run.workers=1", "batch_size=64",
            "run.max_steps=8", "tracking.log_model=false"]
    uri, experiment = f"sqlite:///{storage / 'mlflow.db'}", "smoke"
    with open(tmp / "first.log", "w") as log:
        first = tune_cli(file, args, background=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, done = time.time() + 480, []
            while not done and time.time() < deadline and first.poll() is None:
                time.sleep(1)
                # Read MLflow only once the sweep has made its store (two processes creating the
                # tables at once trips MLflow's migrations).
                if "raysnet: starting sweep" in (tmp / "first.log").read_text():
                    done = [r for r in child_runs(uri, experiment) if r.info.status == "FINISHED"]
            assert done, f"no trial finished before the deadline; see {tmp / 'first.log'}"
            assert first.poll() is None, "the sweep ended before it could be interrupted"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
    run = done[0]
    children = len(child_runs(uri, experiment))
    rerun = tune_cli(file, args, timeout=600)
    return SmokeSweep(file=file, args=args, storage=storage, uri=uri, experiment=experiment,
                      first_run_id=run.info.run_id, first_start_time=run.info.start_time,
                      first_history=histories(uri, run.info.run_id), children_at_kill=children, rerun=rerun)
