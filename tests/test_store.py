"""The model store: versions that verify, atomic current switches, and no half-written state after a crash."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from inspector.stores import folder as store_mod
from inspector.errors import ConfigError, PluginError, StateError
from inspector.stores import ModelStore

REPO = Path(__file__).resolve().parents[1]
NAME = "line1"
FILES = ("state.safetensors", "settings.json")


def fake_save(files=FILES, size=4096):
    """A plugin `save` that writes a few files of random bytes, so every version has its own checksum."""

    def save(folder: Path) -> list[str]:
        for file in files:
            (folder / file).write_bytes(os.urandom(size))
        return list(files)

    return save


def fixed_save(folder: Path) -> list[str]:
    (folder / "state.safetensors").write_bytes(b"same bytes every time")
    return ["state.safetensors"]


def tree(root: Path) -> list[str]:
    """Every path under root, to compare the store before and after."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def leftovers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.name.startswith((".incoming-", "current.tmp-")))


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path / "models")


@pytest.fixture
def clock(monkeypatch):
    """Pin the store's clock; returns a setter."""
    now = {"t": datetime(2026, 11, 28, 10, 15, 0, 500000, tzinfo=timezone.utc)}
    monkeypatch.setattr(store_mod, "_utcnow", lambda: now["t"])

    def set_time(moment: datetime) -> None:
        now["t"] = moment

    set_time.now = now
    return set_time


# -- writing and reading ---------------------------------------------------------------------


def test_write_then_load_path_and_verify(store):
    written = store.write(NAME, fake_save(), {"plugin": "fake"})
    loaded = store.load_path(NAME)
    assert loaded == written == store.verify(NAME, written.version) == store.info(NAME)
    assert loaded.current and loaded.plugin == "fake"
    assert loaded.path == store.root / NAME / "versions" / written.version
    assert sorted(os.listdir(loaded.path)) == sorted([*FILES, "manifest.json"])
    assert store.names() == [NAME]
    assert store.current(NAME) == written.version
    assert (store.root / NAME / "current").read_text().strip() == written.version
    assert leftovers(store.root / NAME) == []


