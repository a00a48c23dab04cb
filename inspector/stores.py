"""The model store a configuration names: a local folder (inspector.store) or S3 (inspector.s3store).

Every command and the worker open the store through `open_store`, so `store.path = "s3://bucket/prefix"`
works everywhere a folder does.
"""

from __future__ import annotations

from pathlib import Path

from inspector.config import StoreSettings
from inspector.s3store import S3ModelStore, is_s3_url
from inspector.store import ModelStore


def open_store(settings: StoreSettings) -> ModelStore | S3ModelStore:
    if is_s3_url(settings.path):
        return S3ModelStore(str(settings.path), Path(settings.cache_dir).expanduser())
    return ModelStore(Path(settings.path))
