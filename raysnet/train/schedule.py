"""Learning-rate schedules, per iteration, as a factor of the base learning rate."""

from __future__ import annotations

import math

from raysnet.config import Config, OptimConfig


def base_lr(cfg: Config) -> float:
    """The recipe's lr, scaled linearly with the global batch when asked (Goyal et al. 2017)."""
    scale = cfg.batch_size / cfg.optim.ref_batch_size if cfg.optim.scale_lr else 1.0
    return cfg.optim.lr * scale


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of the base lr at iteration `step` of `total`."""
    progress = step / max(total, 1)
    if optim.schedule == "step":
        # Paper §4.2: divide by 10 at 32k and 48k of 64k iterations, i.e. milestones 0.5 and 0.75.
        factor = 0.1 ** sum(progress >= m for m in optim.milestones)
    elif optim.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # "onecycle": linear up to the peak at 25% of the run, then linearly down to 0
        peak = 0.25
        factor = 0.1 + 0.9 * progress / peak if progress < peak else (1 - progress) / (1 - peak)
    if step < optim.warmup_iters:
        # "constant": the paper's 110-layer warm-up (lr 0.01 for ~400 iterations, §4.2);
        # "linear": ramp from warmup_factor to 1 (large-batch warm-up).
        ramp = step / optim.warmup_iters if optim.warmup == "linear" else 0.0
        factor *= optim.warmup_factor + (1 - optim.warmup_factor) * ramp
    return factor
