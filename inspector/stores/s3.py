"""The model store on S3-compatible storage (AWS S3, MinIO, Ceph, SeaweedFS), so that one refit reaches
the workers of every host.

The same promises as the folder store (stores.folder), kept with what S3 offers instead of renames
and locks:

- a version's files go up first and its manifest last, with `If-None-Match: *`: a version is visible
  (listed, loadable) only once complete, and two writers can never both write one version id;
- `current` is switched by one PUT, conditional on the `current` the writer read before it began
  (`If-Match` its ETag, or `If-None-Match: *` when there was none): of two concurrent writers one
  wins and the other is told, its version stored but not current;
- loading downloads a version into a local cache and verifies every checksum there before the plugin
  reads it; a cached version that still verifies is not downloaded again (a restart is quick), and
  one that does not is fetched anew. No file is downloaded past the size its manifest states, so an
  object grown in the bucket costs neither the disk nor the time of reading it whole before it is refused.

Layout under `s3://BUCKET/PREFIX/`, as in the folder store: `<name>/versions/<version>/<files>`,
`<name>/versions/<version>/manifest.json`, `<name>/current`.

Endpoint and credentials come from the standard AWS environment, through stores.s3client (as for the
evidence archive); boto3 is imported only when an s3:// store is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inspector.errors import ConfigError, StateError, VersionIncomplete
from inspector.stores.folder import (
    CURRENT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODEL_NAME_PATTERN,
    VERSIONS,
    ModelStore,
    age,
    created_time,
)
from inspector.stores.protocol import VersionInfo
from inspector.stores.s3client import Conflict, Missing, S3Bucket

log = logging.getLogger(__name__)

CACHE_KEEP = 3  # verified versions kept per model in the local cache
# A version written before manifests stated sizes is downloaded up to this per file; a DFKDE state is a few MB.
MAX_UNSIZED_BYTES = 4 << 30
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


class S3ModelStore:
    """The versions of every model under one S3 bucket and prefix, with a verified local cache (a `Store`)."""

    def __init__(self, url: str, cache_dir: Path, client: Any = None) -> None:
        self.s3 = S3Bucket(url, client, setting="store.path", what="the model store")
        self.bucket, self.prefix, self.root = self.s3.name, self.s3.prefix, self.s3.root
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache = ModelStore(Path(cache_dir).expanduser() / f"{self.bucket}-{key}")

    @property
    def client(self) -> Any:
        return self.s3.client

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models that have at least one complete version, sorted."""
        found = []
        for common in self.s3.prefixes(self.prefix):
            name = common[len(self.prefix):].rstrip("/")
            if _MODEL_NAME.match(name) and self._version_ids(name):
                found.append(name)
        return sorted(found)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of `name`, oldest first; ConfigError listing the models if it has none."""
        ids = self._ids_or_unknown(name)
        current = self.current(name)
        return sorted((self._info(name, version, current, strict=False) for version in ids), key=age)

    def current(self, name: str) -> str | None:
        """The current version id, or None when none is set."""
        text = self._get_text(self._key(name, CURRENT))
        if text is None:
            return None
        text = text.strip()
        if not _VERSION.match(text):
            raise StateError(f"model {name!r}: {self.root}{name}/{CURRENT} holds {text[:80]!r}, not a version id; "
                             "choose a version with `inspector models rollback`")
        return text

    def info(self, name: str, version: str | None = None) -> VersionInfo:
        version = self._resolve(name, version)
        return self._info(name, version, self.current(name), strict=True)

    def verify(self, name: str, version: str, progress: Callable[[], None] | None = None) -> VersionInfo:
        """Download (unless cached and intact) and recompute every checksum; StateError on any mismatch.
        `progress` is called after each MiB downloaded or hashed (a watchdog's beat)."""
        version = self._resolve(name, version)
        self._mirror(name, version, progress)
        local = self.cache.verify(name, version, progress)
        return VersionInfo(name=name, version=version, created_at=local.created_at, plugin=local.plugin,
                           current=version == self.current(name), path=local.path, manifest=local.manifest)

    def load_path(self, name: str, version: str | None = None,
                  progress: Callable[[], None] | None = None) -> VersionInfo:
        """The verified local copy of a version (None: the current one), whose `path` goes to `plugin.load`."""
        return self.verify(name, self._resolve(name, version), progress)

    # -- writing ---------------------------------------------------------------------------

    def write(self, name: str, save: Callable[[Path], list[str]], manifest: dict, *,
              make_current: bool = True) -> VersionInfo:
        """Write a version (files, then the manifest) and by default make it current, conditionally."""
        expected = self._current_etag(name)  # what `current` was before this writer began
        existing = [self._info(name, v, None, strict=False) for v in self._version_ids(name)]
        newest = max((created_time(info) for info in existing), default=None)
        staged = self.cache.write(name, save, manifest, make_current=False, after=newest)
        version = staged.version
        folder = f"{self.prefix}{name}/{VERSIONS}/{version}/"
        for file in sorted(staged.manifest["files"]):
            self._put(folder + file, (staged.path / file).read_bytes())
        try:
            self._put(folder + MANIFEST, (staged.path / MANIFEST).read_bytes(), if_none_match=True)
        except Conflict:
            raise StateError(f"model {name!r}: version {version} was written by another writer at the same "
                             "moment; nothing was changed") from None
        if make_current:
            self._switch(name, version, expected, written=True)
        log.info("model %s: wrote version %s to %s%s", name, version, self.root, " (current)" if make_current else "")
        return self.info(name, version)

    def set_current(self, name: str, version: str) -> None:
        """Make an existing version current (a rollback); it must download and verify first."""
        version = self._resolve(name, version)
        expected = self._current_etag(name)
        self.verify(name, version)
        self._switch(name, version, expected, written=False)
        log.info("model %s: current version is now %s", name, version)

    def prune(self, name: str, keep: int) -> list[str]:
        """Remove all but the newest `keep` versions, never the current one; manifests go first, so a
        version being pruned is never listed half-deleted."""
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ConfigError(f"prune: keep must be a whole number of at least 1, got {keep!r}")
        listed = self.versions(name)
        current = self.current(name)
        doomed = [info.version for info in listed[:-keep] if info.version != current]
        for version in doomed:
            folder = f"{self.prefix}{name}/{VERSIONS}/{version}/"
            self.s3.delete([folder + MANIFEST])
            self.s3.delete([key for key in self.s3.keys(folder)])
        if doomed:
            log.info("model %s: pruned %s from %s", name, ", ".join(doomed), self.root)
        return doomed

    # -- internals -------------------------------------------------------------------------

    def _key(self, name: str, *parts: str) -> str:
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise ConfigError(f"invalid model name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                              "starting with a letter or digit")
        return "/".join((f"{self.prefix}{name}", *parts))

    def _version_ids(self, name: str) -> list[str]:
        folder = self._key(name, VERSIONS) + "/"
        ids = set()
        for key in self.s3.keys(folder):
            version, _, file = key[len(folder):].partition("/")
            if file == MANIFEST and _VERSION.match(version):
                ids.add(version)
        return sorted(ids)

    def _ids_or_unknown(self, name: str) -> list[str]:
        ids = self._version_ids(name)
        if not ids:
            raise ConfigError(f"unknown model {name!r}; models in {self.root}: {', '.join(self.names()) or 'none'}")
        return ids

    def _resolve(self, name: str, version: str | None) -> str:
        ids = self._ids_or_unknown(name)
        if version is None:
            current = self.current(name)
            if current is None:
                raise ConfigError(f"model {name!r} has no current version; versions: {', '.join(ids)}; choose one "
                                  "with `inspector models rollback`")
            if current not in ids:
                raise VersionIncomplete(f"model {name!r}: current version {current} is missing from {self.root}; "
                                 f"versions: {', '.join(ids)}")
            return current
        if version not in ids:
            raise ConfigError(f"unknown version {version!r} of model {name!r}; versions: {', '.join(ids)}")
        return version

    def _info(self, name: str, version: str, current: str | None, *, strict: bool) -> VersionInfo:
        manifest: dict = {}
        text = self._get_text(self._key(name, VERSIONS, version, MANIFEST), limit=MAX_MANIFEST_BYTES)
        try:
            if text is None:
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: missing")
            loaded = json.loads(text)
            if not isinstance(loaded, dict):
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: not a JSON object")
            manifest = loaded
        except (ValueError, RecursionError) as exc:
            if strict:
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: cannot be read: {exc!r:.200}") \
                    from None
        except StateError:
            if strict:
                raise
        created, plugin = manifest.get("created_at"), manifest.get("plugin")
        return VersionInfo(name=name, version=version, created_at=created if isinstance(created, str) else "",
                           plugin=plugin if isinstance(plugin, str) else "", current=version == current,
                           path=self.cache.root / name / VERSIONS / version, manifest=manifest)

    def _mirror(self, name: str, version: str, progress: Callable[[], None] | None = None) -> None:
        """Make the cache hold an intact copy of the version: keep one that verifies, else download anew
        into a hidden folder and rename it into place."""
        target = self.cache.root / name / VERSIONS / version
        if target.is_dir():
            try:
                self.cache.verify(name, version, progress)
                return
            except StateError as exc:
                log.warning("model %s: cached version %s is damaged (%s); downloading it again", name, version, exc)
                shutil.rmtree(target)
        incoming = self.cache.root / name / f".incoming-{secrets.token_hex(8)}"
        incoming.mkdir(parents=True)
        try:
            folder = self._key(name, VERSIONS, version) + "/"
            text = self._get_text(folder + MANIFEST, limit=MAX_MANIFEST_BYTES)
            if text is None:
                raise VersionIncomplete(f"model {name!r} version {version}: {MANIFEST}: missing from {self.root}")
            (incoming / MANIFEST).write_text(text, encoding="utf-8")
            try:
                manifest = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: cannot be read: {exc!r:.200}") \
                    from None
            files = manifest.get("files") if isinstance(manifest, dict) else None
            sizes = manifest.get("sizes", {}) if isinstance(manifest, dict) else None
            if not isinstance(files, dict) or not isinstance(sizes, dict):
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: no files map, or a bad sizes map")
            for file in files:
                if "/" in file or file in (".", "..", MANIFEST):
                    raise StateError(f"model {name!r} version {version}: {MANIFEST}: bad file name {file!r}")
                limit = sizes.get(file, MAX_UNSIZED_BYTES)
                if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                    raise StateError(f"model {name!r} version {version}: {MANIFEST}: bad size {limit!r} of {file}")
                self._download(folder + file, incoming / file, limit, progress)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(incoming, target)
            except OSError:  # another worker on this host mirrored it meanwhile: keep theirs, verified after
                if not target.is_dir():
                    raise
                shutil.rmtree(incoming, ignore_errors=True)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        self._trim_cache(name, keep={version})

    def _trim_cache(self, name: str, keep: set[str]) -> None:
        """At most CACHE_KEEP versions of a model in the cache, the newest by id, plus those in `keep`."""
        folder = self.cache.root / name / VERSIONS
        cached = sorted(p.name for p in folder.iterdir() if _VERSION.match(p.name))
        for version in cached[:-CACHE_KEEP]:
            if version not in keep:
                shutil.rmtree(folder / version, ignore_errors=True)

    def _current_etag(self, name: str) -> str | None:
        try:
            return self.s3.call("head_object", Bucket=self.bucket, Key=self._key(name, CURRENT))["ETag"]
        except Missing:
            return None

    def _switch(self, name: str, version: str, expected: str | None, *, written: bool) -> None:
        try:
            self._put(self._key(name, CURRENT), f"{version}\n".encode(), if_match=expected,
                      if_none_match=expected is None)
        except Conflict:
            stored = "is stored but not current" if written else "was not made current"
            raise StateError(f"model {name!r}: another writer changed the current version while this one ran; "
                             f"version {version} {stored}. Look with `inspector models list`, and make it current "
                             f"with `inspector models rollback {name} {version}` if it should be") from None

    def _put(self, key: str, body: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> None:
        extra: dict[str, Any] = {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        elif if_none_match:
            extra["IfNoneMatch"] = "*"
        self.s3.call("put_object", Bucket=self.bucket, Key=key, Body=body, **extra)

    def _get_text(self, key: str, limit: int = 4096) -> str | None:
        try:
            answer = self.s3.call("get_object", Bucket=self.bucket, Key=key)
        except Missing:
            return None
        data = answer["Body"].read(limit + 1)
        if len(data) > limit:
            raise StateError(f"{self.root}{key[len(self.prefix):]}: over {limit} bytes; not a file the store wrote")
        return data.decode("utf-8", errors="replace")

    def _download(self, key: str, path: Path, limit: int, progress: Callable[[], None] | None = None) -> None:
        """Fetch one object into `path`, refusing it (StateError) once it is over `limit` bytes: the size its
        manifest states. What is past the limit is never read, let alone written."""
        where = f"{self.root}{key[len(self.prefix):]}"
        try:
            answer = self.s3.call("get_object", Bucket=self.bucket, Key=key)
        except Missing:
            raise VersionIncomplete(f"{where}: missing") from None
        body = answer["Body"]
        try:
            declared = answer.get("ContentLength")
            if isinstance(declared, int) and declared > limit:
                raise StateError(f"{where}: over the {limit} bytes its manifest states ({declared} bytes stored)")
            got = 0
            with open(path, "wb") as out:
                while chunk := body.read(min(1 << 20, limit + 1 - got)):
                    got += len(chunk)
                    if got > limit:
                        raise StateError(f"{where}: over the {limit} bytes its manifest states")
                    out.write(chunk)
                    if progress is not None:
                        progress()
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
