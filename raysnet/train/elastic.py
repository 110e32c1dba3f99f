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
