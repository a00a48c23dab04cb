"""AMQP topic patterns, checked and matched the way RabbitMQ's topic exchange does.

Used for `worker.binding_keys`, `worker.routes` and `inspector watch --filter`: one rule for what
a pattern may be, so a pattern the configuration accepts is one RabbitMQ binds as the user meant.
"""

from __future__ import annotations

from collections.abc import Sequence

PATTERN_RULE = "must be dot-separated words, each a name, '*' (one word) or '#' (any words)"


def check_pattern(pattern: str) -> str:
    """The pattern itself, or ValueError saying what a pattern must be."""
    words = pattern.split(".")
    if not pattern or any(not w or (("*" in w or "#" in w) and w not in ("*", "#")) for w in words):
        raise ValueError(PATTERN_RULE)
    return pattern


def matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: '*' is exactly one word, '#' zero or more."""

    def match(p: Sequence[str], k: Sequence[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), routing_key.split("."))
