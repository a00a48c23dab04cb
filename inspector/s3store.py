"""The model store on S3-compatible storage (AWS S3, MinIO, Ceph, SeaweedFS), so that one refit reaches
the workers of every host.

The same promises as the folder store (inspector.store), kept with what S3 offers instead of renames
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

Endpoint and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), as every S3 tool
reads them; never from the configuration file. boto3 is imported only when an s3:// store is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inspector import secretfiles
from inspector.errors import ConfigError, StateError, StoreUnavailable, VersionIncomplete
from inspector.store import (
    CURRENT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MODEL_NAME_PATTERN,
    VERSIONS,
    ModelStore,
    VersionInfo,
    age,
    created_time,
)

log = logging.getLogger(__name__)

SCHEME = "s3://"
CACHE_KEEP = 3  # verified versions kept per model in the local cache
# A version written before manifests stated sizes is downloaded up to this per file; a DFKDE state is a few MB.
MAX_UNSIZED_BYTES = 4 << 30
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_MISSING = ("NoSuchKey", "404", "NotFound")
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def is_s3_url(path: str | os.PathLike) -> bool:
    return str(path).startswith(SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of `s3://bucket/prefix`; ConfigError naming store.path."""
    rest = url[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"store.path {url!r}: {bucket!r} is not an S3 bucket name (3 to 63 lower-case letters, "
                          "digits, '.' and '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"store.path {url!r}: the key prefix must be plain words separated by '/'")
    return bucket, f"{prefix}/" if prefix else ""


class S3ModelStore:
    """The versions of every model under one S3 bucket and prefix, with a verified local cache."""

    def __init__(self, url: str, cache_dir: Path, client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.root = f"{SCHEME}{self.bucket}/{self.prefix}"
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        self.cache = ModelStore(Path(cache_dir).expanduser() / f"{self.bucket}-{key}")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client()
        return self._client

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models that have at least one complete version, sorted."""
        found = []
        for common in self._list_prefixes(self.prefix):
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
        except _Conflict:
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
            self._delete([folder + MANIFEST])
            self._delete([key for key in self._list_keys(folder)])
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
        for key in self._list_keys(folder):
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
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: cannot be read: {exc!r:.200}") from None
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
                raise StateError(f"model {name!r} version {version}: {MANIFEST}: cannot be read: {exc!r:.200}") from None
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
            return self._call("head_object", Bucket=self.bucket, Key=self._key(name, CURRENT))["ETag"]
        except _Missing:
            return None

    def _switch(self, name: str, version: str, expected: str | None, *, written: bool) -> None:
        try:
            self._put(self._key(name, CURRENT), f"{version}\n".encode(), if_match=expected,
                      if_none_match=expected is None)
        except _Conflict:
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
        self._call("put_object", Bucket=self.bucket, Key=key, Body=body, **extra)

    def _get_text(self, key: str, limit: int = 4096) -> str | None:
        try:
            answer = self._call("get_object", Bucket=self.bucket, Key=key)
        except _Missing:
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
            answer = self._call("get_object", Bucket=self.bucket, Key=key)
        except _Missing:
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

    def _list_keys(self, prefix: str) -> Iterator[str]:
        for page in self._pages(Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _list_prefixes(self, prefix: str) -> list[str]:
        return [p["Prefix"] for page in self._pages(Prefix=prefix, Delimiter="/") for p in page.get("CommonPrefixes", [])]

    def _pages(self, **query: Any) -> Iterator[dict]:
        token = None
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, **query,
                              **({"ContinuationToken": token} if token else {}))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            if batch:
                self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _call(self, operation: str, **arguments: Any) -> Any:
        """One S3 request, its failures turned into the project's errors with the fix named."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client, operation)(**arguments)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise _Missing(code) from None
            if code in _CONFLICT:
                raise _Conflict(code) from None
            if code == "NoSuchBucket":
                raise ConfigError(f"store.path {self.root}: the bucket {self.bucket!r} does not exist; create it "
                                  "(e.g. `aws s3 mb s3://BUCKET`) or correct store.path") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise ConfigError(f"store.path {self.root}: access denied ({code}); check AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY and the bucket's policy") from None
            raise StoreUnavailable(f"the model store {self.root} answered {code or exc} to {operation}") from None
        except NoCredentialsError:
            raise ConfigError(f"store.path {self.root}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 for a non-AWS store)") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"cannot reach the model store {self.root} ({exc}); check AWS_ENDPOINT_URL_S3 "
                                   "(or AWS_ENDPOINT_URL) and that the store runs") from None


class _Missing(Exception):
    """The object does not exist (internal: callers turn it into None or their own error)."""


class _Conflict(Exception):
    """A conditional write lost: the object changed, or already existed."""


def make_client() -> Any:
    """A boto3 S3 client configured by the standard AWS environment, with short timeouts and few retries:
    a worker asks again at its next poll rather than hanging on a store that is away."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("store.path is an s3:// URL, but boto3 is not installed: pip install boto3") from None
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", config=config, **secretfiles.aws_credentials(os.environ))
