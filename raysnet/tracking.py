"""MLflow: every name raysnet records under, and every look-up of what it recorded.

One MLflow run per raysnet run, found again by `run.name` so a resumed run continues it; a
sweep is one parent run with a child run per trial. The lifecycle (raysnet.lifecycle) opens and
closes runs; rank 0 logs the per-epoch metrics (MLflow step = epoch); tune, report and evaluate
read them back through the look-ups here.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from raysnet.config import Config, flatten, to_yaml
from raysnet.errors import UsageError
from raysnet.models import get_arch

# The metric names, the same in MLflow, in Ray's results and in the reports.
METRICS = ("train_loss", "train_err", "val_loss", "val_err", "val_err_top5", "lr", "images_per_sec",
           "epoch_time_s", "world_size", "train_images")
# Tags: how a rerun finds its run again, and what the UI and the reports group by.
RUN_NAME_TAG = "raysnet.run_name"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
SWEEP_TAG = "raysnet.sweep"  # on a sweep's parent run: the sweep's identity
SWEEP_ID_TAG = "raysnet.sweep_id"  # on a trial's run: its sweep's identity
TRIAL_TAG = "raysnet.trial"  # on a trial's run: its overrides as JSON
DIVERGED_TAG = "raysnet.diverged"  # the loss became non-finite: a result of the settings, not a failure
FAILURE_TAG = "raysnet.failure"  # why a run stopped failed: the error, or the signal that stopped it
STOPPED_TAG = "raysnet.stopped"  # why a run ended KILLED: the scheduler stopped it early, or a stopped sweep
STEPS_PARAM = "steps_per_epoch"  # each run's training steps per epoch (plots against iterations)
STATUS_STOPPED = "KILLED"  # MLflow's status for a run stopped before its end (STOPPED_TAG says why)
# Step-level curves: rank 0's training loss and error over its last tracking.step_every
# steps, and the lr, at MLflow step = global iteration (iterations done), for Fig. 4/6 against
# iterations. Per-epoch METRICS keep step = epoch.
STEP_METRICS = ("iter/train_loss", "iter/train_err", "iter/lr")
STEP_POINTS = 30  # tracking.step_every=null: about this many points per epoch
# MLflow 3 opens an experiment on the view of its kind: model training opens on the runs table
# (the UI's value for it; GenAI experiments open on traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW = "workflowType=machine_learning"
# The run's logged models: the served classifier (images in, class names out; raysnet.serving),
# what tracking.register registers, and the bare nn.Module (a float batch in, logits out).
MODEL_NAME, NETWORK_NAME = "model", "network"
MODEL_ARTIFACT = "checkpoint"  # the served model's artifact: the run's slim checkpoint file
NODE_TAG = "raysnet.node"  # raysnet.node.node<i>: which machine system/node<i>/... was measured on


def default_uri(storage: str) -> str:
    # MLflow 3 deprecates the plain file store: SQLite beside the run's outputs (object storage has
    # no such place: the caller asks for a server then).
    return "" if "://" in storage else f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def resolve_uri(uri: str, storage: str) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else SQLite under run.storage."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(storage)


def check_readable(uri: str, key: str = "tracking.uri") -> None:
    """A store to read runs back from (the report) exists: MLflow would make an empty SQLite file
    of a wrong path, and stops on a plain directory with its file-store notice."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/x.db or sqlite:///relative/x.db
        header = path.open("rb").read(16) if path.is_file() else b""
        if header != b"SQLite format 3\x00":
            found = "no such file" if not path.exists() else "a directory" if path.is_dir() else "not an SQLite database"
            raise UsageError(f"{key}={uri} holds no MLflow store ('{path}': {found}). Give the store training wrote "
                             "into, e.g. tracking.uri=sqlite:///$PWD/outputs/mlflow.db, or a tracking server's http:// "
                             "address.")
    elif "://" not in uri and uri not in ("databricks",):
        raise UsageError(f"{key}={uri} is a path, not a tracking URI: give sqlite:///{Path(uri).absolute()} for an "
                         "SQLite store (training's default is sqlite:///<run.storage>/mlflow.db) or a tracking "
                         "server's http:// address.")
    check_reachable(uri)


