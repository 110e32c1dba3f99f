"""`python -m raysnet.tune SWEEP.yaml [key=value ...] [sweep.key=value ...]`: run (or resume) a sweep.

key=value overrides the config of every trial; sweep.key=value overrides a key of the sweep file.
"""

from __future__ import annotations

from raysnet import cli as _cli
from raysnet.errors import UsageError


def run(args: list[str]) -> int:
    files = [a for a in args if "=" not in a]
    if len(files) != 1:
        raise UsageError("usage: python -m raysnet.tune tuning/SWEEP.yaml [key=value ...] [sweep.key=value ...]: one "
                         "sweep file, then config overrides for every trial (e.g. data=digits epochs=1 run.workers=1) "
                         "and overrides of the sweep file's keys (e.g. sweep.num_samples=2).")
    from raysnet.tune import run_sweep

    sweep = [a for a in args if a.startswith("sweep.")]
    return run_sweep(files[0], [a for a in args if "=" in a and a not in sweep], sweep)


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
