"""What rank 0 shows while an epoch runs, so a long epoch is never silent: progress lines, drawn as
a tqdm bar by a driver whose stdout is a terminal (`Bars`), and the step-level points MLflow records.

The training step never waits for the device. A step costs the watch a clock read and, every
tracking.step_every steps, a device-side copy of the epoch's running sums (EpochStats.sums). Every
run.progress_s seconds, and at the epoch's end, those copies and the current sums come to the host
together (one transfer) to print a line and queue the step points for MLflow.

Loss and error come from rank 0's own batches (its shard of every global batch), images/s from
its step time and the global batch; the epoch's numbers for the tables stay the all-reduced ones.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from raysnet.config import Config

if TYPE_CHECKING:
    from raysnet.tracking import Tracker

Mode = Literal["bar", "lines", "off"]
FLUSH_S = 30.0  # with run.progress_s=0 the step points still reach MLflow this often
BAR_S = 2.0  # a bar moves at least this often (its lines never reach the screen)
# A progress line as `Watch` prints it and `Bars` reads it.
LINE = re.compile(r"raysnet: epoch (\d+)/(\d+) step (\d+)/(\d+) at [\d.]+ s: (.*)$")


def step_every(cfg: Config, steps: int) -> int:
    """Steps per step-level point: tracking.step_every, else about STEP_POINTS an epoch; 0: none."""
    from raysnet.tracking import STEP_POINTS

    if cfg.tracking.step_every is not None:
        return cfg.tracking.step_every
    return max(1, round(steps / STEP_POINTS))


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 3 h 12 min, 2 d 04 h: what an ETA needs, no more."""
    s = round(max(seconds, 0))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def say(text: str) -> None:
    """One line on stdout, which Ray forwards to the driver. Not print(): in a Ray Train worker that
    also goes to the root logger, and Ray forwards both (every line twice)."""
    sys.stdout.write(f"raysnet: {text}\n")
    sys.stdout.flush()


@dataclass
class Epoch:
    """The state of the epoch in progress."""

    index: int
    start: float  # time.monotonic() at its start
    due: float  # when the next line (and flush) is due
    first_step: float | None = None  # when step 0 finished: the rate is timed from there
    done: int = 0  # steps finished
    snaps: list[tuple[int, float, torch.Tensor]] = field(default_factory=list)  # (global step, lr, sums)
    logged: list[float] = field(default_factory=lambda: [0.0] * 4)  # the sums at the last point
    ended: float = 0.0  # when its last step finished


