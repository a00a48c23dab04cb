"""The models in service: loading a stored version and proving it works, choosing one per capture,
and taking up new versions in the background without stopping the line.

A version goes into service only after its checksums verify, its plugin loads it and a
warm-up batch gives finite scores; until then, and for ever if it fails, the old one serves.

Failures are of two kinds. A version that is wrong (a digest mismatch, settings outside the plugin's
bounds, a warm-up that fails: a StateError or PluginError) stays wrong and is refused for the life of
the process. Anything else may pass (a file or listing not there yet on a lagging store, a 403 while
credentials rotate, an OSError, CUDA out of memory) and is tried again after a backoff. At start-up a
model whose current version cannot serve is served by its last good version (the newest older one that
verifies and loads), so a bad version never takes a worker down at every start; with none, the worker
runs not ready and answers that model's frames `model_unavailable` until a good version appears.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from inspector import topics
from inspector.config import ModelSettings, RouteSettings
from inspector.errors import FrameError, PluginError, StateError, VersionIncomplete
from inspector.messages import Capture
from inspector.plugin import Plugin, can_explain, get_plugin, region_level
from inspector.stores import Store

log = logging.getLogger(__name__)

RETRY_FIRST_S = 5.0  # a version that failed for a passing reason is tried again after this, then doubling
RETRY_MAX_S = 600.0
FALLBACK_TRIES = 3  # at start-up, older versions tried when the current one cannot serve


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded version of a named model, with the threshold its verdicts use."""

    name: str
    plugin_name: str
    version: str
    threshold: float
    plugin: Plugin
    region_level: float | None = None  # set when models.NAME.regions is on and the version has a calibrated level
    region_verdicts: frozenset[str] = frozenset({"fail"})  # the verdicts whose results carry regions ("all": both)
    fitted_decodes: frozenset[str] | None = None  # how its fit's images decoded (None: not recorded, not checked)

    def identity(self) -> dict[str, str]:
        """The `model` object of a result."""
        return {"name": self.name, "plugin": self.plugin_name, "version": self.version}


def is_final(exc: BaseException) -> bool:
    """A failure that trying again cannot mend: the version itself is wrong."""
    return isinstance(exc, (StateError, PluginError)) and not isinstance(exc, VersionIncomplete)


def load_version(
    store: Store, name: str, settings: ModelSettings, device: torch.device, version: str | None = None,
    progress: Callable[[], None] | None = None, plugin_settings: BaseModel | None = None,
) -> ServedModel:
    """Verify, load and warm up a stored version (None: the current one); StateError when any step fails.
    `progress` is called as files are fetched and hashed, and between steps (a watchdog's beat).
    `plugin_settings`: the plugin's table as configured now, for its serving choices (DFKDE's runtime)."""
    info = store.load_path(name, version, progress=progress) if progress else store.load_path(name, version)
    if info.plugin != settings.plugin:
        raise StateError(
            f"model {name!r} version {info.version} was fitted with plugin {info.plugin!r}, but models.{name}.plugin "
            f"is {settings.plugin!r}; refit it or change the configuration"
        )
    if progress:
        progress()
    plugin_cls = get_plugin(info.plugin)
    if plugin_settings is None:
        plugin = plugin_cls.load(info.path, device)
    else:
        plugin = plugin_cls.load(info.path, device, settings=plugin_settings)
    if progress:
        progress()
    warm_up(plugin)
    calibrated = (info.manifest.get("calibration") or {}).get("threshold")
    if calibrated is not None and abs(float(calibrated) - settings.threshold) > 1e-9:
        log.warning(
            "model %s version %s was calibrated for threshold %s; models.%s.threshold = %s is used instead, so "
            "its false-reject rate differs from the calibrated %s", name, info.version, calibrated, name,
            settings.threshold, (info.manifest.get("calibration") or {}).get("target_false_reject"),
            extra={"model": name, "version": info.version},
        )
    level = region_level(plugin) if settings.regions else None
    if settings.regions and level is None:
        log.warning("models.%s.regions is on, but version %s draws no calibrated regions (no localisation map, "
                    "or too few good images to calibrate one); its results carry none until a refit adds them",
                    name, info.version, extra={"model": name, "version": info.version})
    verdicts = frozenset({"pass", "fail"}) if settings.regions == "all" else frozenset({"fail"})
    decoded = (info.manifest.get("images") or {}).get("decoded")
    fitted = frozenset(k for k, n in decoded.items() if n) if isinstance(decoded, dict) and any(decoded.values()) \
        else None
    return ServedModel(name=name, plugin_name=info.plugin, version=info.version, threshold=settings.threshold,
                       plugin=plugin, region_level=level, region_verdicts=verdicts, fitted_decodes=fitted)


