"""`python -m raysnet.train key=value ...`: resolve the config, then train on Ray.

    python -m raysnet.train                        # ResNet-20 on the embedded digits, 2 CPU workers
    python -m raysnet.train arch=resnet101 data.root=/data/imagenet
    python -m raysnet.train --print-config arch=plain56 recipe=cifar-paper

Arguments are key=value (the README's "Configuration" lists every key); --print-config prints the
resolved config and starts nothing. Rerunning with the same run.name resumes the run.
"""

from __future__ import annotations

from raysnet import cli as _cli
from raysnet.config import flatten, load_config, to_yaml


def run(args: list[str]) -> int:
    if {"-h", "--help"} & set(args):
        print(usage())
        return 0
    print_only = "--print-config" in args
    cfg = load_config([a for a in args if a != "--print-config"])
    if print_only:
        print(to_yaml(cfg), end="")
        return 0
    from raysnet.lifecycle import run_one

    return run_one(cfg)


def usage() -> str:
    """This module's docstring, then every key with its default (the default recipe's)."""
    keys = "\n".join(f"  {k}={v}" for k, v in flatten(load_config([])).items())
    return f"{__doc__.strip()}\n\nKeys and defaults (recipe=digits; arch= or recipe= picks other defaults):\n{keys}"


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
