"""The Ray Train worker: takes only its config and builds model, loaders and optimiser inside.

Sections follow the data: the pieces (statistics, the train step, validation, the optimiser), then
`build` (setup -> data -> network -> optimiser -> restore) and `run_epoch`, which `train_loop` repeats.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raysnet import checkpoint
from raysnet.config import Config, from_dict
from raysnet.models import build_model
from raysnet.data.order import loss_weight
from raysnet.train import elastic, finetune
from raysnet.train.schedule import base_lr, lr_factor

if TYPE_CHECKING:
    from raysnet.tracking import Tracker
    from raysnet.train.progress import Watch

NONFINITE_NOTE = "nonfinite.json"
# Steps at the start of an epoch left out of `images_per_sec` when they are warm-up, not
# training speed: torch.compile's first steps (and its recompile for a new input size), DDP's
# static-graph recording step, cuDNN autotuning of a new size; counted, they would understate the
# rate the rest of the epoch runs at.
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
               dtype: torch.dtype | None, label_smoothing: float = 0.0, weight: float = 1.0) -> None:
    """One SGD step. No `.item()`: everything the host needs waits in `stats`. `weight`: this
    rank's `raysnet.data.order.loss_weight` (1 unless the shards of the global batch are uneven)."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(images)  # (N, classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss * weight if weight != 1.0 else loss).backward()
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


