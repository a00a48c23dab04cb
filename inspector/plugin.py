"""The plugin contract and the registry that fills itself from entry points.

A plugin is a class registered under the `inspector.plugins` entry-point group.
The built-in DFKDE goes through the same path as a third-party package. A plugin
is checked when it is loaded: a missing method names the plugin and the method,
and two plugins under one name are an error, not a warning.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel

from inspector.errors import PluginError

ENTRY_POINT_GROUP = "inspector.plugins"


@dataclass(frozen=True)
class Scores:
    """What a plugin says of a batch: one anomaly probability (0..1) and one raw score per image."""

    probability: np.ndarray
    raw: np.ndarray


@dataclass(frozen=True)
class Explained:
    """A batch's scores together with what its anomaly maps need, kept by the plugin.

    `map_of(index, (width, height))` is the anomaly map of image `index` of the batch at that size: a
    float32 height x width array in [0, 1], 0 = normal, on one scale for every image a fitted model
    scores (never normalised per image, so a good part's map stays dark). It is meant to be cheap and
    is called off the scoring thread, only for the frames that need a map; it must be thread safe.
    """

    scores: Scores
    map_of: Callable[[int, tuple[int, int]], np.ndarray]


@dataclass(frozen=True)
class FitReport:
    """What a fit used: images seen and embeddings kept (after any subsampling)."""

    images: int
    embeddings: int


class Plugin(Protocol):
    """A scoring model that fits from normal images, saves, loads and scores batches.

    `prepare` runs on decode threads (CPU, one image at a time) and must be thread
    safe; `score` runs on the scoring thread, on the plugin's device. Every member is
    required except those in OPTIONAL_MEMBERS; `check_plugin` reads the list from here.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]]

    @classmethod
    def create(cls, settings: BaseModel, device: torch.device) -> "Plugin":
        """An unfitted plugin from its validated settings."""

    @classmethod
    def load(cls, folder: Path, device: torch.device, settings: BaseModel | None = None) -> "Plugin":
        """A fitted plugin from the files `save` wrote; raises StateError when they are bad. `settings`, when
        given: the plugin's table as configured now, for choices of how to run a version that are not part of
        it (DFKDE's runtime); the callers in this package pass it."""

    @property
    def min_images(self) -> int:
        """The fewest images a fit accepts."""

    def describe(self) -> dict[str, Any]:
        """The settings that define this model, as plain JSON data (for manifests)."""

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 RGB -> the tensor `score` and `fit` take a stack of."""

    def fit(self, batches: Iterable[torch.Tensor]) -> FitReport:
        """Fit from batches of prepared images of normal parts."""

    def score(self, batch: torch.Tensor) -> Scores:
        """Score a stacked batch of prepared images."""

    def calibrate(self, held_out: Scores, threshold: float, target_false_reject: float) -> dict[str, Any]:
        """Re-map probabilities so that a fresh good part scores at or over `threshold` at a rate of at
        most `target_false_reject`, judged on these good images (each scored by a model fitted without it);
        a frame's verdict is `fail` iff its probability is at or over `threshold`, so the map must keep that
        exact. Raise FitError when the images are too few for the target. Returns the figures for the
        manifest (they must include `threshold`; DFKDE's split-conformal rule adds `n`, `k`,
        `expected_false_reject` and `false_reject_interval`, which refit prints)."""

    def save(self, folder: Path) -> list[str]:
        """Write the fitted state into `folder`; returns the names of the files written."""

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """Optional: the smallest (width, height) the plugin needs from a decoder, so that a JPEG may be
        decoded at reduced scale. None (and a plugin without it) means full size."""

    def explain(self, batch: torch.Tensor) -> Explained:
        """Optional: score a stacked batch exactly as `score` does, keeping what its anomaly maps need.
        A plugin without it gives verdicts without maps."""

    def calibration_images(self, target_false_reject: float) -> int:
        """Optional: the fewest calibration images `calibrate` accepts for this target, so that refit can say
        so before fitting anything. A plugin without it is asked only for MIN_HELD_OUT (tools/refit.py)."""

    @property
    def region_level(self) -> float | None:
        """Optional: the map value at or over which a cell belongs to a region (inspector/regions.py), calibrated
        on good parts so that few of them reach it. None (and a plugin without it) means no regions."""


OPTIONAL_MEMBERS = frozenset({"decode_size", "explain", "region_level", "calibration_images"})


def can_explain(plugin: Any) -> bool:
    """Whether a plugin draws anomaly maps (`explain` is optional)."""
    return callable(getattr(plugin, "explain", None))


def anomaly_maps(plugin: Any, batch: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[Scores, list[np.ndarray]]:
    """Scores and one anomaly map per image of a stacked batch, each at its (width, height); the tools'
    way to ask for maps of every image. Raises PluginError when the plugin draws none."""
    if not can_explain(plugin):
        raise PluginError(f"plugin {getattr(plugin, 'name', plugin)!r} draws no anomaly maps (it has no `explain`)")
    explained = plugin.explain(batch)
    if len(sizes) != len(explained.scores.raw):
        raise ValueError(f"{len(sizes)} sizes for a batch of {len(explained.scores.raw)}")
    return explained.scores, [explained.map_of(i, size) for i, size in enumerate(sizes)]


def decode_size(plugin: Any) -> tuple[int, int] | None:
    """A plugin's `decode_size`, or None when it declares none (it is optional)."""
    size = getattr(plugin, "decode_size", None)
    if size is None:
        return None
    width, height = (int(v) for v in size)
    return (width, height) if width > 0 and height > 0 else None


