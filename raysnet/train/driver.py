"""The driver: validate everything cheap first, then run a Ray Train `TorchTrainer`."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

# Ray 2.60 swaps 127.0.0.1 for the routable address unless this is set; a local run listens on
# loopback only. Must precede `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from omegaconf import OmegaConf  # noqa: E402

from raysnet.cli import UsageError  # noqa: E402
from raysnet.config import Config, flatten, to_yaml  # noqa: E402
from raysnet.train import tracking  # noqa: E402

CONFIG_FILE = "raysnet-config.yaml"
# Keys a resumed run may change: they alter how it runs, not what it computes.
RESUMABLE_KEYS = {"run.max_failures", "run.workers", "run.gpus_per_worker", "run.cpus_per_worker",
                  "data.loader_workers", "tracking.log_model", "model.compile", "run.ddp_static_graph"}


def finalize(cfg: Config) -> Config:
    """Fill in what 'empty' means, so the recorded config is the one that ran."""
    storage = cfg.run.storage if "://" in cfg.run.storage else str(Path(cfg.run.storage).expanduser().resolve())
    run = dataclasses.replace(cfg.run, storage=storage,
                              name=cfg.run.name or f"{cfg.arch}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    tr = dataclasses.replace(cfg.tracking, uri=tracking.resolve_uri(dataclasses.replace(cfg, run=run)),
                             experiment=cfg.tracking.experiment or f"raysnet-{cfg.data.name}")
    return dataclasses.replace(cfg, run=run, tracking=tr)


def check_resume(cfg: Config) -> bool:
    """A rerun with the same run.name resumes, but only the same computation. -> True when resuming."""
    path = Path(cfg.run.storage) / cfg.run.name / CONFIG_FILE
    if "://" in cfg.run.storage:
        return False  # remote storage: Ray Train itself finds the run's checkpoints there
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(to_yaml(cfg))
        tmp.replace(path)
        return False
    saved = flatten(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))))
    changed = sorted(k for k, v in flatten(cfg).items() if k not in RESUMABLE_KEYS and saved.get(k) != v)
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {flatten(cfg)[k]!r}" for k in changed)
        raise UsageError(f"run.name={cfg.run.name} already exists in {path.parent} with a different config "
                         f"({diffs}). Rerun with the same settings to resume it, or choose a new run.name.")
    return True


def connect_ray(cfg: Config):
    """The cluster we were submitted to (`ray job submit` sets RAY_ADDRESS), else a local Ray."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level="WARNING")
        else:
            # Enough logical CPUs for the requested workers even on a small laptop. The dashboard
            # (on loopback) also serves the state API that Ray Train's clean-up relies on.
            cpus = max(os.cpu_count() or 1, cfg.run.workers * cfg.run.cpus_per_worker)
            ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=_free_port(8265), logging_level="WARNING")
    return ray


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


def hardware(ray, gpus: int, cfg: Config) -> str:
    import platform

    import torch

    if gpus:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        return f"{cfg.run.workers}x{gpus} {name}"
    return f"{cfg.run.workers} CPU workers ({platform.processor() or platform.machine()}, " \
           f"{int(ray.cluster_resources().get('CPU', 0))} CPUs in the cluster)"


def prepare(cfg: Config) -> tuple[Config, dict, bool]:
    """Everything cheap that can fail, before Ray starts. -> (finalized config, dataset meta, resumed)"""
    from raysnet.data import check_dataset, ensure_dataset

    cfg = finalize(cfg)
    meta = ensure_dataset(cfg.data)
    check_dataset(cfg.data)
    tracking.check_reachable(cfg.tracking.uri)
    return cfg, meta, check_resume(cfg)


