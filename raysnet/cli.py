"""What every entry point shares: a mistake or failure becomes one paragraph (exit status 2 for the
user's input, 1 for a failure), an interruption one line; `--debug` keeps the traceback."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import TypeVar

from raysnet.errors import (
    DEBUG_ENV,
    ConfigError,
    Stopped,
    UsageError,
    from_omegaconf,
    root_cause,
    stop_on_signals,
    unknown_key,
)

__all__ = ["ConfigError", "UsageError", "main", "parse_args"]  # the errors re-exported for older imports

T = TypeVar("T")


DEBUG_FLAG = "--debug"


def _say(text: str) -> None:
    print(textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr)


def main(run: Callable[[list[str]], int | None], argv: list[str] | None = None, *, sigterm: bool = False) -> None:
    """Run `run(args)` as a command. A ConfigError is the user's mistake: one paragraph, exit
    status 2. Any other failure: one paragraph naming the cause, exit status 1. Ctrl-C (and
    SIGTERM, with `sigterm`): one line, exit status 128 + the signal. `--debug` or RAYSNET_DEBUG=1
    shows the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != DEBUG_FLAG]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # for the processes this one starts (a local Ray's workers)
    module = run.__module__
    if module == "__main__":  # `python -m raysnet.X`: the module's own name is in its spec
        module = getattr(sys.modules["__main__"].__spec__, "name", "raysnet")
    tool = module.removesuffix(".__main__")
    if sigterm:
        stop_on_signals()
    try:
        code = run(args)
    except ConfigError as e:
        _say(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt as e:
        name = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C (SIGINT)"
        print(f"{tool}: stopped by {name}; nothing half-written was kept.", file=sys.stderr, flush=True)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT))
    except Exception as e:
        if debug:
            raise
        _say(f"error: {tool} failed: {root_cause(e)}. (The whole traceback: run it again with {DEBUG_FLAG} or "
             f"{DEBUG_ENV}=1.)")
        sys.exit(1)
    sys.exit(code or 0)


def _keys(schema, prefix: str = "", sections: bool = False) -> list[str]:
    """The dotted leaf keys of a dataclass; with `sections`, the names of its nested dataclasses too."""
    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            out.append(prefix + f.name)
            continue
        if sections:
            out.append(prefix + f.name)
        out += _keys(default, f"{prefix}{f.name}.", sections)
    return out


def usage(schema) -> str:
    """The docstring of the module that defines `schema`, then each key with its default."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(schema))
    flat = _flat(defaults)
    keys = "\n".join(f"  {k}={'(required)' if v == '???' else v}" for k, v in flat.items())
    return f"{(sys.modules[schema.__module__].__doc__ or '').strip()}\n\nKeys and defaults:\n{keys}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def parse_args(schema: type[T], args: list[str] | tuple[str, ...], tool: str) -> T:
    """`key=value` arguments into the dataclass `schema` (OmegaConf does the typing): an unknown
    key, a missing required key or a bad value is a ConfigError that names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where, leaves, keys = f"arguments of {tool}", _keys(schema), _keys(schema, sections=True)
    if {"-h", "--help"} & set(args):
        print(usage(schema))
        sys.exit(0)
    for arg in args:
        key = arg.partition("=")[0]
        if "=" not in arg or not key:
            raise ConfigError(f"cannot read argument '{arg}': arguments to {tool} are key=value. "
                              f"Keys: {', '.join(leaves)}.")
        # Checked here: OmegaConf names only the first unknown part (optim of optim.lr), or no key
        # at all for a value given to a whole section (data=3).
        if key in keys and key not in leaves:
            section = [k for k in leaves if k.startswith(key + ".")]
            raise ConfigError(f"bad value for '{key}' ({where}): set its keys one by one: {', '.join(section)}.")
        if key not in keys:
            raise unknown_key(key, where, keys)
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(args)))
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, where, keys) from None
