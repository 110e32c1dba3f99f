"""`python -m raysnet.tune SWEEP.yaml [key=value ...] [sweep.key=value ...]`: run (or resume) a sweep.

key=value overrides the config of every trial; sweep.key=value overrides a key of the sweep file.
--print-config prints every trial's resolved config (a random-search axis at one of its values)
and starts nothing; rerunning the same command resumes the sweep.
"""

from __future__ import annotations

from raysnet import cli as _cli
from raysnet.errors import UsageError


def run(args: list[str]) -> int:
    if {"-h", "--help"} & set(args):
        print(__doc__.strip())
        return 0
    print_only = "--print-config" in args
    args = [a for a in args if a != "--print-config"]
    files = [a for a in args if "=" not in a]
    if len(files) != 1:
        raise UsageError("usage: python -m raysnet.tune tuning/SWEEP.yaml [key=value ...] [sweep.key=value ...]: one "
                         "sweep file, then config overrides for every trial (e.g. data=digits epochs=1 run.workers=1) "
                         "and overrides of the sweep file's keys (e.g. sweep.num_samples=2).")
    from raysnet.tune import run_sweep

    sweep = [a for a in args if a.startswith("sweep.")]
    cli = [a for a in args if "=" in a and a not in sweep]
    return print_configs(files[0], cli, sweep) if print_only else run_sweep(files[0], cli, sweep)


def print_configs(path: str, cli: list[str], sweep_overrides: list[str]) -> int:
    """Each trial's config as YAML, after a comment naming the trial: what the sweep would run."""
    import json

    from raysnet.config import to_yaml
    from raysnet.tune.spec import load, points, validate

    spec, _ = load(path, sweep_overrides)
    for point, cfg in zip(points(spec), validate(spec, cli)):
        print(f"# sweep {spec.name}, trial {json.dumps(point, default=str)}")
        print(to_yaml(cfg), end="")
    return 0


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
