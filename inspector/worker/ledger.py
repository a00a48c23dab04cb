"""The books of the captures a worker holds: one entry per delivery, settled exactly once.

A delivery is taken (its body now held in memory), handed to the worker, answered with results that
are published and confirmed, and then acked or nacked; or it is dropped because the connection it came
on is gone, or refused and requeued. Whatever ends it, `end` releases its share of the budget (frames
and bytes) once and only once: a second `end` of the same entry is a no-op that says so. Budgets that
leak stop a worker for good while it looks healthy, so they live here and nowhere else.

Pure bookkeeping: nothing here knows pika, threads or time. The broker thread owns the ledger and
turns what it says (pause, resume, which tags to ack) into AMQP calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

HELD = "held"  # with the worker: decoding, batching or scoring
WAITING = "waiting"  # results published, confirms outstanding
REFUSED = "refused"  # the broker refused a result: requeued after a pause
ENDED = "ended"


@dataclass(eq=False)
class Entry:
    """One delivery on the books."""

    generation: int
    tag: int
    size: int
    state: str = HELD
    pending: int = 0  # publishes not yet confirmed
    nacked: bool = False  # one of its publishes was refused
    outcome: Any = None  # what the worker answered it with (the consumer's Outcome)
    ended_as: str | None = field(default=None, repr=False)


class Ledger:
    """Deliveries held, their budget, the publishes awaiting confirms, and the pause that follows.

    `max_bytes`: over this many body bytes held, `take` says pause; `end` says resume once the
    held bytes are back at or under `resume_share` of it. Tags are per connection, so entries are
    keyed by (generation, tag); `connected` starts a generation, and publish sequence numbers restart
    with it as the broker's do with each channel.
    """

    def __init__(self, max_bytes: int, resume_share: float = 0.75) -> None:
        if max_bytes < 1 or not 0 < resume_share <= 1:
            raise ValueError("max_bytes must be positive and resume_share in (0, 1]")
        self.max_bytes = max_bytes
        self.resume_share = resume_share
        self.generation = 0  # connections so far: 1 on the first, 2 after a reconnect, ...
        self.live = False  # the current generation's connection is open
        self.frames = 0
        self.bytes = 0
        self.paused = False
        self.released = 0  # entries ended so far (for tests and a sanity figure)
        self._entries: dict[tuple[int, int], Entry] = {}
        self._order: OrderedDict[int, Entry] = OrderedDict()  # this generation's unacked tags, in delivery order
        self._sequence = 0
        self._by_sequence: OrderedDict[int, Entry] = OrderedDict()  # publish sequence -> entry, this generation

    # -- the connection ----------------------------------------------------------------------

    def connected(self) -> int:
        """A new connection (and channel): a new generation; returns it."""
        self.generation += 1
        self.live = True
        self._order.clear()
        self._sequence = 0
        self._by_sequence.clear()
        return self.generation

    def lose_connection(self) -> list[Entry]:
        """The connection is gone: the broker requeues everything it delivered on it. Entries whose answer
        is already back (waiting for confirms, or refused) end now and are returned; entries still with the
        worker stay on the books until their answer comes back and is dropped as stale."""
        ended = [entry for entry in list(self._entries.values())
                 if entry.generation == self.generation and entry.state in (WAITING, REFUSED)]
        for entry in ended:
            self.end(entry, "lost")
        self.live = False  # nothing delivered on the lost connection is live any more
        self._order.clear()
        self._by_sequence.clear()
        self._sequence = 0
        return ended

    # -- a delivery's life -------------------------------------------------------------------

    def take(self, tag: int, size: int) -> tuple[Entry, bool]:
        """A delivery arrived on the current generation; (its entry, True when this crossed the budget
        and consuming must pause)."""
        key = (self.generation, tag)
        if not self.live:
            raise ValueError("a delivery taken with no connection open")
        if key in self._entries:
            raise ValueError(f"delivery tag {tag} taken twice on generation {self.generation}")
        entry = Entry(self.generation, tag, max(0, int(size)))
        self._entries[key] = entry
        self._order[tag] = entry
        self.frames += 1
        self.bytes += entry.size
        if not self.paused and self.bytes > self.max_bytes:
            self.paused = True
            return entry, True
        return entry, False

    def find(self, generation: int, tag: int) -> Entry | None:
        """The live entry of this delivery, or None when it has ended or came on a lost connection
        (an answer for it is stale: the broker redelivers the capture)."""
        entry = self._entries.get((generation, tag))
        if entry is None or not self.live or generation != self.generation or entry.state != HELD:
            return None
        return entry

    def held(self, generation: int, tag: int) -> Entry | None:
        """The entry of this delivery while it has not ended, whatever its generation."""
        return self._entries.get((generation, tag))

    def publish(self, entry: Entry) -> int:
        """One publish for `entry` goes out now; its sequence number (for the broker's confirm)."""
        if entry.state == ENDED or entry.generation != self.generation or not self.live:
            raise ValueError("publishing for a delivery that is not live on this connection")
        self._sequence += 1
        self._by_sequence[self._sequence] = entry
        entry.pending += 1
        entry.state = WAITING
        return self._sequence

    def next_sequence(self) -> int:
        """The sequence number the next publish on this connection will have."""
        return self._sequence + 1

    def by_sequence(self, sequence: int) -> Entry | None:
        """The entry a publish belonged to, while its confirm is outstanding."""
        return self._by_sequence.get(sequence)

    def confirm(self, sequence: int, multiple: bool, acked: bool) -> list[Entry]:
        """The broker confirmed (or, `acked` False, refused) publishes up to `sequence`; the entries whose
        every publish is now answered, in the order they completed."""
        answered: list[Entry] = []
        if multiple:
            while self._by_sequence and next(iter(self._by_sequence)) <= sequence:
                answered.append(self._by_sequence.popitem(last=False)[1])
        elif sequence in self._by_sequence:
            answered.append(self._by_sequence.pop(sequence))
        done: list[Entry] = []
        for entry in answered:
            if entry.state != WAITING:
                continue
            entry.pending -= 1
            entry.nacked = entry.nacked or not acked
            if entry.pending <= 0:
                done.append(entry)
        return done

    def refuse(self, entry: Entry) -> None:
        """A result of `entry` was refused: it waits to be requeued (still held, still on the budget)."""
        if entry.state != ENDED:  # its tag stays in the delivery order: no multiple ack may cover it
            entry.state = REFUSED

    def ack_plan(self, entries: Iterable[Entry]) -> tuple[int | None, bool, list[int]]:
        """How to ack these entries of the current generation in the fewest frames: (the last tag of the
        run at the head of the delivery order and whether it covers more than one, other tags alone)."""
        ackable = {entry.tag for entry in entries if entry.generation == self.generation and entry.state != ENDED}
        last, count = None, 0
        while self._order and next(iter(self._order)) in ackable:
            last = self._order.popitem(last=False)[0]
            ackable.discard(last)
            count += 1
        for tag in ackable:
            self._order.pop(tag, None)
        return last, count > 1, sorted(ackable)

    def unacked(self) -> int:
        """Deliveries of the current connection not yet acked or nacked."""
        return len(self._order)

    def end(self, entry: Entry, how: str) -> bool:
        """`entry`'s life is over (`how`: acked, nacked, requeued, stale, lost, ...): release its budget.
        True the first time; False, releasing nothing, for an entry already ended."""
        if entry.state == ENDED:
            return False
        entry.state, entry.ended_as = ENDED, how
        self._entries.pop((entry.generation, entry.tag), None)
        if entry.generation == self.generation:
            self._order.pop(entry.tag, None)
        self.frames -= 1
        self.bytes -= entry.size
        self.released += 1
        return True

    def should_resume(self) -> bool:
        """Paused, and the held bytes are back under the resume level: True once, and no longer paused."""
        if self.paused and self.bytes <= self.max_bytes * self.resume_share:
            self.paused = False
            return True
        return False

    def entries(self) -> list[Entry]:
        return list(self._entries.values())
