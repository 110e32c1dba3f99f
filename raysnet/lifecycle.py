"""A run's lifecycle, from a resolved config to a closed MLflow run:

    preflight (everything cheap that can fail: names, dataset, tracking server, resume check)
    -> connect Ray -> open the MLflow run -> TorchTrainer(worker.train_loop).fit() -> finish

`run_one` is that sequence, called by `python -m raysnet.train` and by every Tune trial (which
passes its parent run, tags and a callback); the worker (raysnet.train.worker) is what each Ray
Train worker runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

# Ray 2.60 swaps 127.0.0.1 for the routable address unless this is set; a local run listens on
# loopback only. Must precede `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default: each epoch's report, a lost worker
# and the end of a run wait up to that long. Every 0.5 s costs a few small calls a second and took
# a 2-epoch digits run from 36.3 s to 33.2 s on 2 cores (docs/DESIGN.md). Ray passes it on to the workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray folds lines of different processes that differ only in their numbers into one "[repeated 2x
# across cluster]": never raysnet's (the epoch and progress lines of a sweep's concurrent trials).
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"raysnet: |epoch \d+/\d+: train_err")

from omegaconf import OmegaConf  # noqa: E402

from raysnet import checkpoint, reaper, storage, tracking  # noqa: E402
from raysnet.config import Config, flatten, from_dict, to_dict, to_yaml  # noqa: E402
from raysnet.errors import DEBUG_ENV, UsageError, root_cause  # noqa: E402
from raysnet.ray_address import check_ray_address, local_ray  # noqa: E402

CONFIG_FILE = "raysnet-config.yaml"
# Keys a resumed run may change: they alter how it runs, not what it computes. (Not model.init,
# model.init_lr_scale or model.freeze: where the weights start, how fast they move and which stay
# fixed are what a run computes; a rerun that changes them is refused by `check_resume`.)
RESUMABLE_KEYS = {"run.max_failures", "run.workers", "run.resize_check_s", "run.gpus_per_worker", "run.cpus_per_worker",
                  "data.loader_workers", "tracking.log_model", "model.compile", "model.compile_mode",
                  "run.ddp_static_graph", "data.loader", "run.progress_s", "tracking.step_every",
                  "tracking.system_metrics_s", "tracking.register"}
# In the run's directory: the name of the run's resource request in Ray (`_take_over_reservation`).
RESERVATION_NOTE = "ray-request.json"
# How long an elastic run's worker group may wait to be placed before Ray tries another size.
ELASTIC_PLACEMENT_S = 10
# A job submitted with --working-dir runs in a copy Ray deletes later (see README, "Submit to a cluster").
RAY_WORKING_DIR = "/runtime_resources/working_dir_files/"


# --- before Ray ------------------------------------------------------------------------------

def finalize(cfg: Config) -> Config:
    """Fill in what 'empty' means, so the recorded config is the one that ran."""
    where = cfg.run.storage if storage.is_uri(cfg.run.storage) else str(Path(cfg.run.storage).expanduser().resolve())
    if RAY_WORKING_DIR in where:
        print(f"warning: run.storage={where} is inside the job's temporary copy of its working directory, "
              "which Ray deletes; pass an absolute run.storage (e.g. run.storage=$PWD/outputs) to keep the "
              "checkpoints and the MLflow store.", file=sys.stderr, flush=True)
    uri = tracking.resolve_uri(cfg.tracking.uri, where)
    if storage.is_uri(where) and not uri.startswith(("http://", "https://")):
        raise UsageError(f"run.storage={where} is object storage, where MLflow's local SQLite store cannot live: "
                         "give a tracking server as tracking.uri=http://... (or set MLFLOW_TRACKING_URI).")
    name = cfg.run.name or f"{cfg.arch}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, storage=where, name=name),
        tracking=dataclasses.replace(cfg.tracking, uri=uri,
                                     experiment=cfg.tracking.experiment or f"raysnet-{cfg.data.name}"))


def check_resume(cfg: Config) -> bool:
    """A rerun with the same run.name resumes, but only the same computation. -> True when resuming.
    The run's config is kept beside its checkpoints (a local directory or object storage alike);
    writing it first is also the check that run.storage takes writes."""
    filesystem, root = storage.open_uri(cfg.run.storage, "run.storage")
    path = f"{root}/{cfg.run.name}/{CONFIG_FILE}"
    try:
        with filesystem.open_input_stream(path) as f:
            saved = flatten(from_dict(OmegaConf.create(f.read().decode())))
    except FileNotFoundError:
        storage.write_text(filesystem, path, to_yaml(cfg), f"run.storage={cfg.run.storage}")
        return False
    except OSError as e:
        raise UsageError(f"cannot read run.storage={cfg.run.storage} ({str(e).splitlines()[0]}). Check that it "
                         "exists and that this machine has a route to it and permission to read.") from None
    now = flatten(cfg)
    changed = sorted(k for k, v in now.items() if k not in RESUMABLE_KEYS and saved.get(k) != v)
    if changed and not _has_checkpoint(filesystem, f"{root}/{cfg.run.name}"):
        # An earlier attempt that stopped before its first checkpoint trained nothing to protect.
        print(f"raysnet: run.name={cfg.run.name} has no checkpoint yet (its earlier attempt stopped before one); "
              "starting it again with this config", flush=True)
        storage.write_text(filesystem, path, to_yaml(cfg), f"run.storage={cfg.run.storage}")
        return False
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UsageError(f"run.name={cfg.run.name} already exists in {cfg.run.storage}/{cfg.run.name} with a "
                         f"different config ({diffs}). Rerun with the same settings to resume it, or choose a "
                         "new run.name.")
    return True


def _has_checkpoint(filesystem, run_dir: str) -> bool:
    """Whether Ray Train has written a checkpoint (checkpoint_<time>/) into the run's directory."""
    from pyarrow import fs

    infos = filesystem.get_file_info(fs.FileSelector(run_dir, allow_not_found=True))
    return any(i.type == fs.FileType.Directory and i.base_name.startswith("checkpoint_") for i in infos)


