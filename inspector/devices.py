"""One place that turns the configured device into a torch device, for the worker and refit alike."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from inspector.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def resolve_device(spec: str) -> "torch.device":
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N" -> torch.device; clear error if absent."""
    import torch  # here, not at import: the broker tools load the configuration without torch

    if not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"device: {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} asked for, but no CUDA device is available here; use 'auto' or 'cpu'")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device: {spec!r} asked for, but only {count} CUDA device(s) exist (0..{count - 1})")
    return torch.device("cuda", index)


def describe_device(device: "torch.device") -> str:
    """A line for the start-up log: the device and, on CUDA, the card's name."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
