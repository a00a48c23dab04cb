"""Exported backbone graphs kept between processes, so a restarted worker or a refit skips the export.

Exporting the backbone to ONNX takes seconds (3 on an idle 2-core machine, 10 under load) and every process
paid it at its first load: a worker restarted by its supervisor was that much later ready. The graph depends
only on the backbone's architecture, its digest-checked weights, its layers, the input size and the versions
of torch, timm and onnx that exported it, so it is kept under a name hashed from exactly those, in a folder
of this user's alone (0700, refused when another user owns it or can write to it, as ssh refuses a key file).

A graph read back is never trusted blindly: the runner built from it must reproduce the torch module's
features on a seeded probe batch (`reproduces`), or the graph is exported again and the file replaced. A
version's scores therefore never depend on what the cache holds. Nothing is unpickled: a graph is ONNX bytes,
parsed by the runtime as a fresh export would be.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePath

import torch

log = logging.getLogger(__name__)

OFF = "off"
AUTO = "auto"
MAX_GRAPH_BYTES = 512 * 2**20  # far above any backbone we export (the shipped one: 12 MB)
MAX_KEPT = 8  # graphs kept, the least recently used go first: a few backbones and sizes, not every upgrade's
# A cached graph's runner must give the torch module's features to within this share of the largest feature on
# the probe: float32 noise is 1e-6 (tests/test_runtimes.py), bf16 on a CPU without AMX measured up to 12%.
PROBE_TOLERANCE = {"fp32": 1e-4, "bf16": 0.2}

_folder: Path | None = None
_warned: set[str] = set()


def folder_for(setting: str, environ: Mapping[str, str], home: str) -> PurePath | None:
    """Where `setting` keeps graphs for a process with this environment and home folder: 'auto':
    $XDG_CACHE_HOME/inspector/graphs, else HOME/.cache/inspector/graphs; 'off': nowhere; else that folder."""
    if setting == OFF:
        return None
    if setting == AUTO:
        return PurePath(environ.get("XDG_CACHE_HOME") or PurePath(home) / ".cache") / "inspector" / "graphs"
    return PurePath(home) / setting[2:] if setting.startswith("~/") else PurePath(setting)


def use(setting: str) -> None:
    """Keep graphs where `setting` says (folder_for). Process-wide, as the runners are."""
    global _folder
    where = folder_for(setting, os.environ, str(Path.home()))
    _folder = None if where is None else Path(where)


def _warn_once(message: str, *args: object) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message, *args)


def _usable_folder() -> Path | None:
    """The cache folder, made 0700 if missing; None (said once) where it cannot be made or is not ours alone."""
    folder = _folder
    if folder is None:
        return None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.stat()
    except OSError as exc:
        _warn_once("graph cache %s cannot be used (%s): each process exports the backbone itself", folder, exc)
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        _warn_once("graph cache %s is not this user's alone (owner uid %d, mode %o): not used; make it 0700 and "
                   "owned by uid %d, or set plugins.dfkde.graph_cache to another folder or 'off'",
                   folder, status.st_uid, status.st_mode & 0o777, os.getuid())
        return None
    return folder


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def entry_name(key: tuple, input_size: int, opset: int) -> str:
    """The file a graph is kept in: a hash of everything the exported bytes depend on."""
    identity = [repr(part) for part in key] + [str(input_size), str(opset), torch.__version__,
                                               _package("timm"), _package("onnx")]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32] + ".onnx"


def read(name: str) -> bytes | None:
    """The kept graph `name`, or None when there is none (or it cannot be read: said once)."""
    folder = _usable_folder()
    if folder is None:
        return None
    path = folder / name
    try:
        if path.stat().st_size > MAX_GRAPH_BYTES:
            _warn_once("graph cache: %s is over %d bytes: not read", path, MAX_GRAPH_BYTES)
            return None
        graph = path.read_bytes()
        os.utime(path)  # recently used: the last to go
        return graph
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once("graph cache: cannot read %s (%s): exporting instead", path, exc)
        return None


def write(name: str, graph: bytes) -> None:
    """Keep `graph` as `name`, atomically (a reader sees the old file or the whole new one), mode 0600."""
    folder = _usable_folder()
    if folder is None:
        return
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".graph-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(graph)
            os.replace(temporary, folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        kept = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[MAX_KEPT:]:
            old.unlink(missing_ok=True)
    except OSError as exc:
        _warn_once("graph cache: cannot write to %s (%s): each process exports the backbone itself", folder, exc)


def reproduces(features: list[torch.Tensor], expected: list[torch.Tensor], precision: str) -> bool:
    """Whether a runner's `features` on the probe are the torch module's `expected` ones, within float noise."""
    if len(features) != len(expected):
        return False
    tolerance = PROBE_TOLERANCE.get(precision, PROBE_TOLERANCE["bf16"])
    for got, want in zip(features, expected):
        if got.shape != want.shape:
            return False
        largest = want.abs().max().item() or 1.0
        if not (got.float() - want.float()).abs().max().item() <= tolerance * largest:  # NaN fails too
            return False
    return True


def probe_batch(input_size: int) -> torch.Tensor:
    """Two seeded normalised images: what a cached graph's runner is checked on."""
    return torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(20261207))