# The schemes of MLflow 3's tracking stores: its REST client, its SQLAlchemy databases (a driver
# may follow a '+': postgresql+psycopg2), the file store and Databricks. No scheme: a local path.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _check_tracking_uri(cfg: Config) -> None:
    """MLflow can open tracking.uri (or $MLFLOW_TRACKING_URI): found here, before Ray starts, rather than
    as a worker's traceback inside Ray."""
    from urllib.parse import urlparse

    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    scheme = urlparse(uri).scheme.partition("+")[0].lower()
    if not scheme or scheme in TRACKING_SCHEMES:
        return
    key = "'tracking.uri'" if cfg.tracking.uri else "'MLFLOW_TRACKING_URI' (tracking.uri is empty)"
    raise UsageError(f"bad value for {key}: {uri!r} has the scheme '{scheme}:', which MLflow cannot use. Expected "
                     f"one of {', '.join(s + ':' for s in TRACKING_SCHEMES)} (or a local path), or leave tracking.uri "
                     "empty (and MLFLOW_TRACKING_URI unset) to record into a SQLite store under run.storage.")


def _check_meta(cfg: Config, meta: dict) -> None:
    """meta.json agrees with itself: its class count, its class list and each split's labels
    (`per_class`); the model's outputs follow the class list, the labels follow the files."""
    from raysnet.data import prepare_command
    from raysnet.data.layout import META

    path = f"{cfg.data.root.rstrip('/')}/{META}"
    problems = []
    try:
        classes, splits = list(meta["classes"]), dict(meta["splits"])
        if meta.get("num_classes", len(classes)) != len(classes):
            problems.append(f"num_classes is {meta['num_classes']} but 'classes' lists {len(classes)}")
        for split, info in splits.items():
            per_class, samples = info.get("per_class"), int(info["samples"])
            if per_class is None:
                continue
            if sorted(per_class) != sorted(classes):
                problems.append(f"splits.{split}.per_class counts labels of {len(per_class)} classes, not the "
                                f"{len(classes)} of 'classes'")
            elif sum(per_class.values()) != samples:
                problems.append(f"splits.{split}.per_class counts {sum(per_class.values())} labels for {samples} "
                                "samples")
        int(splits["train"]["samples"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        problems.append(f"it is not a raysnet {META} ({type(e).__name__}: {e})")
    if problems:
        raise UsageError(f"dataset file '{path}' contradicts itself: {'; '.join(problems)}. Prepare the dataset "
                         f"again: {prepare_command(cfg.data)} overwrite=true")


def _check_steps(cfg: Config, meta: dict) -> None:
    """At least one training step per epoch (the loaders drop a last, partial global batch)."""
    from raysnet.data import steps_per_epoch as steps

    samples = int(meta["splits"]["train"]["samples"])
    if steps(samples, cfg.batch_size, cfg.run.max_steps) > 0:
        return
    if cfg.run.max_steps is not None and cfg.run.max_steps < 1:
        raise UsageError(f"bad value for 'run.max_steps': {cfg.run.max_steps} gives zero training steps per epoch. "
                         "Expected at least 1, or null for whole epochs.")
    raise UsageError(f"batch_size={cfg.batch_size} is larger than the training split: {samples} samples in "
                     f"'{cfg.data.root}', and only whole global batches are trained, so an epoch would have zero "
                     "steps. " + (f"Lower batch_size to at most {samples}, or use more data." if samples else
                                  "The split is empty: prepare the dataset again with training images."))


def _check_local_workers(cfg: Config) -> None:
    """On this machine's own Ray (RAY_ADDRESS unset) every worker is a process here with its own copy
    of the network and its loader threads: more of them than cores only share the cores, and dozens
    exhaust the memory before the first step. (A cluster is left to Ray: an autoscaler may add nodes.)"""
    cores = os.cpu_count() or 1
    if not local_ray() or cfg.run.max_workers <= max(2, cores):
        return
    raise UsageError(f"run.workers={cfg.run.workers} asks for {cfg.run.max_workers} training processes on this machine "
                     f"(RAY_ADDRESS is unset: a Ray of its own), which has {cores} cores. Use at most "
                     f"run.workers={max(2, cores)} here (batch_size stays the global batch), or submit the run to a "
                     "cluster with ray job submit.")


def _check_local_gpus(cfg: Config) -> None:
    """On this machine's own Ray the GPUs are this machine's (those torch sees, as Ray's workers
    will): a request it can never hold is an error before Ray starts, not a wait without end. A
    cluster we were submitted to may still be scaling up, so there Ray waits."""
    if not local_ray() or not cfg.run.gpus_per_worker:
        return
    import torch

    available, need = torch.cuda.device_count(), cfg.run.min_workers * cfg.run.gpus_per_worker
    if need > available:
        raise UsageError(f"run.gpus_per_worker={cfg.run.gpus_per_worker} with run.workers={cfg.run.workers} asks "
                         f"for {need:g} GPU(s), but this machine has {available}. Pass run.gpus_per_worker=0 to "
                         "train on CPUs, fewer run.workers, or submit to a cluster with GPUs (`ray job submit`).")


def preflight(cfg: Config) -> tuple[Config, dict, bool, Any]:
    """Everything cheap that can fail, before Ray starts. -> (finalized config, dataset meta, resumed,
    the initialisation of model.init (raysnet.train.finetune.Init) or None)
    The resume check comes last: it writes the run's config, which only a run that can start may do."""
    from raysnet.config import check_run_name
    from raysnet.data import check_dataset, ensure_dataset

    _check_tracking_uri(cfg)
    check_ray_address()
    _check_local_workers(cfg)
    _check_local_gpus(cfg)
    given = cfg.run.name
    cfg = finalize(cfg)
    if not given:  # made from arch and data.name; a dataset recipe may name itself anything
        check_run_name(cfg.run.name, hint=f"It was made from arch and data.name={cfg.data.name!r}: set run.name, "
                                          "or give the dataset recipe a plain name.")
    meta = ensure_dataset(cfg.data)
    check_dataset(cfg.data)
    _check_meta(cfg, meta)
    _check_steps(cfg, meta)
    if cfg.data.loader == "device":
        from raysnet.data import resident

        resident.check(cfg.data, meta)
    tracking.check_reachable(cfg.tracking.uri)
    init = _initialisation(cfg, meta)
    resumed = check_resume(cfg)
    if init is not None:
        from raysnet.train import finetune

        finetune.write(cfg, init)  # into the run's directory, where every worker reads it
        print(init.line, flush=True)
    return cfg, meta, resumed, init


def _initialisation(cfg: Config, meta: dict):
    """model.init read and matched to this run (a misfit is one paragraph here, before Ray), or None:
    without model.init, and for a run with a checkpoint of its own, which continues from that
    checkpoint (or is refused by check_resume) and never reads the source again."""
    if not cfg.model.init:
        return None
    filesystem, root = storage.open_uri(cfg.run.storage, "run.storage")
    if _has_checkpoint(filesystem, f"{root}/{cfg.run.name}"):
        return None
    from raysnet.train import finetune

    return finetune.prepare(cfg, list(meta["classes"]))


def steps_per_epoch(cfg: Config, meta: dict) -> int:
    from raysnet.data import steps_per_epoch as steps

    return steps(meta["splits"]["train"]["samples"], cfg.batch_size, cfg.run.max_steps)


# --- Ray -----------------------------------------------------------------------------------------

# Lines Ray prints into every normal run that report nothing wrong, left out of what Ray forwards to
# this driver so that an error-level line always means something: Ray Train's controller starts its
# PreemptionWatcher actor with max_restarts and its arguments in the object store, and Ray's core
# worker logs that at ERROR level every time (ray-project/ray#53727); nothing in it is for a user
# to act on.
HARMLESS_RAY_LINES = (re.compile(r"core_worker\.cc.*'PreemptionWatcher'.*max_restarts"),)
# An elastic group that could not be placed (lifecycle.ELASTIC_PLACEMENT_S): Ray's controller logs
# the timeout with its traceback, and tries again at once with the workers that fit; one line says so.
PLACEMENT_TIMEOUT = re.compile(r"Error in control loop iteration: The worker group startup timed out after "
                               r"([\d.]+) seconds waiting for (\d+) workers")
TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s|\S*WorkerGroupStartupTimeoutError)")
# Ray's notice that token authentication is on (its default in 2.60), printed by every ray.init:
# the README's "Submit to a cluster" section says how the token works.
TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_NOTICE)