def region_level(plugin: Any) -> float | None:
    """A plugin's calibrated region level, or None when it has none (it is optional, and needs maps)."""
    level = getattr(plugin, "region_level", None)
    if level is None or not can_explain(plugin):
        return None
    level = float(level)
    return level if 0.0 < level <= 1.0 else None


def score_all(plugin: Plugin, batches: Iterable[torch.Tensor]) -> Scores:
    """Score a stream of prepared batches into one Scores (empty when there are none)."""
    probability, raw = [], []
    for batch in batches:
        scores = plugin.score(batch)
        probability.append(scores.probability)
        raw.append(scores.raw)
    if not raw:
        return Scores(probability=np.empty(0), raw=np.empty(0))
    return Scores(probability=np.concatenate(probability), raw=np.concatenate(raw))


def _contract() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The required class methods, methods and properties of the Plugin protocol, read from its body."""
    class_methods, methods, properties = [], [], []
    for name, member in vars(Plugin).items():
        if name.startswith("_") or name in OPTIONAL_MEMBERS:
            continue
        if isinstance(member, classmethod):
            class_methods.append(name)
        elif isinstance(member, property):
            properties.append(name)
        elif inspect.isfunction(member):
            methods.append(name)
    return tuple(class_methods), tuple(methods), tuple(properties)


_CLASS_METHODS, _METHODS, _PROPERTIES = _contract()


def check_plugin(name: str, cls: Any) -> type:
    """Raise PluginError unless `cls` implements the Plugin contract."""
    if not inspect.isclass(cls):
        raise PluginError(f"plugin {name!r}: the entry point must name a class, got {cls!r}")
    if getattr(cls, "name", None) != name:
        raise PluginError(
            f"plugin {name!r}: class {cls.__qualname__} declares name {getattr(cls, 'name', None)!r}; "
            "the entry-point name and the class's `name` must agree"
        )
    settings = getattr(cls, "Settings", None)
    if not (inspect.isclass(settings) and issubclass(settings, BaseModel)):
        raise PluginError(f"plugin {name!r}: `Settings` must be a pydantic BaseModel class")
    for method in _CLASS_METHODS + _METHODS:
        if not callable(getattr(cls, method, None)):
            raise PluginError(f"plugin {name!r}: missing method `{method}` of the inspector plugin contract")
    for method in _CLASS_METHODS:
        if not isinstance(inspect.getattr_static(cls, method), classmethod):
            raise PluginError(f"plugin {name!r}: `{method}` must be a classmethod")
    for member in _PROPERTIES:
        if not isinstance(inspect.getattr_static(cls, member, None), property):
            raise PluginError(f"plugin {name!r}: `{member}` must be a property")
    return cls


@cache
def registry() -> dict[str, type]:
    """Every installed plugin by name, each checked; duplicates are an error."""
    found: dict[str, type] = {}
    origins: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            if ep.value == origins[ep.name]:
                continue  # the same package seen twice on the path (editable installs)
            raise PluginError(
                f"two plugins are registered as {ep.name!r}: {origins[ep.name]} and {ep.value}; "
                "uninstall one of them"
            )
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        found[ep.name] = check_plugin(ep.name, cls)
        origins[ep.name] = ep.value
    return found


def get_plugin(name: str) -> type:
    """The plugin class registered as `name`."""
    plugins = registry()
    if name not in plugins:
        available = ", ".join(sorted(plugins)) or "none"
        raise PluginError(f"unknown plugin {name!r}; installed plugins: {available}")
    return plugins[name]
