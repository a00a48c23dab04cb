"""Grouping images of one part, and folds and hold-outs that keep a part's images together."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inspector.errors import ConfigError
from inspector.tools import groups
from inspector.tools.refit import FoldPlan, auto_folds, kfold, split_held_out


def test_a_file_name_pattern_groups_the_frames_of_one_part():
    names = ["day1/p001_f0.png", "day1/p001_f1.png", "day2/p002_f0.png", "notes/other.png", "day2/p001_f2.png"]
    parts = groups.by_pattern(names, r"(?P<part>p\d+)_f\d+")
    assert parts == ["p001", "p001", "p002", None, "p001"]
    found = groups.group(len(names), {"pattern": parts})
    assert found.labels.tolist() == [0, 0, 1, 2, 0]
    assert (found.groups, found.with_twin, found.merged_by) == (3, 3, {"pattern": 2})


def test_a_pattern_without_a_part_group_or_broken_is_a_clear_error():
    with pytest.raises(ConfigError, match="named group `part`"):
        groups.by_pattern(["a.png"], r"p\d+")
    with pytest.raises(ConfigError, match="not a regular expression"):
        groups.by_pattern(["a.png"], r"(?P<part>")


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_a_sidecar_names_each_images_part(tmp_path, kind):
    names = ["a/1.png", "a/2.png", "b/3.png", "b/4.png"]
    if kind == "csv":
        path = tmp_path / "parts.csv"
        path.write_text("image,part\na/1.png,X\n./a/2.png, X\nb/3.png,Y\n")
    else:
        path = tmp_path / "parts.json"
        path.write_text(json.dumps({"a/1.png": "X", "a/2.png": "X", "b/3.png": 7}))
    parts = groups.by_sidecar(names, groups.read_sidecar(path))
    assert parts == ["X", "X", "Y" if kind == "csv" else "7", None]
    assert groups.group(4, {"sidecar": parts}).labels.tolist() == [0, 0, 1, 2]


def test_a_bad_sidecar_is_a_clear_error(tmp_path):
    path = tmp_path / "parts.csv"
    path.write_text("file,name\na,b\n")
    with pytest.raises(ConfigError, match="`image` and `part` columns"):
        groups.read_sidecar(path)
    (tmp_path / "parts.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="one JSON object"):
        groups.read_sidecar(tmp_path / "parts.json")
    with pytest.raises(ConfigError, match="cannot be read"):
        groups.read_sidecar(tmp_path / "missing.csv")


def test_capture_time_blocks_join_bursts_of_triggers():
    times = [100.0, 100.4, 107.0, 100.9, 200.0, 207.5]
    assert groups.capture_blocks(times, 1.0) == [0, 0, 1, 0, 2, 3]
    found = groups.group(6, {"capture_time": groups.capture_blocks(times, 1.0)})
    assert found.labels.tolist() == [0, 0, 1, 0, 2, 3]


def test_sources_join_by_union_find():
    found = groups.group(5, {"pattern": ["a", "a", None, None, None]}, {"embeddings": [(1, 2), (3, 4)]})
    assert found.labels.tolist() == [0, 0, 0, 1, 1]
    assert found.merged_by == {"pattern": 1, "embeddings": 2}


def _parts(n: int, d: int, seed: int) -> np.ndarray:
    """Distinct parts: independent draws, the way distinct good parts spread in feature space."""
    return np.random.default_rng(seed).normal(size=(n, d))


def test_near_copies_are_twins_and_distinct_parts_are_not():
    parts = _parts(60, 32, 0)
    rng = np.random.default_rng(1)
    copies = parts[:20] + rng.normal(scale=0.02, size=(20, 32))  # a re-encoded copy: a small change everywhere
    rows = np.concatenate([parts, copies])
    assert groups.twins(parts) == []
    assert groups.twins(rows) == [(i, 60 + i) for i in range(20)]
    # four frames of a part: all in one group
    frames = np.concatenate([parts, *(parts[:5] + rng.normal(scale=0.02, size=(5, 32)) for _ in range(3))])
    labels = groups.group(len(frames), pairs={"embeddings": groups.twins(frames)}).labels
    assert groups.Grouping(labels).groups == 60
    for j in range(5):
        assert len(set(labels[[j, 60 + j, 65 + j, 70 + j]])) == 1


def _folds_are_groups(folds, labels, n):
    assert sorted(np.concatenate(folds).tolist()) == list(range(n))
    fold_of = np.empty(n, dtype=int)
    for j, fold in enumerate(folds):
        fold_of[fold] = j
    for g in np.unique(labels):
        assert len(set(fold_of[labels == g])) == 1, f"group {g} straddles folds"


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=6, max_size=60), k=st.integers(2, 6), seed=st.integers(0, 99))
def test_no_group_straddles_folds_and_sizes_stay_within_a_group(sizes, k, seed):
    labels = np.repeat(np.random.default_rng(seed).permutation(len(sizes)), sizes)
    labels = groups.group(len(labels), {"p": labels.tolist()}).labels
    k = min(k, len(sizes))
    folds = groups.group_folds(labels, k, seed)
    _folds_are_groups(folds, labels, len(labels))
    ideal = len(labels) / k
    assert all(abs(len(f) - ideal) <= 2 * max(sizes) for f in folds)
    held = split_held_out([f"{i}" for i in range(len(labels))], 0.3, seed, labels)[1]
    held_groups = {labels[int(i)] for i in held}
    assert all((labels[int(i)] in held_groups) == (i in set(held)) for i in map(str, range(len(labels))))


@pytest.mark.parametrize(("n", "k", "seed"), [(40, 5, 0), (41, 5, 3), (652, 10, 7)])
def test_singleton_groups_fold_as_before(n, k, seed):
    labels = np.arange(n)
    assert [f.tolist() for f in groups.group_folds(labels, k, seed)] == [f.tolist() for f in kfold(n, k, seed)]
    paths = [f"{i}" for i in range(n)]
    order = np.random.default_rng(seed).permutation(n)
    assert split_held_out(paths, 0.2, seed, labels)[1] == [paths[i] for i in sorted(order[: round(n * 0.2)])]


def test_time_order_folds_are_contiguous_in_time():
    times = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 0.0, 7.0]
    folds = groups.group_folds(np.arange(8), 4, 0, times)
    assert [sorted(times[i] for i in f) for f in folds] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]


def test_fold_plan_joins_measured_twins_and_counts_folds():
    parts = _parts(30, 16, 2)
    rows = np.concatenate([parts, parts[:10] + 0.01])
    plan = FoldPlan({}, 0, 0)
    folds = plan.folds(40, rows, np.arange(40))
    assert plan.grouping.groups == 30 and plan.grouping.with_twin == 20
    assert len(folds) == auto_folds(40, 30) == 20
    _folds_are_groups(folds, plan.grouping.labels, 40)
    assert (auto_folds(99, 99), auto_folds(100, 100), auto_folds(999, 999), auto_folds(1000, 1000)) == (20, 10, 10, 5)
    with pytest.raises(Exception, match="groups of the same part"):
        FoldPlan({"p": ["a"] * 20 + ["b"] * 20}, 5, 0).folds(40)


def test_mtimes_drive_capture_blocks(tmp_path):
    """Real files: capture_blocks over os.stat's mtimes."""
    paths = []
    for i, t in enumerate([1000, 1000.5, 1100, 1100.2, 1300]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x")
        os.utime(path, (t, t))
        paths.append(path)
    assert groups.capture_blocks([p.stat().st_mtime for p in paths], 2.0) == [0, 0, 1, 1, 2]
