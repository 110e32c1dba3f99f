"""`python -m raysnet.predict model=SOURCE images=INPUT [out=FILE]`: a trained model on your images.

    python -m raysnet.predict model=outputs/run1 images=photos/                    # lines on stdout
    python -m raysnet.predict model=models:/digits/1 images=photos/ out=preds.jsonl
    python -m raysnet.predict model=ckpt.pt images=[a.jpg,b.png] k=3 out=preds.csv
    ray job submit --working-dir . -- python -m raysnet.predict model=s3://bucket/ckpt.pt \\
        images=s3://bucket/photos/ out=s3://bucket/preds.parquet          # Ray Data on the cluster

model=: a raysnet checkpoint (checkpoint.pt, its directory, a run directory, or an s3:// object),
an MLflow model (models:/NAME/VERSION, models:/NAME@alias, runs:/RUN_ID/model, in tracking.uri,
else $MLFLOW_TRACKING_URI), or a plain state dict with arch=NAME (ImageNet's view then).
images=: an image file (always tried), a directory or object-store prefix (its .jpg .jpeg .png .bmp
.webp .tif .tiff .ppm .gif files, recursively, in sorted walk order), a .tar/.tar.gz archive (its
members in order), or a list: images=[a.jpg,dir,b.tar].
out=: .jsonl (one JSON object a line: path, classes, probs, note, error), .csv (path, class_1,
prob_1, ..., class_k, prob_k, note, error) or .parquet (the JSON's columns), a local path or a URI;
written whole at the end, never over an existing file unless overwrite=true. Without out=, one line
an image on stdout: `path: class (p) class (p) ...`, or `path: error: why`.

A file that is not a readable image gets a row with its reason in `error`; a readable but unusual one
(CMYK, 16-bit) is converted as prepare converts it, and says so in `note`. The exit status is 0
either way; the summary (stderr) counts them.

Engines: local (threads read and preprocess, the model runs in batches of batch_size on device=) or
ray (Ray Data: reading and preprocessing in CPU tasks across the cluster, the model in `concurrency`
actors with run.gpus_per_worker GPUs each; default: one GPU each when the cluster has GPUs).
auto: ray when RAY_ADDRESS is set (`ray job submit` sets it). The rows are the same either way, in
the order of the input. On a cluster, images and out= must be where every node can reach them
(an object store, or a shared disk).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from raysnet import cli as _cli
from raysnet.errors import ConfigError, UsageError


@dataclass(frozen=True)
class RunSection:
    # GPUs per model actor of engine=ray (fractions share a GPU); unset: 1 when the cluster has GPUs, else 0.
    gpus_per_worker: Optional[float] = None


@dataclass(frozen=True)
class TrackingSection:
    uri: str = ""  # the MLflow store of models:/ and runs:/ (default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db)


@dataclass(frozen=True)
class PredictConfig:
    """raysnet.predict's keys."""

    model: str = ""
    images: Any = ""  # a path, a URI or a list of them: images=[a.jpg,dir]
    out: str = ""  # .jsonl, .csv or .parquet (a path or a URI); empty: lines on stdout
    overwrite: bool = False
    k: int = 5  # the top-k classes of each image
    mode: Literal["single", "10crop"] = "single"
    batch_size: int = 64
    engine: Literal["auto", "local", "ray"] = "auto"
    concurrency: Optional[int] = None  # engine=ray: model actors (default: one per GPU, or half the CPUs)
    device: str = "auto"  # engine=local (and ray's actors): auto is the first GPU if there is one
    arch: Optional[str] = None  # for a plain state dict
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)


def check(cfg: PredictConfig) -> None:
    if not cfg.model:
        raise ConfigError("raysnet.predict needs model=SOURCE: a checkpoint.pt (or its directory, or a run directory), "
                          "an MLflow model (models:/NAME/VERSION, models:/NAME@alias, runs:/RUN_ID/model), or a state "
                          "dict with arch=NAME.")
    if not cfg.images:
        raise ConfigError("raysnet.predict needs images=INPUT: an image file, a directory, a .tar archive, an "
                          "s3://bucket/prefix, or a list images=[a.jpg,dir].")
    for key, value in (("k", cfg.k), ("batch_size", cfg.batch_size), ("concurrency", cfg.concurrency)):
        if value is not None and value < 1:
            raise ConfigError(f"bad value for '{key}': {value}. Expected 1 or more.")
    if cfg.run.gpus_per_worker is not None and cfg.run.gpus_per_worker < 0:
        raise ConfigError(f"bad value for 'run.gpus_per_worker': {cfg.run.gpus_per_worker}. Expected 0 or more.")


def engine(cfg: PredictConfig) -> str:
    """local or ray: auto predicts on the Ray cluster RAY_ADDRESS names (a `ray job submit`), if any."""
    if cfg.engine != "auto":
        return cfg.engine
    return "ray" if os.environ.get("RAY_ADDRESS") else "local"


