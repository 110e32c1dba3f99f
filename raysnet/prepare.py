"""`python -m raysnet.prepare source=... out=DIR [root=DIR] [overwrite=true] ...`: make a dataset.

Writes DIR/train.beton, DIR/val.beton and DIR/meta.json (see raysnet.data.prepare for the keys).
"""

from __future__ import annotations

from pathlib import Path

from raysnet import cli as _cli


def run(args: list[str]) -> int:
    from raysnet.data.prepare import default_out, parse_args, prepare, summary, usage

    if {"-h", "--help"} & set(args):
        print(usage())
        return 0
    cfg = parse_args(args)
    meta = prepare(cfg)
    print(summary(meta, Path(cfg.out).expanduser() if cfg.out else default_out(cfg.source)))
    return 0


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
