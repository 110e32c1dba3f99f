"""The README's commands stay true: every `python -m raysnet.<tool> ...` in a fenced bash block parses
with the current keys (a renamed key cannot leave a stale command behind), and CI runs the
Quickstart's test command."""

from __future__ import annotations

import re
import shlex

import pytest
from clitools import REPO, run_cli

README = (REPO / "README.md").read_text()
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<"}


def bash_lines(text: str) -> list[str]:
    """The lines of every ```bash block, continuation lines joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def raysnet_commands(line: str) -> list[tuple[str, list[str]]]:
    """Each `python -m raysnet.X ARGS` of a shell line: (raysnet.X, ARGS), up to a shell operator;
    comments left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    found = []
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].startswith("raysnet."):
            args = []
            for arg in words[i + 2:]:
                if arg in SHELL_OPERATORS:
                    break
                args.append(arg)
            found.append((words[i + 1], args))
    return found


def check(capsys, tool: str, args: list[str]) -> None:
    """Parse `args` as `python -m TOOL` would, starting nothing: the train and sweep commands with
    --print-config (every trial resolved), the other tools through their own key=value parser."""
    from raysnet import cli

    if tool in ("raysnet.train", "raysnet.tune"):
        result = run_cli(capsys, tool, *args, "--print-config")
        assert result.code == 0, result.err
    elif tool == "raysnet.prepare":
        from raysnet.prepare import parse_args

        parse_args(args)
    elif tool == "raysnet.report":
        from raysnet.report import ReportArgs

        cli.parse_args(ReportArgs, args, tool)
    elif tool == "raysnet.analyze":
        from raysnet.analyze import AnalyzeArgs

        cli.parse_args(AnalyzeArgs, args, tool)
    elif tool == "raysnet.evaluate":
        from raysnet.config import load_config
        from raysnet.evaluate import EvalConfig

        data = [a for a in args if a.partition("=")[0].split(".")[0] == "data"]  # as evaluate splits them
        cli.parse_args(EvalConfig, [a for a in args if a not in data], tool)
        load_config(data)
    elif tool == "raysnet.predict":
        from raysnet.predict import PredictConfig

        cli.parse_args(PredictConfig, args, tool)
    else:
        raise AssertionError(f"the README runs {tool}, which this test does not know: add its parser here")


COMMANDS = [(line, tool, args) for line in bash_lines(README) for tool, args in raysnet_commands(line)]


def test_the_readme_shows_commands_of_every_tool():
    assert {tool for _, tool, _ in COMMANDS} >= {"raysnet.train", "raysnet.tune", "raysnet.prepare", "raysnet.report",
                                                  "raysnet.evaluate", "raysnet.analyze", "raysnet.predict"}


@pytest.mark.parametrize("line, tool, args", COMMANDS, ids=[line[:80] for line, _, _ in COMMANDS])
def test_each_readme_command_parses_with_the_current_keys(capsys, monkeypatch, tmp_path, line, tool, args):
    monkeypatch.setenv("RAYSNET_DATA", str(tmp_path))  # defaults that name data directories stay here
    check(capsys, tool, args)


def test_ci_runs_the_quickstarts_test_command():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    lines = bash_lines(quickstart)
    assert lines == ["bash install.sh && python -m raysnet.train", "bash install.sh test && python -m pytest"], lines
    assert "bash install.sh test && python -m pytest" in (REPO / ".ci" / "run").read_text()


def test_the_parser_finds_commands_after_shell_syntax():
    line = 'RAY_X=1 ray job submit --working-dir . -- python -m raysnet.train arch=resnet20 "run.name=a b" && echo ok # c'
    assert raysnet_commands(line) == [("raysnet.train", ["arch=resnet20", "run.name=a b"])]
    assert bash_lines("```bash\npython -m raysnet.tune x.yaml \\\n  epochs=1\n```\n") == [
        "python -m raysnet.tune x.yaml    epochs=1"]