def check_reachable(uri: str) -> None:
    """Fail before any training when a tracking server is down (MLflow itself would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as e:
        raise UsageError(f"the MLflow tracking server at tracking.uri={uri} is unreachable ({type(e).__name__}). "
                         "Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), point tracking.uri at a "
                         "running one, or leave tracking.uri empty to record into a local SQLite store.") from None


def ui_url(base: str, experiment: str | None = None) -> str:
    """The MLflow UI at `base` on an experiment's runs table (the experiments list without one). The
    UI's workflow switch (GenAI / model training) is a browser setting that starts on GenAI; the
    query sets it to model training."""
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs?{UI_WORKFLOW}" if experiment else base


def ui_command(uri: str, experiment: str | None = None) -> str:
    """How to open the UI on the runs table of `experiment` (an id)."""
    if uri.startswith("sqlite:///"):
        return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
                f"{ui_url('http://127.0.0.1:5000', experiment)}")
    return f"open {ui_url(uri, experiment)} in a browser"


def client(uri: str):
    import logging

    from mlflow import MlflowClient

    # Its INFO lines when a new SQLite store makes its tables ("Creating initial MLflow database
    # tables...") are no news to a user, and would bury the lines that are.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(uri)


# --- look-ups ----------------------------------------------------------------------------------

def experiment_id(mlflow, name: str, storage: str, uri: str) -> str:
    """The experiment `name`, created when missing (artifacts beside a local SQLite store)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = str(Path(storage) / "mlartifacts") if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def find_run(mlflow, experiment: str, tag: str, value: str):
    """The newest run of `experiment` whose tag `tag` is `value`, or None."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def all_runs(mlflow, experiment_id: str, parent_run_id: str | None = None) -> list:
    """Every run of an experiment (or every child of `parent_run_id`), oldest first."""
    where = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    return mlflow.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time ASC"],
                              max_results=10000)


def history(mlflow, run_id: str, keys=METRICS) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] of a run, oldest step first."""
    return {k: sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, k)) for k in keys}


def recorded_epochs(mlflow, run_id: str) -> list[dict[str, float]]:
    """A run's per-epoch metrics (step = epoch), oldest first: [{"epoch": 0, "train_loss": ...}, ...]."""
    epochs: dict[int, dict[str, float]] = {}
    for key, points in history(mlflow, run_id).items():
        for step, value in points:
            epochs.setdefault(step, {"epoch": step})[key] = value
    return [epochs[e] for e in sorted(epochs)]


# --- a run -------------------------------------------------------------------------------------

def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


INIT_TAG = "raysnet.init"  # a fine-tune's model.init: where its weights started
INIT_RUN_TAG = "raysnet.init_run_id"  # and the MLflow run that trained them, when known


def run_tags(cfg: Config, hardware: str, init_run_id: str | None = None) -> dict[str, str]:
    """What the MLflow UI groups and compares by; `init_run_id`: the MLflow run of model.init's weights."""
    from importlib.metadata import version

    import ray
    import torch

    arch = get_arch(cfg.arch)
    block_stride = arch.block == "bottleneck"
    return {
        RUN_NAME_TAG: cfg.run.name, "arch": cfg.arch, "depth": str(arch.depth), "family": arch.family,
        "residual": "residual" if arch.residual else "plain",
        "shortcut": (cfg.model.shortcut or arch.default_shortcut) if arch.residual else "none",
        # Stride placement only differs for bottleneck blocks.
        "variant": (cfg.model.variant or "v1") if block_stride else "n/a",
        "dataset": cfg.data.name, "recipe": cfg.recipe, "git_revision": _git_revision(),
        "ray_version": ray.__version__, "torch_version": torch.__version__,
        "ffcv_version": version("ffcv"), "hardware": hardware,
        "python": platform.python_version(),
        **({INIT_TAG: cfg.model.init} if cfg.model.init else {}),
        **({INIT_RUN_TAG: init_run_id} if init_run_id else {}),
    }


