"""Save and load a fitted DfkdeModel: tensors in safetensors, settings in JSON, no pickle.

The backbone's weights are not stored with each version; they come from the
configured source. A digest of them is stored instead, and a load whose backbone
differs from the one the model was fitted with is refused: scoring with other
weights would give silently wrong verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inspector.errors import StateError
from plugins.dfkde.backbones import weights_digest
from plugins.dfkde.model import DfkdeModel

STATE_FILE = "state.safetensors"
SETTINGS_FILE = "settings.json"
FORMAT = "dfkde.state/1"

_TENSORS = {
    "pca.mean": ("pca_model", "mean"),
    "pca.components": ("pca_model", "components"),
    "pca.explained_variance": ("pca_model", "explained_variance"),
    "kde.whitened": ("kde_model", "whitened"),
    "kde.neg_half_sq_norm": ("kde_model", "neg_half_sq_norm"),
    "kde.bw_transform": ("kde_model", "bw_transform"),
    "kde.log_norm": ("kde_model", "log_norm"),
}
# The anomaly maps' statistics: saved when fitted; a state saved before maps existed has none, loads all the
# same and scores as before, and its plugin draws no maps.
_OPTIONAL_TENSORS = {
    "local.mean": ("local_stats", "mean"),
    "local.variance": ("local_stats", "variance"),
}


def backbone_digest(model: DfkdeModel) -> str:
    """sha256 of the backbone's weights as loaded, before any unused blocks were dropped (see backbones)."""
    return model.backbone.digest or weights_digest(model.feature_extractor)


def model_settings(model: DfkdeModel) -> dict[str, Any]:
    """The constructor arguments that rebuild `model`, as JSON data."""
    return {
        "backbone": model.backbone.name,
        "layers": list(model.backbone.layers),
        "weights": model.backbone.weights,
        "n_comps": model.n_components,
        "pre_processing": model.pre_processing,
        "filter_count": model.filter_count,
        "threshold_steepness": model.threshold_steepness,
        "threshold_offset": model.threshold_offset,
        "input_size": model.input_size,
        "precision": model.precision,
        "seed": model.seed,
    }


def save_state(model: DfkdeModel, folder: Path, plugin: dict[str, Any] | None = None) -> list[str]:
    """Write the fitted state into `folder` (which must exist); returns the file names. `plugin`: the
    adapter's own choices fixed at fit time (JSON data), read back with read_settings."""
    if not model.fitted:
        raise StateError("cannot save an unfitted DFKDE model")
    tensors = {"max_length": model.max_length.reshape(1)}
    for key, (part, attr) in _TENSORS.items():
        tensors[key] = getattr(getattr(model, part), attr)
    if model.local_stats.fitted:
        for key, (part, attr) in _OPTIONAL_TENSORS.items():
            tensors[key] = getattr(getattr(model, part), attr)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / STATE_FILE))
    meta = {"format": FORMAT, "settings": model_settings(model), "backbone_digest": backbone_digest(model),
            "plugin": dict(plugin or {})}
    (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [STATE_FILE, SETTINGS_FILE]


def read_settings(folder: Path) -> dict[str, Any]:
    path = folder / SETTINGS_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: cannot read the DFKDE settings ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{path}: not a {FORMAT} settings file")
    return meta


def load_state(folder: Path, device: torch.device, precision: str | None = None) -> DfkdeModel:
    """Rebuild a fitted model from `folder`, on `device`; StateError for anything amiss."""
    meta = read_settings(folder)
    settings = dict(meta["settings"])
    if precision is not None:
        settings["precision"] = precision
    try:
        tensors = load_file(str(folder / STATE_FILE))
    except (OSError, SafetensorError) as exc:
        raise StateError(f"{folder / STATE_FILE}: cannot read the DFKDE state ({exc})") from exc
    missing = sorted({"max_length", *_TENSORS} - set(tensors))
    if missing:
        raise StateError(f"{folder / STATE_FILE}: missing tensors {missing}")
    backbone = settings.pop("backbone")
    try:
        model = DfkdeModel(backbone, **settings)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{folder / SETTINGS_FILE}: bad settings ({exc})") from exc
    if backbone_digest(model) != meta.get("backbone_digest"):
        raise StateError(
            f"{folder}: the backbone weights from {settings['weights']!r} differ from the ones this "
            "model was fitted with; restore those weights or refit the model"
        )
    model.max_length = tensors["max_length"].reshape(())
    for key, (part, attr) in _TENSORS.items():
        setattr(getattr(model, part), attr, tensors[key])
    present = [key for key in _OPTIONAL_TENSORS if key in tensors]
    if present and len(present) != len(_OPTIONAL_TENSORS):
        raise StateError(f"{folder / STATE_FILE}: has {present} of the anomaly maps' tensors but not all")
    for key in present:
        part, attr = _OPTIONAL_TENSORS[key]
        if tensors[key].shape != (model.feature_dim,):
            raise StateError(f"{folder / STATE_FILE}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"not ({model.feature_dim},) for the backbone's features")
        setattr(getattr(model, part), attr, tensors[key])
    if model.pca_model.components.shape != (model.feature_dim, model.n_components):
        raise StateError(f"{folder}: PCA shape {tuple(model.pca_model.components.shape)} does not fit the backbone")
    return model.to(device)
