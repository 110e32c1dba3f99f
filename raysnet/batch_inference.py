"""`raysnet.predict engine=ray`: batch inference as a Ray Data pipeline.

    paths (from_items, one block a batch) -> read + Preprocess (CPU tasks, on every node)
          -> Classifier (an actor pool: `concurrency` actors, run.gpus_per_worker GPUs each)
          -> rows, back to the driver in input order (DataContext preserve_order)

Ray Data schedules, retries and streams; nothing here hands out work by hand. The driver loads the
model once (a bad model= fails there, as one paragraph, before the cluster does anything) and puts
it in Ray's object store: the actors take it from there, so a model in the driver's MLflow store or
on its disk needs no route from the nodes. The images are read where the tasks run: on a cluster
they must be in an object store or on a disk every node shares. A file that cannot be read or
decoded becomes a row with its reason, never a failed task.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import numpy as np

from raysnet.classifier import Classifier, Item, Preprocess
from raysnet.predict_io import Input, load

# On a CPU-only cluster the model's actors reserve half a CPU and the reading tasks a quarter: a
# 1-CPU node runs an actor and two reading tasks, where whole CPUs would let the actors take every
# CPU and starve the reading. The two must differ: Ray Data fuses consecutive stages with equal
# resources into one, and the reading would then run inside the actors, one batch after another.
ACTOR_CPUS, READ_CPUS = 0.5, 0.25


def connect():
    """The cluster RAY_ADDRESS names (checked first: Ray retries a dead address for minutes), else a
    local Ray on 127.0.0.1 (raysnet.lifecycle.connect_ray). Its notice goes to stderr: stdout may
    carry the rows."""
    from raysnet import lifecycle
    from raysnet.ray_address import check_ray_address, local_ray

    if not local_ray():
        check_ray_address()
    with contextlib.redirect_stdout(sys.stderr):
        return lifecycle.connect_ray(1)


def _views_shape(prep: Preprocess) -> tuple[int, ...]:
    return (10 if prep.mode == "10crop" else 1, 3, prep.crop, prep.crop)


def read_and_preprocess(batch: dict[str, np.ndarray], preprocess: Preprocess) -> dict[str, np.ndarray]:
    """A CPU task: each image read and made ready, or the reason it cannot be (views of zeros then:
    one tensor column of one shape)."""
    items = [load(Input(str(n), str(p), d if has else None), preprocess)
             for n, p, d, has in zip(batch["path"], batch["source"], batch["data"], batch["has_data"])]
    empty = np.zeros(_views_shape(preprocess), np.float32)
    return {"index": batch["index"], "path": batch["path"],
            "views": np.stack([empty if it.views is None else it.views for it in items]),
            "note": np.array([it.note for it in items], dtype=object),
            "error": np.array([it.error for it in items], dtype=object)}


class Predict:
    """An actor of the pool: the driver's model on this actor's device, rows out."""

    def __init__(self, model_ref, k: int, device: str):
        import ray
        import torch

        model, classes, preprocess, source = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        if device == "auto":  # the GPU Ray gave this actor, if it was given one
            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.clf, self.k = Classifier(model, classes, preprocess, source, device), k

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        items = [Item(None if e else v, n, e) for v, n, e in zip(batch["views"], batch["note"], batch["error"])]
        rows = self.clf.rows([str(p) for p in batch["path"]], items, self.k)
        return pa.table({"index": pa.array(batch["index"], pa.int64()),
                         **{key: [r[key] for r in rows] for key in ("path", "classes", "probs", "note", "error")}})


def _resources(ray, gpus_per_worker: float | None, concurrency: int | None) -> tuple[float, int, float]:
    """(GPUs per actor, actors, CPUs per reading task): one GPU an actor and one actor a GPU when the
    cluster has GPUs; else half its CPUs, at least one."""
    total = ray.cluster_resources()
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if total.get("GPU", 0) > 0 else 0.0)
    if concurrency is None:
        concurrency = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // 2)
    return gpus, max(1, concurrency), 1.0 if gpus else READ_CPUS


def predict(clf: Classifier, inputs: list[Input], *, k: int, batch_size: int, concurrency: int | None,
            gpus_per_worker: float | None, device: str = "auto") -> Iterator[dict]:
    """The rows of `inputs`, in their order, computed by Ray Data on the cluster (or a local Ray)."""
    connect()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in the order of the input
    ctx.enable_progress_bars = False  # raysnet.predict prints its own progress lines
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus, actors, task_cpus = _resources(ray, gpus_per_worker, concurrency)
    model = ray.put((clf.model.cpu(), clf.classes, clf.preprocess, clf.source))
    items = [{"index": i, "path": x.name, "source": x.path, "data": x.data or b"", "has_data": x.data is not None}
             for i, x in enumerate(inputs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
    ds = ds.map_batches(read_and_preprocess, fn_kwargs={"preprocess": clf.preprocess}, batch_size=batch_size,
                        num_cpus=task_cpus, batch_format="numpy")
    # The actors are placed by Ray Data's default SPREAD strategy: across the nodes, not packed on the
    # first. The model's ObjectRef among their constructor arguments makes Ray's core worker log that
    # a restarted actor needs it still in scope: it is, held here until the last row is in.
    ds = ds.map_batches(Predict, fn_constructor_args=(model, k, device), batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus,
                        num_cpus=1.0 if gpus else ACTOR_CPUS)
    expected = 0
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            if row.pop("index") != expected:  # preserve_order promises this; a wrong file must never be written
                raise RuntimeError(f"Ray Data returned rows out of order (row {expected} expected)")
            expected += 1
            yield row
