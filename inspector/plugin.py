"""The plugin contract and the registry that fills itself from entry points.

A plugin is a class registered under the `inspector.plugins` entry-point group.
The built-in DFKDE goes through the same path as a third-party package. A plugin
is checked when it is loaded, against the members declared here: each required
member, and each optional one it has, by kind (class method, method, property)
and parameters. A mismatch names the plugin, the member and what was expected,
and two plugins under one name are an error, not a warning.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class FalseRejectPromise:
    """What a split-conformal threshold promises fresh good parts of the same line: the boundary is the k-th
    lowest of n calibration scores, so a fresh good part fails at the expected rate k / (n + 1), and this
    threshold's own rate lies between `low` and `high` (the `low_quantile` and `high_quantile` of
    `distribution`)."""

    n: int
    k: int
    expected: float
    low: float
    high: float
    low_quantile: float = 0.05
    high_quantile: float = 0.95
    distribution: str = ""

    def figures(self) -> dict[str, Any]:
        """The manifest's words for it."""
        return {"n": self.n, "k": self.k, "expected_false_reject": self.expected,
                "false_reject_interval": {"low_quantile": self.low_quantile, "high_quantile": self.high_quantile,
                                          "low": self.low, "high": self.high, "distribution": self.distribution}}


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` did: the threshold it calibrated for, the rate asked for and the share of the calibration
    images at or over the threshold afterwards; where the plugin has them, the raw score the verdict turns at
    (`boundary`, a `score_name`) and what the threshold promises fresh good parts. `figures` are the plugin's
    own (plain JSON data), recorded in the manifest beside these and never read by inspector."""

    threshold: float
    target_false_reject: float
    held_out_false_reject: float
    boundary: float | None = None
    score_name: str = "raw score"
    promise: FalseRejectPromise | None = None
    figures: Mapping[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        """The manifest's `calibration` record (refit adds how the images were scored)."""
        typed = {"target_false_reject": self.target_false_reject, "threshold": self.threshold,
                 "held_out_false_reject": self.held_out_false_reject}
        promised = self.promise.figures() if self.promise else {}
        clash = sorted((typed.keys() | promised.keys()) & self.figures.keys())
        if clash:
            raise PluginError(f"calibration figures repeat the typed fields {', '.join(clash)}; give those as fields")
        return {**promised, **typed, **self.figures}


@dataclass(frozen=True)
class Components:
    """A plugin's count of model components and why (DFKDE's PCA): the configured count, the count fitted, the
    images per fit it was chosen for and the images each component needs."""

    configured: int
    used: int
    images_per_fit: int
    images_per_component: int

    @property
    def reduced(self) -> bool:
        """Whether fewer components were fitted than configured (refit says so)."""
        return self.used < self.configured


class Plugin(Protocol):
    """A scoring model that fits from normal images, saves, loads and scores batches.

    `prepare` runs on decode threads (CPU, one image at a time) and must be thread
    safe; `score` runs on the scoring thread, on the plugin's device. Every member is
    required except those in OPTIONAL_MEMBERS, and those of an ability (ABILITIES), which a plugin has all
    or none of; `check_plugin` reads names, kinds and parameters from here.
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

    def calibrate(self, held_out: Scores, threshold: float, target_false_reject: float) -> Calibration:
        """Re-map probabilities so that a fresh good part scores at or over `threshold` at a rate of at
        most `target_false_reject`, judged on these good images (each scored by a model fitted without it);
        a frame's verdict is `fail` iff its probability is at or over `threshold`, so the map must keep that
        exact. Raise FitError when the images are too few for the target. Returns what refit records and
        prints (DFKDE's split-conformal rule gives a FalseRejectPromise too)."""

    def save(self, folder: Path) -> list[str]:
        """Write the fitted state into `folder`; returns the names of the files written."""

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """Optional: the smallest (width, height) the plugin needs from a decoder, so that a JPEG may be
        decoded at reduced scale. None (and a plugin without it) means full size."""

    def explain(self, batch: torch.Tensor) -> Explained:
        """Optional: score a stacked batch exactly as `score` does, keeping what its anomaly maps need.
        A plugin without it gives verdicts without maps; PluginError when `draws_maps` is False."""

    @property
    def draws_maps(self) -> bool:
        """Optional, with `explain`: whether this fitted version draws maps (DFKDE: not a version saved before
        maps existed). A plugin with `explain` and without it always does."""

    @property
    def region_level(self) -> float | None:
        """Optional: the map value at or over which a cell belongs to a region (inspector/regions.py), calibrated
        on good parts so that few of them reach it. None (and a plugin without it) means no regions."""

    def calibration_images(self, target_false_reject: float) -> int:
        """Optional: the fewest calibration images `calibrate` accepts for this target, so that refit can say
        so before fitting anything. A plugin without it is asked only for MIN_HELD_OUT (tools/refit.py)."""

    @property
    def min_images_reason(self) -> str:
        """Optional: why `min_images` is what it is, naming the setting behind it; refit's refusals quote it."""

    def pooled(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Optional, with ReusesEmbeddings: the part of rows of `embed` that says whether two images are twins
        (tools/groups.py); a plugin without it is measured on the whole rows."""

    def fit_fold_embeddings(self, embeddings: torch.Tensor, every: torch.Tensor) -> FitReport:
        """Optional, with ReusesEmbeddings: `fit_embeddings` for a cross-fit's fold, given `every` row of the
        archive, so that the fold's model takes the final model's scale; without it, `fit_embeddings`."""


@runtime_checkable
class ReusesEmbeddings(Protocol):
    """An optional ability, all three members or none: a fit that is a costly embedding of each image followed
    by a cheap fit of the embeddings, so that a cross-fit embeds each image once. `fit_embeddings` on the rows
    of some images, in their order, must give the model that `fit` gives from those images, and
    `score_embeddings` what `score` gives."""

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Rows of a batch of prepared images, one per image, on the CPU."""

    def fit_embeddings(self, embeddings: torch.Tensor) -> FitReport:
        """Fit from rows of `embed`, in the order of their images."""

    def score_embeddings(self, embeddings: torch.Tensor) -> Scores:
        """Score rows of `embed`."""


@runtime_checkable
class ChoosesComponents(Protocol):
    """An optional ability, both members or neither: a model whose number of components follows the images a
    fit has, which a cross-fit fixes for every fold and the final fit alike."""

    @property
    def components(self) -> Components:
        """The components of the last fit and why."""

    def fix_components(self, images: int) -> Components:
        """Fit the components `images` images carry from now on, in every fit; FitError when too few."""


ABILITIES: tuple[type, ...] = (ReusesEmbeddings, ChoosesComponents)
OPTIONAL_MEMBERS = frozenset({"decode_size", "explain", "draws_maps", "region_level", "calibration_images",
                              "min_images_reason", "pooled", "fit_fold_embeddings"})


def can_explain(plugin: Any) -> bool:
    """Whether a plugin draws anomaly maps: it has `explain` and, where it says, this version draws them."""
    return callable(getattr(plugin, "explain", None)) and bool(getattr(plugin, "draws_maps", True))


def anomaly_maps(plugin: Any, batch: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple[Scores, list[np.ndarray]]:
    """Scores and one anomaly map per image of a stacked batch, each at its (width, height); the tools'
    way to ask for maps of every image. Raises PluginError when the plugin draws none."""
    if not can_explain(plugin):
        raise PluginError(f"plugin {getattr(plugin, 'name', plugin)!r} draws no anomaly maps (it has no `explain`, "
                          "or this version draws none)")
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


def calibration_images(plugin: Any, target_false_reject: float) -> int | None:
    """The fewest calibration images a plugin's `calibrate` accepts for the target, or None when it does not say."""
    method = getattr(plugin, "calibration_images", None)
    return None if method is None else int(method(target_false_reject))


def min_images_reason(plugin: Any) -> str:
    """Why a plugin's `min_images` is what it is, or "" when it does not say."""
    return str(getattr(plugin, "min_images_reason", "") or "")


def calibrate(plugin: Plugin, held_out: Scores, threshold: float, target_false_reject: float) -> Calibration:
    """A plugin's `calibrate`, its answer checked: PluginError, naming the plugin, unless it is a Calibration."""
    calibrated = plugin.calibrate(held_out, threshold, target_false_reject)
    if not isinstance(calibrated, Calibration):
        raise PluginError(f"plugin {getattr(plugin, 'name', plugin)!r}: `calibrate` must return an "
                          f"inspector.plugin.Calibration, got {type(calibrated).__name__}")
    return calibrated


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


@dataclass(frozen=True)
class _Member:
    """One member of the contract as `check_plugin` compares it: its kind and parameters after self or cls,
    each with whether it has a default."""

    name: str
    kind: str  # "classmethod", "method" or "property"
    parameters: tuple[tuple[str, bool], ...] = ()

    @property
    def expected(self) -> str:
        if self.kind == "property":
            return f"a property `{self.name}`"
        first = "cls" if self.kind == "classmethod" else "self"
        shown = ", ".join([first] + [f"{p}=..." if default else p for p, default in self.parameters])
        return f"a {self.kind} `{self.name}({shown})`"


def _parameters(function: Any) -> tuple[tuple[str, bool], ...] | None:
    """The parameters after the first (self or cls), with whether each has a default; None when a function
    takes none at all, *args or **kwargs excepted."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters or parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                     inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    return tuple((p.name if p.kind == p.POSITIONAL_OR_KEYWORD else f"<{p.kind.description} {p.name}>",
                  p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
                 for p in parameters[1:])


def _members(protocol: type) -> dict[str, _Member]:
    """The class methods, methods and properties declared in a protocol's body, in their order."""
    found = {}
    for name, member in vars(protocol).items():
        if name.startswith("_"):
            continue
        if isinstance(member, classmethod):
            found[name] = _Member(name, "classmethod", _parameters(member.__func__) or ())
        elif isinstance(member, property):
            found[name] = _Member(name, "property")
        elif inspect.isfunction(member):
            found[name] = _Member(name, "method", _parameters(member) or ())
    return found


_DECLARED = _members(Plugin)
_REQUIRED = {name: m for name, m in _DECLARED.items() if name not in OPTIONAL_MEMBERS}
_OPTIONAL = {name: m for name, m in _DECLARED.items() if name in OPTIONAL_MEMBERS}
_ABILITY_MEMBERS = {ability: _members(ability) for ability in ABILITIES}


def _matches(cls: type, member: _Member) -> bool:
    """Whether `cls` implements `member`: the same kind, and the declared parameters by name and in order,
    any more only with defaults, a default wherever the contract has one (callers may leave those out)."""
    found = inspect.getattr_static(cls, member.name)
    if member.kind == "property":
        return isinstance(found, (property, functools.cached_property))
    if member.kind == "classmethod":
        if not isinstance(found, classmethod):
            return False
        function = found.__func__
    elif isinstance(found, (classmethod, staticmethod)) or not inspect.isfunction(inspect.unwrap(found)):
        return False
    else:
        function = found
    given = _parameters(function)
    if given is None or len(given) < len(member.parameters):
        return False
    for (name, default), (want, want_default) in zip(given, member.parameters):
        if name != want or (want_default and not default):
            return False
    return all(default for _, default in given[len(member.parameters):])


def _shown(name: str, function: Any) -> str:
    """`name(a, b=...)` of a function as the plugin wrote it, without annotations."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return f"`{name}` (no signature)"
    shown = [str(p.replace(annotation=p.empty, default=p.empty)) + ("=..." if p.default is not p.empty else "")
             for p in parameters]
    return f"`{name}({', '.join(shown)})`"


def _refuse(name: str, member: _Member, cls: type, where: str) -> PluginError:
    found = inspect.getattr_static(cls, member.name)
    if isinstance(found, (property, functools.cached_property)):
        got = "a property"
    elif isinstance(found, (classmethod, staticmethod)):
        got = f"a {type(found).__name__} {_shown(member.name, found.__func__)}"
    elif callable(found):
        got = f"a method {_shown(member.name, found)}"
    else:
        got = f"the attribute {found!r:.40}"
    return PluginError(f"plugin {name!r}: `{member.name}` ({where}) must be {member.expected}; "
                       f"{cls.__qualname__} has {got}")


def check_plugin(name: str, cls: Any) -> type:
    """Raise PluginError unless `cls` implements the Plugin contract: every required member, each optional
    member it has and every ability it has a member of, each by kind and parameters."""
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
    for member in _REQUIRED.values():
        if not hasattr(cls, member.name):
            raise PluginError(f"plugin {name!r}: missing `{member.name}` of the inspector plugin contract, "
                              f"{member.expected}")
        if not _matches(cls, member):
            raise _refuse(name, member, cls, "required")
    for member in _OPTIONAL.values():
        if hasattr(cls, member.name) and not _matches(cls, member):
            raise _refuse(name, member, cls, "optional; when present it must match")
    for ability, members in _ABILITY_MEMBERS.items():
        present = [m for m in members if hasattr(cls, m)]
        if present and len(present) < len(members):
            missing = ", ".join(f"`{m}`" for m in members if m not in present)
            raise PluginError(f"plugin {name!r}: has {', '.join(f'`{m}`' for m in present)} of the optional "
                              f"ability {ability.__name__}, which needs all of {', '.join(members)}; missing "
                              f"{missing}")
        for member in members.values() if present else ():
            if not _matches(cls, member):
                raise _refuse(name, member, cls, f"of the optional ability {ability.__name__}")
    return cls


@functools.cache
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