def connect_ray(cpus: int, bar: bool = False):
    """The cluster we were submitted to (`ray job submit` sets RAY_ADDRESS), else a local Ray with
    at least `cpus` logical CPUs (so the requested workers fit even on a small laptop). `bar`: draw
    rank 0's progress lines as a bar on a terminal (one run's; a sweep's trials would share it)."""
    import ray

    if not ray.is_initialized():
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DropTokenNotice())
        start = time.perf_counter()
        if not local_ray():
            ray.init(logging_level="WARNING")
            where = f"connected to the Ray cluster at {os.environ['RAY_ADDRESS']}"
        else:
            # The dashboard (on loopback) also serves the state API that Ray Train's clean-up relies on.
            # Its address goes to every process of the job: Ray Train's placement-group cleaner asks
            # the state API without one, which picks the newest Ray on the machine (another user's, a
            # test's) when there are several, and dies with a traceback when that one does not answer.
            port = _free_port(8265)
            reaper.start(os.getpid())  # this Ray's processes end with this one, even after a SIGKILL
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port, logging_level="WARNING",
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
            where = "started a local Ray on 127.0.0.1"
        print(f"raysnet: {where} in {time.perf_counter() - start:.1f} s", flush=True)
    quiet_ray_logs(bar)
    return ray


