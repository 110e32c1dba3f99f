"""Write a `Source` as a dataset directory: train.beton, val.beton, meta.json, all or nothing.

Everything is written into a hidden sibling directory first and renamed onto the final name at
the end, so an interrupted run never leaves a file under a final name, and an existing dataset
is only replaced (never half-overwritten) when the caller asked for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Literal

import numpy as np
import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
from tqdm import tqdm

import raysnet
from raysnet.data.layout import BETON, META, META_FORMAT, out_is_free
from raysnet.data.sources import Source, Split
from raysnet.errors import UsageError, child_signals, fork_context, signals_held
from raysnet.storage import file_digests

Storage = Literal["raw", "jpeg", "proportion", "smart"]
WRITE_MODE = {"raw": "raw", "jpeg": "jpg", "proportion": "proportion", "smart": "smart"}  # ours -> FFCV's


@dataclass(frozen=True)
class WriteSettings:
    storage: Storage
    max_resolution: int | None  # longer side kept (FFCV resizes larger images down); None: as is
    jpeg_quality: int
    compress_probability: float  # storage=proportion: the fraction stored as JPEG
    smart_threshold: int  # storage=smart: JPEG when the raw pixels take more bytes than this
    workers: int
    progress: bool = True


class WriteError(UsageError):
    """A writer process failed; the partial output has been removed."""


class _Writer(DatasetWriter):
    """FFCV's writer, with a watch on its processes.

    FFCV 1.0.2 waits until the sample counter reaches the total; a worker that raises (or is
    killed) never gets there, and the others spin forever on the page-order lock. Here a dead
    worker stops the run: the survivors are terminated and the error is raised.
    """

    def __init__(self, fname: str, fields: dict, page_size: int, num_workers: int, desc: str, progress: bool):
        super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
        self.desc, self.progress = desc, progress

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        procs: list = []
        try:  # from here: an interruption (Ctrl-C, SIGTERM) must not leak the shared memory
            self.prepare()  # header and field descriptors; creates self.metadata_sm
            ctx = fork_context()  # the dataset object is shared, not pickled
            todo, allocations = ctx.Queue(), ctx.Queue()
            for chunk in queue_content:
                todo.put(chunk)
            for _ in range(self.num_workers):
                todo.put(None)
            done = ctx.Value(ctypes.c_uint64, 0)
            from ffcv.memory_allocator import MemoryAllocator

            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (todo, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                    *extra_worker_args)
            procs = [ctx.Process(target=_child, args=(work_fn, *args), daemon=True) for _ in range(self.num_workers)]
            table: list = []
            with signals_held():
                for p in procs:
                    p.start()
            with tqdm(total=num_samples, desc=self.desc, disable=not self.progress, unit="img") as bar:
                reported = 0
                while len(table) < len(procs):
                    try:  # a worker posts its allocations when its share is written
                        table.append(allocations.get(timeout=0.1))
                    except Empty:
                        pass
                    now = done.value
                    if now > reported:
                        bar.update(now - reported)
                        reported = now
                    # Workers that exited without posting failed (a failed worker exits with 1).
                    failed = [p for p in procs if p.exitcode not in (None, 0)]
                    if failed and len(table) < len(procs):
                        raise WriteError(f"writing '{self.fname}' failed: a writer process exited with code "
                                         f"{failed[0].exitcode} (its error is printed above). Nothing was kept.")
            for p in procs:
                p.join()
            self.finalize([a for worker in table for a in worker])
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
            if getattr(self, "metadata_sm", None) is not None:
                self.metadata_sm.close()
                self.metadata_sm.unlink()


def _child(work_fn, *args) -> None:
    child_signals()
    work_fn(*args)


def stored_sizes(split: Split, max_resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) as stored: a split with `short_side` comes with its shorter side scaled
    down to that (sources.load_rgb); the others are scaled by FFCV so their longer side is at most
    `max_resolution` (FFCV's resizer truncates the new sides to integers)."""
    h, w = split.heights.astype(np.int64), split.widths.astype(np.int64)
    if not len(h) or not (split.short_side or max_resolution):
        return h, w
    if split.short_side:
        ratio = np.minimum(split.short_side / np.maximum(np.minimum(h, w), 1), 1.0)
        return np.ceil(h * ratio).astype(np.int64), np.ceil(w * ratio).astype(np.int64)
    ratio = np.minimum(max_resolution / np.maximum(np.maximum(h, w), 1), 1.0)
    return (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)


def _page_size(split: Split, max_resolution: int | None) -> int:
    """FFCV stores a sample within one page, and each writer process fills pages of its own.

    Small datasets get FFCV's smallest page (2 MiB; the data region starts one page in, so
    8 MiB pages would pad a 5 MB dataset to 24 MB); large ones FFCV's default 8 MiB, which
    suits its page-wise process cache. Either way a page holds the largest image as stored
    (after `max_resolution`), not as found: one 8000x8000 photo must not make every page 256 MiB.
    """
    h, w = stored_sizes(split, max_resolution)
    raw = h * w * 3
    size = MIN_PAGE_SIZE if raw.sum() < 2**30 else 4 * MIN_PAGE_SIZE
    while len(raw) and size < int(raw.max()) + 4096:
        size *= 2
    return size


