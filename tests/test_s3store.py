"""The s3:// model store against a real S3 server (SeaweedFS): the folder store's promises kept with
conditional writes, a verified local cache, and errors that name the fix."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from inspector.config import StoreSettings
from inspector.errors import ConfigError, StateError, StoreUnavailable
from inspector.stores import ModelStore, S3ModelStore, open_store
from inspector.stores.s3client import parse_s3_url

FILES = ("state.safetensors", "settings.json")


def fake_save(marker: bytes = b""):
    """A plugin `save` writing two files of random bytes (and `marker`), so each version is its own."""

    def save(folder: Path) -> list[str]:
        for file in FILES:
            (folder / file).write_bytes(os.urandom(2048) + marker)
        return list(FILES)

    return save


@pytest.fixture
def url(s3_bucket, s3_prefix) -> str:
    return f"s3://{s3_bucket}/{s3_prefix}"


@pytest.fixture
def store(url, tmp_path) -> S3ModelStore:
    return S3ModelStore(url, tmp_path / "cache")


def keys(s3_server, bucket: str, prefix: str) -> list[str]:
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"][len(prefix) + 1:] for item in listed.get("Contents", []))


def test_a_written_version_is_listed_current_and_loads_verified(store, s3_server, s3_bucket, s3_prefix):
    written = store.write("line1", fake_save(), {"plugin": "fake"})
    assert store.names() == ["line1"] and store.current("line1") == written.version
    folder = f"line1/versions/{written.version}/"
    assert keys(s3_server, s3_bucket, s3_prefix) == sorted(
        [folder + f for f in (*FILES, "manifest.json")] + ["line1/current"])
    loaded = store.load_path("line1")
    assert loaded.current and loaded.plugin == "fake" and loaded.version == written.version
    assert sorted(os.listdir(loaded.path)) == sorted([*FILES, "manifest.json"])
    assert ModelStore(store.cache.root).verify("line1", written.version).manifest == loaded.manifest


def test_a_second_load_reads_the_cache_and_a_damaged_cache_is_fetched_again(store, s3_server):
    version = store.write("line1", fake_save(), {"plugin": "fake"}).version
    first = store.load_path("line1")
    calls = []
    real = store.client.get_object

    def counting(**arguments):
        calls.append(arguments["Key"])
        return real(**arguments)

    store.client.get_object = counting
    again = store.load_path("line1")
    assert again.path == first.path
    assert not [key for key in calls if key.endswith(FILES)], calls  # the files came from the cache
    state = first.path / FILES[0]
    state.chmod(0o644)
    state.write_bytes(b"bit rot")
    repaired = store.load_path("line1", version)
    assert [key for key in calls if key.endswith(FILES[0])], "the damaged file was not fetched again"
    assert ModelStore(store.cache.root).verify("line1", repaired.version)


def test_a_version_whose_manifest_never_arrived_is_invisible(store, s3_server, s3_bucket, s3_prefix):
    """Files first, manifest last: a writer that died between them leaves nothing loadable."""
    complete = store.write("line1", fake_save(), {"plugin": "fake"}).version
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"{s3_prefix}/line1/versions/20991231T000000Z-abcdef/"
                                  "state.safetensors", Body=b"half written")
    assert [info.version for info in store.versions("line1")] == [complete]
    with pytest.raises(ConfigError, match="unknown version"):
        store.load_path("line1", "20991231T000000Z-abcdef")


def test_a_corrupt_object_in_the_store_is_refused_naming_the_file(store, url, s3_server, s3_bucket, s3_prefix,
                                                                  tmp_path):
    version = store.write("line1", fake_save(), {"plugin": "fake"}).version
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"{s3_prefix}/line1/versions/{version}/settings.json",
                                  Body=b"t" * 2048)  # the stated size, other bytes
    another_host = S3ModelStore(url, tmp_path / "another-host")
    with pytest.raises(StateError, match="settings.json: sha256"):
        another_host.load_path("line1")


def test_a_download_stops_at_the_size_its_manifest_states(store, url, s3_server, s3_bucket, s3_prefix, tmp_path,
                                                          monkeypatch):
    """An object grown past its manifest's size (a hostile or mistaken upload) is refused after at most the
    stated size, not fetched whole to the disk and only then found wrong."""
    version = store.write("line1", fake_save(), {"plugin": "fake"}).version
    key = f"{s3_prefix}/line1/versions/{version}/state.safetensors"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"\0" * (8 << 20))
    another_host = S3ModelStore(url, tmp_path / "another-host")
    written = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith("state.safetensors"):
            real_write = handle.write
            handle.write = lambda data: written.append(len(data)) or real_write(data)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    with pytest.raises(StateError, match="state.safetensors: over the 2048 bytes its manifest states"):
        another_host.load_path("line1")
    assert sum(written) <= 2048
    assert not list((another_host.cache.root / "line1").glob(".incoming-*"))


def test_of_two_concurrent_writers_one_wins_and_the_other_is_told(store, url, tmp_path):
    other = S3ModelStore(url, tmp_path / "other-cache")
    first = store.write("line1", fake_save(), {"plugin": "fake"}).version
    won = {}

    def save_while_another_writes(folder: Path) -> list[str]:
        won["version"] = other.write("line1", fake_save(b"other"), {"plugin": "fake"}).version
        return fake_save(b"mine")(folder)

    with pytest.raises(StateError, match="another writer changed the current version") as lost:
        store.write("line1", save_while_another_writes, {"plugin": "fake"})
    assert store.current("line1") == won["version"] != first
    listed = [info.version for info in store.versions("line1")]
    assert len(listed) == 3 and won["version"] in listed  # the loser's version is stored, not current
    loser = next(v for v in listed if v not in (first, won["version"]))
    assert f"inspector models rollback line1 {loser}" in str(lost.value)


def test_writers_racing_on_one_current_never_both_win(store, url, tmp_path):
    """Many threads switch `current` from the same starting point: exactly one succeeds."""
    base = store.write("line1", fake_save(), {"plugin": "fake"}).version
    stores = [S3ModelStore(url, tmp_path / f"c{i}") for i in range(4)]
    staged = [s.write("line1", fake_save(bytes([i])), {"plugin": "fake"}, make_current=False).version
              for i, s in enumerate(stores)]
    expected = store._current_etag("line1")
    barrier, outcomes = threading.Barrier(len(stores)), []

    def switch(s: S3ModelStore, version: str) -> None:
        barrier.wait()
        try:
            s._switch("line1", version, expected, written=False)
            outcomes.append(("won", version))
        except StateError:
            outcomes.append(("lost", version))

    threads = [threading.Thread(target=switch, args=pair) for pair in zip(stores, staged)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [version for result, version in outcomes if result == "won"]
    assert len(winners) == 1 and store.current("line1") == winners[0] != base


def test_rollback_and_prune_keep_the_current_version(store):
    versions = [store.write("line1", fake_save(), {"plugin": "fake"}).version for _ in range(4)]
    store.set_current("line1", versions[0])
    assert store.current("line1") == versions[0]
    removed = store.prune("line1", keep=2)
    assert removed == versions[1:2]
    assert [info.version for info in store.versions("line1")] == [versions[0], *versions[2:]]
    with pytest.raises(ConfigError, match="unknown version"):
        store.set_current("line1", versions[1])


def test_new_versions_are_newer_than_every_stored_one_whatever_the_local_clock(store, url, tmp_path):
    from datetime import datetime, timezone

    from inspector.stores import folder as store_module

    store.write("line1", fake_save(), {"plugin": "fake"})
    behind = S3ModelStore(url, tmp_path / "behind")
    real = store_module._utcnow
    store_module._utcnow = lambda: datetime(2001, 1, 1, tzinfo=timezone.utc)  # a host whose clock is far behind
    try:
        late = behind.write("line1", fake_save(), {"plugin": "fake"}).version
    finally:
        store_module._utcnow = real
    assert [info.version for info in store.versions("line1")][-1] == late


def test_store_path_takes_a_folder_or_an_s3_url(tmp_path):
    assert isinstance(open_store(StoreSettings(path=str(tmp_path))), ModelStore)
    assert isinstance(open_store(StoreSettings(path=tmp_path)), ModelStore)
    s3 = open_store(StoreSettings(path="s3://plant-models/line1/", cache_dir=tmp_path))
    assert isinstance(s3, S3ModelStore) and s3.root == "s3://plant-models/line1/"
    assert parse_s3_url("s3://plant-models") == ("plant-models", "")
    for bad in ("s3://A_B/x", "s3://plant-models/a//b", "s3://plant-models/../x"):
        with pytest.raises(ConfigError, match="store.path"):
            parse_s3_url(bad)
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        StoreSettings(path="s3:/plant-models")


def test_errors_name_the_fix(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.environment().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        S3ModelStore("s3://no-such-bucket/models", tmp_path).names()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(StoreUnavailable, match="AWS_ENDPOINT_URL_S3"):
        S3ModelStore("s3://plant-models/models", tmp_path).current("line1")
