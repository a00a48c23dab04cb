"""A thread that dies, or stops making progress while it has work, is loud.

Each core thread of the worker is registered with a liveness test and a "busy" test, and beats
when it makes progress. The watchdog looks every second: a thread that is gone, or busy without
a beat for longer than its limit, makes the worker unhealthy. `/healthz` then answers 503 with
the reason and the worker exits non-zero, so systemd or Kubernetes restarts it and the broker
redelivers what it held. Never a silent stall.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0


@dataclass
class Watched:
    """One core thread: how to tell it lives, whether it has work now, and when it last made progress."""

    name: str
    alive: Callable[[], bool]
    busy: Callable[[], bool]
    limit_s: float
    progress: Callable[[], float] | None = None  # its own record of progress (time.monotonic), if it keeps one
    last_progress: float = field(default_factory=time.monotonic)

    def stalled_for(self, now: float) -> float:
        """Seconds busy without progress; 0 while idle or progressing."""
        last = self.progress() if self.progress is not None else self.last_progress
        return max(0.0, now - last) if self.busy() else 0.0


class Watchdog:
    """Watches the registered threads from a thread of its own; `problem` is None while all is well and
    the first reason otherwise. `on_problem` is called once, when the first problem is seen; `on_healthy`
    after every check that finds all well, until then (systemd's watchdog pings)."""

    def __init__(self, on_problem: Callable[[str], None] = lambda reason: None,
                 on_healthy: Callable[[], None] = lambda: None) -> None:
        self.on_problem = on_problem
        self.on_healthy = on_healthy
        self.problem: str | None = None
        self._watched: dict[str, Watched] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inspector-watchdog", daemon=True)

    def watch(self, name: str, alive: Callable[[], bool], busy: Callable[[], bool], limit_s: float,
              progress: Callable[[], float] | None = None) -> None:
        self._watched[name] = Watched(name, alive, busy, limit_s, progress)

    def beat(self, name: str) -> None:
        """`name` made progress (cheap: one attribute write, safe from any thread)."""
        watched = self._watched.get(name)
        if watched is not None:
            watched.last_progress = time.monotonic()

    def stalls(self) -> dict[str, float]:
        """Seconds each thread has been busy without progress (0 while idle or progressing), for metrics."""
        now = time.monotonic()
        return {w.name: _safely(lambda w=w: w.stalled_for(now), 0.0) for w in self._watched.values()}

    def check(self) -> str | None:
        """The first problem now: a thread gone, or busy without progress past its limit."""
        now = time.monotonic()
        for watched in self._watched.values():
            if not _safely(watched.alive, True):
                return f"the {watched.name} thread has stopped"
            stalled = _safely(lambda w=watched: w.stalled_for(now), 0.0)
            if stalled > watched.limit_s:
                return (f"the {watched.name} thread has made no progress for {stalled:.0f} s with work waiting "
                        f"(limit {watched.limit_s:g} s)")
        return None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            try:
                problem = self.check()
            except Exception:  # noqa: BLE001 - the watchdog itself must not die
                log.exception("watchdog check failed")
                continue
            if problem is None and self.problem is None:
                try:
                    self.on_healthy()
                except Exception:  # noqa: BLE001 - a failing hook must not stop the checks
                    log.exception("the healthy-check hook failed")
            if problem is not None and self.problem is None:
                self.problem = problem
                log.error("unhealthy: %s; the worker exits so that its supervisor restarts it", problem)
                try:
                    self.on_problem(problem)
                except Exception:  # noqa: BLE001
                    log.exception("reacting to an unhealthy worker failed")


def _safely(probe: Callable[[], object], fallback: object) -> object:
    try:
        return probe()
    except Exception:  # noqa: BLE001 - a probe that fails says nothing; the next check asks again
        return fallback
