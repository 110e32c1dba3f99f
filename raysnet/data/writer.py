"""Write a `Source` as a dataset directory: train.beton, val.beton, meta.json, all or nothing.

Every image is read, checked, counted and encoded once, by raysnet.data.encode in worker processes
(`raysnet.data.spread`: a local pool or Ray tasks), and comes back in the source's order. This
process, the only writer, appends what is stored of each image to a spool file and keeps its
sizes; once a split is read it knows the page size its largest image needs and copies the spool
into the .beton, in order, through FFCV's own format code (header, pages, metadata, allocation
table). The spool costs one sequential copy of the stored bytes and, while a split is written,
its size again on disk; it is what lets unreadable files be left out of a file whose sample count
is fixed at its start, without decoding anything twice.

Everything is written into a hidden sibling directory first and renamed onto the final name at
the end, so an interrupted run never leaves a file under a final name, and an existing dataset
is only replaced (never half-overwritten) when the caller asked for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
from tqdm import tqdm

import raysnet
from raysnet.data.encode import Encoded, Field, Recipe, ffcv_field, encode_bytes, encode_file, encode_pixels, read_bytes
from raysnet.data.layout import BETON, META, META_FORMAT, out_is_free
from raysnet.data.sources import FileSamples, Source, Split
from raysnet.errors import UsageError
from raysnet.storage import file_digests, is_uri

Storage = Literal["raw", "jpeg", "proportion", "smart"]
WRITE_MODE = {"raw": "raw", "jpeg": "jpg", "proportion": "proportion", "smart": "smart"}  # ours -> FFCV's


@dataclass(frozen=True)
class WriteSettings:
    storage: Storage | Literal["auto"]  # auto: the source's choice (ImageFolder: raw if every image is tiny)
    max_resolution: int | None  # longer side kept (FFCV resizes larger images down); None: as is
    jpeg_quality: int
    compress_probability: float  # storage=proportion: the fraction stored as JPEG
    smart_threshold: int  # storage=smart: JPEG when the raw pixels take more bytes than this
    workers: int
    progress: bool = True


class WriteError(UsageError):
    """Reading or writing a split failed; the partial output has been removed."""


def _field(w: WriteSettings, storage: str, split: Split) -> Field:
    # A split whose source caps the shorter side (validation: whole images for 10-crop and
    # multi-scale testing) is stored as it comes; the others are capped by max_resolution.
    return Field(WRITE_MODE[storage], None if split.short_side else w.max_resolution or None, w.jpeg_quality,
                 w.compress_probability, w.smart_threshold)


def _recipe(w: WriteSettings, storages: Sequence[str], split: Split, stats: bool) -> Recipe:
    return Recipe({s: _field(w, s, split) for s in storages}, stats, None if split.short_side else w.max_resolution,
                  split.short_side)


@dataclass
class _Read:
    """A split as read: the images kept, in order, with their stored bytes' places in the spool."""

    labels: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)  # as found
    widths: list[int] = field(default_factory=list)
    # Storage -> per kept image: FFCV's metadata row, and (offset, size) of its bytes in the spool.
    rows: dict[str, list] = field(default_factory=dict)
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(3))
    products: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pixels: int = 0


def _encoded(split: Split, recipe: Recipe, pool) -> Iterator[Encoded]:
    """Each image of the split, encoded, in order. In-memory images are encoded here (a copy each);
    files by the pool, which on a cluster gets the bytes of local files from here (its nodes need
    not see this machine's disk) and reads object-store URIs itself."""
    samples = split.samples
    if not isinstance(samples, FileSamples):
        return map(functools.partial(encode_pixels, recipe=recipe), iter(samples))
    if pool.reads_local_files or all(is_uri(p) for p in samples.paths[:1]):
        return pool.map(encode_file, recipe, samples.paths)
    return pool.map(encode_bytes, recipe, _FileBytes(samples.paths))