# The line the driver prints after each epoch (`_epoch_printer`): a terminal's bar of that epoch ends there.
EPOCH_LINE = re.compile(r"epoch \d+/\d+: train_err")


def quiet_ray_logs(bar: bool = False) -> None:
    """Print the output Ray forwards to this driver without HARMLESS_RAY_LINES, and on a terminal
    with rank 0's progress lines drawn as a tqdm bar (once per ray.init)."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from raysnet.train.progress import Bars

    handlers = dict(dispatcher.handlers)
    printer = handlers.get("ray_print_logs")  # absent with log_to_driver=False
    if printer is None or getattr(printer, "raysnet", False):
        return
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    bars = Bars() if bar and sys.stdout.isatty() else None
    tracebacks: set = set()  # the processes whose next lines may still be a dropped traceback

    def print_logs(data: dict) -> None:
        lines = _placement_retries([line for line in data.get("lines", [])
                                    if not any(p.search(line) for p in HARMLESS_RAY_LINES)], tracebacks, data.get("pid"))
        if bars is not None:
            lines = [line for line in lines if not bars.take(line)]
            if any(EPOCH_LINE.search(line) for line in lines):
                bars.close()
            elif lines:
                bars.clear()
        if lines:
            ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)
        if bars is not None:
            bars.refresh()

    print_logs.raysnet = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_logs)  # the same name: ray.shutdown removes it


def _placement_retries(lines: list[str], tracebacks: set, pid) -> list[str]:
    """`lines` of process `pid` with each PLACEMENT_TIMEOUT and its traceback as one line (a traceback
    may go on in the next batch of lines: `tracebacks` holds the processes in the middle of one)."""
    kept, dropping = [], pid in tracebacks
    for line in lines:
        timeout = PLACEMENT_TIMEOUT.search(line)
        if timeout:
            kept.append(f"raysnet: a group of {timeout[2]} workers could not be placed in {float(timeout[1]):.0f} s "
                        "(Ray's view of the cluster still held a lost node); trying again with the workers that fit")
            dropping = True
        elif not (dropping and TRACEBACK_LINE.match(line)):
            kept.append(line)
            dropping = False
    (tracebacks.add if dropping else tracebacks.discard)(pid)
    return kept


def _free_port(preferred: int) -> int:
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free port on 127.0.0.1")


def gpus_per_worker(cfg: Config) -> float:
    """run.gpus_per_worker, else 1 when the cluster has GPUs (a request a local machine can never
    hold was refused in the preflight: `_check_local_gpus`)."""
    import ray

    if cfg.run.gpus_per_worker is None:
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return cfg.run.gpus_per_worker


def hardware(gpus: float, cfg: Config) -> str:
    import platform

    import ray
    import torch

    if gpus:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        return f"{cfg.run.workers}x{gpus} {name}"
    return f"{cfg.run.workers} CPU workers ({platform.processor() or platform.machine()}, " \
           f"{int(ray.cluster_resources().get('CPU', 0))} CPUs in the cluster)"


def _epoch_printer(epochs: int):
    """A Ray Train callback (it runs in the controller) that prints one line per epoch."""
    from ray.train import UserCallback

    class EpochPrinter(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if "train_err" in m:
                val = f"val_err {m['val_err']:.2f}%" if math.isfinite(m["val_err"]) else "not validated"
                print(f"epoch {m['epoch'] + 1}/{epochs}: train_err {m['train_err']:.2f}%  {val}  lr {m['lr']:.4g}  "
                      f"{m['images_per_sec']:.0f} images/s  {m['epoch_time_s']:.1f} s", flush=True)

    return EpochPrinter()


def worker_resources(cfg: Config, gpus: float) -> dict[str, float]:
    """What each Ray Train worker of the run asks Ray for."""
    return {"CPU": cfg.run.cpus_per_worker, **({"GPU": gpus} if gpus else {})}


def make_trainer(cfg: Config, meta: dict, run_id: str, gpus: float, callbacks: list):
    """The `TorchTrainer` of one run. Rank 0's progress lines become a tqdm bar when this driver's
    stdout is a terminal (`quiet_ray_logs` draws it; they come more often then), else stay lines."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raysnet.train.network import NodeNetworkTorchConfig

    resources = worker_resources(cfg, gpus)
    if cfg.run.elastic:
        # Ray picks an elastic group's size from a view of the cluster refreshed every 20 s, so
        # after a node loss it may first ask for a group that no longer fits; the group's placement
        # then waits this long (default 60 s) before Ray tries again at the size it finds. Such
        # retries are not charged to run.max_failures. Ray Train passes this on to its controller.
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(ELASTIC_PLACEMENT_S))
    return TorchTrainer(
        _train_loop,
        train_loop_config={"config": to_dict(cfg), "meta": meta, "run_id": run_id,
                           "progress": "bar" if sys.stdout.isatty() else "lines"},
        # Gloo on the node's Ray IP, not wherever the hostname resolves (often 127.0.0.1).
        torch_config=NodeNetworkTorchConfig(),
        scaling_config=ScalingConfig(num_workers=(cfg.run.min_workers, cfg.run.max_workers) if cfg.run.elastic
                                     else cfg.run.max_workers, use_gpu=gpus > 0, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.run.resize_check_s),
        run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage,
                             callbacks=[_epoch_printer(cfg.epochs), *callbacks],
                             # Ray Train's INFO lines per report would drown the epoch lines.
                             logging_config=LoggingConfig(log_level="WARNING"),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )


