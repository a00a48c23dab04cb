"""Micro-batches per model version: full batches go at once, a lone frame waits a bounded time."""

import pytest

from inspector.worker.batcher import Batcher


def test_batches_fill_or_time_out_per_model_version():
    batcher = Batcher(batch_size=3, max_wait_s=0.010)
    assert batcher.add(1, "a1", now=0.000) is None
    assert batcher.add(2, "b1", now=0.001) is None
    assert batcher.add(1, "a2", now=0.002) is None
    assert batcher.add(1, "a3", now=0.003) == ["a1", "a2", "a3"]  # full: goes at once
    assert batcher.next_deadline() == pytest.approx(0.011)
    assert batcher.due(now=0.0105) == []
    assert batcher.due(now=0.011) == [["b1"]]  # a lone frame waits max_wait_s at most
    assert batcher.next_deadline() is None and len(batcher) == 0


def test_a_batch_waits_longer_for_frames_still_being_decoded():
    batcher = Batcher(batch_size=4, max_wait_s=0.010, hold_s=0.200)
    batcher.add(1, "a1", now=0.0)
    assert batcher.next_deadline(decoding=True) == pytest.approx(0.210)
    assert batcher.due(now=0.050, decoding=True) == []  # more are coming: keep filling
    assert batcher.due(now=0.050, decoding=False) == [["a1"]]  # nothing more on its way: go
    batcher.add(1, "b1", now=0.3)
    assert batcher.due(now=0.511, decoding=True) == [["b1"]]  # never longer than the hold