def test_manifest_contents(store):
    caller = {
        "plugin": "fake",
        "settings": {"backbone": "efficientnet_lite0", "n_comps": 16},
        "images": 120,
        "source": "/data/line1/good",
        "calibration": {"mean": 0.12, "std": 0.03},
        "threshold": 0.5,
    }
    before = copy.deepcopy(caller)
    info = store.write(NAME, fake_save(), caller)
    assert caller == before, "the caller's dict must not be changed"

    on_disk = json.loads((info.path / "manifest.json").read_text())
    assert on_disk == info.manifest
    for key, value in before.items():
        assert on_disk[key] == value
    assert on_disk["schema"] == "inspector.manifest/1"
    assert on_disk["name"] == NAME and on_disk["version"] == info.version
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", on_disk["created_at"])
    assert info.created_at == on_disk["created_at"]
    created = datetime.strptime(on_disk["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert info.version.startswith(created.strftime("%Y%m%dT%H%M%SZ-"))
    files = {f: hashlib.sha256((info.path / f).read_bytes()).hexdigest() for f in FILES}
    assert on_disk["files"] == files
    lines = "".join(f"{f}:{files[f]}\n" for f in sorted(files))
    assert on_disk["checksum"] == hashlib.sha256(lines.encode()).hexdigest()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", info.version)
    assert info.version.endswith(on_disk["checksum"][:6])


@pytest.mark.parametrize(
    "manifest, words",
    [
        ({}, "plugin"),
        ({"plugin": 3}, "plugin"),
        ({"plugin": "fake", "version": "x"}, "version"),
        ({"plugin": "fake", "checksum": "x"}, "checksum"),
        ({"plugin": "fake", "calibration": object()}, "JSON"),
        ({"plugin": "fake", "threshold": float("nan")}, "JSON"),
    ],
)
def test_bad_caller_manifest_is_refused_before_anything_is_written(store, manifest, words):
    store.write(NAME, fake_save(), {"plugin": "fake"})
    before = tree(store.root)
    called = []
    with pytest.raises(ConfigError, match=words):
        store.write(NAME, lambda folder: called.append(folder) or [], manifest)
    assert not called
    assert tree(store.root) == before


def test_two_writes_in_the_same_second_get_distinct_ids_in_write_order(store, clock):
    ids = [store.write(NAME, fake_save(), {"plugin": "fake"}).version for _ in range(6)]
    assert len(set(ids)) == 6
    assert {v[:16] for v in ids} == {"20261128T101500Z"}
    # Within one second the hex part is random, so the order is the manifest's milliseconds.
    assert [v.version for v in store.versions(NAME)] == ids
    clock(datetime(2026, 11, 28, 10, 15, 1, tzinfo=timezone.utc))
    later = store.write(NAME, fake_save(), {"plugin": "fake"}).version
    assert sorted([*ids, later])[-1] == later
    assert store.versions(NAME)[-1].version == later


def test_the_same_files_twice_in_one_second_are_refused_not_overwritten(store, clock):
    first = store.write(NAME, fixed_save, {"plugin": "fake"})
    before = tree(store.root)
    with pytest.raises(StateError, match="already exists"):
        store.write(NAME, fixed_save, {"plugin": "fake"})
    assert tree(store.root) == before
    assert store.verify(NAME, first.version) == first


def test_a_clock_stepped_back_still_makes_the_new_version_the_newest(store, clock):
    first = store.write(NAME, fake_save(), {"plugin": "fake"})
    clock(datetime(2000, 1, 1, tzinfo=timezone.utc))  # a line PC that booted with a flat RTC battery
    second = store.write(NAME, fake_save(), {"plugin": "fake"})
    assert [v.version for v in store.versions(NAME)] == [first.version, second.version]
    assert second.created_at > first.created_at
    assert store.prune(NAME, keep=1) == [first.version]


# -- current and rollback --------------------------------------------------------------------


def test_current_switches_only_with_make_current(store):
    first = store.write(NAME, fake_save(), {"plugin": "fake"}, make_current=False)
    assert store.current(NAME) is None
    assert not first.current
    for call in (lambda: store.info(NAME), lambda: store.load_path(NAME)):
        with pytest.raises(ConfigError, match=f"no current version.*{first.version}"):
            call()
    second = store.write(NAME, fake_save(), {"plugin": "fake"})
    assert store.current(NAME) == second.version
    third = store.write(NAME, fake_save(), {"plugin": "fake"}, make_current=False)
    assert store.current(NAME) == second.version
    assert [(v.version, v.current) for v in store.versions(NAME)] == [
        (first.version, False),
        (second.version, True),
        (third.version, False),
    ]


def test_rollback_to_an_older_version(store):
    old = store.write(NAME, fake_save(), {"plugin": "fake"})
    new = store.write(NAME, fake_save(), {"plugin": "fake"})
    store.set_current(NAME, old.version)
    assert store.current(NAME) == old.version
    assert store.load_path(NAME).version == old.version
    assert store.info(NAME, new.version).current is False
    assert leftovers(store.root / NAME) == []


def test_set_current_to_an_unknown_version_lists_the_versions(store):
    a = store.write(NAME, fake_save(), {"plugin": "fake"})
    b = store.write(NAME, fake_save(), {"plugin": "fake"})
    for call in (
        lambda: store.set_current(NAME, "20990101T000000Z-abcdef"),
        lambda: store.info(NAME, "nope"),
        lambda: store.verify(NAME, "../x"),
    ):
        with pytest.raises(ConfigError) as caught:
            call()
        assert a.version in str(caught.value) and b.version in str(caught.value)
    assert store.current(NAME) == b.version


def test_unknown_model_lists_the_models(store):
    store.write(NAME, fake_save(), {"plugin": "fake"})
    for call in (
        lambda: store.versions("line2"),
        lambda: store.info("line2"),
        lambda: store.load_path("line2"),
        lambda: store.set_current("line2", "20990101T000000Z-abcdef"),
        lambda: store.prune("line2", keep=1),
    ):
        with pytest.raises(ConfigError, match=f"unknown model 'line2'.*{NAME}"):
            call()
    assert store.current("line2") is None
    assert store.names() == [NAME]
    assert ModelStore(store.root / "absent").names() == []


# -- corruption ------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": ("state.safetensors", lambda v: _flip(v / "state.safetensors")),
    "missing file": ("settings.json", lambda v: (v / "settings.json").unlink()),
    "unlisted file": ("notes.txt", lambda v: (v / "notes.txt").write_text("hi")),
    "incoming inside": (".incoming-x", lambda v: (v / ".incoming-x").mkdir()),
    "files map edited": (
        "manifest.json",
        lambda v: _edit_manifest(v, lambda m: m["files"].update({"settings.json": "0" * 64})),
    ),
    "wrong schema": ("manifest.json", lambda v: _edit_manifest(v, lambda m: m.update(schema="other/9"))),
    "manifest not JSON": ("manifest.json", lambda v: (v / "manifest.json").write_text("{not json")),
    "manifest missing": ("manifest.json", lambda v: (v / "manifest.json").unlink()),
}


def _edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_version_is_refused_naming_the_file(store, damage):
    file, harm = DAMAGE[damage]
    old = store.write(NAME, fake_save(), {"plugin": "fake"})
    new = store.write(NAME, fake_save(), {"plugin": "fake"})
    harm(old.path)
    for call in (
        lambda: store.verify(NAME, old.version),
        lambda: store.load_path(NAME, old.version),
        lambda: store.set_current(NAME, old.version),
    ):
        with pytest.raises(StateError) as caught:
            call()
        message = str(caught.value)
        assert NAME in message and old.version in message and file in message, message
    assert store.current(NAME) == new.version
    assert store.load_path(NAME).version == new.version
    # A damaged version is still listed, so an operator sees it and prune can remove it.
    assert [v.version for v in store.versions(NAME)] == [old.version, new.version]


def test_damaged_current_is_refused_by_load_path(store):
    info = store.write(NAME, fake_save(), {"plugin": "fake"})
    _flip(info.path / "settings.json")
    with pytest.raises(StateError, match="settings.json"):
        store.load_path(NAME)


def test_a_current_file_with_junk_is_a_state_error(store):
    store.write(NAME, fake_save(), {"plugin": "fake"})
    (store.root / NAME / "current").write_text("../../etc\n")
    with pytest.raises(StateError, match="not a version id"):
        store.current(NAME)


# -- prune -----------------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_never_the_current(store):
    ids = [store.write(NAME, fake_save(), {"plugin": "fake"}).version for _ in range(5)]
    store.set_current(NAME, ids[0])
    assert store.prune(NAME, keep=2) == ids[1:3]
    assert [v.version for v in store.versions(NAME)] == [ids[0], *ids[3:]]
    assert store.current(NAME) == ids[0]
    assert store.prune(NAME, keep=2) == []
    store.set_current(NAME, ids[4])
    assert store.prune(NAME, keep=1) == [ids[0], ids[3]]
    assert [v.version for v in store.versions(NAME)] == [ids[4]]
    assert leftovers(store.root / NAME) == []


@pytest.mark.parametrize("keep", [0, -1, True, 1.5, "2"])
def test_prune_needs_keep_of_at_least_one(store, keep):
    store.write(NAME, fake_save(), {"plugin": "fake"})
    with pytest.raises(ConfigError, match="keep"):
        store.prune(NAME, keep=keep)


# -- failed writes ---------------------------------------------------------------------------


def _raises(exc):
    def save(folder):
        (folder / "state.safetensors").write_bytes(os.urandom(1000))
        raise exc

    return save


def _writes(written, returned):
    def save(folder):
        for file in written:
            if file.endswith("/"):
                (folder / file).mkdir()
            else:
                (folder / file).write_bytes(os.urandom(100))
        return returned

    return save


@pytest.mark.parametrize(
    "save, error",
    [
        (_raises(RuntimeError("disk on fire")), RuntimeError),
        (_raises(KeyboardInterrupt()), KeyboardInterrupt),
        (_writes(["a.bin", "b.bin"], ["a.bin"]), PluginError),  # wrote but did not return
        (_writes(["a.bin"], ["a.bin", "b.bin"]), PluginError),  # returned but did not write
        (_writes(["a.bin"], ["a.bin", "a.bin"]), PluginError),
        (_writes(["a.bin"], None), PluginError),
        (_writes(["manifest.json"], ["manifest.json"]), PluginError),
        (_writes(["a.bin"], ["a.bin", "../x"]), PluginError),
        (_writes(["sub/"], ["sub"]), PluginError),
    ],
)
def test_a_failed_write_leaves_no_trace(store, save, error):
    first = store.write(NAME, fake_save(), {"plugin": "fake"})
    before = tree(store.root)
    with pytest.raises(error):
        store.write(NAME, save, {"plugin": "fake"})
    assert tree(store.root) == before
    assert store.current(NAME) == first.version


def test_a_failure_after_the_rename_removes_the_new_version(store, monkeypatch):
    first = store.write(NAME, fake_save(), {"plugin": "fake"})
    before = tree(store.root)

    def no_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", no_replace)
    with pytest.raises(OSError, match="No space"):
        store.write(NAME, fake_save(), {"plugin": "fake"})
    monkeypatch.undo()
    assert tree(store.root) == before
    assert store.current(NAME) == first.version


def test_leftovers_are_ignored_by_readers_and_cleaned_by_the_next_write(store):
    first = store.write(NAME, fake_save(), {"plugin": "fake"})
    model_dir = store.root / NAME
    (model_dir / ".incoming-dead").mkdir()
    (model_dir / ".incoming-dead" / "state.safetensors").write_bytes(b"half")
    (model_dir / ".incoming-deleting-dead").mkdir()
    (model_dir / "current.tmp-dead").write_text("20990101T000000Z-abcdef\n")
    (store.root / "ghost" / ".incoming-1").mkdir(parents=True)  # a model whose first write crashed
    assert store.names() == [NAME]
    assert [v.version for v in store.versions(NAME)] == [first.version]
    with pytest.raises(ConfigError, match="unknown model 'ghost'"):
        store.versions("ghost")
    second = store.write(NAME, fake_save(), {"plugin": "fake"})
    assert leftovers(model_dir) == []
    assert store.current(NAME) == second.version


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "", "..", ".", "x" * 65, "a b", "-x", "a\nb", None])
def test_bad_model_names_are_refused(store, name):
    for call in (
        lambda: store.write(name, fake_save(), {"plugin": "fake"}),
        lambda: store.versions(name),
        lambda: store.current(name),
        lambda: store.info(name),
        lambda: store.prune(name, keep=1),
    ):
        with pytest.raises(ConfigError, match="invalid model name"):
            call()
    assert not store.root.exists()