def param_groups(model: nn.Module, cfg: Config, fresh: set[str] | None = None) -> list[dict[str, Any]]:
    """One group with the recipe's weight decay; with optim.wd_bn_bias=false, a second group of
    BN weights and biases and every bias (the 1-d tensors) without it (FFCV's ImageNet recipe);
    fine-tuning splits each by where the parameters came from (`finetune.param_groups`). Frozen
    parameters are in none."""
    return finetune.param_groups(model, cfg, fresh)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device,
                   fresh: set[str] | None = None) -> torch.optim.Optimizer:
    """`fresh`: with model.init, the parameters it left as built (the rest train at model.init_lr_scale)."""
    # Paper §3.4: SGD, momentum 0.9, weight decay 1e-4 on every parameter. Fused kernels on GPU
    # (one kernel for the whole update), multi-tensor (foreach) kernels on CPU.
    fused = device.type == "cuda"
    return torch.optim.SGD(param_groups(model, cfg, fresh), lr=base_lr(cfg), momentum=cfg.optim.momentum,
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


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO through a logger named after its file, which its
    LoggingConfig does not reach; the driver prints one line per epoch instead."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@dataclass
class Job:
    """One worker's run, built once: what every epoch reads (and `history`, which it appends to)."""

    cfg: Config
    run_id: str  # the MLflow run
    rank: int
    world: int  # this worker group's size (an elastic run's changes between restarts)
    device: torch.device
    dtype: torch.dtype | None  # autocast's; None: fp32
    train_loader: Any
    val_loader: Any
    steps: int  # training steps per epoch, at every world size
    loss_weight: float  # raysnet.data.order.loss_weight of this rank: 1 unless the shards are uneven
    model: nn.Module  # as trained: wrapped by Ray (DDP), compiled with model.compile
    raw: nn.Module  # the bare network: validated and checkpointed
    frozen_norms: list[nn.Module]  # BatchNorm layers of the stages model.freeze froze: kept in eval mode
    labels: dict  # checkpoint.labels(meta): class names and normalisation, saved with every checkpoint
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    first_epoch: int  # the first this process runs: 0, or the one after a restored checkpoint
    history: list[dict[str, float]]  # every finished epoch's metrics, restored ones included
    tracker: Tracker | None  # rank 0's MLflow logger
    watch: Watch | None = None  # rank 0's progress lines and step-level points
    monitor: Any = None  # this node's MLflow system-metrics monitor (on its local rank 0)


def _seed_and_device(cfg: Config, rank: int) -> torch.device:
    """This worker's device, with every RNG seeded by run.seed + rank."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    random.seed(cfg.run.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        share = cfg.run.gpus_per_worker
        if share is not None and 0 < share < 1:  # a GPU shared by several trials: keep to our part
            torch.cuda.set_per_process_memory_fraction(share, device)
    return device


def _loaders(cfg: Config, meta: dict[str, Any], world: int, device: torch.device):
    """(train, val) FFCV loaders; each worker gets its shard of every global batch (raysnet.data.order)."""
    from raysnet.data import local_copy, make_loaders

    data = local_copy(cfg.data)  # data.root on object storage: this node's copy, fetched once
    if device.type == "cpu":
        # FFCV sets torch's (process-wide) thread count to its decoding threads, so on a CPU the two
        # are one knob: size it to the CPUs Ray gave this worker, or workers oversubscribe the cores.
        data = dataclasses.replace(data, loader_workers=cfg.run.cpus_per_worker)
    return make_loaders(data, meta, cfg.batch_size, device=device, seed=cfg.run.seed,
                        distributed=world > 1, channels_last=cfg.model.channels_last, max_steps=cfg.run.max_steps)


def _network(cfg: Config, classes: int, initialise: bool) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
    """(the model as trained, the bare network, the BatchNorm layers frozen): `initialise` loads the
    run's initial weights (model.init) first; model.freeze freezes before DDP, which then leaves
    those parameters out; then wrapped by Ray (DDP across workers, rank 0's parameters broadcast),
    then compiled."""
    import ray.train.torch

    raw = build_model(cfg.arch, num_classes=classes, shortcut=cfg.model.shortcut, variant=cfg.model.variant)
    if initialise:
        finetune.load(raw, cfg)
    norms = finetune.freeze(raw, cfg)
    if cfg.model.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(raw, parallel_strategy_kwargs=ddp_kwargs(cfg))
    return compiled(model, cfg), raw, norms


def compiled(model: nn.Module, cfg: Config) -> nn.Module:
    """The model as model.compile and model.compile_mode ask (reduce-overhead, cudagraphs: CUDA graphs)."""
    if not cfg.model.compile:
        return model
    if cfg.model.compile_mode == "cudagraphs":
        return torch.compile(model, backend="cudagraphs")
    return torch.compile(model, mode=cfg.model.compile_mode)


def _restore(latest, raw: nn.Module, optimizer, scheduler, device: torch.device) -> tuple[int, list[dict[str, float]]]:
    """(first epoch to run, history): from Ray's latest checkpoint (`latest`) after a worker failure
    or a rerun with the same run.name; (0, []) for a new run."""
    if not latest:
        return 0, []
    with latest.as_directory() as d:
        return checkpoint.restore(Path(d) / checkpoint.CHECKPOINT_FILE, model=raw, optimizer=optimizer,
                                  scheduler=scheduler, device=device)


def build(config: dict[str, Any]) -> Job:
    """Setup -> data -> network -> optimiser and schedule -> restore, from the worker's `config`."""
    import ray.train

    from raysnet.data import steps_per_epoch
    from raysnet.tracking import Tracker
    from raysnet.train.progress import Watch

    cfg, meta, run_id = from_dict(config["config"]), config["meta"], config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    monitor = _system_metrics(cfg, run_id, ctx)
    clock = [time.perf_counter()]
    device = _seed_and_device(cfg, rank)
    train_loader, val_loader = _loaders(cfg, meta, world, device)
    clock.append(time.perf_counter())
    steps = steps_per_epoch(meta["splits"]["train"]["samples"], cfg.batch_size, cfg.run.max_steps)
    # A run with a checkpoint of its own continues from it: model.init's weights start new runs only.
    latest = ray.train.get_checkpoint()
    model, raw, frozen_norms = _network(cfg, len(meta["classes"]), initialise=bool(cfg.model.init) and not latest)
    # The schedule is per iteration, so milestones fall where the paper puts them.
    optimizer = make_optimizer(raw, cfg, device, finetune.fresh_names(cfg))
    total = steps * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
    clock.append(time.perf_counter())
    first_epoch, history = _restore(latest, raw, optimizer, scheduler, device)
    clock.append(time.perf_counter())
    tracker = Tracker(cfg, run_id) if rank == 0 else None
    if tracker:
        tracker.sync(history)  # epochs checkpointed but not yet in MLflow (a crash in between)
        _say_built(cfg, world, first_epoch, clock)
        elastic.note_resize(cfg, tracker, history, world)
    watch = Watch(cfg, steps, world, tracker, config.get("progress", "lines")) if rank == 0 else None
    return Job(cfg=cfg, run_id=run_id, rank=rank, world=world, device=device,
               dtype=autocast_dtype(cfg.run.precision, device), train_loader=train_loader, val_loader=val_loader,
               steps=steps, loss_weight=loss_weight(cfg.batch_size, rank, world), model=model, raw=raw,
               frozen_norms=frozen_norms,
               labels=checkpoint.labels(meta),
               optimizer=optimizer, scheduler=scheduler, first_epoch=first_epoch, history=history,
               tracker=tracker, watch=watch, monitor=monitor)


def _say_built(cfg: Config, world: int, first_epoch: int, clock: list[float]) -> None:
    """Rank 0 says what the start-up of the workers took, so that no phase of a run is silent."""
    from raysnet.train.progress import say

    if cfg.run.progress_s <= 0:
        return
    loaders, network, restore = (b - a for a, b in itertools.pairwise(clock))
    resumed = f", checkpoint of epoch {first_epoch} restored in {restore:.1f} s" if first_epoch else ""
    say(f"{world} worker(s) up; rank 0 built its data loaders in {loaders:.1f} s and the network in "
        f"{network:.1f} s{resumed}")


def _system_metrics(cfg: Config, run_id: str, ctx) -> Any:
    """The local rank 0 of each node starts MLflow's system-metrics monitor there, as node<i>."""
    import socket

    import ray

    from raysnet.tracking import start_system_metrics

    if ctx.get_local_rank() != 0:
        return None
    node = f"node{ctx.get_node_rank()}"
    return start_system_metrics(cfg, run_id, node, f"{socket.gethostname()} {ray.util.get_node_ip_address()}")


def _start_epoch(job: Job, epoch: int) -> int:
    """Shuffle and resize for `epoch`; returns how many warm-up steps `images_per_sec` leaves out."""
    from raysnet.data import set_epoch
    from raysnet.data.loaders import set_train_resolution, train_resolution

    cfg = job.cfg
    set_epoch(job.train_loader, epoch)
    # Progressive resizing (data.res_start/res_end): this epoch's training crop.
    resized = bool(cfg.data.res_start and cfg.data.res_end) and \
        set_train_resolution(job.train_loader, train_resolution(cfg.data, epoch, cfg.epochs))
    return warmup_steps(cfg, first=epoch == job.first_epoch, resized=resized, steps=job.steps)


def _train(job: Job, warm: int) -> tuple[dict[str, float], float]:
    """An epoch of training steps: (EpochStats.reduce() over workers, images/s after `warm` steps).
    Rank 0's watch sees every step without waiting for the device (raysnet.train.progress)."""
    job.model.train()
    finetune.keep_frozen(job.frozen_norms)
    stats, watch = EpochStats(job.device), job.watch
    timed_start, done, lr = time.perf_counter(), 0, job.optimizer.param_groups[0]["lr"]
    for step, (images, labels) in enumerate(job.train_loader):
        if step >= job.steps:
            break
        if warm and step == warm:
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)  # once an epoch: the warm-up steps must be finished
            timed_start = time.perf_counter()
        lr = job.optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps inside train_step)
        train_step(job.model, images, labels, job.optimizer, job.scheduler, stats, step, job.dtype,
                   job.cfg.optim.label_smoothing, job.loss_weight)
        done += 1
        if watch:
            watch.after_step(step, stats.sums, lr)
    if watch:
        watch.end_epoch(stats.sums, lr)
    train = stats.reduce()
    train_time = time.perf_counter() - timed_start
    timed_images = train["n"] * (done - warm) / max(done, 1)  # every step has the same batch (drop_last)
    return train, timed_images / train_time


