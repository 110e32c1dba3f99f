"""What reproducing the paper's ImageNet tables costs, from a measured training rate, before
anyone books the GPUs.

    python benchmarks/imagenet_cost.py --log docs/measurements/gpu_check-h200-2026-11-27.log

Takes ResNet-50's training images/s from a gpu_check.sh log (the FFCV-fed eager run by default;
--rate to give one) and the imagenet-paper recipe's epochs x --train-images, and prints the
GPU-hours of every training run behind Tables 2-4 (Table 4 re-evaluates Table 3's models with
`raysnet.evaluate mode=multiscale`: no training of its own). Only ResNet-50's rate is measured;
every other net's rate is ResNet-50's scaled by the ratio of forward+backward FLOPs per 224 px
image, counted here on raysnet's own models with torch's FlopCounterMode. Per-epoch validation
(50,000 forward passes, about 1% of an epoch's work) is left out. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import flops_per_image  # noqa: E402

from raysnet.config import load_config  # noqa: E402
from raysnet.models import build_model  # noqa: E402

# (table, arch, shortcut): the training runs of tuning/plain-vs-residual-imagenet.yaml (Table 2)
# and tuning/shortcuts-imagenet.yaml (Table 3, and Table 4 by evaluation).
RUNS = (("2", "plain18", "A"), ("2", "plain34", "A"), ("2", "resnet18", "A"), ("2", "resnet34", "A"),
        ("3", "resnet34", "A"), ("3", "resnet34", "B"), ("3", "resnet34", "C"), ("3", "resnet50", "B"),
        ("3", "resnet101", "B"), ("3", "resnet152", "B"))


def measured_rate(log: Path) -> tuple[float, dict]:
    """ResNet-50's images/s with FFCV data, eager, from the JSON lines of a gpu_check.sh log."""
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("arch") == "resnet50" and str(row.get("data", "")).startswith("ffcv") and not row["compile"]:
                return float(row["images_per_sec"]), row
    raise SystemExit(f"{log}: no ResNet-50 FFCV line (arch resnet50, data ffcv:..., compile false); pass --rate.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, help="a gpu_check.sh log with ResNet-50's FFCV-fed training rate")
    p.add_argument("--rate", type=float, help="ResNet-50 training images/s per GPU, instead of --log")
    p.add_argument("--device", default="", help="the GPU the rate was measured on (with --rate)")
    p.add_argument("--train-images", type=int, default=1_281_167, help="ILSVRC-2012 training images")
    a = p.parse_args()
    if a.rate:
        rate, device = a.rate, a.device or "given"
    elif a.log:
        rate, row = measured_rate(a.log)
        device = row["device"]
    else:
        raise SystemExit("give --log LOG or --rate IMAGES_PER_SEC")

    epochs = load_config(["recipe=imagenet-paper"]).epochs
    images = epochs * a.train_images
    flops = {}
    for arch, shortcut in sorted({(r[1], r[2]) for r in RUNS} | {("resnet50", "B")}):
        model = build_model(arch, 1000, shortcut=None if arch.startswith("plain") else shortcut)
        flops[arch, shortcut] = flops_per_image(model, 224, 1000, torch.device("cpu"), None, False)
    base = flops["resnet50", "B"]
    rows, total = [], 0.0
    print(f"ResNet-50 rate {rate:,.0f} images/s ({device}); {epochs} epochs x {a.train_images:,} images")
    print("| table | arch | shortcut | GFLOP/image (fwd+bwd) | images/s | GPU-hours |")
    print("| --- | --- | --- | --- | --- | --- |")
    for table, arch, shortcut in RUNS:
        r = rate * base / flops[arch, shortcut]
        hours = images / r / 3600
        total += hours
        rows.append({"table": table, "arch": arch, "shortcut": shortcut, "gflops": round(flops[arch, shortcut] / 1e9, 2),
                     "images_per_sec": round(r), "measured": arch == "resnet50", "gpu_hours": round(hours, 1)})
        print(f"| {table} | {arch} | {shortcut} | {rows[-1]['gflops']} | {r:,.0f}{'' if arch == 'resnet50' else ' (scaled)'} "
              f"| {hours:.1f} |")
    print(f"total: {total:.0f} GPU-hours for the {len(RUNS)} runs")
    print(json.dumps({"device": device, "resnet50_images_per_sec": rate, "epochs": epochs,
                      "train_images": a.train_images, "runs": rows, "total_gpu_hours": round(total, 1)}))


if __name__ == "__main__":
    main()