def test_model_names_follow_the_configuration_rule():
    from inspector.config import MODEL_NAME_PATTERN

    assert store_mod.MODEL_NAME_PATTERN == MODEL_NAME_PATTERN
    ModelStore(Path("unused"))._model_dir("x" * 64)


# -- crash safety with a real SIGKILL --------------------------------------------------------

# The child writes (or prunes) one version of NAME. Its os.rename / os.replace / shutil.rmtree
# are wrapped so that, in the matching mode, it prints a marker and then blocks right at that
# step: the SIGKILL lands exactly there, not wherever the scheduler happened to be. In the
# "save" mode it writes a large file slowly, printing a marker per chunk, and is killed while
# still writing.
CHILD = r"""
import os, shutil, sys, time
from pathlib import Path
from inspector.stores import ModelStore

root, mode = Path(sys.argv[1]), sys.argv[2]

def say(marker):
    print(marker, flush=True)

def hang():
    time.sleep(60)
    sys.exit("was not killed")

def save(folder):
    chunk = os.urandom(64 * 1024)
    with open(folder / "state.safetensors", "wb") as f:
        for i in range(400 if mode == "save" else 2):
            f.write(chunk)
            f.flush()
            if mode == "save":
                say(f"chunk {i}")
                time.sleep(0.005)
    (folder / "settings.json").write_text("{}")
    return ["state.safetensors", "settings.json"]

real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree

def rename(src, dst):
    if mode == "before-rename":
        say("renaming"); hang()
    real_rename(src, dst)
    if mode == "after-rename":
        say("renamed"); hang()

def replace(src, dst):
    if mode == "before-replace":
        say("replacing"); hang()
    real_replace(src, dst)
    if mode == "after-replace":
        say("replaced"); hang()

def rmtree(path, *args, **kwargs):
    if mode == "prune":
        victim = sorted(Path(path).iterdir())[0]
        victim.unlink()
        say("deleting"); hang()
    real_rmtree(path, *args, **kwargs)

os.rename, os.replace, shutil.rmtree = rename, replace, rmtree
store = ModelStore(root)
if mode == "prune":
    store.prune("line1", keep=1)
else:
    store.write("line1", save, {"plugin": "fake"})
say("done")
"""


