"""The folder model store under its first import path, which third-party plugins, scripts and the Makefile's
users may import; the store itself is inspector.stores.folder, typed by inspector.stores.Store."""

from inspector.stores.folder import ModelStore, age, created_time, file_mode
from inspector.stores.protocol import Store, VersionInfo

__all__ = ["ModelStore", "Store", "VersionInfo", "age", "created_time", "file_mode"]
