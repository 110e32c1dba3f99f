"""End-to-end training images/s on one device, and on a GPU the model FLOP utilisation: how close the
fast path comes to what the device could do.

    python benchmarks/throughput.py [--arch resnet50] [--batch 256] [--size 224] [--compile]
        [--data synthetic | --data-root DIR] [--steps 30] [--warmup 10] [--epochs N] [key=value ...]

raysnet's own pieces, as its Ray Train worker uses them: the recipe's config (imagenet-fast for
ImageNet depths, cifar-paper for CIFAR ones, then key=value overrides), `build_model`,
channels_last, `make_optimizer` (fused SGD on CUDA), `autocast_dtype` (bf16 on a GPU),
`train_step` (no host sync per step), torch.compile with --compile (model.compile). No Ray: one
process, one device, so the figure is the ceiling a Ray worker can reach (benchmarks/overhead.py
measures what Ray adds).

Data: `synthetic` is one random batch made on the device and reused (the model and optimiser
alone); `--data-root DIR` reads a dataset made by `python -m raysnet.prepare` through raysnet's
FFCV loaders (decoding, augmentation, host-to-device copy included), at a fixed crop of --size
for ImageNet pipelines, decoding on every core (data.loader_workers).

Timing: --warmup steps first (torch.compile, cuDNN autotuning, allocator, loader JIT), not
counted, then --steps timed between two device synchronisations. With --epochs N it times N
whole epochs instead (synthetic: of --epoch-size images) and reports the median epoch after the
first (which holds the warm-up). MFU: FLOPs of one forward+backward per image, counted once with
torch.utils.flop_counter.FlopCounterMode, times images/s, over the device's dense bf16 peak
(PEAK_TFLOPS by device name, or --peak-tflops). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from raysnet.config import Config

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model: torch.nn.Module, size: int, classes: int, device: torch.device, dtype,
                    channels_last: bool) -> float:
    """Forward + backward FLOPs of one image (convolutions and matrix products, as FLOP counters count)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    x = torch.randn(n, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (n,), device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=None, help="per device; default 256 on a GPU, 16 on a CPU")
    parser.add_argument("--size", type=int, default=None, help="image side; default 224 (ImageNet depths) or 32")
    parser.add_argument("--data", choices=["synthetic", "ffcv"], default=None,
                        help="default: ffcv with --data-root, else synthetic")
    parser.add_argument("--data-root", default="", help="a dataset directory made by python -m raysnet.prepare")
    parser.add_argument("--recipe", default="", help="default: imagenet-fast (ImageNet depths) or cifar-paper")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (model.compile=true)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 30 on a GPU, 3 on a CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 10 GPU, 2 CPU")
    parser.add_argument("--epochs", type=int, default=0, help="time whole epochs instead of --steps")
    parser.add_argument("--epoch-size", type=int, default=50_000, help="images in a synthetic epoch")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--no-cupy", action="store_true",
                        help="normalise on the GPU with torch, not FFCV's cupy kernel (a cupy not built for "
                             "this CUDA)")
    parser.add_argument("overrides", nargs="*", help="raysnet key=value overrides, e.g. run.precision=fp32")
    args = parser.parse_args()
    args.data = args.data or ("ffcv" if args.data_root else "synthetic")
    if args.data == "ffcv" and not args.data_root:
        parser.error("--data ffcv needs --data-root DIR")
    return args


@dataclass(frozen=True)
class Bench:
    """The flags resolved against the device and the recipe: what is measured, and how."""

    cfg: Config
    device: torch.device
    dtype: torch.dtype | None
    data: str  # "synthetic" or "ffcv"
    recipe: str
    imagenet: bool
    batch: int
    size: int
    steps: int
    warmup: int


