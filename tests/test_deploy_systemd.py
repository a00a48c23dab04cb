"""deploy/systemd: the units pass `systemd-analyze verify` and its security review, their timeouts fit the
worker's own, and the worker speaks sd_notify (READY=1, WATCHDOG=1 while healthy, STOPPING=1) over a
real unix datagram socket, as systemd's $NOTIFY_SOCKET is; no systemd is needed to test that."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from inspector import config
from inspector.config import WorkerSettings
from inspector.worker import watchdog as watchdog_module
from inspector.worker.loop import EXIT_MARGIN_S
from inspector.worker.sdnotify import Notifier
from inspector.worker.watchdog import Watchdog
from tests.deploykit import runnable_tool

SYSTEMD = Path(__file__).resolve().parents[1] / "deploy" / "systemd"
UNITS = {"inspector.service": "inspector.service", "inspector-refit@.service": "inspector-refit@default.service",
         "inspector-opcua.service": "inspector-opcua.service"}
INSTALLED_BINARY = "/opt/inspector/venv/bin/inspector"
SECURITY_THRESHOLD = 20  # systemd-analyze's exposure level times ten: both units score 1.7 ("OK") as shipped


SYSTEMD_ANALYZE = runnable_tool("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed or cannot run here (Debian: apt-get install systemd; .ci/run does)",
)


def unit(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every setting of a unit file, in order; keys may repeat."""
    section, settings = "", []
    for raw in (SYSTEMD / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def values(name: str, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in unit(name) if s == section and k == key]


def one(name: str, key: str, section: str = "Service") -> str:
    (value,) = values(name, key, section)
    return value


def seconds(text: str) -> float:
    """A systemd time span: `45`, `45s`, `6h`, `1min 30s`."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(number) * units[part[len(number):]]
    return total


def installed_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart's binary pointed at a stand-in executable: verify checks that the command
    exists, and /opt/inspector exists only on a box where inspector is installed."""
    stand_in = tmp_path / "opt" / "inspector" / "venv" / "bin" / "inspector"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    copies = []
    for source, installed_as in UNITS.items():
        text = (SYSTEMD / source).read_text()
        assert INSTALLED_BINARY in text, source
        copy = tmp_path / installed_as
        copy.write_text(text.replace(INSTALLED_BINARY, str(stand_in)))
        copies.append(copy)
    return copies


# -- the units -----------------------------------------------------------------------------------


@needs_systemd_analyze
def test_systemd_analyze_verifies_the_units_without_a_word(tmp_path):
    """Any complaint fails: an unknown key or a bad value is only a warning to systemd, a unit that half works."""
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, installed_copies(tmp_path))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        f"systemd-analyze verify:\n{result.stdout}{result.stderr}")


@needs_systemd_analyze
def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The check above is not vacuous: a misspelt value is reported."""
    copy = installed_copies(tmp_path)[0]
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                            timeout=120)
    assert "ProtectSystem" in result.stderr or "strickt" in result.stderr


@needs_systemd_analyze
def test_the_security_review_rates_both_units_ok(tmp_path):
    for copy in installed_copies(tmp_path):
        result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", f"--threshold={SECURITY_THRESHOLD}",
                                 "--no-pager", str(copy)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{copy.name} is exposed over {SECURITY_THRESHOLD / 10}:\n{result.stdout}"


def test_the_worker_unit_is_a_notify_service_with_a_watchdog_and_timeouts_above_the_workers_own():
    worker = WorkerSettings()
    name = "inspector.service"
    assert one(name, "Type") == "notify" and one(name, "NotifyAccess") == "main"
    assert one(name, "ExecStart") == f"{INSTALLED_BINARY} run"
    # the worker pings every check; systemd must allow several missed ones before it kills
    assert seconds(one(name, "WatchdogSec")) >= 10 * watchdog_module.CHECK_EVERY_S
    # stopping: the grace period, and an unhealthy worker's own deadline, end before systemd's SIGKILL
    stop = seconds(one(name, "TimeoutStopSec"))
    assert stop > worker.shutdown_grace_s + 5
    assert stop > min(worker.shutdown_grace_s, 10.0) + EXIT_MARGIN_S
    assert seconds(one(name, "TimeoutStartSec")) > worker.start_timeout_s
    assert one(name, "Restart") == "on-failure" and seconds(one(name, "RestartSec")) >= 1
    assert one(name, "KillSignal") == "SIGTERM"


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_is_hardened_and_takes_the_password_from_an_environment_file(name):
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "User": "inspector"}.items():
        assert one(name, key) == value, key
    assert one(name, "EnvironmentFile") == "/etc/inspector/inspector.env"
    environment = " ".join(values(name, "Environment"))
    assert "INSPECTOR_CONFIG=/etc/inspector/inspector.toml" in environment
    assert "PASSWORD" not in environment.upper()


def test_only_refit_may_write_the_store_the_shipped_configuration_names():
    settings = config.load(SYSTEMD / "inspector.toml")
    store = Path(settings.store.path)
    assert not values("inspector.service", "ReadWritePaths")
    assert values("inspector.service", "StateDirectory") == ["inspector/evidence"], "its archive, not the store"
    writable = [Path(p.lstrip("-")) for p in values("inspector-refit@.service", "ReadWritePaths")]
    assert any(store == path or path in store.parents for path in writable), (store, writable)
    assert one("inspector-refit@.service", "ExecStart").startswith(f"{INSTALLED_BINARY} refit --model %i ")


def test_a_configuration_error_is_not_restarted_like_a_crash():
    """Exit 2 (ConfigError: bad settings, a refused login) comes back at every restart; exit 1 may mend."""
    from inspector.errors import ConfigError

    assert str(ConfigError.exit_code) in one("inspector.service", "RestartPreventExitStatus").split()
    assert "1" not in one("inspector.service", "RestartPreventExitStatus").split()


@pytest.mark.parametrize("name", UNITS)
def test_a_path_the_unit_does_not_create_may_be_missing(name):
    """systemd sets up the mount namespace before the command runs: a ReadOnlyPaths=, ReadWritePaths= or
    InaccessiblePaths= folder that does not exist fails the unit with 226/NAMESPACE unless it starts with
    "-". Only the folders the unit's own *Directory= settings create are sure to exist."""
    created = [Path(base) / word for key, base in (("StateDirectory", "/var/lib"), ("CacheDirectory", "/var/cache"),
                                                   ("LogsDirectory", "/var/log"), ("RuntimeDirectory", "/run"))
               for value in values(name, key) for word in value.split()]
    for key in ("ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths"):
        for value in values(name, key):
            for word in value.split():
                path = Path(word.lstrip("+"))
                sure = any(path == folder or folder in path.parents for folder in created)
                assert word.startswith("-") or sure, f"{name}: {key}={word} fails the unit where it is missing"


