"""ResNet-20 epoch time with the dataset held in device memory (data.loader=device) against the FFCV
loader (data.loader=ffcv), side by side in one run, on whatever device this machine has: how much a
small net gains when no CPU loader feeds it.

    python benchmarks/resident.py [--data-root DIR] [--epochs 3] [--arch resnet20] [key=value ...]

Each loader runs in its own `benchmarks/throughput.py --epochs N` process (raysnet's train step,
the cifar-paper recipe, batch 128 on a GPU, 16 on a CPU unless --batch), the first epoch holding
the warm-up; the figure is the median of the others. DIR defaults to the embedded digits (prepared
on first use); pass a CIFAR-10 directory made by `python -m raysnet.prepare` for the real thing.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def digits_root() -> str:
    sys.path.insert(0, str(REPO))
    from raysnet.config import load_config
    from raysnet.data import ensure_dataset

    data = load_config([]).data  # the default recipe: the embedded digits, prepared on first use
    ensure_dataset(data)
    return data.root


def epoch_time(loader: str, args: argparse.Namespace, root: str) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--arch", args.arch, "--data-root", root,
           "--epochs", str(args.epochs), *(["--batch", str(args.batch)] if args.batch else []),
           f"data.loader={loader}", *args.overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="", help="a dataset made by python -m raysnet.prepare (default: digits)")
    parser.add_argument("--epochs", type=int, default=3, help="whole epochs per loader; the first is warm-up")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch", type=int, default=0, help="default: 128 on a GPU, 16 on a CPU")
    parser.add_argument("overrides", nargs="*", help="key=value for both runs")
    args = parser.parse_args()
    root = args.data_root or digits_root()
    results = {loader: epoch_time(loader, args, root) for loader in ("ffcv", "device")}
    for loader, r in results.items():
        print(f"{loader:>6}: {r['epoch_time_s']:.2f} s per epoch of {r['epoch_images']} images "
              f"({r['images_per_sec']:.0f} images/s) on {r['device']}", file=sys.stderr)
    ffcv, device = results["ffcv"], results["device"]
    print(json.dumps({"arch": args.arch, "data": root, "device": device["device"], "batch": device["batch"],
                      "epoch_images": device["epoch_images"], "ffcv_epoch_s": ffcv["epoch_time_s"],
                      "device_epoch_s": device["epoch_time_s"],
                      "speedup": round(ffcv["epoch_time_s"] / device["epoch_time_s"], 3)}))


if __name__ == "__main__":
    main()
