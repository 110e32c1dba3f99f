"""The errors a person sees, and the one translation of OmegaConf's exceptions into them.

Every layer (config, data, the entry points) raises these; `raysnet.cli.main` prints them as one
paragraph with exit status 2, so nothing here may import more than OmegaConf. Also here: SIGTERM
turned into an exception that cleans up like Ctrl-C, for the entry points and what they fork.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import sys
import typing
from collections.abc import Iterator, Sequence

from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration mistake, worded for the person who made it."""


class UsageError(ConfigError):
    """Bad input that is not a config key: a missing file, a mismatched dataset."""


DEBUG_ENV = "RAYSNET_DEBUG"  # set (not 0): tracebacks instead of one-paragraph errors


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` and `except BaseException` cleans up."""


_held: list[int] | None = None  # the stop signals that arrived inside `signals_held`; None: outside
_owner: int | None = None  # the process that called `stop_on_signals`


def _stop(signum: int, frame) -> None:
    if os.getpid() != _owner:
        # A child forked with this handler, before its own `child_signals` ran: it acts as it will.
        # A SIGTERM swallowed here (the child's copy of `_held` collects it) left a pool worker
        # alive after its pool's terminate(), and the parent waited for it forever.
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    if _held is not None:
        _held.append(signum)
        return
    raise Stopped() if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt and `Stopped` (in the main thread)."""
    global _owner
    _owner = os.getpid()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM take effect when this block ends, not inside it: while a process is
    forked Python runs callbacks in the parent where an exception from a signal handler is printed
    and dropped, so the stop would be lost and the command would run on."""
    global _held
    outer = _held
    _held = [] if outer is None else outer
    try:
        yield
    finally:
        arrived, _held = _held, outer
        if arrived and outer is None:
            raise Stopped() if signal.SIGTERM in arrived else KeyboardInterrupt()


def ray_in_this_process() -> bool:
    """A Ray driver or worker lives in this process (ray.init ran, or Ray started it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def fork_context():
    """multiprocessing's fork context, for the processes that check and encode images. Ray does not
    support forking a process that holds a Ray driver or worker (the child inherits its threads and
    sockets half-copied; a test process that did so saw its Ray stop answering minutes later), so
    that is refused here: such a process prepares in a fresh one (`raysnet.data.prepare.prepare_isolated`)."""
    import multiprocessing

    if ray_in_this_process():
        raise RuntimeError("refusing to fork image workers in a process that holds a Ray driver or worker: "
                           "prepare the dataset before Ray starts, or with raysnet.data.prepare.prepare_isolated")
    return multiprocessing.get_context("fork")


def child_signals() -> None:
    """For a process an entry point forks: Ctrl-C reaches the whole process group, but only the
    parent decides what to clean up (it stops its children); SIGTERM ends a child at once.
    Without this a forked child inherits `stop_on_signals` and prints a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def root_cause(e: BaseException) -> str:
    """`Type: message` of what went wrong. Ray wraps a worker's exception in its own, with the
    worker's traceback as text: the last `SomethingError: ...` line of that text is the cause."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:  # some of Ray's chains loop back
        e = e.__cause__
        seen.add(id(e))
    text = str(e).strip()
    if "Traceback (most recent call last)" in text:
        found = re.findall(r"^((?:\w+\.)*\w+(?:Error|Exception)\b.*)$", text, re.MULTILINE)
        if found:
            return found[-1].strip().rstrip(".")
    first = text.splitlines()[0].rstrip(".") if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def from_omegaconf(e: OmegaConfBaseException, where: str, keys: Sequence[str] = ()) -> ConfigError:
    """OmegaConf's exception `e`, raised while reading `where` (e.g. "command line", "arguments of
    raysnet.analyze"), as one sentence that names the key. `keys`: the valid dotted keys, for
    "Did you mean" and the list of keys an unknown one is shown beside."""
    key = str(getattr(e, "full_key", None) or "")
    if isinstance(e, ConfigKeyError):
        return unknown_key(key, where, keys)
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"missing key '{key}' ({where}): give it as {key}={_placeholder(e)}.")
    if isinstance(e, ValidationError):
        msg = (e.msg or str(e) or "not a valid value").splitlines()[0]
        return ConfigError(f"bad value for '{key}' ({where}): {msg}.")
    return ConfigError(f"cannot read {where}: {e.msg}")


def unknown_key(key: str, where: str, keys: Sequence[str]) -> ConfigError:
    """A key that is not in `keys`; the keys listed are those of its section (or the top level),
    so a typo in `optim.` shows the optimiser's keys, not all of them."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = key.rpartition(".")[0]
    if not any(k.startswith(section + ".") for k in keys):
        section = ""
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    listed = f" Valid keys{f' in {section}' if section else ''}: {', '.join(siblings)}." if siblings else ""
    return ConfigError(f"unknown key '{key}' ({where}).{hint}{listed}")


def _placeholder(e: MissingMandatoryValue) -> str:
    """`a|b|c` for a Literal-typed key (its choices), else VALUE."""
    node = getattr(e, "child_node", None)
    ref_type = getattr(getattr(node, "_metadata", None), "ref_type", None)
    choices = typing.get_args(ref_type) if typing.get_origin(ref_type) is typing.Literal else ()
    return "|".join(map(str, choices)) if choices else "VALUE"
