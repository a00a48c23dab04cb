"""Both model stores are a `Store`: each has the protocol's members with its signatures, and the same calls
give the same answers and the same errors on a folder and on a real S3 server (SeaweedFS), so a caller typed
by the protocol never needs to know which one it holds."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from inspector.errors import ConfigError, StateError
from inspector.stores import ModelStore, S3ModelStore, Store
from inspector.stores.protocol import VersionInfo

NAME = "line1"
FILES = ("state.safetensors", "settings.json")
VERSION_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
KINDS = (ModelStore, S3ModelStore)


def protocol_members() -> list[str]:
    return sorted(name for name in vars(Store) if not name.startswith("_"))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_store_class_has_every_member_of_the_protocol_with_its_signature(kind):
    assert protocol_members() == ["current", "info", "load_path", "names", "prune", "root", "set_current",
                                  "verify", "versions", "write"]
    for member in protocol_members():
        wanted = inspect.getattr_static(Store, member)
        if isinstance(wanted, property):  # an attribute or property: seen on an instance below
            continue
        got = inspect.signature(getattr(kind, member))
        expected = inspect.signature(wanted)
        for name, parameter in expected.parameters.items():
            assert name in got.parameters, f"{kind.__name__}.{member} lacks {name}"
            mine = got.parameters[name]
            assert (mine.kind, mine.default) == (parameter.kind, parameter.default), f"{kind.__name__}.{member}({name})"
        extra = [p for n, p in got.parameters.items() if n not in expected.parameters]
        assert all(p.default is not inspect.Parameter.empty for p in extra), f"{kind.__name__}.{member}: {extra}"
        assert got.return_annotation == expected.return_annotation, f"{kind.__name__}.{member}"


def test_both_stores_are_stores_at_run_time(tmp_path):
    assert isinstance(ModelStore(tmp_path / "models"), Store)
    assert isinstance(S3ModelStore("s3://plant-models/line1", tmp_path / "cache"), Store)
    assert not isinstance(object(), Store)


@dataclass
class Kit:
    """A store under test, a second one on the same place (another host: for S3, a cache of its own), and a
    way to change one stored file behind the store's back."""

    store: Store
    reopen: Callable[[], Store]
    overwrite: Callable[[str, str, bytes], None]  # version, file, bytes


@pytest.fixture(params=["folder", "s3"])
def kit(request, tmp_path) -> Kit:
    if request.param == "folder":
        root = tmp_path / "models"

        def overwrite_file(version: str, file: str, data: bytes) -> None:
            path = root / NAME / "versions" / version / file
            path.chmod(0o644)
            path.write_bytes(data)

        return Kit(ModelStore(root), lambda: ModelStore(root), overwrite_file)
    server = request.getfixturevalue("s3_server")
    bucket, prefix = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_prefix")
    url = f"s3://{bucket}/{prefix}"
    hosts = iter(range(1, 100))

    def overwrite_object(version: str, file: str, data: bytes) -> None:
        server.client().put_object(Bucket=bucket, Key=f"{prefix}/{NAME}/versions/{version}/{file}", Body=data)

    return Kit(S3ModelStore(url, tmp_path / "cache"), lambda: S3ModelStore(url, tmp_path / f"host{next(hosts)}"),
               overwrite_object)


class Saver:
    """A plugin's `save`: two files of random bytes, remembered as the reference of what was stored."""

    def __init__(self) -> None:
        self.written: dict[str, bytes] = {}

    def __call__(self, folder: Path) -> list[str]:
        self.written = {file: os.urandom(1024) for file in FILES}
        for file, data in self.written.items():
            (folder / file).write_bytes(data)
        return list(FILES)


def test_an_empty_store_has_no_models_and_says_so(kit):
    store = kit.store
    assert store.names() == [] and store.current(NAME) is None
    for ask in (lambda: store.versions(NAME), lambda: store.info(NAME), lambda: store.load_path(NAME)):
        with pytest.raises(ConfigError, match=f"unknown model '{NAME}'; models in .*: none"):
            ask()
    assert str(store.root)


