"""Where prepare's per-image work runs: processes of this machine, or Ray tasks on a cluster's nodes.

    with local_pool(workers=8) as pool:          # or: with ray_tasks() as pool:
        for result in pool.map(encode_file, recipe, paths):   # in the order of `paths`
            ...
    pool.nodes                                    # {node: images it encoded}

Both hand out chunks of items and give the results back in order, with a bounded number of
chunks in flight, so the single writer streams them to disk and memory stays flat however large
the dataset. A worker process that dies stops the pool with an error (a local one) or has its
chunk run again elsewhere (Ray's task retries: a lost node costs its chunks, not the dataset).
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from raysnet.errors import UsageError, child_signals, fork_context, signals_held

LOCAL_CHUNK = 16  # images a task: small enough to spread a small split over every process
RAY_CHUNK = 64  # larger on a cluster: a task's scheduling costs milliseconds
AHEAD = 4  # chunks in flight per process (or cluster CPU): enough to keep every one busy


def _in_order(submit: Callable[[list], Any], result: Callable[[Any], list], items: Sequence, chunk: int,
              window: int) -> Iterator[Any]:
    """Submit `items` in chunks, at most `window` chunks ahead of the one being read; yield each
    chunk's result in order."""
    pending: collections.deque = collections.deque()
    starts = iter(range(0, len(items), chunk))
    for start in starts:
        pending.append(submit(list(items[start:start + chunk])))
        if len(pending) >= window:
            break
    while pending:
        done = result(pending.popleft())
        start = next(starts, None)
        if start is not None:
            pending.append(submit(list(items[start:start + chunk])))
        yield done


def _encode_chunk(fn: Callable, recipe: Any, items: list) -> list:
    return [fn(item, recipe) for item in items]


class LocalPool:
    reads_local_files = True

    def __init__(self, executor: ProcessPoolExecutor, workers: int):
        self.executor, self.workers = executor, workers
        self.nodes: collections.Counter = collections.Counter()

    def map(self, fn: Callable, recipe: Any, items: Sequence) -> Iterator[Any]:
        chunk = max(1, min(LOCAL_CHUNK, len(items) // (4 * self.workers)))
        try:
            for results in _in_order(lambda c: self.executor.submit(_encode_chunk, fn, recipe, c),
                                     lambda f: f.result(), items, chunk, AHEAD * self.workers):
                self.nodes[socket.gethostname()] += len(results)
                yield from results
        except BrokenProcessPool:
            raise UsageError("an image worker process died (killed, or out of memory) while preparing; nothing "
                             "was kept. Run prepare again, with fewer workers= if memory is short.") from None


@contextlib.contextmanager
def local_pool(workers: int) -> Iterator[LocalPool]:
    """`workers` forked processes of this one (the recipe's FFCV fields are shared, not pickled)."""
    with contextlib.ExitStack() as stack:
        executor = ProcessPoolExecutor(workers, mp_context=fork_context(), initializer=child_signals)
        # On any exit the chunks not started are dropped (a stopped prepare ends at once).
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)
        with signals_held():  # the processes fork on the first submit; see raysnet.errors.signals_held
            executor.submit(int).result()
        yield LocalPool(executor, workers)


class RayTasks:
    reads_local_files = False  # a cluster's nodes need not see this machine's disk

    def __init__(self, ray, cpus: int):
        self.ray, self.cpus = ray, cpus
        self.nodes: collections.Counter = collections.Counter()
        # SPREAD: every node's CPUs take chunks (by default Ray fills the driver's node first).
        self.task = ray.remote(_encode_on_node).options(num_cpus=1, scheduling_strategy="SPREAD", max_retries=5)

    def map(self, fn: Callable, recipe: Any, items: Sequence) -> Iterator[Any]:
        for node, results in _in_order(lambda c: self.task.remote(fn, recipe, c), self.ray.get, items, RAY_CHUNK,
                                       AHEAD * self.cpus):
            self.nodes[node] += len(results)
            yield from results


def _encode_on_node(fn: Callable, recipe: Any, items: list) -> tuple[str, list]:
    """A chunk encoded by a Ray task, with the node that did it (for meta.json and the tests)."""
    import ray

    return ray.get_runtime_context().get_node_id(), _encode_chunk(fn, recipe, items)


@contextlib.contextmanager
def ray_tasks() -> Iterator[RayTasks]:
    """The Ray cluster RAY_ADDRESS names (`ray job submit` sets it)."""
    if not os.environ.get("RAY_ADDRESS"):
        raise UsageError("engine=ray prepares on a Ray cluster, and RAY_ADDRESS is unset: submit the command with "
                         "`ray job submit -- python -m raysnet.prepare ...`, set RAY_ADDRESS to the cluster's "
                         "address, or use engine=local.")
    from raysnet.ray_address import check_ray_address

    check_ray_address()
    import ray

    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    yield RayTasks(ray, max(1, int(ray.cluster_resources().get("CPU", 1))))