def test_the_environment_file_example_holds_a_placeholder_only():
    text = (SYSTEMD / "inspector.env.example").read_text()
    assert "INSPECTOR_BROKER__PASSWORD=CHANGE-ME" in text.splitlines()


# -- sd_notify ---------------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing where systemd's $NOTIFY_SOCKET would."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.address = address
        self.messages: list[str] = []

    def receive_until(self, wanted: str, timeout: float) -> list[str]:
        """Every message received until one holds the line `wanted`; fails when none does in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            if wanted in self.messages[-1].split("\n"):
                return self.messages
        pytest.fail(f"no {wanted} within {timeout} s; got {self.messages}")

    def drain(self, for_s: float) -> list[str]:
        end = time.monotonic() + for_s
        got = []
        while time.monotonic() < end:
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        self.messages += got
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    made = NotifySocket(str(tmp_path / "notify"))
    yield made
    made.close()


def test_the_notifier_sends_each_notification_as_one_datagram(notify_socket):
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("serving: consuming\ninspector.captures")
    assert notifier.watchdog()
    assert notifier.stopping("stopping")
    notifier.close()
    assert notify_socket.drain(0.5) == [
        "READY=1\nSTATUS=serving: consuming inspector.captures", "WATCHDOG=1", "STOPPING=1\nSTATUS=stopping",
    ]


def test_the_notifier_reaches_an_abstract_socket():
    name = f"@inspector-test-{time.monotonic_ns()}"
    listener = NotifySocket(name)
    try:
        assert Notifier(name).watchdog()
        assert listener.drain(0.5) == ["WATCHDOG=1"]
    finally:
        listener.close()


def test_outside_systemd_or_with_the_socket_gone_the_notifier_does_nothing_and_never_raises(tmp_path, caplog):
    assert not Notifier.from_environment({}).enabled and not Notifier(None).ready("x")
    assert not Notifier("vsock:2:1234").enabled
    gone = Notifier(str(tmp_path / "no-such-socket"))
    assert gone.enabled and not gone.watchdog() and not gone.watchdog()
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1


def test_the_watchdog_pings_systemd_only_while_every_thread_is_healthy(notify_socket):
    """A stalled thread stops the pings, so systemd's WatchdogSec kills a worker that cannot exit by itself."""
    notifier = Notifier(notify_socket.address)
    stalled = threading.Event()
    dog = Watchdog(on_healthy=notifier.watchdog)
    dog.watch("scoring", alive=lambda: True, busy=stalled.is_set, limit_s=0.5)
    dog.start()
    try:
        notify_socket.receive_until("WATCHDOG=1", timeout=5)
        notify_socket.receive_until("WATCHDOG=1", timeout=5)
        stalled.set()  # busy from now on, and never a beat
        deadline = time.monotonic() + 10
        while dog.problem is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dog.problem and "scoring" in dog.problem
        assert notify_socket.drain(2.5) == []
    finally:
        dog.stop()
        notifier.close()


def test_a_real_worker_notifies_ready_pings_while_serving_and_notifies_stopping(fitted, tmp_path, prefix, line,
                                                                                notify_socket):
    from tests.test_logs import WorkerProcess
    from tests.workerkit import worker_config

    worker = WorkerProcess(worker_config(tmp_path, fitted, prefix), {"NOTIFY_SOCKET": notify_socket.address})
    try:
        got = notify_socket.receive_until("READY=1", timeout=120)
        ready = got[-1].split("\n")
        assert f"STATUS=serving: consuming {prefix}.q" in ready
        worker.wait_for(lambda text: "ready: queue" in text, timeout=10)
        pings_before = sum(m == "WATCHDOG=1" for m in notify_socket.messages)
        notify_socket.drain(2.5)
        assert sum(m == "WATCHDOG=1" for m in notify_socket.messages) >= pings_before + 2
    finally:
        status = worker.stop()
    assert status == 0, worker.stderr
    notify_socket.drain(0.5)
    stopping = [m for m in notify_socket.messages if m.startswith("STOPPING=1")]
    assert stopping and "STATUS=stopping: finishing the captures held" in stopping[0].split("\n")
    first_ready = next(i for i, m in enumerate(notify_socket.messages) if m.startswith("READY=1"))
    first_stopping = next(i for i, m in enumerate(notify_socket.messages) if m.startswith("STOPPING=1"))
    assert first_ready < first_stopping
