"""The house's line length, pyproject's `[tool.ruff] line-length`, held by ruff over every Python file of the
repository (the product, the plugins, the benches and the tests): a limit nobody checks drifts back."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).with_name("ruff")


def test_no_line_is_longer_than_the_house_limit():
    run = subprocess.run([str(RUFF), "check", "--no-cache", "--select", "E501", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
