"""How much the broker thread takes and how long it waits: the prefetch that fits the byte budget, the
pause before a refused result's capture is requeued (and when to stop requeueing it), the pause before a
reconnect.

Pure decisions kept apart from the I/O thread that acts on them, as the ledger keeps the books apart:
nothing here knows pika, threads or the clock, so each rule is tested on its own (tests/test_pacing.py).
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque

FIRST_BACKOFF_S = 0.5  # the first pause of a reconnect or a requeue; doubled per round after it
NACK_BACKOFF_MAX_S = 30.0  # longest pause before a capture whose result the broker refused is requeued
MAX_RESULT_REFUSALS = 3  # a capture whose result the broker refused this often is dead-lettered, not requeued
REFUSALS_REMEMBERED = 4096  # frames whose refusals are counted (the oldest forgotten first)
SIZES_REMEMBERED = 64  # the prefetch follows the largest of this many recent capture bodies


def prefetch_for(configured: int, budget: int, largest: int) -> int:
    """The prefetch that keeps one window of deliveries within the byte budget: the broker sends up to
    this many captures before any is acked, and a pause cannot call back what is already on its way.
    Never over worker.prefetch, never under 1."""
    return max(1, min(configured, budget // max(1, largest)))


class RecentSizes:
    """The body sizes of the latest captures, which the prefetch follows."""

    def __init__(self, remembered: int = SIZES_REMEMBERED) -> None:
        self._sizes: deque[int] = deque(maxlen=remembered)

    def add(self, size: int) -> None:
        self._sizes.append(size)

    def largest(self) -> int:
        """The largest capture body of late; 1 before any, so the configured prefetch stands."""
        return max(self._sizes) if self._sizes else 1

    def prefetch(self, configured: int, budget: int) -> int:
        return prefetch_for(configured, budget, self.largest())


class Refusals:
    """Results the broker refused (a nack of a publish): how often per frame, and how long to wait before
    the captures are requeued. A frame is remembered until it is given up; at most `remembered` frames, the
    oldest forgotten first. The pause doubles with each refusal in a row and starts over once a batch of
    confirms comes back without one."""

    def __init__(self, limit: int = MAX_RESULT_REFUSALS, remembered: int = REFUSALS_REMEMBERED) -> None:
        self.limit = limit
        self.remembered = remembered
        self._counts: OrderedDict[str, int] = OrderedDict()  # frame id -> results refused so far
        self._streak = 0

    def refused(self, frame_id: str) -> tuple[int, bool]:
        """A result of this frame was refused: (refusals of it so far, True to requeue the capture again;
        False: give it up, and it is forgotten)."""
        count = self._counts.pop(frame_id, 0) + 1
        if count >= self.limit:
            return count, False
        self._counts[frame_id] = count
        while len(self._counts) > self.remembered:
            self._counts.popitem(last=False)
        return count, True

    def confirmed(self) -> None:
        """Results were confirmed and none refused: the next refusal waits the first pause again."""
        self._streak = 0

    def next_pause(self) -> float:
        """Seconds to wait before requeueing the captures refused now; each call counts one more in a row."""
        delay = min(NACK_BACKOFF_MAX_S, FIRST_BACKOFF_S * 2 ** min(self._streak, 16))
        self._streak += 1
        return delay


def reconnect_delay(attempt: int, nodes: int, longest_s: float) -> float:
    """Seconds to wait before connection attempt `attempt` + 1, over a cluster of `nodes`: the pause grows
    per round over every node (a failover to the next node comes quickly), and is jittered so a fleet of
    workers does not reconnect in step."""
    rounds = max(0, attempt - 1) // nodes
    delay = min(longest_s, FIRST_BACKOFF_S * 2 ** min(rounds, 16))
    return delay * random.uniform(0.5, 1.0)
