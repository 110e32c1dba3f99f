"""A real sweep on the embedded digits, interrupted once and resumed, shared by the sweep, report and
reproduction tests (a sweep costs minutes on 2 cores, so it runs once a session): the shipped Table 6
file (tuning/table6-cifar.yaml) scaled to a CPU, plain-20 against ResNet-20, one trial at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE6 = REPO / "tuning" / "table6-cifar.yaml"
# The file's own loader (data.loader=device runs on the CPU too), eager, a few steps of two nets.
ON_A_CPU = ["data=digits", "run.gpus_per_worker=0", "model.compile=false", "epochs=1", "run.workers=1",
            "batch_size=64", "run.max_steps=8", "tracking.log_model=false", "sweep.grid.arch=[plain20,resnet20]",
            "sweep.max_concurrent_trials=1"]


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
    stopped: int  # the exit status of the SIGTERMed sweep
    stopped_output: str
    statuses_after_stop: dict[str, str]  # run name -> MLflow status, the parent's included, once it had exited
    rerun: subprocess.CompletedProcess


def all_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def child_runs(uri: str, experiment: str) -> list:
    return [r for r in all_runs(uri, experiment) if "mlflow.parentRunId" in r.data.tags]


def histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    from raysnet.tracking import METRICS

    client = MlflowClient(uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in METRICS}


def tune_cli(file: Path, args: list[str], env: dict, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    """`python -m raysnet.tune FILE ARGS` with `env` (the session's Ray head: it connects to it)."""
    cmd = [sys.executable, "-m", "raysnet.tune", str(file), *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, **kw)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, **kw)


def interrupted_sweep(tmp: Path, digits_root: str, env: dict) -> SmokeSweep:
    """Run the smoke sweep as `python -m raysnet.tune` on the Ray head of `env`, stop it with SIGTERM
    (as a scheduler or `timeout` does) once its first trial's MLflow run is FINISHED, then run the
    same command again to the end."""
    file = TABLE6
    storage = tmp / "out"
    args = [*ON_A_CPU, f"data.root={digits_root}", f"run.storage={storage}"]
    uri, experiment = f"sqlite:///{storage / 'mlflow.db'}", "table6-cifar"
    with open(tmp / "first.log", "w") as log:
        first = tune_cli(file, args, env, background=True, stdout=log, stderr=subprocess.STDOUT)
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
            first.send_signal(signal.SIGTERM)  # the driver only, as `timeout` sends it
            first.wait(120)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait(30)
    run = done[0]
    children = len(child_runs(uri, experiment))
    statuses = {r.info.run_name: r.info.status for r in all_runs(uri, experiment)}
    rerun = tune_cli(file, args, env, timeout=600)
    return SmokeSweep(file=file, args=args, storage=storage, uri=uri, experiment=experiment,
                      first_run_id=run.info.run_id, first_start_time=run.info.start_time,
                      first_history=histories(uri, run.info.run_id), children_at_kill=children,
                      stopped=first.returncode, stopped_output=(tmp / "first.log").read_text(),
                      statuses_after_stop=statuses, rerun=rerun)
