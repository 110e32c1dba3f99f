"""`python -m raysnet.train key=value ...`: resolve the config, then train on Ray.

    python -m raysnet.train                        # ResNet-20 on the embedded digits, 2 CPU workers
    python -m raysnet.train arch=resnet101 data.root=/data/imagenet
    python -m raysnet.train --print-config arch=plain56 recipe=cifar-paper
"""

from __future__ import annotations

from raysnet import cli as _cli
from raysnet.config import load_config, to_yaml


def run(args: list[str]) -> int:
    print_only = "--print-config" in args
    cfg = load_config([a for a in args if a != "--print-config"])
    if print_only:
        print(to_yaml(cfg), end="")
        return 0
    from raysnet.lifecycle import run_one

    return run_one(cfg)


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
