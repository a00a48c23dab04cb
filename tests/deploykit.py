"""The deploy tests' shared piece: a validator tool found on PATH or beside this Python, and proven to run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def runnable_tool(name: str) -> str | None:
    """The path of `name` when it is installed and answers `--version`; None otherwise (the test skips)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        return None
    try:
        subprocess.run([found, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return found