def gpus_per_worker(cfg: Config) -> int:
    import ray

    if cfg.run.gpus_per_worker is not None:
        return cfg.run.gpus_per_worker
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _epoch_printer(epochs: int):
    """A Ray Train callback (it runs in the controller) that prints one line per epoch."""
    from ray.train import UserCallback

    class EpochPrinter(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            if "train_err" in m:
                print(f"epoch {m['epoch'] + 1}/{epochs}: train_err {m['train_err']:.2f}%  val_err "
                      f"{m['val_err']:.2f}%  lr {m['lr']:.4g}  {m['images_per_sec']:.0f} images/s  "
                      f"{m['epoch_time_s']:.1f} s", flush=True)

    return EpochPrinter()


def make_trainer(cfg: Config, meta: dict, run_id: str, gpus: int, callbacks: list | None = None):
    """The `TorchTrainer` of one run: also what each Tune trial launches."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        _train_loop,
        train_loop_config={"config": dataclasses.asdict(cfg), "meta": meta, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.run.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage,
                             callbacks=[_epoch_printer(cfg.epochs), *(callbacks or [])],
                             # Ray Train's INFO lines per report would drown the epoch lines.
                             logging_config=LoggingConfig(log_level="WARNING"),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )


def finish(cfg: Config, meta: dict, run_id: str, result) -> int:
    """Close the MLflow run with the model, or explain why the run stopped. -> exit status"""
    import torch

    from raysnet.train.worker import NONFINITE_NOTE, pop_note

    metrics = result.metrics or {}
    bad = pop_note(cfg, NONFINITE_NOTE)
    if bad:
        last = f"the last good checkpoint is {result.checkpoint.path}" if result.checkpoint else "no checkpoint yet"
        print(f"error: the training loss became non-finite at epoch {bad['epoch']}, step {bad['step']} "
              f"(lower optim.lr, or check the data); training stopped and {last}.", file=sys.stderr)
        tracking.fail_run(cfg, run_id)
        return 1
    model = _final_model(cfg, meta, result.checkpoint)
    with result.checkpoint.as_directory() as d:
        tracking.finish_run(cfg, run_id, d, model, example=torch.zeros(1, 3, cfg.data.crop, cfg.data.crop))
    print(f"raysnet: done. val_err {metrics.get('val_err', float('nan')):.2f}% (top-5 "
          f"{metrics.get('val_err_top5', float('nan')):.2f}%), train_err {metrics.get('train_err', float('nan')):.2f}% "
          f"after {cfg.epochs} epochs.\n"
          f"  checkpoints: {result.checkpoint.path}\n"
          f"  MLflow: experiment {cfg.tracking.experiment}, run {run_id} at {cfg.tracking.uri}\n"
          f"  open the MLflow UI: {tracking.ui_command(cfg.tracking.uri)}")
    return 0


def train(cfg: Config) -> int:
    from raysnet.models import get_arch

    cfg, meta, resumed = prepare(cfg)
    ray = connect_ray(cfg)
    gpus = gpus_per_worker(cfg)
    run_id, _ = tracking.open_run(cfg, hardware(ray, gpus, cfg))
    print(f"raysnet: {'resuming' if resumed else 'training'} {cfg.arch} ({get_arch(cfg.arch).depth} layers) on "
          f"{cfg.data.name} [{len(meta['classes'])} classes], {cfg.epochs} epochs, global batch {cfg.batch_size} "
          f"over {cfg.run.workers} worker(s){f' with {gpus} GPU(s) each' if gpus else ''}; run {cfg.run.name}",
          flush=True)
    return finish(cfg, meta, run_id, make_trainer(cfg, meta, run_id, gpus).fit())


def _train_loop(config: dict) -> None:
    # Imported inside, so Ray ships a reference to the module rather than pickling the driver's state.
    from raysnet.train.worker import train_loop

    train_loop(config)


def _final_model(cfg: Config, meta: dict, checkpoint):
    import torch

    from raysnet.models import build_model
    from raysnet.train.worker import CHECKPOINT_FILE

    model = build_model(cfg.arch, num_classes=len(meta["classes"]), shortcut=cfg.model.shortcut,
                        variant=cfg.model.variant)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval()