def log_params(mlflow, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    batch = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params a batch
        mlflow.log_batch(run_id, params=batch[i:i + 100])


def open_run(cfg: Config, tags: dict[str, str], params: dict[str, Any], title: str | None = None) -> tuple[str, bool]:
    """The MLflow run of `cfg.run.name`, created with the config as params, `params` and `tags`
    unless it exists (a resumed run keeps what it was created with); the UI lists it as `title`
    (default run.name: the tag raysnet.run_name is what finds it again). -> (run id, resumed)"""
    mlflow = client(cfg.tracking.uri)
    found = find_run(mlflow, cfg.tracking.experiment, RUN_NAME_TAG, cfg.run.name)
    if found:
        mlflow.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, True
    exp_id = experiment_id(mlflow, cfg.tracking.experiment, cfg.run.storage, cfg.tracking.uri)
    run = mlflow.create_run(exp_id, run_name=title or cfg.run.name, tags={RUN_NAME_TAG: cfg.run.name, **tags})
    log_params(mlflow, run.info.run_id, {**flatten(cfg), **params})
    mlflow.log_text(run.info.run_id, to_yaml(cfg), "config.yaml")  # the resolved config, rerunnable as is
    return run.info.run_id, False


class Tracker:
    """Rank 0's logging, on one background thread so the training never waits for MLflow.

    Each epoch (step = epoch) lands exactly once, even across restarts and outages: `sync` logs
    whatever epochs of the checkpointed history MLflow does not have yet. Step-level points (step =
    global iteration) land at most once and in order: a process asks MLflow for the last step it
    holds and logs only later ones, so the steps a restarted epoch trains again are not doubled."""

    def __init__(self, cfg: Config, run_id: str):
        from concurrent.futures import ThreadPoolExecutor

        # Bounded retries: an outage delays an epoch's metrics to the next sync, never the training.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id = client(cfg.tracking.uri), run_id
        self.logged: set[int] | None = None  # epochs MLflow has; None: ask it
        self.last_step: int | None = None  # the last global step of STEP_METRICS MLflow has; None: ask it
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raysnet-mlflow")

    def sync(self, history: list[dict[str, Any]]) -> None:
        """Log the epochs of `history` MLflow lacks, after every step point queued before (waits)."""
        self._thread.submit(self._sync, history).result()

    def log_steps(self, points: list[tuple[int, dict[str, float]]]) -> None:
        """Queue [(global step, {metric: value})], oldest first; returns at once."""
        if points:
            self._thread.submit(self._log_steps, points)

    def set_tag(self, key: str, value: str) -> None:
        """Queue a tag; returns at once (a failure is a warning: the training goes on)."""
        self._thread.submit(self._set_tag, key, value)

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _set_tag(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as e:  # noqa: BLE001 - as in _sync
            warnings.warn(f"MLflow could not set the tag {key} ({type(e).__name__}: {e}).", stacklevel=2)

    def _sync(self, history: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        try:
            if self.logged is None:
                self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            pending = [h for h in history if h["epoch"] not in self.logged]
            if not pending:
                return
            now = int(1000 * time.time())
            # An epoch without validation (run.eval_every) has no val_* numbers: nothing is logged for
            # them, rather than NaN points that break MLflow's charts.
            # (A checkpoint written before a metric existed lacks it: nothing is logged for it.)
            metrics = [Metric(k, float(h.get(k, math.nan)), now, int(h["epoch"])) for h in pending for k in METRICS
                       if math.isfinite(float(h.get(k, math.nan)))]
            self.client.log_batch(self.run_id, metrics=metrics)
            self.logged |= {h["epoch"] for h in pending}
        except Exception as e:  # noqa: BLE001 - any tracking failure must leave the training running
            self.logged = None  # after a failure, ask MLflow again what it has, so nothing doubles
            warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); will retry next epoch.", stacklevel=2)

    def _log_steps(self, points: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        try:
            if self.last_step is None:
                self.last_step = max((m.step for m in self.client.get_metric_history(self.run_id, STEP_METRICS[0])),
                                     default=0)
            fresh = [(step, values) for step, values in points if step > self.last_step]
            now = int(1000 * time.time())
            metrics = [Metric(k, float(v), now, step) for step, values in fresh for k, v in values.items()]
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
            if fresh:
                self.last_step = fresh[-1][0]
        except Exception as e:  # noqa: BLE001 - as in _sync: the training goes on
            self.last_step = None
            warnings.warn(f"MLflow logging of step metrics failed ({type(e).__name__}: {e}); those points are "
                          "skipped.", stacklevel=2)


def start_system_metrics(cfg: Config, run_id: str, node: str, where: str):
    """MLflow's system-metrics monitor for this node (CPU, memory, disk, network, each GPU when
    nvidia-ml-py finds one) as system/<node>/..., continuing the run's steps after a restart;
    `where` (the machine) goes to the tag raysnet.node.<node>. -> the monitor (call .finish()), or None."""
    if not cfg.tracking.system_metrics_s:
        return None
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no INFO line per start and stop
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # needs psutil

        monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_s, resume_logging=True,
                                       node_id=node, tracking_uri=cfg.tracking.uri)
        client(cfg.tracking.uri).set_tag(run_id, f"{NODE_TAG}.{node}", where)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - the training matters more than its system metrics
        warnings.warn(f"MLflow system metrics of {node} are off ({type(e).__name__}: {e}).", stacklevel=2)
        return None


@contextlib.contextmanager
def fluent_uri(uri: str):
    """Point MLflow's fluent API (mlflow.start_run, log_model, register_model, models:/ look-ups)
    at `uri` for a while, its model registry too. mlflow.set_tracking_uri and set_registry_uri also
    set MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI for the whole process, which would send every
    later run or registered version in this process to this store: all are put back."""
    import mlflow

    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    registry = os.environ.get("MLFLOW_REGISTRY_URI")  # set_registry_uri mirrors every setting here
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(registry)  # None: the registry follows the tracking URI again
        for name, value in (("MLFLOW_TRACKING_URI", env), ("MLFLOW_REGISTRY_URI", registry)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class ServedModel(NamedTuple):
    """A python_function model to log from code (raysnet.serving.package makes raysnet's)."""

    code: str  # the file MLflow copies into the model and runs to load it
    artifacts: dict[str, str]  # name -> local file, copied into the model
    signature: Any  # mlflow.models.ModelSignature
    pip_requirements: list[str]
    input_example: Any = None  # checked by MLflow when logging, kept as the request to copy


def finish_run(cfg: Config, run_id: str, checkpoint_dir: str | None, served: ServedModel | None = None,
               network=None, example=None, val_err: float = float("nan")) -> str | None:
    """Artifacts at the end: the last checkpoint, and when tracking.log_model the served model as
    MODEL_NAME (registered as tracking.register when set) with the bare network beside it as
    NETWORK_NAME. -> the registered model's "name version N", or None"""
    records = client(cfg.tracking.uri)
    if checkpoint_dir:
        records.log_artifacts(run_id, checkpoint_dir, artifact_path="checkpoint")
    registered = None
    if served is not None and cfg.tracking.log_model:
        model_uri = _log_model(cfg, run_id, served, network, example)
        if cfg.tracking.register:
            registered = register(cfg, run_id, model_uri, val_err)
    records.set_terminated(run_id, status="FINISHED")
    return registered


def _log_model(cfg: Config, run_id: str, served: ServedModel, network=None, example=None) -> str:
    """Log `served` as MODEL_NAME and `network` (an nn.Module, or None) as NETWORK_NAME, its input
    `example` a batch (MLflow's pt2 format traces the network on it). -> the served model's URI"""
    import mlflow
    import torch

    with fluent_uri(cfg.tracking.uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=served.code, artifacts=served.artifacts,
                                       signature=served.signature, pip_requirements=served.pip_requirements,
                                       input_example=served.input_example)
        if network is not None:
            # Explicit requirements: MLflow's inference of them imports the world and takes minutes.
            mlflow.pytorch.log_model(network, name=NETWORK_NAME, input_example=example.numpy(),
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    return info.model_uri


def register(cfg: Config, run_id: str, model_uri: str, val_err: float) -> str:
    """The logged model as a new version of the registered model tracking.register, its
    description the run's val_err. -> 'NAME version N'"""
    import mlflow

    with fluent_uri(cfg.tracking.uri):
        version = mlflow.register_model(model_uri, cfg.tracking.register,
                                        tags={RUN_NAME_TAG: cfg.run.name, "arch": cfg.arch})
    client(cfg.tracking.uri).update_model_version(
        cfg.tracking.register, version.version,
        description=f"{cfg.arch} on {cfg.data.name}: val_err {val_err:.2f}% after {cfg.epochs} epochs "
                    f"(run {cfg.run.name}, MLflow run {run_id}).")
    return f"{cfg.tracking.register} version {version.version}"


def fail_run(cfg: Config, run_id: str, reason: str, diverged: bool = False) -> None:
    """Close a run as FAILED with `reason` as its failure tag (and its diverged tag when the loss
    became non-finite)."""
    records = client(cfg.tracking.uri)
    records.set_tag(run_id, DIVERGED_TAG if diverged else FAILURE_TAG, reason[:5000])  # MLflow's tag limit: 8000
    records.set_terminated(run_id, status="FAILED")
