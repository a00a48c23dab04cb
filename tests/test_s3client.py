"""The one way to S3 (stores.s3client), shared by the model store and the evidence archive: listings follow
every page, deletes go in batches of at most 1000 keys and a key S3 refused to delete is an error, and S3's
failures become errors naming the setting and the fix. Against an in-memory bucket that pages as S3 does;
the real server is exercised by tests/test_s3store.py, tests/test_store_protocol.py and tests/test_evidence.py."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from inspector.errors import ConfigError, StoreUnavailable
from inspector.stores.s3client import DELETE_BATCH, Conflict, Missing, S3Bucket, parse_s3_url


class PagingBucket:
    """list_objects_v2 and delete_objects as S3 answers them, `page` keys a page, in key order."""

    def __init__(self, keys: list[str], page: int = 3, refuse: frozenset[str] = frozenset()) -> None:
        self.stored, self.page, self.refuse = set(keys), page, refuse
        self.requests: list[tuple[str, dict]] = []

    def list_objects_v2(self, Bucket, Prefix="", Delimiter=None, ContinuationToken=None):  # noqa: N803 - boto3's
        self.requests.append(("list", {"token": ContinuationToken}))
        keys = sorted(k for k in self.stored if k.startswith(Prefix))
        if Delimiter:
            keys = sorted({Prefix + k[len(Prefix):].split(Delimiter)[0] + Delimiter if Delimiter in k[len(Prefix):]
                           else k for k in keys})
        start = int(ContinuationToken or 0)
        chunk, more = keys[start:start + self.page], start + self.page < len(keys)
        answer = {"IsTruncated": more, "KeyCount": len(chunk)}
        if more:
            answer["NextContinuationToken"] = str(start + self.page)
        answer["Contents"] = [{"Key": k, "Size": len(k)} for k in chunk if not k.endswith("/")]
        answer["CommonPrefixes"] = [{"Prefix": k} for k in chunk if k.endswith("/")]
        return answer

    def delete_objects(self, Bucket, Delete):  # noqa: N803 - boto3's
        keys = [item["Key"] for item in Delete["Objects"]]
        assert Delete["Quiet"] is True and len(keys) <= 1000, "S3 takes at most 1000 keys a request"
        self.requests.append(("delete", {"keys": keys}))
        refused = [k for k in keys if k in self.refuse]
        self.stored -= set(keys) - set(refused)
        return {"Errors": [{"Key": k, "Code": "AccessDenied", "Message": "Access Denied"} for k in refused]}


def test_a_listing_follows_every_page_and_the_folders_are_the_common_prefixes():
    keys = [f"p/m{i % 4}/versions/{i:04d}" for i in range(23)]
    fake = PagingBucket(keys)
    bucket = S3Bucket("s3://plant-models/p", fake)
    assert list(bucket.keys("p/")) == sorted(keys)
    assert [item["Size"] for item in bucket.objects("p/m1/")] == [len(k) for k in sorted(keys) if "/m1/" in k]
    assert sum(1 for kind, _ in fake.requests if kind == "list") >= 23 // 3
    assert bucket.prefixes("p/") == ["p/m0/", "p/m1/", "p/m2/", "p/m3/"]


def test_a_delete_goes_in_batches_and_a_refused_key_is_an_error_naming_the_setting():
    keys = [f"e/2026-12-01/l/c/{i:05d}.json" for i in range(2 * DELETE_BATCH + 7)]
    fake = PagingBucket(keys)
    bucket = S3Bucket("s3://plant-evidence/e", fake, setting="evidence.path", what="the evidence archive")
    bucket.delete(keys)
    assert [len(r["keys"]) for kind, r in fake.requests if kind == "delete"] == [DELETE_BATCH, DELETE_BATCH, 7]
    assert fake.stored == set()
    refusing = PagingBucket(keys[:10], refuse=frozenset(keys[3:5]))
    with pytest.raises(ConfigError, match=r"^evidence.path s3://plant-evidence/e/: access denied \(AccessDenied\)"):
        S3Bucket("s3://plant-evidence/e", refusing, setting="evidence.path").delete(keys[:10])
    assert refusing.stored == set(keys[3:5])
    bucket.delete([])  # nothing to delete: no request
    assert len([kind for kind, _ in fake.requests if kind == "delete"]) == 3


class Failing:
    """A client whose every request fails with one S3 error code (or cannot connect)."""

    def __init__(self, code: str | None) -> None:
        self.code = code

    def __getattr__(self, operation):
        def fail(**arguments):
            if self.code is None:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
            raise ClientError({"Error": {"Code": self.code, "Message": "no"}}, operation)

        return fail


@pytest.mark.parametrize("code, error, words", [
    ("NoSuchBucket", ConfigError, "store.path s3://plant-models/p/: the bucket 'plant-models' does not exist; "
                                  "create it (e.g. `aws s3 mb s3://BUCKET`) or correct store.path"),
    ("InvalidAccessKeyId", ConfigError, "store.path s3://plant-models/p/: access denied (InvalidAccessKeyId); "
                                        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("SlowDown", StoreUnavailable, "the model store s3://plant-models/p/ answered SlowDown to list_objects_v2"),
    (None, StoreUnavailable, "cannot reach the model store s3://plant-models/p/ (Could not connect to the endpoint "
                             'URL: "http://127.0.0.1:9"); check AWS_ENDPOINT_URL_S3'),
    ("NoSuchKey", Missing, "NoSuchKey"),
    ("PreconditionFailed", Conflict, "PreconditionFailed"),
])
def test_s3_failures_become_errors_that_name_the_fix(code, error, words):
    with pytest.raises(error) as caught:
        list(S3Bucket("s3://plant-models/p", Failing(code)).keys("p/"))
    assert str(caught.value).startswith(words), str(caught.value)


def test_a_missing_bucket_is_named_by_check_though_head_answers_a_bare_404():
    with pytest.raises(ConfigError, match="the bucket 'plant-models' does not exist"):
        S3Bucket("s3://plant-models/p", Failing("404")).check()


def test_a_bad_url_names_the_setting_it_came_from():
    assert parse_s3_url("s3://plant-models/a/b/") == ("plant-models", "a/b/")
    with pytest.raises(ConfigError, match="^evidence.path 's3://Plant/x': 'Plant' is not an S3 bucket name"):
        S3Bucket("s3://Plant/x", setting="evidence.path")
