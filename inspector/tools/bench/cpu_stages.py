"""Where the frame path's CPU goes: thread CPU time per stage, measured inside a worker the bench runs.

Only the bench turns this on, for one saturation run: a `CpuStages` is the stage hooks (worker/hooks.py) of
the worker it runs, told on each thread when a stage of a frame begins and ends, and it reads that thread's
CPU clock then; a worker outside the bench has no hooks and runs none of it. Each thread's own CPU clock
(`pthread_getcpuclockid`) gives that thread's total, so what no stage covers is its remainder: on the
broker thread that is pika reading, parsing and writing frames; on the scoring thread, the batching.
Stages nest (hand-off inside consume, settled inside ack), and each counts only its own time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from inspector.worker import hooks
from inspector.worker.hooks import StageHooks

# (stage, thread, what it covers), in the order a frame passes. The remainder stages are each thread's CPU
# less the hooked stages timed on it; the others are the worker's stage hooks (hooks.STAGES).
_REMAINDERS = {"broker": "pika I/O", "decode": "decode other", "score": "batch"}
_THREAD_OF = {"consume": "broker", "hand-off": "broker", "parse": "decode", "decode": "decode", "prepare": "decode",
              "score": "score", "result encode": "score", "publish": "broker", "confirm": "broker", "ack": "broker",
              "settled": "broker"}
_ORDER = ("consume", "hand-off", "parse", "decode", "prepare", "decode other", "batch", "score", "result encode",
          "publish", "confirm", "ack", "settled", "pika I/O")
_REMAINDER_TEXT = {
    "decode other": "the decode threads' remainder: model choice, metrics, queueing",
    "batch": "the scoring thread's remainder: queue, batcher, stack, hand-off to the broker thread",
    "pika I/O": "the broker thread's remainder: pika reading, parsing and writing frames, the IOLoop",
}
STAGES: tuple[tuple[str, str, str], ...] = tuple(
    (stage, _THREAD_OF[stage], hooks.STAGES[stage]) if stage in hooks.STAGES
    else (stage, next(role for role, name in _REMAINDERS.items() if name == stage), _REMAINDER_TEXT[stage])
    for stage in _ORDER
)
_THREADS = (("inspector-broker", "broker"), ("inspector-decode", "decode"), ("inspector-score", "score"))


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every live thread so far, by ident: (name, seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            out[thread.ident] = (thread.name, time.clock_gettime(time.pthread_getcpuclockid(thread.ident)))
        except (OSError, ProcessLookupError):  # it ended in between
            continue
    return out


def _role(name: str) -> str | None:
    return next((role for prefix, role in _THREADS if name.startswith(prefix)), None)


class CpuStages(StageHooks):
    """The stage hooks of one worker (`Worker(settings, hooks=CpuStages())`), read after its run (`figures`).
    The counts start when the worker has connected, before its first delivery."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds: dict[str, float] = {}
        self.by_role: dict[str, float] = {}  # the stages' own time, by the role of the thread that ran them
        self.calls = 0
        self._baseline: dict[int, tuple[str, float]] = {}
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.seconds = {stage: 0.0 for stage, _, _ in STAGES}
            self.by_role = {role: 0.0 for role in _REMAINDERS}
            self.calls = 0
            self._baseline = thread_cpu()

    def connection(self, up: bool, generation: int) -> None:
        if up and generation == 1:
            self.reset()  # on the broker thread, before the first delivery is read

    def begin(self, stage: str) -> None:
        local = self._local
        stack = getattr(local, "stack", None)
        if stack is None:
            stack = local.stack = []
            local.role = _role(threading.current_thread().name)
        stack.append([time.thread_time(), 0.0])  # [started, time of the stages nested in it]

    def end(self, stage: str) -> None:
        local = self._local
        started, inner = local.stack.pop()
        spent = time.thread_time() - started
        if local.stack:
            local.stack[-1][1] += spent
        own = spent - inner
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + own
            if local.role is not None:
                self.by_role[local.role] += own
            self.calls += 1

    def figures(self, frames: int) -> dict[str, Any]:
        """Microseconds of CPU per frame: per stage, per thread, the path's total and that total less the
        decode of the image itself; plus the wrappers' own cost. Read while the worker's threads still run."""
        now = thread_cpu()
        threads = {"broker": 0.0, "decode": 0.0, "score": 0.0}
        for ident, (name, seconds) in now.items():
            role = _role(name)
            if role is not None:
                threads[role] += seconds - self._baseline.get(ident, (name, 0.0))[1]
        collector = sum(s - self._baseline.get(i, (n, 0.0))[1] for i, (n, s) in now.items() if n == "bench-collector")
        with self._lock:
            stages = dict(self.seconds)
            by_role = dict(self.by_role)
            calls = self.calls
        for role, remainder in _REMAINDERS.items():
            stages[remainder] = max(0.0, threads[role] - by_role[role])
        per_frame = 1e6 / max(1, frames)
        total = sum(threads.values())
        return {
            "stages_us": {stage: round(stages[stage] * per_frame, 1) for stage, _, _ in STAGES},
            "threads_us": {role: round(seconds * per_frame, 1) for role, seconds in threads.items()},
            "total_us": round(total * per_frame, 1),
            "without_image_decode_us": round((total - stages["decode"]) * per_frame, 1),
            "collector_us": round(collector * per_frame, 1),
            "wrapped_calls_per_frame": round(calls / max(1, frames), 2),
            "wrapper_us_per_call": round(wrapper_cost() * 1e6, 2),
        }


def wrapper_cost(calls: int = 20000) -> float:
    """CPU seconds one timed stage adds (a no-op through the hooks, less the no-op alone): what the figures
    carry extra."""
    probe = CpuStages()

    def nothing() -> None:
        return None

    started = time.thread_time()
    for _ in range(calls):
        nothing()
    bare = time.thread_time() - started
    started = time.thread_time()
    for _ in range(calls):
        hooks.timed(probe, "consume", nothing)
    return max(0.0, (time.thread_time() - started - bare) / calls)
