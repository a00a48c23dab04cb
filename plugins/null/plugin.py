"""`null`: a plugin that scores every frame with a fixed probability and does no work.

A benchmark and test aid, never a default: with it, `inspector bench --plugin null` measures what the
frame path itself costs (broker, parsing, decoding, batching, results) with the model taken out. It
goes through the same entry point, store, loading and warm-up as any other plugin, so a null model can
be fitted with `inspector refit` and served by `inspector run` like a real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inspector.errors import StateError
from inspector.plugin import Calibration, FitReport, Scores

STATE_FILE = "null.json"
_TOKEN = torch.zeros(1, dtype=torch.uint8)  # what prepare gives for every image: stacking it costs nothing


class NullSettings(BaseModel):
    """The `[plugins.null]` table."""

    model_config = ConfigDict(extra="forbid")

    probability: float = Field(0.0, ge=0.0, le=1.0, description="the anomaly probability every frame gets")
    score: float = Field(0.0, allow_inf_nan=False, description="the raw score every frame gets")


class NullPlugin:
    """Scores nothing: `prepare` keeps no pixels and `score` returns the configured constants."""

    name: ClassVar[str] = "null"
    Settings: ClassVar[type[BaseModel]] = NullSettings

    def __init__(self, settings: NullSettings) -> None:
        self.settings = settings

    @classmethod
    def create(cls, settings: BaseModel, device: torch.device) -> "NullPlugin":
        return cls(NullSettings.model_validate(settings.model_dump() if isinstance(settings, BaseModel) else settings))

    @classmethod
    def load(cls, folder: Path, device: torch.device, settings: BaseModel | None = None) -> "NullPlugin":
        path = Path(folder) / STATE_FILE
        try:
            return cls(NullSettings.model_validate(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, ValidationError) as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise StateError(f"null plugin state {path} cannot be read: {exc}; refit the model") from None

    @property
    def min_images(self) -> int:
        return 1

    def describe(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """The same one-byte tensor for every image: the decoded pixels are dropped here."""
        return _TOKEN

    def fit(self, batches: Iterable[torch.Tensor]) -> FitReport:
        """Counts the images; there is nothing to learn."""
        seen = sum(int(batch.shape[0]) for batch in batches)
        return FitReport(images=seen, embeddings=0)

    def score(self, batch: torch.Tensor) -> Scores:
        size = int(batch.shape[0])
        return Scores(probability=np.full(size, self.settings.probability), raw=np.full(size, self.settings.score))

    def calibrate(self, held_out: Scores, threshold: float, target_false_reject: float) -> Calibration:
        """Nothing moves: the probability is fixed. The figures say what it gives on the images."""
        probability = np.asarray(held_out.probability, dtype=np.float64)
        return Calibration(
            threshold=threshold,
            target_false_reject=target_false_reject,
            held_out_false_reject=float(np.mean(probability >= threshold)) if probability.size else 0.0,
            figures={"rule": "none: the null plugin's probability is fixed"},
        )

    def save(self, folder: Path) -> list[str]:
        (Path(folder) / STATE_FILE).write_text(json.dumps(self.settings.model_dump()), encoding="utf-8")
        return [STATE_FILE]
