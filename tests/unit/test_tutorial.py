"""docs/tutorial.md stays true: every `morphml ...` command in it parses with the real CLI, every
`--set` it shows is accepted by the manifest it is used with, and every file it names exists.
(The examples themselves run in tests/process/test_examples.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from morphml.cli import build_parser
from morphml.experiment import load_manifest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tutorial.md"


def commands(text: str) -> list[list[str]]:
    """The shell lines of the tutorial (its 4-space indented blocks, outside ``` fences), with
    continuations joined and leading VAR=value assignments dropped."""
    lines, out, fenced = text.splitlines(), [], False
    i = 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        if raw.startswith("```"):
            fenced = not fenced
            continue
        if fenced or not raw.startswith("    "):
            continue
        line = raw.strip()
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


def morphml_commands() -> list[list[str]]:
    return [words[1:] for words in commands(TUTORIAL.read_text()) if words[0] == "morphml"]


def test_the_tutorial_shows_the_commands_it_promises():
    subcommands = {args[0] for args in morphml_commands()}
    assert {"run", "results"} <= subcommands, subcommands


def test_every_morphml_command_parses_with_the_real_cli():
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)  # the subcommands this version has
    text = TUTORIAL.read_text()
    for args in morphml_commands():
        if args == ["--help"]:
            continue
        if args[0] not in known:
            # Being added in this development version (e.g. `morphml results`): the tutorial must say so.
            assert args[0] == "results" and "Requires a MorphML version that has `morphml results`" in text, args
            continue
        try:
            parsed = parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"`morphml {' '.join(args)}` does not parse") from exc
        if args[0] == "run":
            assert (ROOT / parsed.manifest).is_file(), parsed.manifest
            if parsed.overrides:
                load_manifest(ROOT / parsed.manifest, tuple(parsed.overrides))  # raises naming a bad --set


def test_every_file_the_tutorial_names_exists():
    text = TUTORIAL.read_text()
    named = set(re.findall(r"\b((?:examples|docs|helm)/[\w./-]+\w)", text))
    named |= {"Dockerfile.master", "Dockerfile.worker"}
    assert named, "the tutorial names no files"
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"docs/tutorial.md names files that do not exist: {missing}"