class _DropWorkerTraceback(logging.Filter):
    """Ray Train logs a failed worker's traceback on the worker, and Ray forwards it to the driver;
    the driver says the cause in one paragraph (its traceback with --debug / RAYSNET_DEBUG=1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Error in training function")


def _train_loop(config: dict) -> None:
    # Imported inside, so Ray ships a reference to the module rather than pickling the driver's state.
    from raysnet.train.worker import train_loop

    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        logging.getLogger("ray.train.v2._internal.util").addFilter(_DropWorkerTraceback())
    train_loop(config)


# --- the run -------------------------------------------------------------------------------------

def run_one(cfg: Config, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None,
            callbacks: list | None = None, title: str | None = None) -> int:
    """Train one run to the end (or resume it) and record it. -> exit status: 0 done, 1 the loss
    became non-finite (the run is closed FAILED and tagged diverged). `parent_run_id` nests the
    MLflow run under a sweep's parent; `tags` are added to it; `callbacks` go to Ray Train; `title`
    is the name the MLflow UI lists it by (default run.name)."""
    start = time.perf_counter()
    cfg, meta, resumed, init = preflight(cfg)
    print(f"raysnet: checked the config, the dataset and the tracking store in {time.perf_counter() - start:.1f} s",
          flush=True)
    cpus = cfg.run.max_workers * cfg.run.cpus_per_worker
    connect_ray(cpus, bar=parent_run_id is None)
    gpus = gpus_per_worker(cfg)
    steps = steps_per_epoch(cfg, meta)
    nest = {tracking.PARENT_TAG: parent_run_id} if parent_run_id else {}
    own = tracking.run_tags(cfg, hardware(gpus, cfg), init_run_id=init.run_id if init else None)
    run_id, _ = tracking.open_run(cfg, {**own, **(tags or {}), **nest},
                                  {tracking.STEPS_PARAM: steps}, title=title)
    print(f"raysnet: {'resuming' if resumed else 'training'} {_describe(cfg, meta, gpus, steps)}; run {cfg.run.name}; "
          f"starting the workers", flush=True)
    trainer = make_trainer(cfg, meta, run_id, gpus, callbacks or [])
    _take_over_reservation(cfg, trainer)
    try:
        with _minimum_watch(cfg, gpus):
            result = trainer.fit()
        return finish(cfg, run_id, result)
    except (Exception, KeyboardInterrupt) as e:
        reason = "stopped by Ctrl-C or SIGTERM" if isinstance(e, KeyboardInterrupt) else root_cause(e)
        with contextlib.suppress(Exception):  # the error itself matters more than the record of it
            tracking.fail_run(cfg, run_id, reason)
        raise


def _minimum_watch(cfg: Config, gpus: float):
    """An elastic run's watch on its minimum (raysnet.train.elastic.MinimumWatch); else nothing."""
    from raysnet.train.elastic import MinimumWatch

    if not cfg.run.elastic:
        return contextlib.nullcontext()
    return MinimumWatch(cfg, worker_resources(cfg, gpus))


