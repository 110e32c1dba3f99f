"""Sweeps: the paper's comparisons (and your own searches) as Ray Tune experiments of raysnet runs.

    python -m raysnet.tune tuning/plain-vs-residual-cifar.yaml data.root=/data/cifar10
    python -m raysnet.tune tuning/lr-wd-asha.yaml data=digits arch=resnet20 epochs=3 sweep.num_samples=2  # smoke

A sweep file (see raysnet.tune.spec) names a base recipe, the trials, the metric and the
scheduler; command-line overrides apply to every trial. Rerunning the same command resumes.
"""

from raysnet.tune.spec import Sweep, load, points, run_name, validate

__all__ = ["Sweep", "load", "points", "run_name", "run_sweep", "validate"]


def run_sweep(path: str, cli: list[str], sweep_overrides: list[str] | None = None) -> int:
    from raysnet.tune.runner import run_sweep as run

    return run(path, cli, sweep_overrides or [])
