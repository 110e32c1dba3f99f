"""What every entry point shares: config errors become one paragraph and exit status 2."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from collections.abc import Callable
from typing import TypeVar

from raysnet.errors import ConfigError, UsageError, from_omegaconf, unknown_key

__all__ = ["ConfigError", "UsageError", "main", "parse_args"]  # the errors re-exported for older imports

T = TypeVar("T")


def main(run: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run `run(args)`; a ConfigError is the user's mistake: say it plainly, no traceback."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(textwrap.fill(f"error: {e}", width=100, break_long_words=False, break_on_hyphens=False),
              file=sys.stderr)
        sys.exit(2)
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


def parse_args(schema: type[T], args: list[str] | tuple[str, ...], tool: str) -> T:
    """`key=value` arguments into the dataclass `schema` (OmegaConf does the typing): an unknown
    key, a missing required key or a bad value is a ConfigError that names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    where, leaves, keys = f"arguments of {tool}", _keys(schema), _keys(schema, sections=True)
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
