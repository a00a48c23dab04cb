"""The model stores: a local folder (stores.folder) or S3 (stores.s3), both a `Store` (stores.protocol).

Every command and the worker open the store through `open_store`, so `store.path = "s3://bucket/prefix"`
works everywhere a folder does, and they use it through the `Store` protocol alone. stores.s3client is the
one way to S3, shared with the evidence archive. Importing this package loads neither boto3 nor pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from inspector.stores.folder import ModelStore
from inspector.stores.protocol import Store, VersionInfo
from inspector.stores.s3 import S3ModelStore
from inspector.stores.s3client import is_s3_url

if TYPE_CHECKING:
    from inspector.config import StoreSettings

__all__ = ["ModelStore", "S3ModelStore", "Store", "VersionInfo", "is_s3_url", "open_store"]


def open_store(settings: StoreSettings) -> Store:
    """The store `store.path` names: s3://bucket/prefix (with its local cache) or a folder."""
    if is_s3_url(settings.path):
        return S3ModelStore(str(settings.path), Path(settings.cache_dir).expanduser())
    return ModelStore(Path(settings.path))
