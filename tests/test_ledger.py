"""The consumer's books: every delivery's budget released exactly once, whatever ends it and in whatever order
deliveries, answers, confirms, refusals, connection losses and redeliveries come. No broker: the ledger is pure."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from inspector.worker.ledger import ENDED, HELD, REFUSED, WAITING, Ledger

BUDGET = 1000


def test_a_connection_lost_while_results_wait_for_confirms_releases_their_budget():
    """The leak that stalled a fleet: results published, the connection closed by a resource alarm before
    the confirms came. The broker redelivers those captures; their budget must not stay spent."""
    ledger = Ledger(BUDGET)
    ledger.connected()
    waiting = []
    for tag in range(1, 5):
        entry, _ = ledger.take(tag, 300)
        ledger.publish(entry)
        waiting.append(entry)
    assert ledger.paused and ledger.bytes == 1200
    ended = ledger.lose_connection()
    assert set(ended) == set(waiting) and ledger.frames == 0 and ledger.bytes == 0
    assert ledger.should_resume() and not ledger.paused
    ledger.connected()
    again, crossed = ledger.take(1, 300)  # the redelivery, under a new connection's tag
    assert not crossed and ledger.frames == 1 and ledger.bytes == 300


def test_an_answer_from_a_lost_connection_ends_its_delivery_once():
    ledger = Ledger(BUDGET)
    generation = ledger.connected()
    entry, _ = ledger.take(7, 100)
    assert ledger.lose_connection() == []  # still with the worker: ended when its answer comes back
    assert ledger.frames == 1
    ledger.connected()
    assert ledger.find(generation, 7) is None  # stale
    assert ledger.held(generation, 7) is entry
    assert ledger.end(entry, "stale") is True
    assert ledger.end(entry, "stale") is False
    assert ledger.frames == 0 and ledger.bytes == 0


def test_acks_coalesce_only_over_a_run_at_the_head_of_the_delivery_order():
    ledger = Ledger(BUDGET)
    ledger.connected()
    entries = [ledger.take(tag, 1)[0] for tag in range(1, 6)]
    assert ledger.ack_plan([entries[0], entries[1], entries[3]]) == (2, True, [4])
    assert ledger.ack_plan([entries[4]]) == (None, False, [5])  # 3 is still held: no multiple ack over it


def test_a_refused_entry_stays_a_barrier_for_multiple_acks():
    ledger = Ledger(BUDGET)
    ledger.connected()
    first, second = ledger.take(1, 1)[0], ledger.take(2, 1)[0]
    ledger.publish(first)
    ledger.publish(second)
    assert ledger.confirm(1, False, False) == [first] and first.nacked
    ledger.refuse(first)
    assert ledger.confirm(2, False, True) == [second]
    assert ledger.ack_plan([second]) == (None, False, [2])


def test_a_multiple_confirm_answers_every_publish_up_to_it():
    ledger = Ledger(BUDGET)
    ledger.connected()
    one, two = ledger.take(1, 1)[0], ledger.take(2, 1)[0]
    ledger.publish(one)
    ledger.publish(one)  # a result and its dead letter
    ledger.publish(two)
    assert ledger.confirm(2, True, True) == [one]
    assert ledger.confirm(3, True, True) == [two]


@pytest.mark.parametrize("max_bytes, share", [(0, 0.5), (10, 0.0), (10, 1.5)])
def test_nonsense_budgets_are_refused(max_bytes, share):
    with pytest.raises(ValueError):
        Ledger(max_bytes, share)


class LedgerMachine(RuleBasedStateMachine):
    """Any interleaving of what the broker and the worker do. The model: which entries were taken, which
    ended, and what each one holds."""

    @initialize()
    def start(self):
        self.ledger = Ledger(BUDGET, 0.75)
        self.taken = []  # every entry ever taken
        self.released = {}  # id(entry) -> times `end` returned True
        self.next_tag = 1
        self.ledger.connected()

    def _live(self, state=None):
        return [e for e in self.taken if e.state != ENDED and (state is None or e.state == state)]

    def _end(self, entry, how):
        if self.ledger.end(entry, how):
            self.released[id(entry)] = self.released.get(id(entry), 0) + 1

    @precondition(lambda self: self.ledger.live)
    @rule(size=st.integers(0, 600))
    def deliver(self, size):
        before = self.ledger.paused
        entry, crossed = self.ledger.take(self.next_tag, size)
        self.next_tag += 1
        self.taken.append(entry)
        assert crossed == (not before and self.ledger.bytes > BUDGET)

    @precondition(lambda self: any(e.state == HELD for e in self.taken))
    @rule(data=st.data(), publishes=st.integers(0, 2))
    def answer(self, data, publishes):
        """The worker answers a delivery: published once or twice (result, dead letter), or rejected (0),
        or, when its connection is gone, dropped as stale."""
        entry = data.draw(st.sampled_from(self._live(HELD)))
        if self.ledger.find(entry.generation, entry.tag) is None:
            assert self.ledger.held(entry.generation, entry.tag) is entry
            self._end(entry, "stale")
        elif publishes == 0:
            self._end(entry, "dead-lettered")
        else:
            for _ in range(publishes):
                self.ledger.publish(entry)

    @precondition(lambda self: any(e.state == WAITING for e in self.taken) and self.ledger.live)
    @rule(data=st.data(), multiple=st.booleans(), acked=st.booleans())
    def confirm(self, data, multiple, acked):
        sequence = data.draw(st.integers(1, max(1, self.ledger.next_sequence() - 1)))
        done = self.ledger.confirm(sequence, multiple, acked)
        assert all(e.state == WAITING and e.pending == 0 for e in done)
        good = [e for e in done if not e.nacked]
        for entry in done:
            if entry.nacked:
                self.ledger.refuse(entry)
        last, _multiple, alone = self.ledger.ack_plan(good)
        acked_tags = set(alone) | ({last} if last is not None else set())
        assert acked_tags <= {e.tag for e in good}
        for entry in good:
            self._end(entry, "acked")

    @precondition(lambda self: any(e.state == REFUSED for e in self.taken))
    @rule(data=st.data())
    def requeue(self, data):
        self._end(data.draw(st.sampled_from(self._live(REFUSED))), "requeued")

    @precondition(lambda self: self.ledger.live)
    @rule()
    def lose_connection(self):
        for entry in self.ledger.lose_connection():
            self.released[id(entry)] = self.released.get(id(entry), 0) + 1
        self.ledger.should_resume()

    @precondition(lambda self: not self.ledger.live)
    @rule()
    def reconnect(self):
        self.ledger.connected()

    @precondition(lambda self: bool(self.taken))
    @rule(data=st.data())
    def end_twice(self, data):
        """A second end of anything already ended releases nothing."""
        entry = data.draw(st.sampled_from(self.taken))
        if entry.state == ENDED:
            assert self.ledger.end(entry, "again") is False

    @rule()
    def resume_check(self):
        was = self.ledger.paused
        resumed = self.ledger.should_resume()
        if was and self.ledger.bytes <= BUDGET * 0.75:
            assert resumed and not self.ledger.paused
        else:
            assert not resumed

    @invariant()
    def budgets_match_what_is_held(self):
        if not hasattr(self, "ledger"):
            return
        live = self._live()
        assert self.ledger.frames == len(live) >= 0
        assert self.ledger.bytes == sum(e.size for e in live) >= 0
        assert all(count == 1 for count in self.released.values())
        assert len(self.released) == len(self.taken) - len(live)
        assert self.ledger.unacked() <= len(live)

    def teardown(self):
        """Drain: the connection goes, every answer comes back. Nothing may remain on the books."""
        if not hasattr(self, "ledger"):
            return
        if self.ledger.live:
            self.lose_connection()
        for entry in self._live(HELD):
            self._end(entry, "stale")
        assert self.ledger.frames == 0 and self.ledger.bytes == 0
        assert not self.ledger.entries()
        assert all(count == 1 for count in self.released.values()) and len(self.released) == len(self.taken)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