class _FileBytes(Sequence):
    """The bytes of local files, read when a chunk of them is sliced off (just before it is sent)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return [read_bytes(p) for p in self.paths[i]] if isinstance(i, slice) else read_bytes(self.paths[i])


def _read(split: Split, recipe: Recipe, encoded: Iterable[Encoded], spool: Path, desc: str,
          progress: bool) -> _Read:
    """Spool what `encoded` stores of each image, in order; keep the sizes, labels and pixel sums."""
    names = split.samples.names if isinstance(split.samples, FileSamples) else None
    read = _Read(rows={s: [] for s in recipe.fields}, spans={s: [] for s in recipe.fields})
    offset = 0
    with open(spool, "wb") as out, _Progress(len(split.labels), desc, progress) as bar:
        for i, e in enumerate(encoded):
            bar.update()
            if e.reason:
                read.skipped.append({"path": names[i] if names else str(i), "reason": e.reason})
                continue
            read.labels.append(int(split.labels[i]))
            read.heights.append(e.height)
            read.widths.append(e.width)
            for storage, (row, payload) in e.stored.items():
                out.write(payload.data)
                read.rows[storage].append(row)
                read.spans[storage].append((offset, payload.nbytes))
                offset += payload.nbytes
            if e.sums is not None:
                read.sums, read.products = read.sums + e.sums, read.products + e.products
                read.pixels += e.pixels
    return read


class _Progress:
    """Images done, images/s and the time left: a tqdm bar on a terminal; elsewhere (a job's log,
    a file) a line every PROGRESS_S seconds and one at the end, as a bar's redraws would be noise."""

    PROGRESS_S = 10.0

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done = total, desc, 0
        self.bar = tqdm(total=total, desc=desc, unit="img") if enabled and sys.stderr.isatty() else None
        self.lines = enabled and self.bar is None
        self.start = self.said = time.monotonic()

    def __enter__(self) -> _Progress:
        return self

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.lines and time.monotonic() - self.said >= self.PROGRESS_S:
            self.said = time.monotonic()
            rate = self.done / max(self.said - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} images, {rate:.0f} images/s, about "
                  f"{(self.total - self.done) / max(rate, 1e-9):.0f} s left", flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and exc[0] is None:
            took = time.monotonic() - self.start
            print(f"{self.desc}: {self.done} images in {took:.1f} s ({self.done / max(took, 1e-9):.0f} images/s)",
                  flush=True)


def _page_size(rows: list, spans: list[tuple[int, int]]) -> int:
    """FFCV stores a sample within one page. Small datasets get FFCV's smallest page (2 MiB; the data
    region starts one page in, so 8 MiB pages would pad a 5 MB dataset to 24 MB); large ones FFCV's
    default 8 MiB, which suits its page-wise process cache. Either way a page holds the largest image
    as stored (after `max_resolution`), not as found: one 8000x8000 photo must not make every page 256 MiB."""
    raw = np.array([int(r["height"]) * int(r["width"]) * 3 for r in rows], dtype=np.int64)
    largest = max([int(raw.max())] + [size for _, size in spans]) if len(raw) else 0
    size = MIN_PAGE_SIZE if raw.sum() < 2**30 else 4 * MIN_PAGE_SIZE
    while size < largest + 4096:
        size *= 2
    return size


def _assemble(path: Path, image: RGBImageField, read: _Read, storage: str, spool: Path) -> int:
    """Write the .beton from the spool, sample by sample in order, with FFCV's writer's own pieces
    (one process: the header, the page allocator, the metadata table, the allocation table).
    Returns the page size."""
    rows, spans = read.rows[storage], read.spans[storage]
    page_size = _page_size(rows, spans)
    writer = DatasetWriter(str(path), {"image": image, "label": IntField()}, page_size=page_size, num_workers=1)
    writer.num_samples = len(rows)
    writer.prepare()  # the header and field descriptors; creates writer.metadata_sm
    try:
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        image_meta, labels = (metadata[n] for n in writer.metadata_type.names)
        stored = np.memmap(spool, dtype=np.uint8, mode="r") if spans else np.zeros(0, np.uint8)
        allocator = MemoryAllocator(str(path), writer.data_region_start, page_size)
        with allocator:
            for i, (row, (offset, size)) in enumerate(zip(rows, spans)):
                allocator.set_current_sample(i)
                ptr, buffer = allocator.malloc(size)
                buffer[:] = stored[offset:offset + size]
                image_meta[i] = row
                image_meta["data_ptr"][i] = ptr
                labels[i] = read.labels[i]
        del metadata, image_meta, labels, stored  # views of the shared memory and the spool: released before closing
        writer.finalize(allocator.allocations)
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    return page_size


def _size_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    v = np.asarray(values)
    return {"min": int(v.min()), "max": int(v.max()), "mean": round(float(v.mean()), 2)}


def _split_meta(read: _Read, split: Split, classes: list[str], path: Path) -> dict[str, Any]:
    counts = np.bincount(np.asarray(read.labels, dtype=np.int64), minlength=len(classes))
    return {"file": path.name, "samples": len(read.labels), "bytes": path.stat().st_size,
            "per_class": {c: int(n) for c, n in zip(classes, counts)},
            "image_size": {"height": _size_stats(read.heights), "width": _size_stats(read.widths)},
            # Set: stored whole, the shorter side at most this (as found before: image_size).
            "short_side": split.short_side}


def principal_components(cov: np.ndarray) -> dict[str, Any]:
    """Eigen-decomposition of a 3x3 RGB covariance of 0-255 pixel values, largest first, on the 0-1
    scale of fb.resnet.torch's published ImageNet values (Krizhevsky et al. 2012, §4.1)."""
    values, vectors = np.linalg.eigh(np.asarray(cov, dtype=np.float64) / 255.0**2)
    order = np.argsort(values)[::-1]
    return {"eigval": [float(f"{max(v, 0.0):.6g}") for v in values[order]],
            "eigvec": [[float(f"{x:.6g}") for x in row] for row in vectors[:, order]]}


