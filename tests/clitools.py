"""Run an entry point in this process exactly as its command line does.

Each tool's module has `run(args) -> int`, and its console entry is `raysnet.cli.main(run, argv)`:
a ConfigError/UsageError becomes one paragraph on stderr and exit status 2, any other exception
one paragraph and exit status 1. `run_cli` calls that same `main`, in the repository root (where
the command-line tests ran their subprocesses), and returns the exit status and what was printed.
It saves a fresh interpreter per call (torch, FFCV, Ray and MLflow imported and
FFCV's numba compiled again: 5-50 s each on two busy cores).

Keep one real `python -m raysnet.<tool>` per tool somewhere (the cheapest): that the module runs
as a command is not something an in-process call can show.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent

# The command `python -m TOOL` -> the module holding its `run(args)`.
MODULES = {
    "raysnet.train": "raysnet.train.__main__",
    "raysnet.tune": "raysnet.tune.__main__",
    "raysnet.evaluate": "raysnet.evaluate",
    "raysnet.analyze": "raysnet.analyze",
    "raysnet.report": "raysnet.report",
    "raysnet.prepare": "raysnet.prepare",
    "raysnet.predict": "raysnet.predict",
}


class Result(NamedTuple):
    code: int
    out: str
    err: str


def _exit_status(code: object) -> int:
    """What the interpreter would exit with after `sys.exit(code)`."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1  # sys.exit("text") prints the text and exits 1


def run_cli(capsys, tool: str, *args: str) -> Result:
    """`python -m TOOL ARGS...` in this process: its entry point through raysnet.cli.main, with
    the repository root as working directory. -> (exit status, stdout, stderr)"""
    from raysnet import cli, lifecycle

    run = importlib.import_module(MODULES[tool]).run
    capsys.readouterr()  # only what this command prints
    # Every way to Ray goes through lifecycle.connect_ray: count the calls (and let them through),
    # since an e2e test earlier in the session may already have a Ray running in this process.
    real, _CONNECTS[:] = lifecycle.connect_ray, []
    lifecycle.connect_ray = lambda *a, **kw: (_CONNECTS.append(a), real(*a, **kw))[1]
    try:
        with contextlib.chdir(REPO):
            cli.main(run, list(args))
    except SystemExit as e:
        code = _exit_status(e.code)
    else:
        raise AssertionError(f"raysnet.cli.main returned for {tool} instead of exiting")
    finally:
        lifecycle.connect_ray = real
    printed = capsys.readouterr()
    return Result(code, printed.out, printed.err)


def one_paragraph(result: Result | subprocess.CompletedProcess) -> str:
    """The error of a command that must stop on bad input: exit status 2, one paragraph starting
    'error:' on stderr, no traceback. -> that paragraph on one line"""
    if isinstance(result, subprocess.CompletedProcess):
        result = Result(result.returncode, result.stdout, result.stderr)
    err = result.err.strip()
    assert result.code == 2, (result.code, result.out[-2000:], result.err[-2000:])
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err
    assert err.startswith("error:") and "\n\n" not in err, err
    assert [line.startswith("error:") for line in err.splitlines()].count(True) == 1, err  # one error, once
    return " ".join(err.split())


_CONNECTS: list = []  # the last run_cli's calls of lifecycle.connect_ray


def ray_started() -> bool:
    """Whether the last command run by run_cli went as far as connecting to (or starting) Ray."""
    return bool(_CONNECTS)


def command(tool: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The real command line, `python -m TOOL ARGS...` in the repository root."""
    return subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)
