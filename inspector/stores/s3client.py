"""S3 for the model store and the evidence archive alike: one way to make a client, to list, to delete in
batches, and to turn S3's failures into errors that name the setting and the fix.

The endpoint and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and the `_FILE` forms of the
secrets, see secretfiles), as every S3 tool reads them; never from the configuration file. boto3 is
imported only when an s3:// location is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from inspector import secretfiles
from inspector.errors import ConfigError, StoreUnavailable

SCHEME = "s3://"
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MISSING = ("NoSuchKey", "404", "NotFound")
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")


class Missing(Exception):
    """The object does not exist (callers turn it into None or their own error)."""


class Conflict(Exception):
    """A conditional write lost: the object changed, or already existed."""


def is_s3_url(path: str | os.PathLike) -> bool:
    return str(path).startswith(SCHEME)


def parse_s3_url(url: str, setting: str = "store.path") -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of `s3://bucket/prefix`; ConfigError naming `setting`."""
    rest = url[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{setting} {url!r}: {bucket!r} is not an S3 bucket name (3 to 63 lower-case letters, "
                          "digits, '.' and '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"{setting} {url!r}: the key prefix must be plain words separated by '/'")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(setting: str = "store.path") -> Any:
    """A boto3 S3 client configured by the standard AWS environment, with short timeouts and few retries:
    a worker asks again at its next poll rather than hanging on a store that is away."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"{setting} is an s3:// URL, but boto3 is not installed: pip install boto3") from None
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", config=config, **secretfiles.aws_credentials(os.environ))


class S3Bucket:
    """One s3://bucket/prefix: its requests, each failure told as the setting that named it (`store.path`,
    `evidence.path`) and what to do about it. Keys are whole keys, the prefix included."""

    def __init__(self, url: str, client: Any = None, *, setting: str = "store.path",
                 what: str = "the model store") -> None:
        self.name, self.prefix = parse_s3_url(url, setting)
        self.root = f"{SCHEME}{self.name}/{self.prefix}"
        self.setting, self.what = setting, what
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.setting)
        return self._client

    def check(self) -> None:
        """That the bucket exists and the credentials may use it; the error names the fix otherwise."""
        try:
            self.call("head_bucket", Bucket=self.name)
        except Missing:  # HEAD has no body: a missing bucket answers a bare 404
            raise self._error("NoSuchBucket", "head_bucket") from None

    def call(self, operation: str, **arguments: Any) -> Any:
        """One S3 request, its failures turned into the project's errors with the fix named (Missing and
        Conflict for the answers a caller decides about)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(self.client, operation)(**arguments)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            raise self._error(code, operation, exc) from None
        except NoCredentialsError:
            raise ConfigError(f"{self.setting} {self.root}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 for a non-AWS store)") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"cannot reach {self.what} {self.root} ({exc}); check AWS_ENDPOINT_URL_S3 "
                                   "(or AWS_ENDPOINT_URL) and that the store runs") from None

    def objects(self, prefix: str) -> Iterator[dict]:
        """Every object under `prefix` (its `Key`, `Size`, `LastModified`), page by page as S3 gives them."""
        for page in self._pages(Prefix=prefix):
            yield from page.get("Contents", [])

    def keys(self, prefix: str) -> Iterator[str]:
        for item in self.objects(prefix):
            yield item["Key"]

    def prefixes(self, prefix: str) -> list[str]:
        """The `folders` directly under `prefix` (common prefixes at the next '/')."""
        pages = self._pages(Prefix=prefix, Delimiter="/")
        return [common["Prefix"] for page in pages for common in page.get("CommonPrefixes", [])]

    def delete(self, keys: list[str]) -> None:
        """Delete `keys` in batches of DELETE_BATCH; a key already gone is no error, any other refusal is."""
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start:start + DELETE_BATCH]]
            answer = self.call("delete_objects", Bucket=self.name, Delete={"Objects": batch, "Quiet": True})
            refused = [e for e in answer.get("Errors", []) if str(e.get("Code", "")) not in _MISSING]
            if refused:
                first = refused[0]
                raise self._error(str(first.get("Code", "")), "delete_objects",
                                  f"{first.get('Key')}: {first.get('Message', '')}; {len(refused)} keys not deleted")

    def _pages(self, **query: Any) -> Iterator[dict]:
        token = None
        while True:
            page = self.call("list_objects_v2", Bucket=self.name, **query,
                             **({"ContinuationToken": token} if token else {}))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _error(self, code: str, operation: str, detail: object = "") -> Exception:
        if code in _MISSING:
            return Missing(code)
        if code in _CONFLICT:
            return Conflict(code)
        if code == "NoSuchBucket":
            return ConfigError(f"{self.setting} {self.root}: the bucket {self.name!r} does not exist; create it "
                               f"(e.g. `aws s3 mb s3://BUCKET`) or correct {self.setting}")
        if code in _DENIED:
            return ConfigError(f"{self.setting} {self.root}: access denied ({code}); check AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY and the bucket's policy")
        return StoreUnavailable(f"{self.what} {self.root} answered {code or detail} to {operation}")