class Watch:
    """Rank 0's eye on the training loop: `start_epoch`, `after_step` per step, `end_epoch`."""

    def __init__(self, cfg: Config, steps: int, world: int, tracker: Tracker | None, mode: Mode):
        self.cfg, self.steps, self.world, self.tracker = cfg, steps, world, tracker
        self.mode: Mode = mode if cfg.run.progress_s > 0 else "off"
        self.every = step_every(cfg, steps)
        self.interval = {"off": FLUSH_S, "lines": cfg.run.progress_s, "bar": min(cfg.run.progress_s, BAR_S)}[self.mode]
        self.walls: list[float] = []  # whole epochs of this process: start to the next start
        self.tails: list[float] = []  # of those, the time after the last step (validation, checkpoint)
        self.now: Epoch | None = None
        self.steps_start: float | None = None  # when this process's first step began; None once it is done

    def start_epoch(self, epoch: int) -> None:
        now = time.monotonic()
        if self.now is not None:  # the previous epoch ended where this one starts
            self.walls.append(now - self.now.start)
            self.tails.append(now - self.now.ended)
        self.now = Epoch(index=epoch, start=now, due=now + self.interval)
        if not self.walls and self.mode != "off":  # this process's first epoch
            what = [w for w, on in (("FFCV compiles its loader pipeline", self.cfg.data.loader == "ffcv"),
                                    ("torch.compile compiles the model", self.cfg.model.compile)) if on]
            say(f"epoch {epoch + 1}: the first step ({'; '.join(what) or 'its data and kernels are set up'}) ...")
            self.steps_start = now

    def after_step(self, step: int, stats_sums: torch.Tensor, lr: float) -> None:
        """After step `step` (0-based) of the epoch: host-side bookkeeping; a transfer only when due."""
        e = self.now
        e.done = step + 1
        now = time.monotonic()
        if step == 0:
            e.first_step = now
            if self.steps_start is not None:
                say(f"the first step took {now - self.steps_start:.1f} s")
                self.steps_start = None
        if self.every and e.done % self.every == 0:
            e.snaps.append((self.global_step(e.done), lr, stats_sums.clone()))  # a device-side copy
        if now >= e.due:
            self._flush(stats_sums, now, show=True)
            e.due = now + self.interval

    def end_epoch(self, stats_sums: torch.Tensor, lr: float) -> None:
        """After the epoch's last step: its last point (the epoch's tail) and every queued one go to MLflow."""
        e = self.now
        if self.every and e.done % self.every and e.done:
            e.snaps.append((self.global_step(e.done), lr, stats_sums.clone()))
        self._flush(stats_sums, time.monotonic(), show=False)
        e.ended = time.monotonic()

    # --- inside ---

    def global_step(self, done_in_epoch: int) -> int:
        """Iterations done since the run began: MLflow's step for the step-level points."""
        return self.now.index * self.steps + done_in_epoch

    def _flush(self, stats_sums: torch.Tensor, now: float, show: bool) -> None:
        e = self.now
        rows = torch.stack([s for _, _, s in e.snaps] + [stats_sums]).tolist()  # the one transfer
        points = []
        for (g, lr, _), row in zip(e.snaps, rows):
            d = [a - b for a, b in zip(row, e.logged)]
            if d[3] > 0:
                points.append((g, {"iter/train_loss": d[0] / d[3], "iter/train_err": 100 * (1 - d[1] / d[3]),
                                   "iter/lr": lr}))
            e.logged = row
        e.snaps = []
        if self.tracker is not None:
            self.tracker.log_steps(points)
        if show and self.mode != "off":
            self._show(rows[-1], now)

    def _show(self, sums: list[float], now: float) -> None:
        e = self.now
        n = max(sums[3], 1.0)
        loss, err = sums[0] / n, 100 * (1 - sums[1] / n)
        timed = e.done - 1  # steps finished after step 0 (step 0 carries the epoch's start-up)
        if e.first_step is None or timed < 1:
            return
        per_step = (now - e.first_step) / timed
        images = self.cfg.batch_size / per_step  # the global batch: every worker's step
        epoch_eta, run_eta = self.etas(per_step)
        say(f"epoch {e.index + 1}/{self.cfg.epochs} step {e.done}/{self.steps} at {now - e.start:.1f} s: "
            f"loss {loss:.3f} err {err:.2f}% "
            f"(rank 0, running) | {images:.0f} images/s | epoch ETA {duration(epoch_eta)}, "
            f"run ETA {duration(run_eta)}")

    def etas(self, per_step: float) -> tuple[float, float]:
        """(seconds left in this epoch's steps, seconds left in the run): the epochs after this one
        take as long as the last whole ones of this process but its first (which also carried its
        start-up), else as long as this one's steps and the last epochs' tails (validation, checkpoint)."""
        e = self.now
        epoch_left = (self.steps - e.done) * per_step
        tail = sum(self.tails[-3:]) / len(self.tails[-3:]) if self.tails else 0.0
        recent = self.walls[1:][-3:]
        whole = sum(recent) / len(recent) if recent else self.steps * per_step + tail
        return epoch_left, epoch_left + tail + (self.cfg.epochs - e.index - 1) * whole


class Bars:
    """The driver's side, when its stdout is a terminal: rank 0's progress lines, as Ray forwards them,
    become a tqdm bar per epoch (Ray's own tqdm_ray draws nothing through Ray Train's print); every
    other line is printed above the bar."""

    def __init__(self):
        self.bar = None
        self.epoch: tuple[int, int] | None = None

    def take(self, line: str) -> bool:
        """True when `line` was a progress line, now shown by the bar."""
        m = LINE.search(line)
        if m is None:
            return False
        from tqdm import tqdm

        epoch, (step, steps) = (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))
        if self.bar is None or self.epoch != epoch:
            self.close()
            self.bar = tqdm(total=steps, desc=f"epoch {epoch[0]}/{epoch[1]}", unit="step", file=sys.stdout,
                            dynamic_ncols=True, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {postfix}]")
            self.epoch = epoch
        # The bar shows the epoch's time left itself.
        self.bar.set_postfix_str(re.sub(r"epoch ETA [^,]*, ", "", m[5].replace(" (rank 0, running)", "")), refresh=False)
        self.bar.update(step - self.bar.n)
        return True

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def refresh(self) -> None:
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
