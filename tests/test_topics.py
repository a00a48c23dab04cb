"""Topic patterns: what the configuration and `watch --filter` accept, and matching as RabbitMQ does."""

import pytest

from inspector import topics
from inspector.config import RouteSettings, WorkerSettings
from inspector.errors import ConfigError
from inspector.tools.watch import check_filter


@pytest.mark.parametrize("pattern, key, expected", [
    ("line2.*", "line2.cam1", True), ("line2.*", "line2.cam1.x", False), ("line2.*", "line2", False),
    ("line2.#", "line2", True), ("line2.#", "line2.a.b", True), ("#", "anything.at.all", True),
    ("*.cam1", "line9.cam1", True), ("*.cam1", "line9.cam2", False), ("#.cam1", "a.b.cam1", True),
    ("line1.cam1", "line1.cam1", True), ("line1.cam1", "line1.cam10", False),
])
def test_topic_patterns_match_like_rabbitmq(pattern, key, expected):
    assert topics.matches(pattern, key) is expected


@pytest.mark.parametrize("pattern", ["", "line1.", ".cam1", "line1..cam1", "line*.cam1", "line1.cam#", "a.b*"])
def test_one_rule_refuses_a_bad_pattern_everywhere(pattern):
    with pytest.raises(ValueError, match="dot-separated words"):
        topics.check_pattern(pattern)
    with pytest.raises(ValueError, match="dot-separated words"):
        RouteSettings(match=pattern, model="default")
    with pytest.raises(ValueError, match="dot-separated words"):
        WorkerSettings(binding_keys=[pattern])
    with pytest.raises(ConfigError, match="--filter"):
        check_filter(pattern)


@pytest.mark.parametrize("pattern", ["#", "*", "line1.*", "line1.#", "*.cam1", "fail.#.cam2", "a-b.c_d"])
def test_one_rule_accepts_a_good_pattern_everywhere(pattern):
    assert topics.check_pattern(pattern) == pattern
    assert RouteSettings(match=pattern, model="default").match == pattern
    assert WorkerSettings(binding_keys=[pattern]).binding_keys == [pattern]
    assert check_filter(pattern) == pattern