MapOf = Callable[[tuple[int, int]], np.ndarray]  # (width, height) -> one frame's anomaly map


def score_batch(
    model: ServedModel, tensors: list[torch.Tensor], stack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Probabilities, raw scores and, per frame, why it could not be scored (None when it was).

    A batch the plugin fails on is scored again frame by frame, to find the frame at fault; a frame
    the plugin fails on, or whose score is not finite or whose probability is outside [0, 1], gets NaN
    and the reason. The worker and `inspector evaluate` both score this way.
    """
    probability, raw, failures, _ = explain_batch(model, tensors, stack, maps=False)
    return probability, raw, failures


def explain_batch(
    model: ServedModel, tensors: list[torch.Tensor], stack: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack,
    maps: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str | None], list[MapOf | None]]:
    """`score_batch` through the plugin's `explain` (the same scores), plus, per frame, a function of (width,
    height) that draws its anomaly map later; None for a frame not scored. With `maps` False, or a plugin
    that draws none, it is `score_batch` and every map is None. The frame-by-frame retry keeps each frame's
    own map, so the worker and the tools get maps the same way."""
    explain = maps and can_explain(model.plugin)
    size = len(tensors)
    try:
        probability, raw, map_of = _score(model, stack(tensors), size, explain)
        failures: list[str | None] = [None] * size
        drawn = [None if map_of is None else functools.partial(map_of, i) for i in range(size)]
    except Exception as exc:  # noqa: BLE001 - isolate the frame(s) at fault, one at a time
        log.warning("model %s version %s failed on a batch of %d (%r); scoring its frames one by one",
                    model.name, model.version, size, exc, extra={"model": model.name, "version": model.version})
        probability, raw, failures, drawn = np.full(size, np.nan), np.full(size, np.nan), [], []
        for i, tensor in enumerate(tensors):
            try:
                p, r, map_of = _score(model, stack([tensor]), 1, explain)
                probability[i], raw[i] = p[0], r[0]
                failures.append(None)
                drawn.append(None if map_of is None else functools.partial(map_of, 0))
            except Exception as one:  # noqa: BLE001 - this frame's answer says why
                failures.append(f"{model.plugin_name} failed on this frame: {one!r}")
                drawn.append(None)
    for i, (p, r) in enumerate(zip(probability, raw)):
        if failures[i] is None and not (np.isfinite(p) and np.isfinite(r) and 0.0 <= p <= 1.0):
            failures[i] = f"{model.plugin_name} gave probability {p} and score {r}"
        if failures[i] is not None:
            probability[i] = raw[i] = np.nan
            drawn[i] = None
    return probability, raw, failures, drawn


def _score(model: ServedModel, batch: torch.Tensor, size: int,
           explain: bool) -> tuple[np.ndarray, np.ndarray, Callable[[int, tuple[int, int]], np.ndarray] | None]:
    if explain:
        explained = model.plugin.explain(batch)
        scores, map_of = explained.scores, explained.map_of
    else:
        scores, map_of = model.plugin.score(batch), None
    probability, raw = np.array(scores.probability, float), np.array(scores.raw, float)
    if probability.shape != (size,) or raw.shape != (size,):
        raise StateError(f"a batch of {size} gave {probability.shape} probabilities and {raw.shape} scores")
    return probability, raw, map_of


def warm_up(plugin: Plugin) -> None:
    """Score a small batch end to end (allocations, kernels, autotuning); StateError unless it gives one
    finite probability in [0, 1] and one finite raw score per image."""
    rng = np.random.default_rng(0)
    images = [np.full((96, 128, 3), 128, np.uint8), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)]
    try:
        scores = plugin.score(torch.stack([plugin.prepare(image) for image in images]))
        probability, raw = np.asarray(scores.probability, float), np.asarray(scores.raw, float)
    except Exception as exc:  # noqa: BLE001 - any failure of a freshly loaded plugin refuses it
        raise StateError(f"warm-up batch failed: {exc!r}") from exc
    if probability.shape != (2,) or raw.shape != (2,):
        raise StateError(f"warm-up batch of 2 gave {probability.shape} probabilities and {raw.shape} scores")
    if not (np.isfinite(probability).all() and np.isfinite(raw).all()):
        raise StateError("warm-up batch gave scores that are not finite numbers")
    if ((probability < 0) | (probability > 1)).any():
        raise StateError(f"warm-up batch gave probabilities outside [0, 1]: {probability.tolist()}")


class ModelSet:
    """The version in service of each configured model (None until one loads); swapped atomically.

    A frame keeps the ServedModel it was prepared with, so a swap takes effect between
    batches and a result names the version that really scored it.
    """

    def __init__(self, models: dict[str, ModelSettings], default_model: str, routes: Sequence[RouteSettings]) -> None:
        self.settings = dict(models)
        self.default_model = default_model
        self.routes = list(routes)
        self._served: dict[str, ServedModel | None] = {name: None for name in models}
        self._lock = threading.Lock()

    def choose(self, capture: Capture) -> ServedModel:
        """The model for a capture: its `model` header, else the first matching route, else the default."""
        name = capture.model
        if name is None:
            name = next((r.model for r in self.routes if topics.matches(r.match, capture.routing_key)),
                        self.default_model)
        elif name not in self.settings:
            raise FrameError("model_unknown", f"model header {name!r} names no configured model; "
                                              f"configured: {', '.join(sorted(self.settings))}")
        served = self.get(name)
        if served is None:
            raise FrameError("model_unavailable", f"model {name!r} has no version in service; "
                                                  f"run `inspector refit --model {name} --data DIR`")
        return served

    def get(self, name: str) -> ServedModel | None:
        with self._lock:
            return self._served.get(name)

    def put(self, served: ServedModel) -> ServedModel | None:
        """Put a version in service; returns the one it replaces."""
        with self._lock:
            previous, self._served[served.name] = self._served.get(served.name), served
            return previous

    def in_service(self) -> list[ServedModel]:
        with self._lock:
            return [s for s in self._served.values() if s is not None]


class Reloader:
    """A background thread that takes up new current versions: on request (an announcement, a
    reconnect) and every `poll_s` seconds (an announcement missed while disconnected).

    A version that is wrong (`is_final`) is refused once, logged and counted, and not tried again by this
    process. One that failed for a reason that may pass is counted too and tried again after a backoff
    that doubles from RETRY_FIRST_S up to RETRY_MAX_S, whether or not anything asks. The version in
    service keeps scoring. Requests are coalesced per model, so the queue holds at most one per model
    however many announcements arrive. The thread beats as it works (`watch`), so a store read that
    hangs is seen by the watchdog.
    """

    def __init__(
        self,
        store: Store,
        models: ModelSet,
        device: torch.device,
        poll_s: float,
        on_loaded: Callable[[ServedModel], None],
        on_outcome: Callable[[str, str], None],
        plugin_settings: Callable[[str], BaseModel] | None = None,
    ) -> None:
        self.store = store
        self.plugin_settings = plugin_settings  # plugin name -> its configured table
        self.models = models
        self.device = device
        self.poll_s = poll_s
        self.on_loaded = on_loaded
        self.on_outcome = on_outcome
        self.refused: set[tuple[str, str]] = set()
        self.retry_at: dict[tuple[str, str], tuple[int, float]] = {}  # passing failures: (count, monotonic)
        self.problems: dict[str, str] = {}  # model -> why its current version is not in service
        self.last_progress = time.monotonic()
        self.busy = False
        self._pending: set[str] = set()
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="inspector-reload", daemon=True)
        self._starting = False  # load_at_start runs: a load in service is not counted as a reload

    def start(self) -> None:
        self._thread.start()

    def request(self, name: str) -> None:
        with self._wake:
            self._pending.add(name)
            self._wake.notify()

    def request_all(self) -> None:
        with self._wake:
            self._pending.update(self.models.settings)
            self._wake.notify()

    @property
    def pending(self) -> int:
        with self._wake:
            return len(self._pending)

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def describe_problems(self) -> str | None:
        """Why models are not in service, one clause per model, for /readyz; None when there is nothing to say."""
        problems = dict(self.problems)
        return "; ".join(f"model {name}: {why}" for name, why in sorted(problems.items()))[:500] or None

    def beat(self) -> None:
        self.last_progress = time.monotonic()

    def watch(self, watchdog: Any, limit_s: float) -> None:
        """Register with the worker's watchdog: a reload that makes no progress (no MiB fetched or hashed, no
        step done) for `limit_s` makes the worker unhealthy, instead of leaving it silently on an old version."""
        watchdog.watch("reload", self.is_alive, lambda: self.busy, limit_s=limit_s,
                       progress=lambda: self.last_progress)

    def _next_wait(self) -> float | None:
        """Seconds until the next poll or the earliest retry, whichever is first; None: wait for a request."""
        waits = [self.poll_s] if self.poll_s else []
        if self.retry_at:
            waits.append(max(0.0, min(at for _, at in self.retry_at.values()) - time.monotonic()))
        return min(waits) if waits else None

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._pending and not self._stopping:
                    self._wake.wait(self._next_wait())
                if self._stopping:
                    return
                names = sorted(self._pending) or list(self.models.settings)
                self._pending.clear()
            try:
                for model in names:
                    self.reload(model)
            except Exception:  # noqa: BLE001 - the thread outlives its own bugs; the next poll tries again
                log.exception("reloading models failed")

    def reload(self, name: str) -> ServedModel | None:
        """Put the store's current version of `name` in service unless it already is, or was refused."""
        self.busy = True
        self.beat()
        try:
            return self._reload(name)
        finally:
            self.busy = False
            self.beat()

    def load_at_start(self, name: str) -> ServedModel | None:
        """Put the current version of `name` in service, or, when it cannot serve, its last good version:
        the newest older one that verifies and loads (at most FALLBACK_TRIES are tried). None when no
        version serves; the reloader keeps trying the current one if its failure may pass. A load here is
        not a reload: only failures are counted (inspector_model_reloads_total), as they always were."""
        self._starting = True
        try:
            return self._load_at_start(name)
        finally:
            self._starting = False

    def _load_at_start(self, name: str) -> ServedModel | None:
        loaded = self.reload(name)
        if loaded is not None or self.models.get(name) is not None:
            return loaded
        try:
            current = self.store.current(name)
            older = [v.version for v in self.store.versions(name) if v.version != current]
        except Exception as exc:  # noqa: BLE001 - a store that cannot be listed: nothing to fall back to
            self.problems.setdefault(name, f"the store cannot be read: {_reason(exc)}")
            return None
        if current is not None and current in older:
            older = older[: older.index(current)]
        for version in list(reversed(older))[:FALLBACK_TRIES]:
            if (name, version) in self.refused:
                continue
            fallback = self._try(name, version, None)
            if fallback is not None:
                log.warning("model %s: serving version %s, the last good one; current version %s cannot serve: %s",
                            name, version, current, self.problems.get(name), extra={"model": name, "version": version})
                return fallback
        return None

    def _reload(self, name: str) -> ServedModel | None:
        try:
            version = self.store.current(name)
        except Exception as exc:  # noqa: BLE001 - an unreadable store must not stop the thread
            log.error("model %s: cannot read the store's current version: %s", name, exc, extra={"model": name})
            if self.models.get(name) is None:
                self.problems[name] = f"the store's current version cannot be read: {_reason(exc)}"
            return None
        served = self.models.get(name)
        for stale in [key for key in self.retry_at if key[0] == name and key[1] != version]:
            del self.retry_at[stale]  # no longer current: not tried again (and never waited for)
        if version is None:
            if served is None:
                self.problems[name] = "no version in the store"
            return None
        if served is not None and served.version == version:
            return None
        if (name, version) in self.refused:
            return None
        _, not_before = self.retry_at.get((name, version), (0, 0.0))
        if time.monotonic() < not_before:
            return None
        return self._try(name, version, served)

    def _try(self, name: str, version: str, served: ServedModel | None) -> ServedModel | None:
        """Load one version and put it in service; on failure, refuse it or schedule its retry."""
        failures, _ = self.retry_at.get((name, version), (0, 0.0))
        log.info("model %s: loading version %s", name, version, extra={"model": name, "version": version})
        try:
            settings = self.models.settings[name]
            table = self.plugin_settings(settings.plugin) if self.plugin_settings else None
            loaded = load_version(self.store, name, settings, self.device, version, self.beat, table)
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the old version keeps serving
            kept = f"version {served.version} keeps serving" if served else "no version is in service"
            if is_final(exc):
                self.refused.add((name, version))
                self.retry_at.pop((name, version), None)
                log.error("model %s: version %s refused, %s: %s", name, version, kept, _reason(exc),
                          extra={"model": name, "version": version})
                problem = f"version {version} refused: {_reason(exc)}"
            else:
                delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** failures)
                self.retry_at[(name, version)] = (failures + 1, time.monotonic() + delay)
                log.error("model %s: version %s failed to load, %s; tried again in %.0f s: %s", name,
                          version, kept, delay, _reason(exc), extra={"model": name, "version": version})
                problem = f"version {version} failed to load (tried again in {delay:.0f} s): {_reason(exc)}"
            if self.models.get(name) is None:
                self.problems[name] = problem
            self.on_outcome(name, "failed")
            return None
        self.retry_at.pop((name, version), None)
        self.problems.pop(name, None)
        previous = self.models.put(loaded)
        log.info("model %s: version %s in service (was %s)", name, version,
                 previous.version if previous else "none", extra={"model": name, "version": version})
        self.on_loaded(loaded)
        if not self._starting:
            self.on_outcome(name, "success")
        return loaded


def _reason(exc: BaseException) -> Any:
    return exc if str(exc) else repr(exc)
