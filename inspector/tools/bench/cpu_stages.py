"""Where the frame path's CPU goes: thread CPU time per stage, measured inside a worker the bench runs.

Only the bench turns this on, for one saturation run: it wraps the functions each stage runs (methods of
that worker's consumer, the functions the worker's loop calls, the plugin's class) with a thread-CPU clock,
and puts them back afterwards; a worker outside the bench runs none of it. Each thread's own CPU clock
(`pthread_getcpuclockid`) gives that thread's total, so what no wrapper covers is its remainder: on the
broker thread that is pika reading, parsing and writing frames; on the scoring thread, the batching.
Wrapped calls nest (an ack inside a confirm), and each stage counts only its own time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from inspector.worker import loop

# (stage, thread, what it covers), in the order a frame passes. A stage marked REMAINDER is its thread's CPU
# less the wrapped stages on that thread.
REMAINDER = "remainder"
STAGES: tuple[tuple[str, str, str], ...] = (
    ("consume", "broker", "Consumer._on_message: a delivery taken from pika"),
    ("hand-off", "broker", "Worker._on_delivery: counts, byte budget, submit to the decode pool"),
    ("parse", "decode", "messages.parse_capture"),
    ("decode", "decode", "decode_capture: the image itself"),
    ("prepare", "decode", "plugin.prepare"),
    ("decode other", "decode", "the decode threads' remainder: model choice, metrics, queueing"),
    ("batch", "score", "the scoring thread's remainder: queue, batcher, stack, hand-off to the broker thread"),
    ("score", "score", "plugin.score"),
    ("result encode", "score", "result_body, encode, result_routing_key"),
    ("publish", "broker", "Consumer._publish: each result's properties and basic_publish"),
    ("confirm", "broker", "Consumer._on_confirm: publisher confirms matched to captures"),
    ("ack", "broker", "Consumer._settle: basic_ack"),
    ("settled", "broker", "Worker._on_settled: the frame's metrics"),
    ("pika I/O", "broker", "the broker thread's remainder: pika reading, parsing and writing frames, the IOLoop"),
)
_REMAINDERS = {"broker": "pika I/O", "decode": "decode other", "score": "batch"}
_CONSUMER = (("_on_message", "consume"), ("on_delivery", "hand-off"), ("_publish", "publish"),
             ("_on_confirm", "confirm"), ("_settle", "ack"), ("on_settled", "settled"))
_LOOP = (("parse_capture", "parse"), ("decode_capture", "decode"), ("result_body", "result encode"),
         ("encode", "result encode"), ("result_routing_key", "result encode"))
_PLUGIN = (("prepare", "prepare"), ("score", "score"))
_THREADS = (("inspector-broker", "broker"), ("inspector-decode", "decode"), ("inspector-score", "score"))
_MISSING = object()


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


class CpuStages:
    """Installed on one worker before it starts (`install`), read after its run (`figures`), then `restore`d.
    The counts start when the worker has connected, before its first delivery."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._undo: list[tuple[Any, str, Any]] = []
        self.seconds: dict[str, float] = {}
        self.calls = 0
        self._baseline: dict[int, tuple[str, float]] = {}

    def reset(self) -> None:
        with self._lock:
            self.seconds = {stage: 0.0 for stage, _, _ in STAGES}
            self.calls = 0
            self._baseline = thread_cpu()

    def wrap(self, stage: str, function: Callable) -> Callable:
        """`function`, counting its thread CPU time (less that of wrapped calls inside it) to `stage`."""
        clock, local, lock = time.thread_time, self._local, self._lock

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = getattr(local, "inner", None)
            local.inner = 0.0
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent = clock() - started
                inner = local.inner
                local.inner = None if outer is None else outer + spent
                with lock:
                    self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - inner
                    self.calls += 1

        return timed

    def _patch(self, owner: Any, attribute: str, stage: str) -> None:
        original = getattr(owner, attribute, _MISSING)
        if not callable(original):
            raise AttributeError(f"the bench's CPU stages expect {owner!r}.{attribute}; the worker changed")
        own = vars(owner).get(attribute, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        self._undo.append((owner, attribute, own))
        setattr(owner, attribute, self.wrap(stage, original))

    def install(self, worker: Any, plugin: type) -> None:
        """Wrap the stages of this worker, not yet started (its consumer's methods, the loop's functions), and
        of the plugin class it serves."""
        consumer = worker.consumer
        self.reset()
        for attribute, stage in _CONSUMER:
            self._patch(consumer, attribute, stage)
        for attribute, stage in _LOOP:
            self._patch(loop, attribute, stage)
        for attribute, stage in _PLUGIN:
            self._patch(plugin, attribute, stage)
        connected = consumer.on_connection

        def on_connection(up: bool) -> None:
            if up and consumer.generation == 1:
                self.reset()  # on the broker thread, before the first delivery is read
            connected(up)

        self._undo.append((consumer, "on_connection", vars(consumer).get("on_connection", _MISSING)))
        consumer.on_connection = on_connection

    def restore(self) -> None:
        for owner, attribute, own in reversed(self._undo):
            if own is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)
        self._undo.clear()

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
            calls = self.calls
        for role, remainder in _REMAINDERS.items():
            wrapped = sum(stages[stage] for stage, thread, _ in STAGES if thread == role and stage != remainder)
            stages[remainder] = max(0.0, threads[role] - wrapped)
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
    """CPU seconds one wrapped call adds (a no-op wrapped, less the no-op alone): what the figures carry extra."""
    probe = CpuStages()
    probe.reset()

    def nothing() -> None:
        return None

    timed = probe.wrap("consume", nothing)
    started = time.thread_time()
    for _ in range(calls):
        nothing()
    bare = time.thread_time() - started
    started = time.thread_time()
    for _ in range(calls):
        timed()
    return max(0.0, (time.thread_time() - started - bare) / calls)