def kill_at(root: Path, mode: str, marker: str, timeout: float = 30.0) -> str:
    """Run the child until it prints `marker`, SIGKILL it, and return what it printed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
    )
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while marker not in out.decode(errors="replace").splitlines():
            remaining = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(remaining, 0))[0] if remaining > 0 else []
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                pytest.fail(f"the child never printed {marker!r}:\n{out.decode(errors='replace')}")
            out += chunk
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    text = out.decode(errors="replace")
    assert "done" not in text.splitlines()
    return text


def assert_recovers(store: ModelStore, expected_current: str, expected_versions: list[str]) -> None:
    """The store after a kill: the expected current verifies, listings show only whole versions,
    and the next write succeeds and removes what the killed writer left."""
    assert store.current(NAME) == expected_current
    assert store.load_path(NAME).version == expected_current
    assert store.names() == [NAME]
    listed = [v.version for v in store.versions(NAME)]
    assert listed == expected_versions
    for version in listed:
        store.verify(NAME, version)
    after = store.write(NAME, fake_save(), {"plugin": "fake"})
    assert leftovers(store.root / NAME) == []
    assert store.current(NAME) == after.version
    assert [v.version for v in store.versions(NAME)] == [*expected_versions, after.version]


@pytest.mark.parametrize(
    "mode, marker",
    [
        ("save", "chunk 0"),  # just started writing the state file
        ("save", "chunk 60"),  # deep inside it
        ("before-rename", "renaming"),  # manifest written and fsynced, not yet renamed into versions/
    ],
)
def test_sigkill_before_the_rename_leaves_the_previous_version_current(store, mode, marker):
    previous = store.write(NAME, fake_save(), {"plugin": "fake"})
    kill_at(store.root, mode, marker)
    model_dir = store.root / NAME
    incoming = [p for p in model_dir.iterdir() if p.name.startswith(".incoming-")]
    assert len(incoming) == 1, "the kill should have landed mid-write"
    state = incoming[0] / "state.safetensors"
    if mode == "save":
        assert state.stat().st_size < 400 * 64 * 1024
        assert not (incoming[0] / "manifest.json").exists()
    else:
        assert (incoming[0] / "manifest.json").exists()
    assert_recovers(store, previous.version, [previous.version])


@pytest.mark.parametrize("mode, marker", [("after-rename", "renamed"), ("before-replace", "replacing")])
def test_sigkill_between_the_rename_and_the_switch_leaves_the_previous_version_current(store, mode, marker):
    previous = store.write(NAME, fake_save(), {"plugin": "fake"})
    kill_at(store.root, mode, marker)
    model_dir = store.root / NAME
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".incoming-")]
    if mode == "before-replace":
        assert [p.name for p in model_dir.iterdir() if p.name.startswith("current.tmp-")]
    # The new version was renamed into versions/ whole, so it exists and verifies; it is just
    # not current. That is fine: it is a complete version an operator can switch to or prune.
    listed = [v.version for v in store.versions(NAME)]
    assert len(listed) == 2 and listed[0] == previous.version
    assert not store.verify(NAME, listed[1]).current
    assert_recovers(store, previous.version, listed)


def test_sigkill_right_after_the_switch_leaves_the_new_version_current(store):
    previous = store.write(NAME, fake_save(), {"plugin": "fake"})
    kill_at(store.root, "after-replace", "replaced")
    listed = [v.version for v in store.versions(NAME)]
    assert listed[0] == previous.version and len(listed) == 2
    assert_recovers(store, listed[1], listed)


def test_sigkill_mid_prune_never_leaves_a_half_deleted_version(store):
    ids = [store.write(NAME, fake_save(), {"plugin": "fake"}).version for _ in range(3)]
    kill_at(store.root, "prune", "deleting")
    doomed = [p for p in (store.root / NAME).iterdir() if p.name.startswith(".incoming-deleting-")]
    assert len(doomed) == 1 and len(list(doomed[0].iterdir())) < 3, "the kill should have landed mid-delete"
    assert_recovers(store, ids[2], ids[1:])


def test_a_manifest_nested_past_the_stack_is_a_state_error_not_a_crash(store):
    version = store.write(NAME, fake_save(), {"plugin": "fake"}).version
    manifest = store.root / NAME / "versions" / version / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StateError, match="manifest.json: cannot be read"):
        store.load_path(NAME)
    listed = store.versions(NAME)  # `inspector models list` goes on past it
    assert [info.version for info in listed] == [version]


# -- hostile and lagging stores --------------------------------------------------------------


def _within(seconds: float, call):
    """Run `call` in a thread and return what it raised; fail, instead of hanging the suite, if it blocks."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("where", ["settings.json", "manifest.json", "current"])
