"""The Ray Train worker: takes only its config and builds model, loaders and optimiser inside.

Sections follow the data: setup -> data -> network -> optimiser -> restore -> epochs.
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raysnet.config import Config, from_dict, to_dict
from raysnet.models import build_model
from raysnet.train.schedule import base_lr, lr_factor

CHECKPOINT_FILE = "checkpoint.pt"
NONFINITE_NOTE = "nonfinite.json"
# Steps at the start of an epoch left out of `images_per_sec` when they are warm-up, not
# training speed: torch.compile's first steps (and its recompile for a new input size), DDP's
# static-graph recording step, cuDNN autotuning of a new size (issue 7).
WARMUP_STEPS = 5


def _note_path(cfg: Config, name: str):
    """(filesystem, path) of a small file in the run's directory; local or s3://, gs:// alike."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(cfg.run.storage)
    return filesystem, f"{root}/{cfg.run.name}/{name}"


def write_note(cfg: Config, name: str, note: dict) -> None:
    filesystem, path = _note_path(cfg, name)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(note).encode())


def pop_note(cfg: Config, name: str) -> dict | None:
    """Read and remove a note; None when there is none."""
    from pyarrow import fs

    filesystem, path = _note_path(cfg, name)
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as f:
        note = json.loads(f.read())
    filesystem.delete_file(path)
    return note


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs by default (no loss scaler needed); fp32 on CPUs."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class EpochStats:
    """Sums kept on the device, so the training step never waits for the host (read once an epoch)."""

    def __init__(self, device: torch.device):
        self.device = device
        # loss sum, top-1 correct, top-5 correct, samples
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        n = labels.shape[0]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
        hits = top5 == labels[:, None]
        self.sums += torch.stack([loss.double() * n, hits[:, 0].sum().double(), hits.any(1).sum().double(),
                                  torch.tensor(n, dtype=torch.float64, device=self.device)])
        bad = ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def reduce(self) -> dict[str, float]:
        """Sum over workers (one collective); -1 for `bad_step` when every loss was finite."""
        sums = self.sums.clone()
        # The smallest bad step across workers; encode "none" as a large number for MIN.
        bad = torch.where(self.first_bad_step < 0, torch.iinfo(torch.int64).max, self.first_bad_step)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        loss, top1, top5, n = sums.tolist()
        bad_step = int(bad.item())
        n = max(n, 1.0)
        return {"loss": loss / n, "err": 100 * (1 - top1 / n), "err_top5": 100 * (1 - top5 / n), "n": n,
                "bad_step": -1 if bad_step == torch.iinfo(torch.int64).max else bad_step}


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, stats: EpochStats, step: int,
               dtype: torch.dtype | None, label_smoothing: float = 0.0) -> None:
    """One SGD step. No `.item()`: everything the host needs waits in `stats`."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(images)  # (N, classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    stats.add(loss.detach(), logits.detach().float(), labels, step)


@torch.no_grad()
def validate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None,
             flip: bool = False) -> dict[str, float]:
    """Validation error and loss. `flip`: average the logits of each image and its mirror image
    (test-time augmentation, data.val_flip; the loss is that of the averaged logits)."""
    if dist.is_available() and dist.is_initialized():
        # Every rank evaluates rank 0's BN statistics (each rank's last training forward moved its own).
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    model.eval()
    stats = EpochStats(device)
    for step, (images, labels) in enumerate(loader):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(images)  # (N, classes)
            if flip:
                logits = (logits + model(images.flip(3))) / 2  # dim 3: width, in NCHW (also channels_last)
            loss = F.cross_entropy(logits, labels)
        stats.add(loss, logits.float(), labels, step)
    return stats.reduce()


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """One group with the recipe's weight decay; with optim.wd_bn_bias=false, a second group of
    BN weights and biases and every bias (the 1-d tensors) without it (FFCV's ImageNet recipe)."""
    if cfg.optim.wd_bn_bias:
        return [{"params": list(model.parameters())}]
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},  # conv and fc weights
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # Paper §3.4: SGD, momentum 0.9, weight decay 1e-4 on every parameter. Fused kernels on GPU
    # (one kernel for the whole update), multi-tensor (foreach) kernels on CPU.
    fused = device.type == "cuda"
    return torch.optim.SGD(param_groups(model, cfg), lr=base_lr(cfg), momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov,
                           fused=fused or None, foreach=None if fused else True)


def ddp_kwargs(cfg: Config) -> dict[str, Any]:
    """DistributedDataParallel's arguments, via Ray's prepare_model(parallel_strategy_kwargs=...)."""
    # gradient_as_bucket_view saves a copy of every gradient; ResNets have no unused parameters,
    # and the same graph every step, so DDP may record it once (static_graph, run.ddp_static_graph).
    return {"gradient_as_bucket_view": True, "static_graph": cfg.run.ddp_static_graph}


def warmup_steps(cfg: Config, *, first: bool, resized: bool, steps: int) -> int:
    """How many steps at the start of an epoch `images_per_sec` leaves out: WARMUP_STEPS in the
    first epoch of a process with a compiled model (torch.compile compiles on its first steps) and
    in an epoch whose input size is new (a recompile, cuDNN autotuning); else 0. An epoch of
    2 * WARMUP_STEPS steps or fewer (smoke tests) is timed whole."""
    if steps <= 2 * WARMUP_STEPS:
        return 0
    return WARMUP_STEPS if (cfg.model.compile and first) or resized else 0


