"""The tree stays ruff-clean and mypy-clean (the rules are in pyproject.toml), so CI catches
what a session forgot to check. Both tools are pinned in the test extra; a missing one fails
here instead of skipping, since CI installs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [
    ["ruff", "check", "."],        # the package, tests, benchmarks, examples and notebooks
    ["mypy"],                      # the package, as configured under [tool.mypy]
], ids=["ruff", "mypy"])
def test_the_checker_finds_nothing(command):
    tool = Path(sys.executable).parent / command[0]
    assert tool.exists(), f"{command[0]} is not installed next to {sys.executable}"
    done = subprocess.run([str(tool), *command[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
