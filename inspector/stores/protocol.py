"""What every model store offers: the members the commands, refit, evaluate and the worker's reloader use.

The folder store (stores.folder) and the S3 store (stores.s3) keep the same promises with different means;
callers are typed by `Store` alone, so neither is ever special-cased and a third kind of store is one class
that passes tests/test_store_protocol.py. Errors are part of the contract too: an unknown model or version
is a ConfigError naming what there is, a version that may yet arrive is VersionIncomplete, a wrong one a
StateError, a store that cannot be reached StoreUnavailable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class VersionInfo:
    """One stored version as listed; `manifest` is `{}` when it could not be read."""

    name: str
    version: str
    created_at: str
    plugin: str
    current: bool
    path: Path
    manifest: dict


@runtime_checkable
class Store(Protocol):
    """The versions of every model in one place (a folder, or s3://bucket/prefix)."""

    @property
    def root(self) -> Path | str:
        """Where the store is, as shown to an operator."""
        ...

    def names(self) -> list[str]:
        """Models that have at least one complete version, sorted."""
        ...

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of `name`, oldest first; ConfigError listing the models if it has none."""
        ...

    def current(self, name: str) -> str | None:
        """The current version id, or None when none is set."""
        ...

    def info(self, name: str, version: str | None = None) -> VersionInfo:
        """One version as listed (None: the current one), without hashing its files."""
        ...

    def verify(self, name: str, version: str, progress: Callable[[], None] | None = None) -> VersionInfo:
        """Recompute every checksum of a version; StateError naming model, version and file on any mismatch."""
        ...

    def load_path(self, name: str, version: str | None = None,
                  progress: Callable[[], None] | None = None) -> VersionInfo:
        """The verified version (None: the current one) whose local `path` is handed to `plugin.load`."""
        ...

    def write(self, name: str, save: Callable[[Path], list[str]], manifest: dict, *,
              make_current: bool = True) -> VersionInfo:
        """Store a new version written by `save(folder)`, and by default make it current."""
        ...

    def set_current(self, name: str, version: str) -> None:
        """Make an existing version current (a rollback); it must verify first."""
        ...

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove all but the newest `keep` versions, never the current one; the removed ids, oldest first."""
        ...
