"""What every entry point shares: config errors become one paragraph and exit status 2."""

from __future__ import annotations

import dataclasses
import difflib
import sys
import textwrap
import typing
from collections.abc import Callable
from typing import TypeVar

from raysnet.config import ConfigError

T = TypeVar("T")


class UsageError(ConfigError):
    """Bad input that is not a config key: a missing file, a mismatched dataset."""


def main(run: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run `run(args)`; a ConfigError is the user's mistake: say it plainly, no traceback."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(textwrap.fill(f"error: {e}", width=100, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def _keys(schema, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        out += _keys(default, f"{prefix}{f.name}.") if dataclasses.is_dataclass(default) else [prefix + f.name]
    return out


def parse_args(schema: type[T], args: list[str] | tuple[str, ...], tool: str) -> T:
    """`key=value` arguments into the dataclass `schema` (OmegaConf does the typing): an unknown
    key, a missing required key or a bad value is a ConfigError that names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

    keys = _keys(schema)
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"cannot read argument '{arg}': arguments to {tool} are key=value. "
                              f"Keys: {', '.join(keys)}.")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(args)))
        return OmegaConf.to_object(node)
    except ConfigKeyError as e:
        close = difflib.get_close_matches(str(e.full_key), keys, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{e.full_key}' for {tool}.{hint} Valid keys: {', '.join(keys)}.") from None
    except MissingMandatoryValue as e:
        choices = typing.get_args(typing.get_type_hints(schema).get(str(e.full_key)))
        value = "|".join(map(str, choices)) if choices else "VALUE"
        raise ConfigError(f"missing key '{e.full_key}' for {tool}: give it as {e.full_key}={value}.") from None
    except ValidationError as e:
        raise ConfigError(f"bad value for '{e.full_key}' ({tool}): {e.msg.splitlines()[0]}.") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read arguments {list(args)} for {tool}: {e.msg}") from None