def _stop_nonfinite(job: Job, epoch: int, step: int) -> None:
    """Stop every worker the same way: no retry (it would diverge again), no checkpoint (the last
    good one stays). Ray's result only carries checkpointed metrics, so rank 0 leaves a note in the
    run's directory for the driver."""
    import ray.train

    if job.rank == 0:
        write_note(job.cfg, NONFINITE_NOTE, {"epoch": epoch, "step": step})
    ray.train.report({"epoch": epoch, "nonfinite_step": step})


def _validate_if_due(job: Job, epoch: int) -> dict[str, float]:
    """Validation every run.eval_every epochs and after the last one; {} in the epochs between."""
    cfg = job.cfg
    last = epoch == cfg.epochs - 1
    if not (last or (epoch + 1) % cfg.run.eval_every == 0):
        return {}
    return validate(job.raw, job.val_loader, job.device, job.dtype, flip=cfg.data.val_flip)


def _checkpoint_and_report(job: Job, epoch: int, metrics: dict[str, float]) -> None:
    """Every worker reports the epoch to Ray; rank 0 with the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if job.rank == 0:
            checkpoint.save(Path(tmp) / checkpoint.CHECKPOINT_FILE, model=job.raw, optimizer=job.optimizer,
                            scheduler=job.scheduler, epoch=epoch, cfg=job.cfg, run_id=job.run_id,
                            history=job.history, dataset=job.labels)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def run_epoch(job: Job, epoch: int) -> dict[str, float] | None:
    """Train, validate when due, checkpoint, report: the epoch's metrics, or None when a loss was
    not finite (the run stops)."""
    start = time.perf_counter()
    if job.watch:
        job.watch.start_epoch(epoch)
    warm = _start_epoch(job, epoch)
    lr = job.optimizer.param_groups[0]["lr"]
    train, images_per_sec = _train(job, warm)
    if train["bad_step"] >= 0:
        _stop_nonfinite(job, epoch, train["bad_step"])
        return None
    val = _validate_if_due(job, epoch)
    metrics = {"epoch": epoch, "train_loss": train["loss"], "train_err": train["err"],
               "val_loss": val.get("loss", float("nan")), "val_err": val.get("err", float("nan")),
               "val_err_top5": val.get("err_top5", float("nan")), "lr": lr,
               "images_per_sec": images_per_sec, "epoch_time_s": time.perf_counter() - start,
               "world_size": job.world, "train_images": train["n"], elastic.END_TIME: time.time()}
    job.history.append(metrics)
    _checkpoint_and_report(job, epoch, metrics)
    if job.tracker:
        job.tracker.sync(job.history)
    return metrics


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. `config` = {"config": resolved Config dict (to_dict), "meta":
    dataset metadata, "run_id": MLflow run id}."""
    _quiet_ray_train_reports()
    job = build(config)
    try:
        for epoch in range(job.first_epoch, job.cfg.epochs):
            if run_epoch(job, epoch) is None:
                return
    finally:
        if job.tracker:
            job.tracker.close()  # the step points still queued land before the run closes
        if job.monitor:
            job.monitor.finish()
