"""`python -m raysnet.prepare source=... out=DIR [root=DIR] [overwrite=true] ...`: make a dataset.

Writes DIR/train.beton, DIR/val.beton and DIR/meta.json (see raysnet.data.prepare for the keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raysnet import cli as _cli

if TYPE_CHECKING:
    from raysnet.data.prepare import PrepareConfig


def parse_args(args: list[str] | tuple[str, ...]) -> PrepareConfig:
    """The command line as a `raysnet.data.PrepareConfig` (its values are checked by `prepare`)."""
    from raysnet.data.prepare import PrepareConfig

    return _cli.parse_args(PrepareConfig, args, "raysnet.prepare")


def run(args: list[str]) -> int:
    from raysnet.data.prepare import default_out, prepare, summary

    cfg = parse_args(args)
    meta = prepare(cfg)
    out = cfg.out if "://" in cfg.out else Path(cfg.out).expanduser() if cfg.out else default_out(cfg.source)
    print(summary(meta, out))
    return 0


def cli() -> None:
    _cli.main(run, sigterm=True)  # a stopped prepare removes what it had written


if __name__ == "__main__":
    cli()