def resolve(args: argparse.Namespace) -> Bench:
    """The recipe's config (imagenet-fast for ImageNet depths, else cifar-paper) at one crop, one device."""
    from raysnet.config import load_config
    from raysnet.models import get_arch
    from raysnet.train.worker import autocast_dtype

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    imagenet = get_arch(args.arch).family == "imagenet"
    batch, size = args.batch or (256 if gpu else 16), args.size or (224 if imagenet else 32)
    steps, warmup = args.steps or (30 if gpu else 3), args.warmup if args.warmup is not None else (10 if gpu else 2)
    recipe = args.recipe or ("imagenet-fast" if imagenet else "cifar-paper")
    fixed_size = ["data.crop=" + str(size), "data.res_start=0", "data.res_end=0"]  # one size, no resizing
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cfg = load_config([f"recipe={recipe}", f"arch={args.arch}", f"batch_size={batch}", "run.workers=1",
                       f"data.loader_workers={cores}", *fixed_size,
                       *([f"data.root={args.data_root}"] if args.data_root else []),
                       *(["model.compile=true"] if args.compile else []), *args.overrides])
    if gpu:
        torch.backends.cudnn.benchmark = True  # as the worker: fixed sizes, fastest kernels
    return Bench(cfg=cfg, device=device, dtype=autocast_dtype(cfg.run.precision, device), data=args.data,
                 recipe=recipe, imagenet=imagenet, batch=batch, size=cfg.data.crop, steps=steps, warmup=warmup)