def test_a_written_version_is_listed_current_and_loads_the_bytes_saved(kit):
    store, save = kit.store, Saver()
    info = store.write(NAME, save, {"plugin": "fake", "threshold": 0.5})
    assert isinstance(info, VersionInfo) and VERSION_ID.match(info.version)
    assert (info.name, info.plugin, info.current) == (NAME, "fake", True)
    assert info.manifest["threshold"] == 0.5 and sorted(info.manifest["files"]) == sorted(FILES)
    assert info.manifest["sizes"] == {file: 1024 for file in FILES}
    assert store.names() == [NAME] and store.current(NAME) == info.version
    assert store.info(NAME) == store.info(NAME, info.version)
    beats = []
    loaded = store.load_path(NAME, progress=lambda: beats.append(1))
    assert loaded.version == info.version and loaded.manifest == info.manifest and beats
    assert sorted(os.listdir(loaded.path)) == sorted([*FILES, "manifest.json"])
    assert {file: (loaded.path / file).read_bytes() for file in FILES} == save.written
    assert store.verify(NAME, info.version).manifest == info.manifest
    elsewhere = kit.reopen().load_path(NAME)
    assert {file: (elsewhere.path / file).read_bytes() for file in FILES} == save.written


def test_versions_are_oldest_first_and_only_make_current_moves_current(kit):
    store = kit.store
    first = store.write(NAME, Saver(), {"plugin": "fake"}).version
    second = store.write(NAME, Saver(), {"plugin": "fake"}, make_current=False).version
    listed = store.versions(NAME)
    assert [v.version for v in listed] == [first, second]
    assert [v.current for v in listed] == [True, False]
    assert store.current(NAME) == first and store.info(NAME).version == first
    assert store.info(NAME, second).current is False


def test_a_rollback_and_a_prune_never_remove_the_current_version(kit):
    store = kit.store
    versions = [store.write(NAME, Saver(), {"plugin": "fake"}).version for _ in range(4)]
    store.set_current(NAME, versions[1])
    assert store.current(NAME) == versions[1] and store.info(NAME).version == versions[1]
    assert store.prune(NAME, keep=2) == [versions[0]]
    assert [v.version for v in store.versions(NAME)] == versions[1:]
    assert store.prune(NAME, keep=1) == [versions[2]]  # the newest is kept, and the current besides
    assert [v.version for v in store.versions(NAME)] == [versions[1], versions[3]]
    left = ", ".join(sorted([versions[1], versions[3]]))  # an error lists the ids as they sort
    with pytest.raises(ConfigError, match=f"unknown version '{versions[0]}' of model '{NAME}'; versions: {left}$"):
        store.set_current(NAME, versions[0])
    for keep in (0, True, 1.5):
        with pytest.raises(ConfigError, match="keep must be a whole number of at least 1"):
            store.prune(NAME, keep=keep)


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "x" * 65])
def test_a_bad_model_name_is_refused_the_same_way(kit, name):
    for ask in (lambda: kit.store.current(name), lambda: kit.store.versions(name),
                lambda: kit.store.write(name, Saver(), {"plugin": "fake"})):
        with pytest.raises(ConfigError, match="invalid model name"):
            ask()


def test_a_refused_manifest_or_a_failing_save_stores_nothing(kit):
    store = kit.store
    with pytest.raises(ConfigError, match="must name its plugin"):
        store.write(NAME, Saver(), {"plugin": ""})

    def failing(folder: Path) -> list[str]:
        (folder / "state.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write(NAME, failing, {"plugin": "fake"})
    assert store.names() == [] and store.current(NAME) is None


def test_a_file_changed_behind_the_store_is_refused_naming_it(kit):
    version = kit.store.write(NAME, Saver(), {"plugin": "fake"}).version
    kit.overwrite(version, "settings.json", b"t" * 1024)  # the stated size, other bytes
    with pytest.raises(StateError, match=f"model '{NAME}' version {version}: settings.json: sha256"):
        kit.reopen().load_path(NAME)
