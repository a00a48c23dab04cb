"""The folder model store: fitted plugin states on disk, one folder per version, switched atomically.

Line engineers run this for months, so a crash, SIGKILL or Ctrl-C at any point
while writing must leave the previous current version in place and nothing
half-written that could be loaded. Every step is therefore either invisible to
readers (work inside `.incoming-*`) or a single atomic rename. Plain files and
JSON only: nothing is loaded with pickle, and this module does not import torch.

Layout::

    <root>/<name>/versions/<version>/manifest.json    # written last; lists every file and its sha256
    <root>/<name>/versions/<version>/<plugin files>   # what the plugin's `save(folder)` wrote
    <root>/<name>/current          # the current version id; replaced with os.replace
    <root>/<name>/.incoming-*/     # versions being written (or pruned); never read, removed by the next writer
    <root>/<name>/current.tmp-*    # a current switch in flight; removed by the next writer
    <root>/<name>/.lock            # fcntl.flock advisory lock held while writing, switching or pruning

Version ids are `YYYYMMDDTHHMMSSZ-xxxxxx`: the UTC creation second, then the first
6 hex digits of the version's checksum (`20261128T101500Z-3f9c2a`). They sort by
time; within one second `versions()` orders by the manifest's millisecond
`created_at`. A writer never gives a new version a `created_at` at or before the
newest existing one (a clock stepped back after a reboot would otherwise make the
newest version look oldest, and prune would remove it first).

The manifest is the caller's dict plus `schema`, `name`, `version`, `created_at`
(RFC 3339 UTC, milliseconds), `files` ({filename: sha256}), `sizes` ({filename: bytes}; absent from
versions written before it existed) and `checksum`: the
sha256 of the UTF-8 text made of one `filename:sha256\\n` line per file, sorted by
filename. A version folder verifies when it holds exactly `manifest.json` and the
listed files, each a regular file of its stated size with its recorded hash. Every file is opened
non-blocking and checked to be a regular file before it is read, so a FIFO or a device planted in a
version is refused at once instead of blocking the reader for ever; a size that differs is refused
before a byte is hashed, and a remote store downloads no more than the stated size.

A file or manifest that is missing, or a `current` naming a version not listed yet, raises
VersionIncomplete (a lagging NFS or S3-compatible listing shows this for a while: worth trying again);
any other mismatch is a plain StateError (the version is wrong and stays wrong).

A version that was renamed into `versions/` but never made current (a crash
between the rename and the switch) is complete and verifies; it is simply not
current.

The lock is per model and only serialises writers (write, set_current, prune).
Readers take no lock: they only ever see whole versions and a whole `current`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from inspector.errors import ConfigError, PluginError, StateError, VersionIncomplete
from inspector.stores.protocol import VersionInfo
from inspector.timestamps import rfc3339

MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # a manifest is a few KB; a larger file is not one
MAX_CURRENT_BYTES = 4096  # `current` holds one version id

log = logging.getLogger(__name__)

SCHEMA = "inspector.manifest/1"
MANIFEST = "manifest.json"
CURRENT = "current"
LOCK = ".lock"
VERSIONS = "versions"
INCOMING_PREFIX = ".incoming-"
CURRENT_TMP_PREFIX = "current.tmp-"

# The same rule as config.MODEL_NAME_PATTERN (not imported: config pulls in torch),
# so any name the configuration accepts is one the store accepts. It also keeps
# names to one path component that is not hidden: no traversal, no `..`.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
# Plugin file names: one plain, non-hidden path component, and nothing that could
# break the `filename:sha256` lines of the checksum.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = ("schema", "name", "version", "created_at", "files", "sizes", "checksum")
_CHUNK = 1 << 20


def _utcnow() -> datetime:
    """The wall clock, in UTC; a module function so tests can pin it."""
    return datetime.now(timezone.utc)


class ModelStore:
    """The versions of every model under one root folder (a `Store`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models that have at least one complete version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in os.scandir(self.root)
            if _MODEL_NAME.match(entry.name)
            and entry.is_dir(follow_symlinks=False)
            and self._version_ids(Path(entry.path))
        )

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of `name`, oldest first; ConfigError listing the models if it has none.

        Manifests are read but not verified (that hashes every file); a version whose
        manifest cannot be read is still listed, with an empty manifest, so an operator
        sees it and prune can remove it.
        """
        model_dir = self._model_dir(name)
        ids = self._version_ids(model_dir)
        if not ids:
            raise ConfigError(f"unknown model {name!r}; models in {self.root}: {_listing(self.names())}")
        current = self._read_current(name, model_dir)
        infos = [self._info(name, model_dir, version, current, strict=False) for version in ids]
        return sorted(infos, key=age)

    def current(self, name: str) -> str | None:
        """The current version id, or None when none is set (including a model with no versions yet)."""
        return self._read_current(name, self._model_dir(name))

    def info(self, name: str, version: str | None = None) -> VersionInfo:
        """One version as listed (None: the current one), without hashing its files."""
        model_dir = self._model_dir(name)
        version = self._resolve(name, model_dir, version)
        return self._info(name, model_dir, version, self._read_current(name, model_dir), strict=True)

    def verify(self, name: str, version: str, progress: Callable[[], None] | None = None) -> VersionInfo:
        """Recompute every checksum of a version; StateError naming model, version and file on any mismatch.
        `progress` is called after each MiB hashed (a watchdog's beat)."""
        model_dir = self._model_dir(name)
        version = self._resolve(name, model_dir, version)
        return self._verify(name, model_dir, version, progress)

    def load_path(self, name: str, version: str | None = None,
                  progress: Callable[[], None] | None = None) -> VersionInfo:
        """The verified version (None: the current one) whose `path` is handed to `plugin.load`."""
        return self.verify(name, self._resolve(name, self._model_dir(name), version), progress)

    # -- writing ---------------------------------------------------------------------------

    def write(
        self,
        name: str,
        save: Callable[[Path], list[str]],
        manifest: dict,
        *,
        make_current: bool = True,
        after: datetime | None = None,
    ) -> VersionInfo:
        """Store a new version written by `save(folder)`, and by default make it current.

        The caller's `manifest` must hold `plugin` (str) and JSON data only; it is
        copied, never changed. If anything raises (KeyboardInterrupt included) the
        store is left as it was: the incoming folder is removed, and a version already
        renamed into place but not yet current is removed again.
        """
        model_dir = self._model_dir(name)
        base = _caller_manifest(manifest)
        self.root.mkdir(parents=True, exist_ok=True)
        _make_dir(model_dir)
        with _locked(model_dir):
            versions_dir = _make_dir(model_dir / VERSIONS)
            self._clean_leftovers(model_dir)
            incoming = model_dir / f"{INCOMING_PREFIX}{secrets.token_hex(8)}"
            incoming.mkdir()
            version = ""
            renamed = False
            try:
                names = save(incoming)
                _same_mode(incoming, names)
                files = _collect(incoming, names, base["plugin"])
                sizes = {file: os.stat(incoming / file).st_size for file in files}
                created = self._next_time(name, model_dir, after)
                checksum = _checksum(files)
                version = f"{created.strftime('%Y%m%dT%H%M%SZ')}-{checksum[:6]}"
                final = versions_dir / version
                if os.path.lexists(final):
                    raise StateError(
                        f"model {name!r}: version {version} already exists (the same files were written "
                        "within the same second); nothing was written"
                    )
                data = {
                    **base,
                    "schema": SCHEMA,
                    "name": name,
                    "version": version,
                    "created_at": rfc3339(created),
                    "files": files,
                    "sizes": sizes,
                    "checksum": checksum,
                }
                text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
                _write_file(incoming / MANIFEST, text.encode())
                _fsync_dir(incoming)
                os.rename(incoming, final)
                renamed = True
                _fsync_dir(versions_dir)
                if make_current:
                    self._switch(model_dir, version)
            except BaseException:
                self._undo_write(name, model_dir, incoming, version if renamed else "")
                raise
        log.info("model %s: wrote version %s%s", name, version, " (current)" if make_current else "")
        return self.info(name, version)

    def set_current(self, name: str, version: str) -> None:
        """Make an existing version current (this is how a rollback is done); it must verify first."""
        model_dir = self._model_dir(name)
        self._resolve(name, model_dir, version)  # an unknown model has no folder to lock
        with _locked(model_dir):
            version = self._resolve(name, model_dir, version)
            self._verify(name, model_dir, version)
            self._switch(model_dir, version)
        log.info("model %s: current version is now %s", name, version)

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove all but the newest `keep` versions, never the current one; returns the removed ids, oldest first."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError(f"prune: keep must be a whole number of at least 1, got {keep!r}")
        model_dir = self._model_dir(name)
        self.versions(name)  # an unknown model is an error, not a no-op
        with _locked(model_dir):
            self._clean_leftovers(model_dir)
            listed = self.versions(name)
            current = self._read_current(name, model_dir)
            doomed = [info.version for info in listed[:-keep] if info.version != current]
            for version in doomed:
                self._remove_version(model_dir, version)
        if doomed:
            log.info("model %s: pruned %s", name, ", ".join(doomed))
        return doomed

    # -- internals -------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise ConfigError(
                f"invalid model name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        return self.root / name

    @staticmethod
    def _version_ids(model_dir: Path) -> list[str]:
        try:
            entries = list(os.scandir(model_dir / VERSIONS))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if _VERSION.match(e.name) and e.is_dir(follow_symlinks=False))

    @staticmethod
    def _read_current(name: str, model_dir: Path) -> str | None:
        try:
            text = _read_small(model_dir / CURRENT, MAX_CURRENT_BYTES).decode("utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"model {name!r}: cannot read {model_dir / CURRENT}: {exc}") from exc
        if not _VERSION.match(text):
            raise StateError(
                f"model {name!r}: {model_dir / CURRENT} holds {text[:80]!r}, not a version id; "
                "choose a version with set_current"
            )
        return text

    def _resolve(self, name: str, model_dir: Path, version: str | None) -> str:
        """`version` (None: the current one), checked to exist."""
        ids = self._version_ids(model_dir)
        if not ids:
            raise ConfigError(f"unknown model {name!r}; models in {self.root}: {_listing(self.names())}")
        if version is None:
            current = self._read_current(name, model_dir)
            if current is None:
                raise ConfigError(
                    f"model {name!r} has no current version; versions: {_listing(ids)}; "
                    "choose one with set_current"
                )
            if current not in ids:
                raise VersionIncomplete(
                    f"model {name!r}: current version {current} is missing from {model_dir / VERSIONS}; "
                    f"versions: {_listing(ids)}"
                )
            return current
        if version not in ids:
            raise ConfigError(f"unknown version {version!r} of model {name!r}; versions: {_listing(ids)}")
        return version

    def _info(self, name: str, model_dir: Path, version: str, current: str | None, *, strict: bool) -> VersionInfo:
        path = model_dir / VERSIONS / version
        try:
            manifest = _read_manifest(name, version, path)
        except StateError:
            if strict:
                raise
            manifest = {}
        created_at = manifest.get("created_at")
        plugin = manifest.get("plugin")
        return VersionInfo(
            name=name,
            version=version,
            created_at=created_at if isinstance(created_at, str) else "",
            plugin=plugin if isinstance(plugin, str) else "",
            current=version == current,
            path=path,
            manifest=manifest,
        )

    def _verify(self, name: str, model_dir: Path, version: str,
                progress: Callable[[], None] | None = None) -> VersionInfo:
        path = model_dir / VERSIONS / version
        manifest = _read_manifest(name, version, path)

        def bad(file: str, problem: str) -> StateError:
            return StateError(f"model {name!r} version {version}: {file}: {problem}")

        if manifest.get("schema") != SCHEMA:
            raise bad(MANIFEST, f"schema is {manifest.get('schema')!r}, expected {SCHEMA!r}")
        for key, expected in (("name", name), ("version", version)):
            if manifest.get(key) != expected:
                raise bad(MANIFEST, f"{key} is {manifest.get(key)!r}, expected {expected!r} (a moved folder?)")
        if not isinstance(manifest.get("plugin"), str) or not manifest["plugin"]:
            raise bad(MANIFEST, "no plugin named")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise bad(MANIFEST, "no files map")
        for file, digest in files.items():
            good_name = _FILE_NAME.match(file) and file != MANIFEST
            if not good_name or not isinstance(digest, str) or not _SHA256.match(digest):
                raise bad(MANIFEST, f"malformed files entry {file!r}: {digest!r}")
        sizes = manifest.get("sizes", {})
        if not isinstance(sizes, dict) or any(
            file not in files or not isinstance(size, int) or isinstance(size, bool) or size < 0
            for file, size in sizes.items()
        ):
            raise bad(MANIFEST, "malformed sizes map")
        checksum = _checksum(files)
        if manifest.get("checksum") != checksum:
            raise bad(MANIFEST, "checksum does not match its files map")
        if not version.endswith(checksum[:6]):
            raise bad(MANIFEST, f"checksum {checksum[:6]}... does not match the version id")
        for entry in sorted(os.listdir(path)):
            if entry.startswith(INCOMING_PREFIX):
                raise bad(entry, "an incoming folder inside a version; this version was not written by the store")
            if entry != MANIFEST and entry not in files:
                raise bad(entry, "not listed in the manifest")
        for file, digest in sorted(files.items()):
            try:
                found, stated = os.lstat(path / file), sizes.get(file)
                if not stat.S_ISREG(found.st_mode):
                    raise bad(file, "cannot be read: not a regular file")
                if stated is not None and found.st_size != stated:
                    raise bad(file, f"{found.st_size} bytes, the manifest states {stated}")
                actual = _hash_file(path / file, progress=progress)
            except FileNotFoundError:
                raise VersionIncomplete(f"model {name!r} version {version}: {file}: missing") from None
            except OSError as exc:
                raise bad(file, f"cannot be read: {exc}") from exc
            if actual != digest:
                raise bad(file, f"sha256 {actual[:12]}... does not match the manifest's {digest[:12]}...")
        return self._info(name, model_dir, version, self._read_current(name, model_dir), strict=True)

    def _next_time(self, name: str, model_dir: Path, after: datetime | None = None) -> datetime:
        """Now, to the millisecond, but always after the newest existing version (and after `after`: the
        newest version of a remote store this one stages for)."""
        now = _utcnow().astimezone(timezone.utc)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if after is not None:
            now = max(now, after + timedelta(milliseconds=1))
        ids = self._version_ids(model_dir)
        if not ids:
            return now
        newest = max((self._info(name, model_dir, v, None, strict=False) for v in ids), key=age)
        latest = created_time(newest)
        return max(now, latest + timedelta(milliseconds=1))

    def _switch(self, model_dir: Path, version: str) -> None:
        """Point `current` at `version`: write a temporary file, fsync, os.replace, fsync the folder."""
        tmp = model_dir / f"{CURRENT_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            _write_file(tmp, f"{version}\n".encode())
            os.replace(tmp, model_dir / CURRENT)
            _fsync_dir(model_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _remove_version(self, model_dir: Path, version: str) -> None:
        """Rename out of `versions/` first, so a crash never leaves a half-deleted version there."""
        doomed = model_dir / f"{INCOMING_PREFIX}deleting-{secrets.token_hex(8)}"
        os.rename(model_dir / VERSIONS / version, doomed)
        _fsync_dir(model_dir / VERSIONS)
        shutil.rmtree(doomed)

    def _undo_write(self, name: str, model_dir: Path, incoming: Path, renamed: str) -> None:
        """Leave the store as it was before a write that raised; never let cleanup hide the error."""
        try:
            if os.path.lexists(incoming):
                shutil.rmtree(incoming)
            if renamed and self._read_current(name, model_dir) != renamed:
                self._remove_version(model_dir, renamed)
        except Exception:  # noqa: BLE001 - the original error matters more; leftovers go with the next write
            log.warning("model %s: could not clean up after a failed write", name, exc_info=True)

    @staticmethod
    def _clean_leftovers(model_dir: Path) -> None:
        """Remove what crashed writers left. Called under the lock, so nobody else is writing them."""
        for entry in os.scandir(model_dir):
            if not (entry.name.startswith(INCOMING_PREFIX) or entry.name.startswith(CURRENT_TMP_PREFIX)):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                log.info("removed %s, left by an interrupted writer", entry.path)
            except OSError:
                log.warning("could not remove %s, left by an interrupted writer", entry.path, exc_info=True)


# -- helpers ---------------------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def age(info: VersionInfo) -> tuple[str, str, str]:
    """Sort key, oldest first: the id's second, then the millisecond `created_at`, then the id."""
    return (info.version[:16], info.created_at, info.version)


def created_time(info: VersionInfo) -> datetime:
    """A version's creation time: the manifest's when readable, else the id's second."""
    with contextlib.suppress(ValueError):
        return datetime.strptime(info.created_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return datetime.strptime(info.version[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def _caller_manifest(manifest: Any) -> dict:
    """A deep, JSON-clean copy of the caller's manifest, checked before any file is written."""
    if not isinstance(manifest, dict):
        raise ConfigError(f"a model manifest must be a dict, got {type(manifest).__name__}")
    if not isinstance(manifest.get("plugin"), str) or not manifest["plugin"]:
        raise ConfigError("a model manifest must name its plugin (`plugin`: str)")
    clashes = sorted(set(manifest) & set(_RESERVED))
    if clashes:
        raise ConfigError(f"manifest keys {', '.join(clashes)} are set by the store; leave them out")
    try:
        return json.loads(json.dumps(manifest, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a model manifest must be plain JSON data: {exc}") from exc


def _collect(folder: Path, returned: Any, plugin: str) -> dict[str, str]:
    """Check what `save` returned against what it wrote; hash and fsync each file."""
    if not isinstance(returned, (list, tuple)) or not all(isinstance(n, str) for n in returned):
        raise PluginError(f"plugin {plugin!r}: save must return a list of file names, got {returned!r}")
    names = set(returned)
    if len(names) != len(returned):
        raise PluginError(f"plugin {plugin!r}: save returned a file name twice: {sorted(returned)}")
    for file in sorted(names):
        if file == MANIFEST or not _FILE_NAME.match(file):
            raise PluginError(
                f"plugin {plugin!r}: save returned {file!r}; state files need plain names "
                f"(letters, digits, '_', '.', '-'; not {MANIFEST})"
            )
    written = {}
    for entry in os.scandir(folder):
        written[entry.name] = entry.is_file(follow_symlinks=False)
    unlisted = sorted(set(written) - names)
    if unlisted:
        raise PluginError(f"plugin {plugin!r}: save wrote files it did not return: {', '.join(unlisted)}")
    missing = sorted(names - set(written))
    if missing:
        raise PluginError(f"plugin {plugin!r}: save returned files it did not write: {', '.join(missing)}")
    not_files = sorted(n for n, is_file in written.items() if not is_file)
    if not_files:
        raise PluginError(f"plugin {plugin!r}: save must write plain files, not {', '.join(not_files)}")
    return {file: _hash_file(folder / file, sync=True) for file in sorted(names)}


def file_mode() -> int:
    """The mode every file of a version is written with: what the process umask allows a new file (0644 under
    the usual 022). A plugin's writer may choose its own (safetensors writes 0600), and a worker running as
    another user than the refit (the shipped systemd units) must read every file of it."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc: no race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _same_mode(folder: Path, names: Any) -> None:
    """Give each plain file a plugin's `save` wrote the version's file mode (see file_mode)."""
    mode = file_mode()
    for name in names if isinstance(names, (list, tuple)) else []:
        path = folder / str(name)
        if isinstance(name, str) and _FILE_NAME.match(name) and path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _checksum(files: dict[str, str]) -> str:
    lines = "".join(f"{file}:{files[file]}\n" for file in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _open_regular(path: Path, *, follow: bool = False) -> int:
    """A read-only descriptor of a regular file; OSError for anything else. Opened non-blocking, so a FIFO
    with no writer (or a device) is refused at once instead of blocking the open for ever."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return fd


def _read_small(path: Path, limit: int) -> bytes:
    """All of a regular file of at most `limit` bytes; OSError for a larger one or one that is not a file."""
    fd = _open_regular(path, follow=True)
    try:
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, min(_CHUNK, limit + 1 - len(data)))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(f"{path.name} is over {limit} bytes")
    return data


def _hash_file(path: Path, *, sync: bool = False, progress: Callable[[], None] | None = None) -> str:
    """sha256 of a regular file (symlinks, FIFOs and devices refused); with `sync`, also fsync it on the same
    descriptor; `progress` is called after each chunk."""
    fd = _open_regular(path)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress()
        if sync:
            os.fsync(fd)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _read_manifest(name: str, version: str, path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(_read_small(file, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        raise VersionIncomplete(f"model {name!r} version {version}: {MANIFEST}: missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's stack
        raise StateError(f"model {name!r} version {version}: {MANIFEST}: cannot be read: {exc!r:.200}") from None
    if not isinstance(manifest, dict):
        raise StateError(f"model {name!r} version {version}: {MANIFEST}: not a JSON object")
    return manifest


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write all of `data` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> Path:
    """mkdir that also makes the new entry durable in its parent."""
    if not path.is_dir():
        path.mkdir(exist_ok=True)
        _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Hold the model's advisory lock; the kernel drops it if the process dies, so a crash never wedges it."""
    fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