def _take_over_reservation(cfg: Config, trainer) -> None:
    """Cancel the resource request of this run's previous driver, and note this one's.

    Every Ray Train run (fixed or elastic) asks Ray's AutoscalingCoordinator, a detached actor that
    shares the cluster's resources out among requesters, the oldest first, for its workers; its
    controller cancels the request when it shuts down. A driver stopped by `ray job stop` or killed
    ends before that: its request stays for 180 s and is counted as holding its nodes, so an elastic
    run started meanwhile (the same one submitted again, or another) finds fewer workers' room
    reserved for it than there is, and waits or starts small, silently. The request is named after
    Ray Train's run id (`ScalingPolicy`: "train-<id>"), which each driver notes in the run's
    directory: rerunning a stopped run or sweep releases what it held."""
    from raysnet.train.worker import pop_note, write_note

    previous = pop_note(cfg, RESERVATION_NOTE)
    if previous:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        with contextlib.suppress(Exception):  # gone already, or the coordinator restarted: nothing held
            ray.get(get_or_create_autoscaling_coordinator().cancel_request.remote(previous["requester"]), timeout=30)
    write_note(cfg, RESERVATION_NOTE, {"requester": f"train-{trainer.train_run_context.run_id}"})


def _describe(cfg: Config, meta: dict, gpus: float, steps: int) -> str:
    from raysnet.models import get_arch

    start = f" from {cfg.model.init}" if cfg.model.init else ""
    frozen = f", frozen up to {cfg.model.freeze}" if cfg.model.freeze else ""
    return (f"{cfg.arch} ({get_arch(cfg.arch).depth} layers){start}{frozen} on {cfg.data.name} "
            f"[{len(meta['classes'])} classes], {cfg.epochs} epochs of {steps} steps, global batch {cfg.batch_size} "
            f"over {cfg.run.workers} worker(s){f' with {gpus} GPU(s) each' if gpus else ''}")


