"""Images/s of `python -m raysnet.predict` on real photographs, with ResNet-50 at 224 px: the local
engine, and engine=ray (Ray Data) on a local Ray of this machine.

    python benchmarks/predict.py                         # 2,000 copies of ../shared's 100 ImageNet photos
    python benchmarks/predict.py --images 300 --engines local,ray --batch-size 32

The model is an untrained raysnet checkpoint of ResNet-50 with 1,000 classes and ImageNet's view
(shorter side 256, centre 224 crop), built here: the numbers measure the pipeline (reading, JPEG
decoding, resizing, the network's forward pass, writing), not a model's accuracy, which the weights
do not change. Each engine runs as the command a user types, in a fresh interpreter; the rates are
read from its summary line: over the whole run (the number to quote), and from its first row on
(without imports, model loading and Ray's start; for engine=ray an upper bound, since Ray Data has
computed rows ahead by the time the first one is handed back in order). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-100.tar.gz"
SUMMARY = re.compile(r"raysnet\.predict: (\d+) images in ([\d.]+) s \(([\d.]+) images/s; the first after ([\d.]+) s\)")


def build_folder(archive: Path, images: int, into: Path) -> int:
    """`images` files: the archive's photographs copied round-robin under distinct names, <wnid>/."""
    with tarfile.open(archive) as tar:
        photos = sorted((Path(m.name).parent.name, Path(m.name).name, tar.extractfile(m).read())
                        for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg")))
    for i in range(images):
        wnid, name, data = photos[i % len(photos)]
        (into / wnid).mkdir(parents=True, exist_ok=True)
        (into / wnid / f"{i // len(photos):04d}_{name}").write_bytes(data)
    return images


def build_model(path: Path) -> Path:
    """An untrained ResNet-50 (1,000 classes) saved as a raysnet checkpoint with ImageNet's view."""
    import torch

    from raysnet import checkpoint
    from raysnet.classifier import IMAGENET_MEAN, IMAGENET_STD
    from raysnet.config import load_config
    from raysnet.models import build_model as build

    cfg = load_config(["recipe=imagenet-paper", "arch=resnet50"])
    assert (cfg.data.crop, cfg.data.val_resize, cfg.data.val_aug) == (224, 256, "center"), cfg.data
    torch.manual_seed(0)
    model = build("resnet50", num_classes=1000).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    checkpoint.save(path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=0, cfg=cfg, run_id="",
                    history=[], dataset={"classes": [f"n{i:08d}" for i in range(1000)], "mean": list(IMAGENET_MEAN),
                                         "std": list(IMAGENET_STD)})
    return path


def run_engine(engine: str, model: Path, folder: Path, out: Path, batch_size: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # engine=ray: a local Ray of its own
    command = [sys.executable, "-m", "raysnet.predict", f"model={model}", f"images={folder}", f"out={out}",
               f"engine={engine}", f"batch_size={batch_size}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    found = SUMMARY.search(done.stderr)
    if done.returncode or not found:
        raise SystemExit(f"engine={engine} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    n, took, rate, first = int(found[1]), float(found[2]), float(found[3]), float(found[4])
    steady = (n - 1) / max(took - first, 1e-9)
    print(f"engine={engine}: {n} images, command {wall:.1f} s; {rate:.1f} images/s over the run, {steady:.1f} "
          f"images/s from the first row on (first row after {first:.1f} s)", flush=True)
    return {"images": n, "command_s": round(wall, 2), "rows_s": took, "first_row_s": first, "images_per_s": rate,
            "steady_images_per_s": round(steady, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--archive", type=Path, default=SAMPLE)
    args = parser.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"no photographs at {args.archive}: give --archive PATH to a .tar.gz of JPEGs")
    results = {}
    with tempfile.TemporaryDirectory(prefix="raysnet-bench-predict-") as tmp:
        folder, model = Path(tmp) / "photos", build_model(Path(tmp) / "resnet50.pt")
        build_folder(args.archive, args.images, folder)
        for engine in args.engines.split(","):
            results[engine] = run_engine(engine, model, folder, Path(tmp) / f"preds-{engine}.jsonl", args.batch_size)
    import torch

    print(json.dumps({"benchmark": "predict", "model": "resnet50 (untrained), 224 px single view",
                      "images": args.images, "batch_size": args.batch_size, "cpus": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0)
                      if torch.cuda.is_available() else None, "machine": platform.machine(), **results}))


if __name__ == "__main__":
    main()
