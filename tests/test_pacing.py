"""The broker thread's pacing rules on their own: the prefetch follows the latest capture sizes, a refused
result's capture is requeued after a doubling pause and given up after MAX_RESULT_REFUSALS, and reconnects
back off per round over the cluster. No broker, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inspector.worker import pacing
from inspector.worker.pacing import RecentSizes, Refusals, reconnect_delay


@given(st.lists(st.integers(min_value=0, max_value=10_000_000), max_size=200))
def test_the_prefetch_follows_the_largest_of_the_latest_sizes(sizes):
    recent = RecentSizes(remembered=64)
    for size in sizes:
        recent.add(size)
    window = sizes[-64:]
    largest = max(window) if window else 1
    assert recent.largest() == largest
    assert recent.prefetch(64, 1_000_000) == max(1, min(64, 1_000_000 // max(1, largest)))


def test_a_refused_frame_is_requeued_until_its_last_refusal_then_forgotten():
    refusals = Refusals(limit=3)
    assert [refusals.refused("f1") for _ in range(3)] == [(1, True), (2, True), (3, False)]
    assert refusals.refused("f1") == (1, True)  # given up: counted afresh if it comes back


def test_only_the_latest_refused_frames_are_remembered():
    refusals = Refusals(limit=3, remembered=2)
    for frame in ("a", "b", "c"):
        refusals.refused(frame)
    assert refusals.refused("a") == (1, True)  # the oldest was forgotten
    assert refusals.refused("c") == (2, True)


def test_the_pause_before_a_requeue_doubles_while_refusals_go_on_and_starts_over_after_a_confirm():
    refusals = Refusals()
    pauses = [refusals.next_pause() for _ in range(10)]
    assert pauses == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    refusals.confirmed()
    assert refusals.next_pause() == 0.5


@pytest.mark.parametrize(("attempt", "nodes", "base"), [
    (0, 1, 0.5), (1, 1, 0.5), (2, 1, 1.0), (3, 1, 2.0), (8, 1, 30.0),  # one node: doubles per attempt, capped
    (1, 3, 0.5), (3, 3, 0.5), (4, 3, 1.0), (7, 3, 2.0),  # three nodes: each round over them waits the same
    (10_000, 2, 30.0),
])
def test_a_reconnect_backs_off_per_round_over_the_nodes_with_jitter(monkeypatch, attempt, nodes, base):
    monkeypatch.setattr(pacing.random, "uniform", lambda low, high: high)
    assert reconnect_delay(attempt, nodes, longest_s=30.0) == base
    monkeypatch.setattr(pacing.random, "uniform", lambda low, high: low)
    assert reconnect_delay(attempt, nodes, longest_s=30.0) == base / 2
