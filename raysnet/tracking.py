"""MLflow: one run per raysnet run, found again by `run.name` so a resumed run continues it.

The driver opens and closes the run; rank 0 logs the per-epoch metrics (MLflow step = epoch).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

from raysnet.cli import UsageError
from raysnet.config import Config, flatten, to_yaml
from raysnet.models import get_arch

RUN_NAME_TAG = "raysnet.run_name"
# The metric names, the same in MLflow, in Ray's results and in the reports.
METRICS = ("train_loss", "train_err", "val_loss", "val_err", "val_err_top5", "lr", "images_per_sec",
           "epoch_time_s")


def default_uri(storage: str) -> str:
    # MLflow 3 deprecates the plain file store: SQLite beside the run's outputs.
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def resolve_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cfg.run.storage)


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


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: Config, hardware: str) -> dict[str, str]:
    """What the MLflow UI groups and compares by."""
    import ffcv
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
        "ffcv_version": getattr(ffcv, "__version__", "1.0.2"), "hardware": hardware,
        "python": platform.python_version(),
    }


def open_run(cfg: Config, hardware: str, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The MLflow run of `cfg.run.name`, created with params and tags unless it exists. -> (id, resumed)

    `parent_run_id` nests it under a sweep's parent run (MLflow's `mlflow.parentRunId` tag)."""
    from mlflow import MlflowClient

    uri = cfg.tracking.uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = str(Path(cfg.run.storage) / "mlartifacts") if uri.startswith("sqlite:") else None
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    tags = {**run_tags(cfg, hardware), **(extra_tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_text(run.info.run_id, to_yaml(cfg), "config.yaml")  # the resolved config, rerunnable as is
    return run.info.run_id, False


class Tracker:
    """Rank 0's per-epoch logging. Each epoch lands exactly once, even across restarts and outages:
    it logs whatever epochs of the checkpointed history MLflow does not have yet."""

    def __init__(self, cfg: Config, run_id: str):
        # Bounded retries: an outage delays an epoch's metrics to the next sync, never the training.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(cfg.tracking.uri), run_id
        self.logged: set[int] | None = None  # epochs MLflow has; None: ask it

    def sync(self, history: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        try:
            if self.logged is None:
                self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            pending = [h for h in history if h["epoch"] not in self.logged]
            if not pending:
                return
            now = int(1000 * __import__("time").time())
            metrics = [Metric(k, float(h[k]), now, int(h["epoch"])) for h in pending for k in METRICS]
            self.client.log_batch(self.run_id, metrics=metrics)
            self.logged |= {h["epoch"] for h in pending}
        except Exception as e:  # noqa: BLE001 - any tracking failure must leave the training running
            self.logged = None  # after a failure, ask MLflow again what it has, so nothing doubles
            warnings.warn(f"MLflow logging failed ({type(e).__name__}: {e}); will retry next epoch.", stacklevel=2)


@contextlib.contextmanager
def fluent_uri(uri: str):
    """Point MLflow's fluent API (mlflow.start_run, log_model) at `uri` for a while.
    mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI for the whole process, which would
    send every later run in this process to this store: both are put back."""
    import mlflow

    env, previous = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def finish_run(cfg: Config, run_id: str, checkpoint_dir: str | None, model, example=None) -> None:
    """Artifacts at the end: the last checkpoint and the model in MLflow's format."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    if checkpoint_dir:
        client.log_artifacts(run_id, checkpoint_dir, artifact_path="checkpoint")
    if model is not None and cfg.tracking.log_model:
        import torch

        with fluent_uri(cfg.tracking.uri), mlflow.start_run(run_id=run_id):
            # Explicit requirements: MLflow's inference imports the world and takes minutes.
            mlflow.pytorch.log_model(model, name="model", input_example=example.numpy(),
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    client.set_terminated(run_id, status="FINISHED")


def fail_run(cfg: Config, run_id: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(cfg.tracking.uri).set_terminated(run_id, status="FAILED")