@dataclass
class State:
    """What a checkpoint restores."""

    epoch: int = 0  # next epoch to run
    history: list[dict[str, float]] | None = None


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, cfg: Config, run_id: str,
                    history: list[dict]) -> None:
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaler; kept so the format has room for fp16
        "epoch": epoch, "config": to_dict(cfg), "mlflow_run_id": run_id, "history": history,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, device: torch.device) -> State:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return State(epoch=ckpt["epoch"] + 1, history=ckpt["history"])


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO through a logger named after its file, which its
    LoggingConfig does not reach; the driver prints one line per epoch instead."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. `config` = {"config": resolved Config dict, "meta": dataset
    metadata, "run_id": MLflow run id}."""
    import ray.train
    import ray.train.torch

    from raysnet.data import make_loaders, set_epoch
    from raysnet.data.loaders import set_train_resolution, train_resolution
    from raysnet.train.tracking import Tracker

    # --- setup
    _quiet_ray_train_reports()
    cfg = from_dict(config["config"])
    meta, run_id = config["meta"], config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    random.seed(cfg.run.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    dtype = autocast_dtype(cfg.run.precision, device)

    # --- data: each worker gets its shard of the global batch
    data = cfg.data
    if device.type == "cpu":
        # FFCV sets torch's (process-wide) thread count to its decoding threads, so on a CPU the two
        # are one knob: size it to the CPUs Ray gave this worker, or workers oversubscribe the cores.
        data = dataclasses.replace(data, loader_workers=cfg.run.cpus_per_worker)
    train_loader, val_loader = make_loaders(data, meta, cfg.batch_size // world, device=device,
                                            seed=cfg.run.seed, distributed=world > 1,
                                            channels_last=cfg.model.channels_last)
    steps = len(train_loader) if cfg.run.max_steps is None else min(cfg.run.max_steps, len(train_loader))

    # --- network
    model = build_model(cfg.arch, num_classes=len(meta["classes"]), shortcut=cfg.model.shortcut,
                        variant=cfg.model.variant)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs(cfg))
    if cfg.model.compile:
        model = torch.compile(model)

    # --- optimiser and schedule (per iteration, so milestones fall where the paper puts them)
    optimizer = make_optimizer(raw, cfg, device)
    total = steps * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))

    # --- restore: after a worker failure or a rerun with the same run.name
    state = State(history=[])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE, raw, optimizer, scheduler, device)
    tracker = Tracker(cfg, run_id) if rank == 0 else None
    if tracker:
        tracker.sync(state.history)  # epochs checkpointed but not yet in MLflow (a crash in between)

    # --- epochs
    for epoch in range(state.epoch, cfg.epochs):
        start = time.perf_counter()
        set_epoch(train_loader, epoch)
        # Progressive resizing (data.res_start/res_end): this epoch's training crop.
        resized = bool(cfg.data.res_start and cfg.data.res_end) and \
            set_train_resolution(train_loader, train_resolution(cfg.data, epoch, cfg.epochs))
        warm = warmup_steps(cfg, first=epoch == state.epoch, resized=resized, steps=steps)
        model.train()
        stats = EpochStats(device)
        lr = optimizer.param_groups[0]["lr"]
        timed_start, done = time.perf_counter(), 0
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps:
                break
            if warm and step == warm:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once an epoch: the warm-up steps must be finished
                timed_start = time.perf_counter()
            train_step(model, images, labels, optimizer, scheduler, stats, step, dtype, cfg.optim.label_smoothing)
            done += 1
        train = stats.reduce()
        train_time = time.perf_counter() - timed_start
        timed_images = train["n"] * (done - warm) / max(done, 1)  # every step has the same batch (drop_last)
        if train["bad_step"] >= 0:
            # Stop every worker the same way: no retry (it would diverge again), no checkpoint (the
            # last good one stays). Ray's result only carries checkpointed metrics, so rank 0
            # leaves a note in the run's directory for the driver.
            if rank == 0:
                write_note(cfg, NONFINITE_NOTE, {"epoch": epoch, "step": train["bad_step"]})
            ray.train.report({"epoch": epoch, "nonfinite_step": train["bad_step"]})
            return
        last = epoch == cfg.epochs - 1
        val = validate(raw, val_loader, device, dtype, flip=cfg.data.val_flip) \
            if last or (epoch + 1) % cfg.run.eval_every == 0 else {}
        metrics = {"epoch": epoch, "train_loss": train["loss"], "train_err": train["err"],
                   "val_loss": val.get("loss", float("nan")), "val_err": val.get("err", float("nan")),
                   "val_err_top5": val.get("err_top5", float("nan")), "lr": lr,
                   "images_per_sec": timed_images / train_time, "epoch_time_s": time.perf_counter() - start}
        state.history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, raw, optimizer, scheduler, epoch, cfg, run_id,
                                state.history)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if tracker:
            tracker.sync(state.history)
