"""Images/s of raysnet's FFCV training pipeline against torchvision's ImageFolder + DataLoader.

Same JPEGs, same output (float32 3x224x224, normalised, random-resized crop + flip), same
number of worker processes/threads, measured side by side in one run with warm-up excluded
(the first epoch: numba compilation for FFCV, process start-up for torchvision).

    python benchmarks/loader.py                       # ~500 generated ImageNet-sized JPEGs
    python benchmarks/loader.py --root DIR            # DIR/train/<class>/*.jpg, or DIR/<class>/*.jpg
    python benchmarks/loader.py --workers 8 --batch-size 256

The last line printed is one JSON object with the rates and their ratio, and, per core (images
per CPU-second of the loader's process), the CPU part of a GPU run's pipeline at 224 and 176 px:
decode, random-resized crop and flip into uint8 batches, which the GPU then converts and
normalises (raysnet.data.loaders.to_batch), with the cores it takes to feed 8,000 images/s.

Measured on 2026-12-03 (2-core VM, load 0.6-1.4; `python benchmarks/loader.py --root DIR --epochs 3`,
DIR the 2,000 copies of ../shared's 100 ImageNet photographs that benchmarks/prepare.py makes, 1,800
in train/, stored JPEG q90 at 512 px): the GPU run's CPU part 663.7 images/s per core at 224 px and
700.0 at 176 px, so 12.1 and 11.4 cores feed ResNet-50 at 8,000 images/s; the whole CPU pipeline
(normalised float32) 576.2 per core; torchvision 261.2 (FFCV 2.04x its images/s).

Measured (2-core x86_64 VM shared with other work, load average ~3; 500 generated 300-500 px
JPEGs, batch 64, 2 workers, median of 5 epochs; `--storage` is raysnet.prepare's storage=):

    storage      torchvision   FFCV rrc        FFCV scale      rrc per CPU-second
    jpeg         481 img/s     825 (1.72x)     851 (1.77x)     1.72x    beton 26 MiB
    proportion   477 img/s     1085 (2.27x)    1216 (2.55x)    2.37x    beton 146 MiB
    raw          299 img/s     1124 (3.76x)    1193 (3.99x)    3.81x    beton 258 MiB

With JPEG storage both sides spend most of their time in the same libjpeg-turbo decode
(~0.7 ms of FFCV's ~1.2 CPU-ms per image); FFCV saves PIL, ToTensor/Normalize and
inter-process copies, not the decode. Storing decoded pixels (raw, or FFCV's usual
proportion) is what takes it past 3x, at 10x the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from raysnet.config import DataConfig
from raysnet.data import check_dataset, make_loaders, prepare
from raysnet.prepare import parse_args


def generate(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain, 300-500 px sides) in ImageFolder layout.

    Pure noise would compress 3-4x worse than photographs and make decoding unrealistically slow.
    """
    rng = np.random.default_rng(seed)
    for i in range(images):
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        d = root / "train" / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    # val/ is required by raysnet.prepare; the benchmark reads only train/.
    for c in range(classes):
        (root / "val" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        first = next((root / "train" / f"class{c:02d}").iterdir())
        os.symlink(first, root / "val" / f"class{c:02d}" / first.name)


def as_imagefolder(src: Path, tmp: Path) -> Path:
    """DIR/train/<class>/ as is; a flat DIR/<class>/ (e.g. the ImageNet sample) gets a train/ and val/ view."""
    if (src / "train").is_dir():
        return src
    root = tmp / "view"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for c in sorted(p for p in src.iterdir() if p.is_dir()):
            os.symlink(c.resolve(), root / split / c.name)
    return root


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")


def loader_pids(loader) -> list[int]:
    """This process (FFCV's threads live here) and torchvision's persistent worker processes."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    return [os.getpid()] + [w.pid for w in workers]


def epoch(loader) -> tuple[int, float, float]:
    """One pass: (images, wall seconds, CPU seconds of every process that worked on it)."""
    pids = loader_pids(loader)
    start, cpu, n = time.perf_counter(), cpu_seconds(pids), 0
    for x, _ in loader:
        n += x.shape[0]
    return n, time.perf_counter() - start, cpu_seconds(pids) - cpu


def torchvision_loader(root: Path, batch_size: int, workers: int, mean: list[float], std: list[float]):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    # The standard ImageNet training transform: PIL decode, RandomResizedCrop, flip, tensor, normalise.
    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std])])
    dataset = datasets.ImageFolder(str(root / "train"), transform=tf)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def parse_flags() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="an ImageFolder of JPEGs (default: generate one in a temp dir)")
    p.add_argument("--images", type=int, default=500, help="how many JPEGs to generate")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="loader processes (torchvision) / threads (FFCV)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader, after one warm-up epoch")
    p.add_argument("--storage", default="jpeg", help="raysnet.prepare storage= for the FFCV files")
    p.add_argument("--max-resolution", type=int, default=512)
    return p.parse_args()


def make_datasets(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, dict]:
    """(the JPEG ImageFolder, raysnet's FFCV dataset made from it, its meta.json) under `tmp`."""
    if args.root:
        src = as_imagefolder(args.root.expanduser().resolve(), tmp)
    else:
        src = tmp / "images"
        print(f"generating {args.images} JPEGs in {src} ...", flush=True)
        generate(src, args.images, args.classes)
    out = tmp / "ffcv"
    print(f"preparing {src} with raysnet.prepare (storage={args.storage}) ...", flush=True)
    meta = prepare(parse_args(["source=imagefolder", f"root={src}", f"out={out}", f"storage={args.storage}",
                               f"max_resolution={args.max_resolution}", f"workers={os.cpu_count()}"]))
    return src, out, meta


def make_all_loaders(args: argparse.Namespace, src: Path, out: Path, meta: dict) -> dict:
    """torchvision's loader and raysnet's FFCV loader with each training augmentation, by name."""
    loaders = {"torchvision": torchvision_loader(src, args.batch_size, args.workers, meta["mean"], meta["std"])}
    for aug in ("rrc", "scale"):
        data = DataConfig(name="bench", root=str(out), train_aug=aug, crop=224, flip=True, pca_lighting=0.0,
                          colour_jitter=0.0, val_aug="center", loader_workers=args.workers, os_cache=True)
        loaders[f"ffcv_{aug}"], _ = make_loaders(data, check_dataset(data), args.batch_size,
                                                 device=torch.device("cpu"), seed=0, distributed=False,
                                                 channels_last=True)
    for crop in (224, 176):
        loaders[f"gpu_cpu_part_{crop}"] = gpu_cpu_part(args, out, meta, crop)
    return loaders


def gpu_cpu_part(args: argparse.Namespace, out: Path, meta: dict, crop: int):
    """What a GPU run's loader threads do on the CPU: decode, random-resized crop and flip into uint8
    batches (raysnet.data.loaders.to_batch then copies them to the GPU, which converts and normalises)."""
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from raysnet.data.loaders import label_pipeline, train_decoder_and_augment

    data = DataConfig(name="bench", root=str(out), train_aug="rrc", crop=crop, flip=True, pca_lighting=0.0,
                      colour_jitter=0.0, loader_workers=args.workers, os_cache=True)
    return Loader(str(out / "train.beton"), batch_size=args.batch_size, num_workers=args.workers, os_cache=True,
                  order=OrderOption.RANDOM, drop_last=True, seed=0,
                  pipelines={"image": train_decoder_and_augment(data, meta) + [ToTensor()],
                             "label": label_pipeline(torch.device("cpu"))})


def measure(loaders: dict, epochs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(images/s, images per CPU-second) of every timed epoch, by loader, after one warm-up epoch each."""
    for name, loader in loaders.items():
        _, wall, _ = epoch(loader)
        print(f"warm-up {name}: {wall:.1f} s", flush=True)
    # Interleaved, so load from anything else on the machine hits all alike. CPU time is
    # reported too: on a shared machine images per CPU-second is the steadier measure.
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    per_cpu: dict[str, list[float]] = {name: [] for name in loaders}
    for e in range(epochs):
        for name, loader in loaders.items():
            images, wall, cpu = epoch(loader)
            rates[name].append(images / wall)
            per_cpu[name].append(images / cpu)
        print(f"epoch {e + 1}: " + ", ".join(f"{k} {rates[k][-1]:.0f} img/s ({per_cpu[k][-1]:.0f} img/cpu-s)"
                                             for k in loaders), flush=True)
    return rates, per_cpu


def summary(args: argparse.Namespace, meta: dict, jpeg_mb: float, rates: dict[str, list[float]],
            per_cpu: dict[str, list[float]]) -> dict[str, object]:
    """The last line's JSON object: median rates, their ratios, and what they were measured on."""
    n = meta["splits"]["train"]["samples"]
    result: dict[str, object] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    result.update({
        "ratio_rrc": round(result["ffcv_rrc"] / result["torchvision"], 2),
        "ratio_scale": round(result["ffcv_scale"] / result["torchvision"], 2),
        "per_cpu_second": {k: round(statistics.median(v), 1) for k, v in per_cpu.items()},
        "unit": "images/s (median of timed epochs)", "images": n, "jpeg_MiB": round(jpeg_mb, 1),
        "beton_MiB": round(meta["splits"]["train"]["bytes"] / 2**20, 1), "storage": args.storage,
        "workers": args.workers, "batch_size": args.batch_size, "epochs": args.epochs, "crop": 224,
        "cpus": os.cpu_count(), "load_average": [round(x, 1) for x in os.getloadavg()],
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    })
    pc = result["per_cpu_second"]
    result["ratio_rrc_per_cpu_second"] = round(pc["ffcv_rrc"] / pc["torchvision"], 2)
    # Per core: images per CPU-second of the GPU run's CPU part, and the cores it takes to feed
    # ResNet-50 at 8,000 images/s (an H200's rate with torch.compile and bf16 is about 6,600).
    result["gpu_cpu_part_images_per_sec_per_core"] = {c: pc[f"gpu_cpu_part_{c}"] for c in (224, 176)}
    result["cores_for_8000_images_per_sec"] = {c: round(8000 / pc[f"gpu_cpu_part_{c}"], 1) for c in (224, 176)}
    return result


def main() -> None:
    args = parse_flags()
    with tempfile.TemporaryDirectory(prefix="raysnet-bench-") as tmp:
        src, out, meta = make_datasets(args, Path(tmp))
        jpeg_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(src / "train", followlinks=True)
                      for f in files) / 2**20
        torch.set_num_threads(1)  # the main process only iterates; workers do the work
        rates, per_cpu = measure(make_all_loaders(args, src, out, meta), args.epochs)
    print(json.dumps(summary(args, meta, jpeg_mb, rates, per_cpu)))


if __name__ == "__main__":
    main()