def finish(cfg: Config, run_id: str, result: Any) -> int:
    """Close the MLflow run with the model, or explain why the run stopped. -> exit status"""
    import tempfile

    import torch

    from raysnet.train.worker import NONFINITE_NOTE, pop_note

    bad = pop_note(cfg, NONFINITE_NOTE)
    if bad:
        last = f"the last good checkpoint is {result.checkpoint.path}" if result.checkpoint else "no checkpoint yet"
        why = f"the training loss became non-finite at epoch {bad['epoch'] + 1}/{cfg.epochs} (counted from 1, as the progress lines), step {bad['step']}"
        print(f"error: {why} (lower optim.lr, or check the data); training stopped and {last}.", file=sys.stderr)
        tracking.fail_run(cfg, run_id, why, diverged=True)
        return 1
    m = {k: (result.metrics or {}).get(k, float("nan")) for k in ("val_err", "val_err_top5", "train_err")}
    with result.checkpoint.as_directory() as d, tempfile.TemporaryDirectory(prefix="raysnet-model-") as slim:
        file = Path(d) / checkpoint.CHECKPOINT_FILE
        served = network = None
        if cfg.tracking.log_model:
            from raysnet import serving  # imports MLflow: only for a run that logs its model

            served, network = serving.package(file, slim), checkpoint.load_model(file).model
        # A batch of 2: torch.export keeps the batch dimension dynamic (with 1 it specializes it, and warns).
        registered = tracking.finish_run(cfg, run_id, d, served, network, val_err=m["val_err"],
                                         example=torch.zeros(2, 3, cfg.data.crop, cfg.data.crop))
    experiment = tracking.client(cfg.tracking.uri).get_run(run_id).info.experiment_id
    print(f"raysnet: done. val_err {m['val_err']:.2f}% (top-5 {m['val_err_top5']:.2f}%), train_err "
          f"{m['train_err']:.2f}% after {cfg.epochs} epochs.\n"
          f"  checkpoints: {result.checkpoint.path}\n"
          f"  MLflow: experiment {cfg.tracking.experiment}, run {run_id} at {cfg.tracking.uri}\n"
          + (f"  model registry: {registered}\n" if registered else "") +
          f"  open the MLflow UI: {tracking.ui_command(cfg.tracking.uri, experiment)}")
    return 0
