"""Argument checks the tools share, made before torch or a model is loaded: a mistake is told in well
under a second, not after the seconds a backbone takes."""

from __future__ import annotations

from pathlib import Path

from inspector.config import Settings
from inspector.errors import ConfigError


def check_model(settings: Settings, model: str, option: str = "--model") -> None:
    """ConfigError naming the configured models when `model` is not one of them."""
    if model not in settings.models:
        raise ConfigError(f"{option} {model!r} is not a configured model; configured: "
                          f"{', '.join(sorted(settings.models))}")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be 1 or more")


# What `inspector evaluate` reads: MVTec AD's test/ folder.
TEST_SET_LAYOUT = (
    "expected MVTec AD's test/ layout: DIR/good/ with images of good parts and one folder per defect kind "
    "beside it (DIR/scratch/, DIR/hole/, ...), images found recursively"
)


def check_folder(path: Path, option: str = "--data", hint: str = "") -> None:
    """ConfigError when `path` is missing or not a folder, with its absolute path (a relative one hides where
    it was looked for)."""
    more = f"; {hint}" if hint else ""
    if not path.exists():
        raise ConfigError(f"{option} {path}: no such folder{more} (looked for {path.absolute()})")
    if not path.is_dir():
        raise ConfigError(f"{option} {path}: not a folder{more} ({path.absolute()})")


def check_paths(paths: list[Path], option: str = "--data") -> None:
    """Every path names an existing file or folder."""
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{option} {path}: no such folder or file (looked for {path.absolute()})")