def _fields(w: WriteSettings, split: Split) -> dict:
    # A split whose source caps the shorter side (validation: whole images for 10-crop and
    # multi-scale testing) is stored as it comes; the others are capped by max_resolution.
    image = RGBImageField(write_mode=WRITE_MODE[w.storage], max_resolution=None if split.short_side else
                          w.max_resolution or None,
                          smart_threshold=w.smart_threshold, jpeg_quality=w.jpeg_quality,
                          compress_probability=w.compress_probability)
    return {"image": image, "label": IntField()}


def _size_stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(values.min()), "max": int(values.max()), "mean": round(float(values.mean()), 2)}


def _split_meta(split: Split, classes: list[str], path: Path) -> dict[str, Any]:
    counts = np.bincount(split.labels, minlength=len(classes))
    return {"file": path.name, "samples": len(split.labels), "bytes": path.stat().st_size,
            "per_class": {c: int(n) for c, n in zip(classes, counts)},
            "image_size": {"height": _size_stats(split.heights), "width": _size_stats(split.widths)},
            # Set: stored whole, the shorter side at most this (as found before: image_size).
            "short_side": split.short_side}


PARTIAL = ".{name}.partial-"  # + the writing process's id + "-" + a random suffix


def remove_stale(out: Path) -> list[Path]:
    """The partial directories beside `out` that no running process is writing (a prepare killed
    before it could clean up) -> those removed. Old ones without a process id are stale too."""
    removed = []
    for p in out.parent.glob(PARTIAL.format(name=out.name) + "*"):
        pid = p.name[len(PARTIAL.format(name=out.name)):].partition("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling of `out` to write the dataset into, removed on any exit unless installed.
    Made before a single image is read, so an output place that cannot be written fails at once."""
    out = out.expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={out} is a file; expected the path of a dataset directory to create (or an empty "
                         "directory). Nothing was changed.")
    if not out_is_free(out) and not overwrite:
        raise UsageError(f"output directory '{out}' already exists and is not empty; nothing was changed. Pass "
                         "overwrite=true to replace it, or choose another out=DIR.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in remove_stale(out):
            print(f"removed {p}, left by an earlier prepare that was killed", flush=True)
        # A sibling, so the final rename stays on one filesystem (atomic).
        tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL.format(name=out.name)}{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise UsageError(f"cannot write the dataset at out={out}: {e.strerror or e} in '{out.parent}'. Choose an out= "
                         "in a directory this user can write to; nothing was read or written.") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once installed


def write_dataset(source: Source, out: Path, w: WriteSettings, overwrite: bool = False) -> dict[str, Any]:
    """Write `source` to `out`, atomically; returns the meta.json contents."""
    with staging(out, overwrite) as tmp:
        return write_into(source, tmp, out, w, overwrite)


def write_into(source: Source, tmp: Path, out: Path, w: WriteSettings, overwrite: bool) -> dict[str, Any]:
    """Write `source` into the staging directory `tmp`, then install it as `out`."""
    out = out.expanduser().absolute()
    splits = {}
    started = time.time()
    for name, split in source.splits.items():
        path = tmp / BETON[name]
        writer = _Writer(str(path), _fields(w, split), _page_size(split, w.max_resolution), max(1, w.workers),
                         f"write {BETON[name]}", w.progress)
        # Small chunks for small splits, so every process gets a share.
        chunk = max(1, min(100, len(split.labels) // (4 * max(1, w.workers))))
        writer.from_indexed_dataset(split.samples, chunksize=chunk)
        splits[name] = _split_meta(split, source.classes, path)
    import ffcv

    meta = {
        "format": META_FORMAT,
        "raysnet_version": raysnet.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source.info,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "splits": splits,
        # Per-channel statistics of the training pixels (0-255): the loaders subtract the
        # mean and divide by the std (paper §3.4 / §4.2: "per-pixel mean subtracted").
        "mean": [round(m, 4) for m in source.mean],
        "std": [round(s, 4) for s in source.std],
        # The training pixels' RGB principal components (0-1 scale), for AlexNet's PCA lighting.
        "pca": source.pca,
        "skipped": source.skipped,
        "write": {"storage": w.storage, "write_mode": WRITE_MODE[w.storage], "max_resolution": w.max_resolution,
                  "jpeg_quality": w.jpeg_quality, "compress_probability": w.compress_probability,
                  "smart_threshold": w.smart_threshold,
                  "page_size": {n: _page_size(s, w.max_resolution) for n, s in source.splits.items()},
                  "workers": w.workers, "seconds": round(time.time() - started, 1), "ffcv": ffcv.__version__},
    }
    # Sizes and digests: how a node's copy of a dataset on object storage is verified (raysnet.storage).
    meta["files"] = file_digests(tmp)
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
    tmp.chmod(0o755)  # mkdtemp makes it private
    _install(tmp, out, overwrite)
    return meta


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished directory onto `out`; an old one is moved aside first, then removed."""
    if out_is_free(out):
        os.replace(tmp, out)  # onto an absent or empty directory: one atomic rename
        return
    if not overwrite:  # someone else finished first while this run was writing
        raise UsageError(f"output directory '{out}' appeared while writing; it was left as it is.")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the old dataset back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
