"""What a run says when its worker group changed size (an elastic run, run.workers=MIN-MAX, that
lost or gained workers; or a resume with another run.workers).

Ray Train resizes the group by restarting it from the last checkpoint; what the training keeps
constant across sizes is elsewhere (the batches: raysnet.data.order; the schedule counts global
steps: raysnet.train.schedule). Every epoch records the size it ran at (the `world_size` metric), so
the run's history says where each resize fell; rank 0 of a resized group says so once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raysnet.config import Config
    from raysnet.tracking import Tracker

END_TIME = "end_time"  # in each epoch's metrics: when its checkpoint was written (wall clock, s)
RESIZES_TAG = "raysnet.resizes"  # how many times the run's worker group changed size


def sizes(history: list[dict]) -> list[int]:
    """The world size of each epoch of `history` that recorded one."""
    return [int(h["world_size"]) for h in history if "world_size" in h]


def resizes(history: list[dict], world: int) -> int:
    """How many times the size changed over `history`, then to `world`."""
    seen = [*sizes(history), world]
    return sum(a != b for a, b in zip(seen, seen[1:]))


def note_resize(cfg: Config, tracker: Tracker, history: list[dict], world: int) -> None:
    """Rank 0 of a new worker group: when the run's last epoch ran at another size, one line (old and
    new size, why, the time since the last checkpoint, which the restart lost) and the tag."""
    from raysnet.train.progress import say

    if not sizes(history) or sizes(history)[-1] == world:
        return
    before, last = sizes(history)[-1], history[-1]
    if cfg.run.elastic:
        why = "a worker or its node was lost" if world < before else "the cluster had room for more workers"
    else:
        why = f"the run was resumed with run.workers={cfg.run.workers}"
    lost = time.time() - last[END_TIME] if END_TIME in last else float("nan")
    say(f"resized from {before} to {world} workers ({why}); epoch {int(last['epoch']) + 2}/{cfg.epochs} starts "
        f"again {lost:.1f} s after the last checkpoint, with the same global batch of {cfg.batch_size}")
    tracker.set_tag(RESIZES_TAG, str(resizes(history, world)))


def room(nodes: list[dict], per_worker: dict[str, float]) -> int:
    """How many workers needing `per_worker` the live nodes of `ray.nodes()` hold, by their total
    resources (what the run could have once its own workers are counted in)."""
    return sum(int(min(node["Resources"].get(k, 0.0) // v for k, v in per_worker.items() if v > 0))
               for node in nodes if node.get("Alive"))


class MinimumWatch:
    """The driver's eye on an elastic run's minimum: when the cluster's nodes can no longer hold
    run.workers' MIN, Ray waits without a word (its controller logs below the run's log level);
    this says so once, and once again when there is room. Polls `ray.nodes()` every `interval` s."""

    def __init__(self, cfg: Config, per_worker: dict[str, float], interval: float = 5.0):
        import threading

        self.cfg, self.per_worker, self.interval = cfg, per_worker, interval
        self.below = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raysnet-minimum", daemon=True)

    def __enter__(self) -> MinimumWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def check(self, nodes: list[dict]) -> str | None:
        """The line to print for this look at the cluster, if any."""
        n, low = room(nodes, self.per_worker), self.cfg.run.min_workers
        if n < low and not self.below:
            self.below = True
            return (f"raysnet: the cluster's nodes hold {n} of this run's workers, fewer than the {low} of "
                    f"run.workers={self.cfg.run.workers}: training waits, as Ray does, until nodes join")
        if n >= low and self.below:
            self.below = False
            return f"raysnet: the cluster's nodes hold {n} workers again: training goes on from its last checkpoint"
        return None

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.interval):
            try:
                line = self.check(ray.nodes())
            except Exception:  # noqa: BLE001 - a look that failed says nothing; the next one may
                continue
            if line:
                print(line, flush=True)
