"""Micro-batches per model version: the scoring thread's only policy decision, kept pure so it is
tested without threads, clocks or a broker."""

from __future__ import annotations


class Batcher:
    """Groups prepared frames by the model version that prepared them. A group goes when it holds
    `batch_size` frames, or when its oldest frame has waited `max_wait_s` and no more frames are on
    their way; while frames are still being decoded it waits for them up to `hold_s` longer.

    The hold is what keeps batches full under a backlog on a small CPU: inference takes the cores,
    decoding trickles, and a plain timer would send batches of one, far below the throughput of full
    batches (`inspector bench --batch-size N` shows the difference on a machine). An idle line still
    sends a lone frame after `max_wait_s`.
    """

    def __init__(self, batch_size: int, max_wait_s: float, hold_s: float = 0.0) -> None:
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.hold_s = hold_s
        self._groups: dict[int, list] = {}
        self._since: dict[int, float] = {}

    def add(self, key: int, item: object, now: float) -> list | None:
        group = self._groups.setdefault(key, [])
        if not group:
            self._since[key] = now
        group.append(item)
        return self._take(key) if len(group) >= self.batch_size else None

    def due(self, now: float, decoding: bool = False) -> list[list]:
        wait = self._wait(decoding)
        return [self._take(key) for key, since in list(self._since.items()) if now >= since + wait]

    def next_deadline(self, decoding: bool = False) -> float | None:
        return min(self._since.values()) + self._wait(decoding) if self._since else None

    def drain(self) -> list[list]:
        return [self._take(key) for key in list(self._groups)]

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def _wait(self, decoding: bool) -> float:
        return self.max_wait_s + (self.hold_s if decoding else 0.0)

    def _take(self, key: int) -> list:
        self._since.pop(key, None)
        return self._groups.pop(key)
