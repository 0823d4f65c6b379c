"""The README's two commands: CI runs exactly its test command; its main command parses."""

from __future__ import annotations

import pathlib
import re
import shlex

from jaxsample.cli import _parser

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_test_command():
    main, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "the last line of .ci/run must be the README's test command"
    assert "pytest" in tests and "pip install" in main


def test_readme_main_command_parses():
    main, _ = _readme_commands()
    argv = shlex.split(main.split(".venv/bin/jaxsample", 1)[1])
    args = _parser().parse_args(argv)
    assert args.command == "generate" and args.prompt and args.seed is not None
