"""Worker processes started and watched from outside, as a supervisor runs them: for the scale-out
benchmark and the scale-out tests. Each is a real `inspector run` with its own config; its output is
read on a thread, so its readiness and its metrics port are known without polling."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_METRICS = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")
_READY = "ready: queue"


class WorkerProcess:
    """`python -m inspector.cli run --config CONFIG` with `environment` added to a clean environment."""

    def __init__(self, config: Path, environment: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inspector.cli", "run", "--config", str(config)],
            cwd=cwd, env={**clean, **(environment or {})}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.metrics_port: int | None = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            found = _METRICS.search(line)
            if found:
                self.metrics_port = int(found.group(1))
            if _READY in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not become ready:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL: the worker gets no chance to finish; the broker redelivers what it held."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a supervisor stops it; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=30)