def test_a_fifo_in_a_version_is_refused_at_once_not_read_forever(store, where):
    """A FIFO with no writer blocks an ordinary open() for ever: hashing it would wedge the reloader."""
    info = store.write(NAME, fake_save(), {"plugin": "fake"})
    target = (store.root / NAME / "current") if where == "current" else info.path / where
    target.unlink()
    os.mkfifo(target)
    raised = _within(3.0, lambda: store.load_path(NAME))
    assert isinstance(raised, StateError), raised
    assert where in str(raised) and "not a regular file" in str(raised)


def test_a_missing_file_or_a_listing_behind_current_is_incomplete_not_final(store):
    """What a lagging NFS or S3-compatible listing shows is worth trying again; a wrong digest is not."""
    from inspector.errors import VersionIncomplete

    info = store.write(NAME, fake_save(), {"plugin": "fake"})
    (info.path / "settings.json").unlink()
    with pytest.raises(VersionIncomplete, match="settings.json: missing"):
        store.load_path(NAME)
    (info.path / "manifest.json").unlink()
    with pytest.raises(VersionIncomplete, match="manifest.json: missing"):
        store.verify(NAME, info.version)
    other = store.write(NAME, fake_save(), {"plugin": "fake"})
    (store.root / NAME / "current").write_text("20990101T000000Z-abcdef\n")  # written before the listing shows it
    with pytest.raises(VersionIncomplete, match="20990101T000000Z-abcdef"):
        store.load_path(NAME)
    _flip(other.path / "state.safetensors")
    with pytest.raises(StateError) as final:
        store.verify(NAME, other.version)
    assert not isinstance(final.value, VersionIncomplete)


def test_the_manifest_states_each_file_size_and_a_file_of_another_size_is_refused_unread(store, monkeypatch):
    info = store.write(NAME, fake_save(size=1000), {"plugin": "fake"})
    assert info.manifest["sizes"] == {file: 1000 for file in FILES}
    with open(info.path / "state.safetensors", "ab") as grown:
        grown.write(b"\0" * 5000)
    hashed = []
    real = store_mod._hash_file
    monkeypatch.setattr(store_mod, "_hash_file", lambda path, **kw: hashed.append(path.name) or real(path, **kw))
    with pytest.raises(StateError, match=r"state.safetensors: 6000 bytes, the manifest states 1000"):
        store.verify(NAME, info.version)
    assert "state.safetensors" not in hashed