# --- the local engine ---------------------------------------------------------------------------

AHEAD = 2  # batches read and preprocessed while the model runs on the current one


def local_rows(clf, inputs: list, batch_size: int, k: int, threads: int | None = None) -> Iterator[dict]:
    """The rows of `inputs` in order: threads read and preprocess (Pillow and OpenCV release the
    GIL), the model runs on one batch at a time, at most AHEAD batches in memory ahead of it."""
    from raysnet.predict_io import load

    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            pending.append((batch, [pool.submit(load, x, clf.preprocess) for x in batch]))
            if len(pending) > AHEAD:
                yield from _predicted(clf, *pending.popleft(), k)
        while pending:
            yield from _predicted(clf, *pending.popleft(), k)


def _predicted(clf, batch: list, futures: list, k: int) -> list[dict]:
    return clf.rows([x.name for x in batch], [f.result() for f in futures], k)


# --- progress and summary -----------------------------------------------------------------------

class Progress:
    """A line on stderr every PROGRESS_S seconds (images done, images/s, time left), as
    raysnet.data.writer's progress does in a job's log; on stderr, since stdout may carry the rows."""

    PROGRESS_S = 10.0

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.start = self.said = self.first = time.monotonic()
        self.counts: collections.Counter = collections.Counter()

    def update(self, row: dict) -> None:
        self.done += 1
        self.counts["unreadable" if row["error"] else "predicted"] += 1
        self.counts["converted"] += bool(row["note"])
        now = time.monotonic()
        if self.done == 1:  # the clock of the lines starts with the first row, after the model and Ray
            self.said = self.first = now
        elif now - self.said >= self.PROGRESS_S:
            self.said = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"raysnet.predict: {self.done}/{self.total} images, {rate:.0f} images/s, about "
                  f"{(self.total - self.done) / max(rate, 1e-9):.0f} s left", file=sys.stderr, flush=True)

    def summary(self, skipped: int) -> str:
        took = time.monotonic() - self.start
        c = self.counts
        text = (f"raysnet.predict: {self.done} images in {took:.1f} s ({self.done / max(took, 1e-9):.1f} images/s; "
                f"the first after {self.first - self.start:.1f} s): "
                f"{c['predicted']} predicted, {c['unreadable']} unreadable (the reason in `error`), {c['converted']} "
                "converted (CMYK or 16-bit: see `note`)")
        return text + (f"; {skipped} file(s) without an image extension skipped" if skipped else "")


def write_rows(rows: Iterable[dict], out: str, k: int, total: int, skipped: int) -> Progress:
    """Every row into `out` (raysnet.predict_io.open_output), counted; the summary on stderr."""
    from raysnet.predict_io import open_output

    progress = Progress(total)
    with open_output(out, k) as writer:
        for row in rows:
            writer.write(row)
            progress.update(row)
    print(progress.summary(skipped) + (f"; written to {out}" if out else ""), file=sys.stderr, flush=True)
    return progress


# --- the command --------------------------------------------------------------------------------

def run(args: list[str]) -> int:
    cfg = _cli.parse_args(PredictConfig, args, "raysnet.predict")
    check(cfg)
    from raysnet.predict_io import check_out, list_inputs

    check_out(cfg.out, cfg.overwrite)  # before any work: nothing is replaced unless asked
    inputs, skipped = list_inputs(cfg.images)
    if not inputs:
        raise UsageError(f"images={cfg.images} holds no image files (looked for {', '.join(_extensions())}, "
                         "recursively).")
    # Imported once the arguments and inputs are checked: torch (and Ray) take seconds to import.
    from raysnet.classifier import Classifier
    from raysnet.tracking import resolve_uri

    uri = resolve_uri(cfg.tracking.uri, "outputs")
    if engine(cfg) == "ray":
        from raysnet import batch_inference

        clf = Classifier.load(cfg.model, tracking_uri=uri, mode=cfg.mode, arch=cfg.arch)
        rows = batch_inference.predict(clf, inputs, k=cfg.k, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                                       gpus_per_worker=cfg.run.gpus_per_worker, device=cfg.device)
    else:
        from raysnet.inference import pick_device

        device = str(pick_device(cfg.device))
        clf = Classifier.load(cfg.model, tracking_uri=uri, mode=cfg.mode, device=device, arch=cfg.arch)
        rows = local_rows(clf, inputs, cfg.batch_size, cfg.k)
    write_rows(rows, cfg.out, cfg.k, len(inputs), skipped)
    return 0


def _extensions() -> tuple[str, ...]:
    from raysnet.predict_io import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def cli() -> None:
    _cli.main(run, sigterm=True)


if __name__ == "__main__":
    cli()
