"""The training order of an epoch: the same global batches at every world size.

A run that changes size (an elastic run losing or gaining workers, or a resume with another
run.workers) must train on the same batches, in the same order, as one that never did. So the
order is drawn from (seed, epoch) alone, cut into `steps` global batches of `batch_size`, and
a world of W workers splits each global batch into W contiguous shards:

    epoch's permutation:  [ b0 | b1 | b2 | ... | b(steps-1) | the last samples % batch_size, unused ]
    global batch b_s over 3 workers:  [ rank 0 | rank 1 | rank 2 ]

When W does not divide `batch_size`, the first `batch_size % W` ranks take one sample more
(`shard_sizes`); the loss of each rank is weighted by its share (`loss_weight`) so that DDP's
mean of the ranks' gradients is the gradient of the global batch's mean loss. Every sample is
in at most one batch of an epoch; the `samples % batch_size` left over (a different random few
every epoch) are not trained on, as with any loader that drops a last partial batch.

With one worker this is FFCV's own RANDOM order (`default_rng(seed + epoch).permutation`), so a
single-worker run sees what it always saw.
"""

from __future__ import annotations

import numpy as np


def steps_per_epoch(samples: int, batch_size: int, max_steps: int | None = None) -> int:
    """Optimiser steps per epoch, at every world size: whole global batches, capped by `max_steps`."""
    steps = samples // batch_size
    return steps if max_steps is None else min(max_steps, steps)


def shard_sizes(batch_size: int, world: int) -> list[int]:
    """Each rank's share of a global batch: as even as can be, the first ranks one more."""
    share, extra = divmod(batch_size, world)
    return [share + (rank < extra) for rank in range(world)]


def loss_weight(batch_size: int, rank: int, world: int) -> float:
    """What rank `rank` multiplies its mean loss by, so that DDP's average over the `world` ranks
    is the mean over the global batch: mean_r * n_r / batch_size * world (1 when shards are even)."""
    return shard_sizes(batch_size, world)[rank] * world / batch_size


def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of `samples` that epoch `epoch` trains in, whatever the world size."""
    return np.random.default_rng(seed + epoch).permutation(samples)


def rank_order(samples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int,
               max_steps: int | None = None) -> np.ndarray:
    """The sample indices rank `rank` of `world` trains on in `epoch`, batch after batch: its shard of
    each global batch (shard_sizes(batch_size, world)[rank] samples a step), the first `max_steps`."""
    steps = steps_per_epoch(samples, batch_size, max_steps)
    batches = epoch_order(samples, seed, epoch)[:steps * batch_size].reshape(steps, batch_size)
    start = sum(shard_sizes(batch_size, world)[:rank])
    return batches[:, start:start + shard_sizes(batch_size, world)[rank]].reshape(-1)
