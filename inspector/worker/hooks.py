"""Stage hooks: how a profiler or a test watches the frame path without reaching into the worker.

The worker and its consumer call `begin(stage)` and `end(stage)` around each stage a frame passes, on the
thread that does that work, and `connection(up, generation)` as the broker connection comes and goes
(dramatiq's middleware is the model). `inspector bench` times the stages with a thread-CPU clock; a test
may count them, or hold a stage to make a race happen when it wants.

Without hooks (the default, `hooks=None`) nothing is wrapped: the marked methods and the functions the worker
binds at construction are the plain ones, so an unwatched worker pays nothing per frame. A hook that raises
is logged, once per hook and stage, and the frame goes on: watching must not change what is watched.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

# stage -> what it covers, in the order a frame passes them; the one list of stages, the bench's is derived
STAGES: dict[str, str] = {
    "consume": "the consumer takes a delivery from the broker and hands it to the worker",
    "hand-off": "the worker counts the delivery and submits it to the decode pool",
    "parse": "the capture read from the delivery (messages.parse_capture)",
    "decode": "the image itself (decode.decode_capture)",
    "prepare": "the plugin's prepare",
    "score": "the plugin's score (or explain) on a batch, and the checks of its scores",
    "result encode": "a result's body, its encoding and its routing key",
    "publish": "the consumer publishes a batch of results (and dead letters)",
    "confirm": "the broker's publisher confirms matched to their captures",
    "ack": "the captures whose results are confirmed are acked",
    "settled": "the worker records a settled frame (its metrics)",
}

F = TypeVar("F", bound=Callable[..., Any])


class StageHooks:
    """Subclass and override what you need; here every method does nothing. Calls come from the worker's
    threads (broker, decode, scoring) at once, so a hook that keeps state guards it itself."""

    def begin(self, stage: str) -> None:
        """The calling thread starts `stage` (one of STAGES). Stages nest: hand-off runs inside consume."""

    def end(self, stage: str) -> None:
        """The calling thread is done with `stage`, whether it succeeded or raised."""

    def connection(self, up: bool, generation: int) -> None:
        """The broker connection opened (`up`, its generation: 1, then 2 after a reconnect, ...) or was lost;
        called on the broker thread before any delivery of that connection."""


def staged(stage: str) -> Callable[[F], F]:
    """Mark a method as the work of `stage`. The method is left as it is: `watch(owner, hooks)`, called in
    its object's constructor, puts it between `hooks.begin` and `hooks.end` on that object only, and only
    when there are hooks, so an unwatched worker runs exactly the code it would without them."""
    _check(stage)

    def mark(method: F) -> F:
        method.__stage__ = stage  # type: ignore[attr-defined]
        return method

    return mark


def watch(owner: Any, hooks: StageHooks | None) -> None:
    """Put each method of `owner` marked with `staged` between `hooks.begin` and `hooks.end` (on this
    instance only); with no hooks, nothing."""
    if hooks is None:
        return
    seen: set[str] = set()
    for cls in type(owner).__mro__:
        for name, member in vars(cls).items():
            stage = getattr(member, "__stage__", None)
            if name in seen or stage is None:
                continue
            seen.add(name)
            setattr(owner, name, functools.partial(timed, hooks, stage, getattr(owner, name)))


def watched(hooks: StageHooks | None, stage: str, function: F) -> F:
    """`function` as the work of `stage`: itself when there are no hooks, else wrapped in begin and end."""
    _check(stage)
    if hooks is None:
        return function
    return functools.partial(timed, hooks, stage, function)  # type: ignore[return-value]


def timed(hooks: StageHooks | None, stage: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` as the work of `stage`, between `hooks.begin` and `hooks.end`."""
    if hooks is None:
        return function(*args, **kwargs)
    return _around(hooks, stage, function, *args, **kwargs)


def tell(hooks: StageHooks | None, event: str, *args: Any) -> None:
    """Call `hooks.<event>(*args)`, logging a failure instead of raising it."""
    if hooks is not None:
        _safely(hooks, event, *args)


def _around(hooks: StageHooks, stage: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    _safely(hooks, "begin", stage)
    try:
        return function(*args, **kwargs)
    finally:
        _safely(hooks, "end", stage)


_reported: set[tuple[int, str, str]] = set()  # (hooks, method, stage) whose failure was logged with its traceback


def _safely(hooks: StageHooks, method: str, *args: Any) -> None:
    try:
        getattr(hooks, method)(*args)
    except Exception:  # noqa: BLE001 - a hook's bug is the hook's; the frame goes on
        key = (id(hooks), method, str(args[0]) if args else "")
        if key in _reported:
            log.debug("stage hook %s.%s%r failed again", type(hooks).__name__, method, args)
            return
        _reported.add(key)
        log.exception("stage hook %s.%s%r failed; the worker goes on without it (logged once)",
                      type(hooks).__name__, method, args)


def _check(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
