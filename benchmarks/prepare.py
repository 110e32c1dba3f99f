"""Images/s per core of `raysnet.prepare` on real photographs: the one-pass prepare against the two
passes it replaced (a checking pass that decoded and counted every image, then FFCV's writer that
decoded each again), in one run, on the same files.

    python benchmarks/prepare.py                        # 2,000 copies of ../shared's 100 ImageNet photos
    python benchmarks/prepare.py --images 10000 --workers 2
    python benchmarks/prepare.py --archive imagenet-sample-100.tar.gz

The tree: each photograph copied under distinct names (train/<wnid>/ and, one in ten, val/<wnid>/),
prepared with the defaults (JPEG quality 90, longer side 512, validation shorter side 640). Start-up
(imports, process pool) is timed apart; the rates are images / (seconds x workers), the median of
`--repeat` runs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-100.tar.gz"


def build_tree(archive: Path, images: int, into: Path) -> int:
    """`images` files: the archive's photographs copied round-robin, one copy in ten to val/."""
    with tarfile.open(archive) as tar:
        photos = [(Path(m.name).parent.name, Path(m.name).name, tar.extractfile(m).read())
                  for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg"))]
    photos.sort()
    for i in range(images):
        wnid, name, data = photos[i % len(photos)]
        copy = i // len(photos)
        d = into / ("val" if copy % 10 == 9 else "train") / wnid
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{copy:04d}_{name}").write_bytes(data)
    return images


def one_pass(tree: Path, out: Path, workers: int) -> float:
    from raysnet.data.prepare import PrepareConfig, prepare

    start = time.perf_counter()
    prepare(PrepareConfig(source="imagefolder", root=str(tree), out=str(out), overwrite=True, workers=workers,
                          engine="local", progress=False))
    return time.perf_counter() - start


# --- the two passes as they were before the one-pass prepare, for the comparison ---------------------

def _old_pixel_sums(rgb):
    """The checking pass's counting as it was: histograms of values and of value pairs."""
    import numpy as np

    values = np.arange(256, dtype=np.float64)
    pairs = np.outer(values, values).ravel()
    flat = rgb.reshape(-1, 3)
    channels = [flat[:, k] for k in range(3)]
    counts = [np.bincount(c, minlength=256) for c in channels]
    products = np.diag([n @ values**2 for n in counts])
    for i in range(3):
        high = channels[i].astype(np.uint16) << 8
        for j in range(i + 1, 3):
            products[i, j] = products[j, i] = np.bincount(high | channels[j], minlength=65536) @ pairs
    return np.array([n @ values for n in counts]), products


def _old_check(job):
    from PIL import Image

    from raysnet.data.encode import to_rgb

    path, stats = job
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        rgb = to_rgb(im)
    return path, rgb.shape[:2], _old_pixel_sums(rgb) if stats else None


class _OldFiles:
    """What FFCV's writer indexed: each file decoded again (at a reduced DCT scale where it could)."""

    def __init__(self, paths, labels, recipe):
        self.paths, self.labels, self.recipe = paths, labels, recipe

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from raysnet.data.encode import load_rgb, read_bytes

        return load_rgb(read_bytes(self.paths[i]), self.recipe), int(self.labels[i])


def two_pass(tree: Path, out: Path, workers: int) -> float:
    import multiprocessing

    import raysnet.data.ffcv_import  # noqa: F401
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from raysnet.data.encode import EVAL_SHORT_SIDE, Recipe
    from raysnet.data.sources import imagefolder

    source = imagefolder(str(tree), EVAL_SHORT_SIDE)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    jobs = [(p, name == "train") for name, s in source.splits.items() for p in s.samples.paths]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        list(pool.imap(_old_check, jobs, chunksize=8))
    for name, split in source.splits.items():
        recipe = Recipe({}, max_resolution=None if split.short_side else 512, short_side=split.short_side)
        fields = {"image": RGBImageField(write_mode="jpg", max_resolution=None if split.short_side else 512,
                                         jpeg_quality=90), "label": IntField()}
        writer = DatasetWriter(str(out / f"{name}.beton"), fields, page_size=1 << 23, num_workers=workers)
        with open(os.devnull, "w") as quiet:  # FFCV's own progress bar
            err, sys.stderr = sys.stderr, quiet
            try:
                writer.from_indexed_dataset(_OldFiles(split.samples.paths, split.labels, recipe), chunksize=25)
            finally:
                sys.stderr = err
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=SAMPLE, help="a .tar.gz of JPEG photographs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-two-pass", action="store_true", help="skip the old two-pass figure")
    args = parser.parse_args()
    if not args.archive.is_file():
        sys.exit(f"no archive of photographs at {args.archive}: pass --archive PATH (a .tar.gz of JPEG files, "
                 "such as ../shared/data/imagenet-sample-100.tar.gz)")

    start = time.perf_counter()
    import raysnet.data.prepare  # noqa: F401
    import raysnet.data.spread  # noqa: F401
    import raysnet.data.writer  # noqa: F401  (FFCV, numba, OpenCV: what a prepare process imports)

    imports = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="raysnet-bench-prepare-") as tmp:
        tree = Path(tmp) / "tree"
        n = build_tree(args.archive, args.images, tree)
        new = [one_pass(tree, Path(tmp) / "one", args.workers) for _ in range(args.repeat)]
        old = [] if args.no_two_pass else [two_pass(tree, Path(tmp) / "two", args.workers) for _ in range(args.repeat)]
        meta = json.loads((Path(tmp) / "one" / "meta.json").read_text())
    result = {
        "images": n, "workers": args.workers, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "startup_s": round(imports, 2),
        "one_pass_s": [round(t, 2) for t in new],
        "images_per_sec_per_core": round(n / statistics.median(new) / args.workers, 1),
        "two_pass_s": [round(t, 2) for t in old],
        "two_pass_images_per_sec_per_core": round(n / statistics.median(old) / args.workers, 1) if old else None,
        "train_samples": meta["splits"]["train"]["samples"], "val_samples": meta["splits"]["val"]["samples"],
        "mean_size": [meta["splits"]["train"]["image_size"]["height"]["mean"],
                      meta["splits"]["train"]["image_size"]["width"]["mean"]],
    }
    for name, seconds in (("one pass", new), ("two passes", old)):
        if seconds:
            print(f"{name:>10}: {statistics.median(seconds):6.2f} s  {n / statistics.median(seconds) / args.workers:6.1f} "
                  f"images/s per core  (runs: {', '.join(f'{t:.2f}' for t in seconds)})")
    print(f"start-up (imports), not counted above: {imports:.2f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
