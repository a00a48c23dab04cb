"""The model store and a model's load under hostile versions: a FIFO named in a manifest, a settings.json that
asks for a giant backbone, and an S3 object grown past the size its manifest states.

Bounded: the product's store and DFKDE loader refuse each at once. Unbounded: the paths they replaced, kept
here as the baseline: a plain blocking open to hash the file, the backbone built from the stored settings
before any check, a download read to its end before its digest is compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from hostile import Case

GIANT = "convnext_xlarge"  # 350 M parameters: 1.4 GB as fp32, built twice by the old path; over the bound
GROWN_BYTES = 256 << 20  # what an object grown in the bucket holds, against the 2 KiB its manifest states


def _store_with_fifo() -> tuple[object, str]:
    from inspector.stores import ModelStore

    store = ModelStore(Path(tempfile.mkdtemp()) / "models")

    def save(folder: Path) -> list[str]:
        (folder / "state.safetensors").write_bytes(os.urandom(4096))
        return ["state.safetensors"]

    info = store.write("line1", save, {"plugin": "fake"})
    (info.path / "state.safetensors").unlink()
    os.mkfifo(info.path / "state.safetensors")
    return store, info.version


def fifo_bounded() -> str:
    from inspector.errors import StateError

    store, version = _store_with_fifo()
    try:
        store.verify("line1", version)
    except StateError as exc:
        return "refused: not a regular file" if "not a regular file" in str(exc) else f"refused: {exc}"
    return "loaded (a bug)"


def fifo_unbounded() -> str:
    """The old hashing: a blocking open of whatever the manifest names (it waits for a writer for ever)."""
    store, version = _store_with_fifo()
    path = store.root / "line1" / "versions" / version / "state.safetensors"
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    os.close(fd)
    return "opened"


def _giant_settings() -> Path:
    folder = Path(tempfile.mkdtemp())
    settings = {"backbone": GIANT, "layers": ["stages.3"], "weights": "none", "n_comps": 16, "pre_processing": "scale",
                "filter_count": 40000, "threshold_steepness": 0.05, "threshold_offset": 12.0, "input_size": 224,
                "precision": "fp32", "seed": 0}
    meta = {"format": "dfkde.state/1", "settings": settings, "backbone_digest": "0" * 64, "plugin": {}}
    (folder / "settings.json").write_text(json.dumps(meta))
    (folder / "state.safetensors").write_bytes(b"\0" * 64)
    return folder


def giant_bounded() -> str:
    import torch

    from inspector.errors import StateError
    from inspector_dfkde.plugin import DfkdePlugin

    try:
        DfkdePlugin.load(_giant_settings(), torch.device("cpu"))
    except StateError as exc:
        return "refused: parameters over the bound" if "parameters" in str(exc) else f"refused: {exc}"
    return "loaded (a bug)"


def giant_unbounded() -> str:
    """The old load: the backbone built from the stored settings, before the digest (or anything) is checked."""
    from inspector_dfkde.model import DfkdeModel

    settings = json.loads((_giant_settings() / "settings.json").read_text())["settings"]
    DfkdeModel(settings.pop("backbone"), **settings)
    return "built, then refused by the digest"


class _EndlessBody:
    """An S3 body of GROWN_BYTES zeros, as botocore's StreamingBody reads them."""

    def __init__(self) -> None:
        self.left = GROWN_BYTES

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return b"\0" * size


class _GrownClient:
    def get_object(self, **_: object) -> dict:
        return {"Body": _EndlessBody()}


def grown_bounded() -> str:
    from inspector.errors import StateError
    from inspector.stores import S3ModelStore

    store = S3ModelStore("s3://bucket/models", Path(tempfile.mkdtemp()), client=_GrownClient())
    try:
        store._download("models/line1/versions/v/state.safetensors", Path(tempfile.mkdtemp()) / "f", 2048)
    except StateError:
        return "refused past 2048 bytes"
    return "downloaded (a bug)"


def grown_unbounded() -> str:
    """The old download: the whole object to disk, then hashed and found wrong."""
    path = Path(tempfile.mkdtemp()) / "f"
    body = _EndlessBody()
    with open(path, "wb") as out:
        for chunk in iter(lambda: body.read(1 << 20), b""):
            out.write(chunk)
    digest = hashlib.sha256()
    with open(path, "rb") as back:
        for chunk in iter(lambda: back.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.stat().st_size >> 20} MiB written, then refused ({digest.hexdigest()[:6]}...)"


CASES: list[Case] = [
    Case("store: a manifest naming a FIFO", fifo_bounded, fifo_unbounded, unbounded_limit_s=10.0),
    Case(f"store: settings.json asking for {GIANT} (350 M parameters)", giant_bounded, giant_unbounded,
         unbounded_limit_s=120.0),
    Case("store: an S3 object grown to 256 MiB past its stated 2 KiB", grown_bounded, grown_unbounded),
]
