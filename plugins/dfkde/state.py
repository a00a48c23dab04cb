"""Save and load a fitted DfkdeModel: tensors in safetensors, settings in JSON, no pickle.

The backbone's weights are not stored with each version; they come from the
configured source. A digest of them is stored instead, and a load whose backbone
differs from the one the model was fitted with is refused: scoring with other
weights would give silently wrong verdicts.

A stored version is untrusted input until it has passed every check, and the checks cost nothing
beside what they guard: its settings are validated with the plugin's own settings model and bounds,
the backbone they name is sized on torch's meta device (no memory) and refused over
MAX_BACKBONE_PARAMETERS, and the safetensors header is read alone and checked against the shapes the
settings imply, all before the backbone is built or a tensor is allocated.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import timm
import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inspector.errors import StateError, StoreUnavailable
from inspector_dfkde.backbones import weights_digest
from inspector_dfkde.conformal import MAX_SCORES, ConformalScale
from inspector_dfkde.model import DfkdeModel

STATE_FILE = "state.safetensors"
SETTINGS_FILE = "settings.json"
FORMAT = "dfkde.state/1"
MAX_SETTINGS_BYTES = 1 << 20  # settings.json is under 1 KB
MAX_HEADER_BYTES = 1 << 20  # the safetensors header of ten tensors is under 1 KB
# wide_resnet101_2 (127 M) fits; a 1 B-parameter ViT would take 4.5 GB as fp32, built twice (see backbones).
MAX_BACKBONE_PARAMETERS = 200_000_000

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
# The maps' own scale (plugins/dfkde/maps.py); a state saved before it existed draws with the fixed scale.
_MAP_SCALE = "local.scale"
# The conformal calibration (plugins/dfkde/conformal.py), float64: the sorted calibration scores, the
# boundary's rank k and the threshold placed on it. A state saved before they were kept has none, loads all
# the same and scores with its logistic as before.
_CALIBRATION_TENSORS = ("calibration.scores", "calibration.k", "calibration.threshold")


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
        if model.local_stats.scale.numel():
            tensors[_MAP_SCALE] = model.local_stats.scale.reshape(1)
    if model.calibration is not None:
        scale = model.calibration
        tensors |= dict(zip(_CALIBRATION_TENSORS, (torch.from_numpy(scale.scores),
                                                    torch.tensor(float(scale.k), dtype=torch.float64),
                                                    torch.tensor(scale.threshold, dtype=torch.float64))))
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / STATE_FILE))
    meta = {"format": FORMAT, "settings": model_settings(model), "backbone_digest": backbone_digest(model),
            "plugin": dict(plugin or {})}
    (folder / SETTINGS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return [STATE_FILE, SETTINGS_FILE]


def read_settings(folder: Path) -> dict[str, Any]:
    path = folder / SETTINGS_FILE
    try:
        meta = json.loads(_read_regular(path, MAX_SETTINGS_BYTES))
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: cannot read the DFKDE settings ({exc!r:.200})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("settings"), dict):
        raise StateError(f"{path}: not a {FORMAT} settings file")
    if not isinstance(meta.get("plugin", {}), dict):
        raise StateError(f"{path}: `plugin` is not a table")
    return meta


def checked_settings(folder: Path, meta: dict[str, Any], schema: type[BaseModel]) -> tuple[dict[str, Any], int]:
    """The stored settings (and the plugin's fit-time choices) validated with the plugin's settings model,
    then the backbone they name sized without building it: (settings, feature dimension); StateError
    naming the setting otherwise."""
    path = folder / SETTINGS_FILE
    try:
        schema.model_validate({**meta["settings"], **meta.get("plugin", {})})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()[:5])
        raise StateError(f"{path}: settings outside the plugin's bounds ({problems}); refit the model") from None
    settings = dict(meta["settings"])
    return settings, _check_backbone(path, settings["backbone"], settings["layers"])


def _check_backbone(path: Path, name: str, layers: list[str]) -> int:
    """Size the backbone on the meta device (shapes only, no memory), check its layers exist and return the
    dimension of the features they give."""
    if not timm.is_model(name):
        raise StateError(f"{path}: backbone {name!r} is no timm architecture; refit the model")
    try:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            info = timm.create_model(name, features_only=True).feature_info
            channels = dict(zip(info.module_name(), info.channels()))
    except Exception as exc:  # noqa: BLE001 - an architecture that cannot be sized is not built blind
        raise StateError(f"{path}: backbone {name!r} cannot be sized before it is built ({exc!r:.200})") from None
    if parameters > MAX_BACKBONE_PARAMETERS:
        raise StateError(f"{path}: backbone {name!r} has {parameters:,} parameters, over the "
                         f"{MAX_BACKBONE_PARAMETERS:,} a stored DFKDE version may build")
    unknown = [layer for layer in layers if layer not in channels]
    if unknown:
        raise StateError(f"{path}: layers {unknown} are not among {name}'s: {', '.join(channels)}")
    return sum(channels[layer] for layer in layers)


def _read_regular(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file, opened non-blocking (a FIFO is refused, never waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise StoreUnavailable(f"{path}: cannot be opened ({exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{path}: not a regular file")
        data = os.read(fd, limit + 1)
    except OSError as exc:
        raise StoreUnavailable(f"{path}: cannot be read ({exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise StateError(f"{path}: over {limit} bytes; not a file the DFKDE plugin wrote")
    return data


def _check_header(path: Path, settings: dict[str, Any], feature_dim: int) -> None:
    """Read the safetensors header alone and check every tensor's name, dtype and shape against what the
    settings imply: nothing unexpected is allocated when the tensors are read."""
    try:
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise StateError(f"{path}: not a regular file")
            size = struct.unpack("<Q", handle.read(8).ljust(8, b"\xff"))[0]
            if size > MAX_HEADER_BYTES:
                raise StateError(f"{path}: cannot read the DFKDE state (a header of {size} bytes)")
            header = json.loads(handle.read(size))
    except OSError as exc:
        raise StoreUnavailable(f"{path}: cannot be read ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: cannot read the DFKDE state (its header: {exc!r:.200})") from None
    if not isinstance(header, dict):
        raise StateError(f"{path}: cannot read the DFKDE state (its header is not a table)")
    d, k, limit = feature_dim, settings["n_comps"], settings["filter_count"]
    rows = header.get("kde.whitened", {}).get("shape", [0])[0] if isinstance(header.get("kde.whitened"), dict) else 0
    if not isinstance(rows, int) or rows < 1:
        raise StateError(f"{path}: kde.whitened has no rows")
    if limit and rows > limit:
        raise StateError(f"{path}: kde.whitened holds {rows} rows, over filter_count {limit}")
    expected = {
        "max_length": [1], "pca.mean": [d], "pca.components": [d, k], "pca.explained_variance": [k],
        "kde.whitened": [rows, k], "kde.neg_half_sq_norm": [rows], "kde.bw_transform": [k, k], "kde.log_norm": [],
        "local.mean": [d], "local.variance": [d], _MAP_SCALE: [1],
    }
    scores = header.get("calibration.scores")
    count = scores.get("shape", [0])[0] if isinstance(scores, dict) and scores.get("shape") else 0
    if scores is not None and not (isinstance(count, int) and 1 <= count <= MAX_SCORES):
        raise StateError(f"{path}: calibration.scores holds {count!r:.20} scores, not 1 to {MAX_SCORES}")
    expected |= {"calibration.scores": [count], "calibration.k": [], "calibration.threshold": []}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if key not in expected:
            raise StateError(f"{path}: unexpected tensor {key!r}")
        dtype = "F64" if key in _CALIBRATION_TENSORS else "F32"
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != expected[key]:
            found = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise StateError(f"{path}: {key} is {found!r:.100}, expected {dtype} {expected[key]} for these settings")


def load_state(folder: Path, device: torch.device, precision: str | None = None,
               schema: type[BaseModel] | None = None) -> DfkdeModel:
    """Rebuild a fitted model from `folder`, on `device`; StateError for anything amiss. With `schema` (the
    plugin's settings model), the stored settings and tensor shapes are checked before anything is built."""
    meta = read_settings(folder)
    settings = dict(meta["settings"])
    if schema is not None:
        settings, feature_dim = checked_settings(folder, meta, schema)
        _check_header(folder / STATE_FILE, settings, feature_dim)
    if precision is not None:
        settings["precision"] = precision
    try:
        tensors = load_file(str(folder / STATE_FILE))
    except SafetensorError as exc:
        raise StateError(f"{folder / STATE_FILE}: cannot read the DFKDE state ({exc})") from exc
    except OSError as exc:
        raise StoreUnavailable(f"{folder / STATE_FILE}: cannot read the DFKDE state ({exc})") from exc
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
    if _MAP_SCALE in tensors:
        scale = tensors[_MAP_SCALE].reshape(-1)
        if not present or scale.shape != (1,) or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise StateError(f"{folder / STATE_FILE}: {_MAP_SCALE} must be one positive number beside the maps' "
                             "statistics; refit the model")
        model.local_stats.scale = scale
    model.calibration = _calibration(folder / STATE_FILE, tensors)
    if model.pca_model.components.shape != (model.feature_dim, model.n_components):
        raise StateError(f"{folder}: PCA shape {tuple(model.pca_model.components.shape)} does not fit the backbone")
    return model.to(device)



def _calibration(path: Path, tensors: dict[str, torch.Tensor]) -> ConformalScale | None:
    """The stored conformal calibration, checked; None for a state saved before it was kept."""
    present = [key for key in _CALIBRATION_TENSORS if key in tensors]
    if not present:
        return None
    if len(present) != len(_CALIBRATION_TENSORS):
        raise StateError(f"{path}: has {present} of the calibration's tensors but not all")
    scores, k, threshold = (tensors[key].double() for key in _CALIBRATION_TENSORS)
    if scores.ndim != 1 or k.numel() != 1 or threshold.numel() != 1 or float(k) != int(float(k)):
        raise StateError(f"{path}: the calibration's tensors have the wrong shapes")
    try:
        return ConformalScale(scores.numpy(), int(float(k)), float(threshold))
    except ValueError as exc:
        raise StateError(f"{path}: bad calibration ({exc}); refit the model") from None
