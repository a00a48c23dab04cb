"""Progress of a long command: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Counts items done out of `total`; a tqdm bar (rate, time left) when stderr is a terminal."""

    def __init__(self, total: int, label: str, interval_s: float = 15.0) -> None:
        self.total = total
        self.label = label
        self.interval_s = interval_s
        self.done = 0
        self.bar = tqdm(total=total, desc=label, unit="img", dynamic_ncols=True) if sys.stderr.isatty() else None
        self.started = self.last_log = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last_log >= self.interval_s:
            self.last_log = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d images, %.1f images/s, about %s left", self.label, self.done, self.total, rate,
                     _duration(left))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
