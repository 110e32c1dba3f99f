"""End-to-end training images/s on one device, and on a GPU the model FLOP utilisation (issue 7).

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

import torch

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


def main() -> None:
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
    if args.no_cupy:
        sys.modules["cupy"] = None  # find_spec("cupy") is then None: raysnet's loaders pick torch

    from raysnet.config import load_config
    from raysnet.models import build_model, get_arch
    from raysnet.train.schedule import lr_factor
    from raysnet.train.worker import EpochStats, autocast_dtype, make_optimizer, train_step

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    imagenet = get_arch(args.arch).family == "imagenet"
    batch, size = args.batch or (256 if gpu else 16), args.size or (224 if imagenet else 32)
    steps, warmup = args.steps or (30 if gpu else 3), args.warmup if args.warmup is not None else (10 if gpu else 2)
    data = args.data or ("ffcv" if args.data_root else "synthetic")
    if data == "ffcv" and not args.data_root:
        parser.error("--data ffcv needs --data-root DIR")
    recipe = args.recipe or ("imagenet-fast" if imagenet else "cifar-paper")
    fixed_size = ["data.crop=" + str(size), "data.res_start=0", "data.res_end=0"]  # one size, no resizing
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cfg = load_config([f"recipe={recipe}", f"arch={args.arch}", f"batch_size={batch}", "run.workers=1",
                       f"data.loader_workers={cores}", *fixed_size, *([f"data.root={args.data_root}"] if args.data_root else []),
                       *(["model.compile=true"] if args.compile else []), *args.overrides])
    size = cfg.data.crop
    if gpu:
        torch.backends.cudnn.benchmark = True  # as the worker: fixed sizes, fastest kernels
    dtype = autocast_dtype(cfg.run.precision, device)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    # --- data: an endless stream of (images, labels) on the device, and where epochs end
    if data == "ffcv":
        from raysnet.data import ensure_dataset, make_loaders

        meta = ensure_dataset(cfg.data)
        classes = len(meta["classes"])
        loader, _ = make_loaders(cfg.data, meta, batch, device=device, seed=cfg.run.seed, distributed=False,
                                 channels_last=cfg.model.channels_last)
        per_epoch = len(loader)

        def epoch_batches():
            yield from loader
    else:
        classes = 1000 if imagenet else 10
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
        labels = torch.randint(0, classes, (batch,), device=device)
        per_epoch = max(1, args.epoch_size // batch)

        def epoch_batches():
            for _ in range(per_epoch):
                yield images, labels

    # --- network and optimiser, as in the worker
    raw = build_model(cfg.arch, num_classes=classes, shortcut=cfg.model.shortcut, variant=cfg.model.variant)
    raw = raw.to(device, memory_format=memory_format).train()
    flops = flops_per_image(raw, size, classes, device, dtype, cfg.model.channels_last)
    model = torch.compile(raw) if cfg.model.compile else raw
    optimizer = make_optimizer(raw, cfg, device)
    total = warmup + (args.epochs * per_epoch if args.epochs else steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.optim))
    stats = EpochStats(device)
    print(f"{cfg.arch} on {data} ({cfg.data.root if data == 'ffcv' else 'random tensors'}), batch {batch}, "
          f"{size}x{size}, {dtype or torch.float32}, channels_last={cfg.model.channels_last}, "
          f"compile={cfg.model.compile}, device {torch.cuda.get_device_name(device) if gpu else 'CPU'}",
          file=sys.stderr, flush=True)

    step = 0

    def run(batches, limit: int | None = None) -> int:
        nonlocal step
        done = 0
        for x, y in batches:
            if limit is not None and done >= limit:
                break
            train_step(model, x, y, optimizer, scheduler, stats, step, dtype, cfg.optim.label_smoothing)
            step, done = step + 1, done + 1
        return done

    def endless():
        while True:
            yield from epoch_batches()

    epoch_times: list[float] = []
    start = time.perf_counter()
    if args.epochs:
        # Whole epochs: the first holds the warm-up and is left out of the figures.
        for _ in range(args.epochs):
            sync(device)
            t = time.perf_counter()
            n = run(epoch_batches())
            sync(device)
            epoch_times.append(time.perf_counter() - t)
            print(f"  epoch of {n} steps: {epoch_times[-1]:.2f} s", file=sys.stderr, flush=True)
        timed = epoch_times[1:] or epoch_times
        seconds, timed_steps = statistics.median(timed), per_epoch
    else:
        stream = endless()
        run(stream, warmup)
        sync(device)
        print(f"  warm-up ({warmup} steps): {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        t = time.perf_counter()
        timed_steps = run(stream, steps)
        sync(device)
        seconds = time.perf_counter() - t
    bad = stats.reduce()["bad_step"]
    if bad >= 0:
        print(f"warning: non-finite loss from step {bad} (lr too high for random data?)", file=sys.stderr)

    rate = timed_steps * batch / seconds
    peak = peak_tflops(device, args.peak_tflops)
    achieved = rate * flops / 1e12
    result = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)",
              "arch": cfg.arch, "data": data if data == "synthetic" else f"ffcv:{cfg.data.root}",
              "recipe": recipe, "batch": batch, "size": size, "dtype": str(dtype or torch.float32),
              "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
              "images_per_sec": round(rate, 1), "step_ms": round(1000 * seconds / timed_steps, 2),
              "gflops_per_image": round(flops / 1e9, 3), "achieved_tflops": round(achieved, 2),
              "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None}
    if args.epochs:
        result.update({"epoch_steps": per_epoch, "epoch_images": per_epoch * batch,
                       "epoch_time_s": round(seconds, 3), "epoch_times_s": [round(s, 3) for s in epoch_times]})
    print(f"{rate:.1f} images/s, {achieved:.2f} TFLOP/s" + (f" = {100 * achieved / peak:.1f}% of {peak:g}"
                                                          if peak else ""), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
