"""Lint and types: `ruff check` and `mypy` pass over the code with the settings in pyproject.toml.

The README's test command (`python3 -m pytest`, which .ci/run runs) collects this file, so CI fails
on a lint finding or a type error the same way it fails on a broken test. Both tools come with the
`test` extra. Each runs as a subprocess from the repository root, reading only pyproject.toml: the
paths, rules and strictness live there (docs/testing.md, "Lint and types").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lint, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _run(*command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.timeout(300)
def test_ruff_check_finds_nothing() -> None:
    done = _run("ruff", "check", "--no-fix", "--output-format", "concise", timeout=240)
    rc = done.returncode
    assert rc == 0, f"ruff check failed (`ruff check --fix` fixes some findings):\n{done.stdout}{done.stderr}"


@pytest.mark.timeout(900)
def test_mypy_finds_no_type_errors() -> None:
    # The files mypy checks (runtime/morphml, operator/morphml_operator) come from pyproject.toml.
    done = _run("mypy", timeout=840)
    rc = done.returncode
    assert rc == 0, f"mypy found type errors:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout, done.stdout