def _statistics(read: _Read) -> dict[str, Any]:
    """Mean, std and principal components of the training pixels, from their exact sums."""
    mean = read.sums / max(read.pixels, 1)
    cov = read.products / max(read.pixels, 1) - np.outer(mean, mean)
    # Per-channel statistics of the training pixels (0-255): the loaders subtract the mean and
    # divide by the std (paper §3.4 / §4.2: "per-pixel mean subtracted").
    return {"mean": [round(float(m), 4) for m in mean],
            "std": [round(float(s), 4) for s in np.sqrt(np.maximum(cov.diagonal(), 0.0))],
            # The training pixels' RGB principal components (0-1 scale), for AlexNet's PCA lighting.
            "pca": principal_components(cov)}


def _check_read(source: Source, reads: dict[str, _Read]) -> None:
    root = source.info.get("root", source.kind)
    present = set(reads["train"].labels)
    for label, cls in enumerate(source.classes):
        if label not in present:
            raise UsageError(f"class folder '{root}/train/{cls}' has no readable image: every file in it was "
                             "skipped (see the reasons above).")
    if not reads["val"].labels:
        raise UsageError(f"'{root}/{source.info.get('val', 'val')}' has no readable image.")


def _storage(w: WriteSettings, reads: dict[str, _Read]) -> str:
    """storage=auto on an ImageFolder: raw when every image is tiny (each then came encoded both ways)."""
    if w.storage != "auto":
        return w.storage
    return "raw" if all(len(r.rows["raw"]) == len(r.labels) for r in reads.values()) else "jpeg"


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


def write_dataset(source: Source, out: Path, w: WriteSettings, overwrite: bool = False, pool=None) -> dict[str, Any]:
    """Write `source` to `out`, atomically; returns the meta.json contents."""
    with staging(out, overwrite) as tmp:
        return write_into(source, tmp, out, w, overwrite, pool)


def write_into(source: Source, tmp: Path, out: Path, w: WriteSettings, overwrite: bool, pool=None) -> dict[str, Any]:
    """Write `source` into the staging directory `tmp`, then install it as `out`. `pool` encodes
    the files of an ImageFolder (raysnet.data.spread); in-memory images are encoded here."""
    out = out.expanduser().absolute()
    started = time.time()
    storages = ("jpeg", "raw") if w.storage == "auto" else (w.storage,)
    recipes = {name: _recipe(w, storages, split, stats=name == "train") for name, split in source.splits.items()}
    reads = {}
    for name, split in source.splits.items():
        spool = tmp / f".{name}.spool"
        with _failure_named(tmp / BETON[name]):
            reads[name] = _read(split, recipes[name], _encoded(split, recipes[name], pool), spool,
                                f"prepare {BETON[name]}", w.progress)
    if any(isinstance(s.samples, FileSamples) for s in source.splits.values()):
        _check_read(source, reads)
    storage = _storage(w, reads)
    splits, pages = {}, {}
    for name, split in source.splits.items():
        path, spool = tmp / BETON[name], tmp / f".{name}.spool"
        with _failure_named(path):
            pages[name] = _assemble(path, ffcv_field(recipes[name].fields[storage]), reads[name], storage, spool)
        spool.unlink()
        splits[name] = _split_meta(reads[name], split, source.classes, path)
    import ffcv

    meta = {
        "format": META_FORMAT,
        "raysnet_version": raysnet.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source.info,
        "classes": source.classes,
        "num_classes": len(source.classes),
        "splits": splits,
        **_statistics(reads["train"]),
        "skipped": source.skipped + [s for r in reads.values() for s in r.skipped],
        "write": {"storage": storage, "write_mode": WRITE_MODE[storage], "max_resolution": w.max_resolution,
                  "jpeg_quality": w.jpeg_quality, "compress_probability": w.compress_probability,
                  "smart_threshold": w.smart_threshold, "page_size": pages, "workers": w.workers,
                  # Where the images were encoded: {this machine's name: images}, or per Ray node id.
                  "encoded_on": dict(pool.nodes) if pool is not None else {},
                  "seconds": round(time.time() - started, 1), "ffcv": ffcv.__version__},
    }
    # Sizes and digests: how a node's copy of a dataset on object storage is verified (raysnet.storage).
    meta["files"] = file_digests(tmp)
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
    tmp.chmod(0o755)  # mkdtemp makes it private
    _install(tmp, out, overwrite)
    return meta


@contextlib.contextmanager
def _failure_named(path: Path) -> Iterator[None]:
    """A failure while a split is read or written names its file (the staging directory goes with it)."""
    try:
        yield
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as e:  # any failure here loses the split: say which file and why
        raise WriteError(f"writing '{path.name}' failed: {type(e).__name__}: {e}. Nothing was kept.") from e


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
