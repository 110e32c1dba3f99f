"""What every entry point shares: config errors become one paragraph and exit status 2."""

from __future__ import annotations

import sys
import textwrap
from typing import Callable

from raysnet.config import ConfigError


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