def make_data(bench: Bench, epoch_size: int) -> tuple[Callable[[], Iterator], int, int]:
    """(epoch_batches, steps per epoch, classes): `epoch_batches()` yields one epoch of (images, labels)
    on the device."""
    cfg = bench.cfg
    if bench.data == "ffcv":
        from raysnet.data import ensure_dataset, make_loaders

        meta = ensure_dataset(cfg.data)
        loader, _ = make_loaders(cfg.data, meta, bench.batch, device=bench.device, seed=cfg.run.seed,
                                 distributed=False, channels_last=cfg.model.channels_last)

        def epoch_batches():
            yield from loader

        return epoch_batches, len(loader), len(meta["classes"])
    classes = 1000 if bench.imagenet else 10
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    images = torch.randn(bench.batch, 3, bench.size, bench.size, device=bench.device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, classes, (bench.batch,), device=bench.device)
    per_epoch = max(1, epoch_size // bench.batch)

    def epoch_batches():
        for _ in range(per_epoch):
            yield images, labels

    return epoch_batches, per_epoch, classes


class Stepper:
    """raysnet's train_step over batches; `step` counts across calls (the schedule's iteration)."""

    def __init__(self, bench: Bench, model: torch.nn.Module, optimizer, scheduler):
        from raysnet.train.worker import EpochStats

        self.bench, self.model, self.optimizer, self.scheduler = bench, model, optimizer, scheduler
        self.stats = EpochStats(bench.device)
        self.step = 0

    def run(self, batches: Iterable, limit: int | None = None) -> int:
        from raysnet.train.worker import train_step

        done = 0
        for x, y in batches:
            if limit is not None and done >= limit:
                break
            train_step(self.model, x, y, self.optimizer, self.scheduler, self.stats, self.step, self.bench.dtype,
                       self.bench.cfg.optim.label_smoothing)
            self.step, done = self.step + 1, done + 1
        return done


def build(bench: Bench, classes: int, total: int) -> tuple[Stepper, float]:
    """Network and optimiser, as in the worker; and the FLOPs of one image, counted on the eager model."""
    from raysnet.models import build_model
    from raysnet.train.schedule import lr_factor
    from raysnet.train.worker import compiled, make_optimizer

    cfg = bench.cfg
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    raw = build_model(cfg.arch, num_classes=classes, shortcut=cfg.model.shortcut, variant=cfg.model.variant)
    raw = raw.to(bench.device, memory_format=memory_format).train()
    flops = flops_per_image(raw, bench.size, classes, bench.device, bench.dtype, cfg.model.channels_last)
    model = compiled(raw, cfg)
    optimizer = make_optimizer(raw, cfg, bench.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
    return Stepper(bench, model, optimizer, scheduler), flops


def time_epochs(stepper: Stepper, epoch_batches: Callable[[], Iterator], epochs: int) -> tuple[float, list[float]]:
    """(median seconds of an epoch, every epoch's seconds): the first epoch holds the warm-up and is
    left out of the median."""
    device = stepper.bench.device
    epoch_times: list[float] = []
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        n = stepper.run(epoch_batches())
        sync(device)
        epoch_times.append(time.perf_counter() - t)
        print(f"  epoch of {n} steps: {epoch_times[-1]:.2f} s", file=sys.stderr, flush=True)
    timed = epoch_times[1:] or epoch_times
    return statistics.median(timed), epoch_times


def time_steps(stepper: Stepper, epoch_batches: Callable[[], Iterator]) -> tuple[float, int]:
    """(seconds, steps) of --steps steps after --warmup untimed ones, over epochs end to end."""
    bench = stepper.bench

    def endless():
        while True:
            yield from epoch_batches()

    start = time.perf_counter()
    stream = endless()
    stepper.run(stream, bench.warmup)
    sync(bench.device)
    print(f"  warm-up ({bench.warmup} steps): {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    timed_steps = stepper.run(stream, bench.steps)
    sync(bench.device)
    return time.perf_counter() - t, timed_steps


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def summary(bench: Bench, *, rate: float, seconds: float, timed_steps: int, flops: float,
            peak: float | None) -> dict[str, Any]:
    """The result's JSON object (without the --epochs fields)."""
    cfg, achieved = bench.cfg, rate * flops / 1e12
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    return {"device": device_name(bench.device) if bench.device.type == "cuda" else cpu,
            "arch": cfg.arch,
            "data": bench.data if bench.data == "synthetic" else f"{cfg.data.loader}:{cfg.data.root}",
            "recipe": bench.recipe, "batch": bench.batch, "size": bench.size,
            "dtype": str(bench.dtype or torch.float32),
            "channels_last": cfg.model.channels_last,
            "compile": cfg.model.compile and cfg.model.compile_mode,
            "images_per_sec": round(rate, 1), "step_ms": round(1000 * seconds / timed_steps, 2),
            "gflops_per_image": round(flops / 1e9, 3), "achieved_tflops": round(achieved, 2),
            "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None}


def main() -> None:
    args = parse_args()
    if args.no_cupy:
        sys.modules["cupy"] = None  # find_spec("cupy") is then None: raysnet's loaders pick torch
    bench = resolve(args)
    cfg = bench.cfg
    epoch_batches, per_epoch, classes = make_data(bench, args.epoch_size)
    total = bench.warmup + (args.epochs * per_epoch if args.epochs else bench.steps)
    stepper, flops = build(bench, classes, total)
    print(f"{cfg.arch} on {bench.data} ({cfg.data.root if bench.data == 'ffcv' else 'random tensors'}), "
          f"batch {bench.batch}, {bench.size}x{bench.size}, {bench.dtype or torch.float32}, "
          f"channels_last={cfg.model.channels_last}, compile={cfg.model.compile}, "
          f"device {device_name(bench.device)}", file=sys.stderr, flush=True)

    if args.epochs:
        seconds, epoch_times = time_epochs(stepper, epoch_batches, args.epochs)
        timed_steps = per_epoch
    else:
        seconds, timed_steps = time_steps(stepper, epoch_batches)
    bad = stepper.stats.reduce()["bad_step"]
    if bad >= 0:
        print(f"warning: non-finite loss from step {bad} (lr too high for random data?)", file=sys.stderr)

    rate = timed_steps * bench.batch / seconds
    peak = peak_tflops(bench.device, args.peak_tflops)
    result = summary(bench, rate=rate, seconds=seconds, timed_steps=timed_steps, flops=flops, peak=peak)
    if args.epochs:
        result.update({"epoch_steps": per_epoch, "epoch_images": per_epoch * bench.batch,
                       "epoch_time_s": round(seconds, 3), "epoch_times_s": [round(s, 3) for s in epoch_times]})
    achieved = rate * flops / 1e12
    print(f"{rate:.1f} images/s, {achieved:.2f} TFLOP/s" + (f" = {100 * achieved / peak:.1f}% of {peak:g}"
                                                          if peak else ""), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
