"""DfkdeModel: anomalib's DFKDE normality model, with the seed's API and math.

features (pooled CNN layers) -> PCA -> scale or norm -> Gaussian KDE log-density
-> anomaly probability: the log-density's rank among good parts' calibration scores (conformal.py), or,
for a state saved before those were kept, 1 / (1 + exp(steepness * (log_density - offset))).

Plain torch: no files, no queues. Differences from the seed, all on purpose:
log-densities through logsumexp (no underflow, defects stay ranked), one
vectorised pass per batch, PCA without an N x N matrix, layers concatenated along
channels, no in-place changes to the caller's tensors, and a clear error instead
of a half-fitted model when there are too few embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inspector.errors import FitError
from inspector_dfkde.backbones import Backbone, create_backbone
from inspector_dfkde.conformal import ConformalScale
from inspector_dfkde.kde import GaussianKDE
from inspector_dfkde.maps import LocalStats
from inspector_dfkde.pca import PCA
from inspector_dfkde.runtimes import RUNTIMES, runner_for

PRE_PROCESSING = ("scale", "norm")
PRECISIONS = ("fp32", "bf16", "fp16")


class DfkdeModel(nn.Module):
    """Normality model for DFKDE.

    Args:
        backbone: a timm architecture name, or a ready `Backbone`.
        n_comps: PCA components.
        pre_processing: "scale" (divide by the largest training norm) or "norm" (unit length).
        filter_count: at most this many embeddings (a seeded random subset) fit the KDE.
        threshold_steepness, threshold_offset: the logistic that maps log-density to probability.
        layers: timm feature_info layer names, each pooled, concatenated along channels.
        weights: "hub", "none", a packaged source name or a local file (see backbones).
        input_size: images are resized (antialiased) to this square size.
        precision: the backbone's compute precision; PCA and KDE always run in float32.
        runtime: where the backbone runs (plugins/dfkde/runtimes.py): a serving choice, not part of the model.
        seed: seeds the subsample (and random weights, for tests).
    """

    def __init__(
        self,
        backbone: str | Backbone = "resnet18",
        n_comps: int = 16,
        pre_processing: str = "scale",
        filter_count: int = 40000,
        threshold_steepness: float = 0.05,
        threshold_offset: float = 12.0,
        *,
        layers: Sequence[str] = ("layer4",),
        weights: str = "hub",
        input_size: int = 256,
        precision: str = "fp32",
        seed: int = 0,
        runtime: str = "torch",
    ) -> None:
        super().__init__()
        if pre_processing not in PRE_PROCESSING:
            raise ValueError(f"pre_processing must be one of {PRE_PROCESSING}, got {pre_processing!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if n_comps < 1:
            raise ValueError(f"n_comps must be at least 1, got {n_comps}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if isinstance(backbone, str):
            # Random weights are only reproducible (save, load, same scores) from a fixed seed.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                backbone = create_backbone(backbone, layers, weights)
        self.backbone = backbone
        self.feature_extractor = backbone.extractor.eval()
        self.n_components = n_comps
        self.pre_processing = pre_processing
        self.filter_count = filter_count
        self.threshold_steepness = threshold_steepness
        self.threshold_offset = threshold_offset
        self.input_size = input_size
        self.precision = precision
        self.runtime = runtime
        self.seed = seed
        self.register_buffer("input_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(backbone.std).view(1, 3, 1, 1))
        self.register_buffer("max_length", torch.empty(0))
        self.pca_model = PCA(n_components=n_comps)
        self.kde_model = GaussianKDE()
        # What the anomaly maps need (plugins/dfkde/maps.py); fitted by the plugin alongside PCA and the KDE,
        # and absent from states saved before maps existed.
        self.local_stats = LocalStats()
        # The conformal calibration (plugins/dfkde/conformal.py), set by the plugin's `calibrate`. None: the
        # logistic above gives the probability, as it did for every state saved before calibration scores
        # were kept. Plain float64 on the CPU, not a buffer: it follows no device.
        self.calibration: ConformalScale | None = None

    @property
    def feature_dim(self) -> int:
        return sum(self.backbone.channels)

    @property
    def min_embeddings(self) -> int:
        """The fewest embeddings a fit accepts: a KDE in n_comps dimensions needs n_comps + 2."""
        return self.n_components + 2

    @property
    def fitted(self) -> bool:
        return self.kde_model.fitted

    # -- features -------------------------------------------------------------------------

    def normalise_input(self, batch: Tensor) -> Tensor:
        """uint8 (0..255) or float (0..1) images B x 3 x H x W -> resized, normalised float32."""
        x = batch.to(self.input_mean.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.input_mean) / self.input_std

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    @torch.inference_mode()
    def get_feature_maps(self, batch: Tensor) -> list[Tensor]:
        """The requested layers' spatial feature maps, float32, each B x C x h x w (deepest smallest)."""
        self.feature_extractor.eval()
        if self.runtime != "torch":
            return self._runner()(self.normalise_input(batch).contiguous())
        x = self.normalise_input(batch).contiguous(memory_format=torch.channels_last)
        with self._autocast(x.device):
            maps = self.feature_extractor(x)
        return [m.float() for m in maps]

    def _runner(self):
        """The backbone exported to this model's runtime, shared by every model of the same backbone."""
        return runner_for(self.feature_extractor, self.runner_key, self.runtime, self.precision, self.input_size)

    @property
    def runner_key(self) -> tuple:
        """What identifies the backbone module across models and processes: architecture, weights, layers."""
        return (self.backbone.name, self.backbone.digest or id(self.feature_extractor), tuple(self.backbone.layers))

    @staticmethod
    def pool(maps: Sequence[Tensor]) -> Tensor:
        """Feature maps -> each layer averaged over its grid, concatenated along channels: B x feature_dim."""
        return torch.cat([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in maps], dim=1)

    @torch.inference_mode()
    def get_features(self, batch: Tensor) -> Tensor:
        """Pooled features of each requested layer, concatenated along channels: B x feature_dim."""
        return self.pool(self.get_feature_maps(batch))

    # -- fit --------------------------------------------------------------------------------

    def fit(self, embeddings: Sequence[Tensor] | Tensor, max_length: Tensor | None = None) -> bool:
        """Fit PCA and KDE to embeddings (a list of B x D tensors, or one N x D tensor).

        `max_length` ("scale" only): the scale to divide by in place of the fit's own largest norm. A cross-fit's
        fold passes the final model's (`scale_of` every image), so that its scores carry the scale the final
        model's do: the KDE's bandwidth follows the data's covariance, so the scale only adds
        d log(max_length) to every log-density, and a fold whose own largest norm differs would shift all
        its scores by that much.

        Raises FitError when there are fewer than `min_embeddings` or they are degenerate;
        the model is then left as it was.
        """
        stack = embeddings if isinstance(embeddings, Tensor) else torch.cat(list(embeddings), dim=0)
        stack = stack.detach().float()
        n = stack.shape[0]
        if n < self.min_embeddings:
            raise FitError(
                f"DFKDE with n_comps={self.n_components} needs at least {self.min_embeddings} "
                f"embeddings (images), got {n}"
            )
        if stack.shape[1] < self.n_components:
            raise FitError(
                f"n_comps={self.n_components} is more than the {stack.shape[1]} features "
                "the backbone layers give; lower n_comps"
            )
        if self.filter_count and n > self.filter_count:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(n, generator=generator)[: self.filter_count]
            stack = stack[chosen.to(stack.device)]
        pca = PCA(self.n_components)
        kde = GaussianKDE()
        if not torch.isfinite(stack).all():
            raise FitError("DFKDE fit failed: the embeddings hold NaN or infinite values")
        try:
            projected = pca.fit_transform(stack)
            given = None if max_length is None else torch.as_tensor(max_length, dtype=projected.dtype,
                                                                      device=projected.device)
            scaled, max_length = self.preprocess(projected, given)
            if not max_length > 0:
                raise ValueError("all embeddings are identical; use more varied images")
            kde.fit(scaled)
        except ValueError as exc:
            raise FitError(f"DFKDE fit failed: {exc}") from exc
        self.pca_model, self.kde_model, self.max_length = pca, kde, max_length
        self.calibration = None  # calibrated for the scores of the model it replaces
        return True

    def scale_of(self, embeddings: Tensor) -> Tensor:
        """The max_length a fit on `embeddings` would have (the same subsample, its own PCA)."""
        stack = embeddings.detach().float()
        if self.filter_count and stack.shape[0] > self.filter_count:
            generator = torch.Generator().manual_seed(self.seed)
            stack = stack[torch.randperm(stack.shape[0], generator=generator)[: self.filter_count].to(stack.device)]
        try:
            return _largest_norm(PCA(self.n_components).fit_transform(stack))
        except ValueError as exc:
            raise FitError(f"DFKDE fit failed: {exc}") from exc

    def use_components(self, n_comps: int) -> None:
        """Fit with `n_comps` PCA components from now on (the plugin's rule for what an archive can carry);
        the fitted state, if any, is dropped."""
        if n_comps < 1:
            raise ValueError(f"n_comps must be at least 1, got {n_comps}")
        self.n_components = n_comps
        self.pca_model, self.kde_model = PCA(n_components=n_comps), GaussianKDE()

    def preprocess(self, feature_stack: Tensor, max_length: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scale by the largest training norm ("scale") or to unit length ("norm"); returns new tensors."""
        norms = torch.linalg.vector_norm(feature_stack, ord=2, dim=1)
        if max_length is None:
            max_length = norms.max()
        if self.pre_processing == "norm":
            return feature_stack / norms.clamp_min(torch.finfo(norms.dtype).tiny)[:, None], max_length
        return feature_stack / max_length, max_length

    # -- score ------------------------------------------------------------------------------

    def evaluate(self, features: Tensor, as_log_likelihood: bool | None = False) -> Tensor:
        """KDE density (or log-density) of features (B x D)."""
        if not self.fitted:
            raise RuntimeError("DfkdeModel is not fitted")
        projected = self.pca_model.transform(features.float())
        scaled, _ = self.preprocess(projected, self.max_length)
        log_density = self.kde_model.log_density(scaled)
        return log_density if as_log_likelihood else torch.exp(log_density)

    def to_probability(self, densities: Tensor) -> Tensor:
        """Log-densities -> anomaly probabilities: the conformal scale's, float64 on the CPU, when the model is
        calibrated so; else the logistic around threshold_offset, in the densities' own dtype and device."""
        if self.calibration is not None:
            raw = densities.detach().double().cpu().numpy()
            return torch.from_numpy(self.calibration.probability(raw))
        return torch.sigmoid(-self.threshold_steepness * (densities - self.threshold_offset))

    def predict(self, features: Tensor) -> Tensor:
        return self.to_probability(self.evaluate(features, as_log_likelihood=True))

    @torch.inference_mode()
    def score(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> (anomaly probabilities, log-densities), one pass."""
        probability, log_density, _ = self.score_with_maps(batch)
        return probability, log_density

    @torch.inference_mode()
    def score_with_maps(self, batch: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`score`, also giving the feature maps the pooled features came from (for anomaly maps)."""
        maps = self.get_feature_maps(batch)
        log_density = self.evaluate(self.pool(maps), as_log_likelihood=True)
        return self.to_probability(log_density), log_density, maps

    def forward(self, batch: Tensor) -> Tensor:
        return self.score(batch)[0]


def _largest_norm(rows: Tensor) -> Tensor:
    return torch.linalg.vector_norm(rows, ord=2, dim=1).max()

