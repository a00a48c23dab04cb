"""pika's private internals that inspector/worker/pikaconnection.py relies on, checked against the installed
pika: a pika release that renames, removes or re-signs any of them fails here, naming what changed, rather
than in a worker that reads frames wrongly. And the checker is shown to catch each kind of change, on
classes altered on purpose. No broker."""

from __future__ import annotations

import ast
import collections.abc
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pika
import pytest
from packaging.requirements import Requirement
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils import io_services_utils

from inspector.worker import pikaconnection
from inspector.worker.pikaconnection import TolerantConnection

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
TRANSPORT = "_AsyncPlaintextTransport"


def _parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def _overrides() -> dict[str, types.FunctionType]:
    """The private methods TolerantConnection defines: each replaces one of pika's."""
    return {name: value for name, value in vars(TolerantConnection).items()
            if name.startswith("_") and not name.startswith("__") and inspect.isfunction(value)}


def _connection(connection_class: type):
    """An instance never connected (its IOLoop never runs), and a function that disposes of it."""
    loop = IOLoop()
    return connection_class(pika.ConnectionParameters("127.0.0.1", 1), custom_ioloop=loop), loop.close


class _Services:
    """The I/O services a transport registers its socket with: recorded, never run."""

    def set_reader(self, fd, on_readable):
        self.reader = (fd, on_readable)


def pika_differences(connection_class: type, transport_module) -> list[str]:
    """What differs between what pikaconnection relies on and `connection_class` (pika.SelectConnection) and
    `transport_module` (pika.adapters.utils.io_services_utils); empty when nothing does."""
    found: list[str] = []
    where = connection_class.__qualname__

    def check_method(owner: type, label: str, name: str, expected: list[str]) -> None:
        method = getattr(owner, name, None)
        if not callable(method):
            found.append(f"{label}.{name} is gone (pikaconnection relies on it)")
        elif [p for p, _ in _parameters(method)] != expected:
            found.append(f"{label}.{name}{inspect.signature(method)} no longer takes ({', '.join(expected)})")

    for name, override in _overrides().items():
        method = getattr(connection_class, name, None)
        if not callable(method):
            found.append(f"{where}.{name} is gone: TolerantConnection overrides it")
        elif _parameters(method) != _parameters(override):
            found.append(f"{where}.{name}{inspect.signature(method)} differs from the override "
                         f"TolerantConnection.{name}{inspect.signature(override)}")
    for name, expected in pikaconnection.CONNECTION_METHODS.items():
        check_method(connection_class, where, name, list(expected))
    try:
        connection, dispose = _connection(connection_class)
    except Exception as exc:  # noqa: BLE001 - reported, the other checks go on
        found.append(f"{where}(parameters, custom_ioloop=...) cannot be built as the tests build it: {exc!r}")
    else:
        try:
            for name in pikaconnection.CONNECTION_ATTRIBUTES:
                if name not in vars(connection):
                    found.append(f"{where}'s init no longer sets {name}")
            if "_frame_buffer" in vars(connection) and not isinstance(connection._frame_buffer, bytes):
                found.append(f"{where}._frame_buffer is not bytes")
        finally:
            dispose()

    transport = getattr(transport_module, TRANSPORT, None)
    if not isinstance(transport, type):
        found.append(f"{transport_module.__name__}.{TRANSPORT} is gone (pikaconnection imports it)")
        return found
    label = f"{transport_module.__name__}.{TRANSPORT}"
    for name in pikaconnection.TRANSPORT_CLASS_ATTRIBUTES:
        if not isinstance(getattr(transport, name, None), int):
            found.append(f"{label}.{name} is no longer an int class attribute")
    for name, expected in pikaconnection.TRANSPORT_METHODS.items():
        check_method(transport, label, name, list(expected))
    near, far = socket.socketpair()
    try:
        instance = transport(near, object(), _Services())
    except Exception as exc:  # noqa: BLE001
        found.append(f"{label}(sock, protocol, nbio) cannot be built as pika builds it: {exc!r}")
    else:
        for name in pikaconnection.TRANSPORT_ATTRIBUTES:
            if name not in vars(instance):
                found.append(f"{label}'s init no longer sets {name}")
        buffers = vars(instance).get("_tx_buffers", [])
        if not isinstance(buffers, collections.abc.MutableSequence):
            found.append(f"{label}._tx_buffers is no longer a mutable sequence (its last write is extended)")
        if getattr(instance, "_state", None) != getattr(transport, "_STATE_ACTIVE", object()):
            found.append(f"{label} is no longer in _STATE_ACTIVE once built")
    finally:
        near.close()
        far.close()
    return found


def test_the_installed_pika_has_every_internal_pikaconnection_relies_on():
    assert pika_differences(pika.SelectConnection, io_services_utils) == []


def test_the_installed_pika_is_the_one_pyproject_pins():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in dependencies if Requirement(d).name == "pika")
    assert pin.specifier.contains(pika.__version__), f"pika {pika.__version__} is installed; pyproject pins {pin}"


def test_every_private_name_pikaconnection_touches_is_one_it_declares():
    """The checks above cover what the module says it uses; here, what it uses is read from its source, so a
    new private name cannot slip in undeclared."""
    tree = ast.parse(Path(pikaconnection.__file__).read_text())
    touched = {node.attr for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.name.startswith("_")}
    plain, dispose_plain = _connection(pika.SelectConnection)
    tolerant, dispose_tolerant = _connection(TolerantConnection)
    own = set(vars(tolerant)) - set(vars(plain))  # TolerantConnection's own state
    dispose_plain()
    dispose_tolerant()
    declared = (set(_overrides()) | own | set(pikaconnection.CONNECTION_ATTRIBUTES)
                | set(pikaconnection.CONNECTION_METHODS) | set(pikaconnection.TRANSPORT_ATTRIBUTES)
                | set(pikaconnection.TRANSPORT_CLASS_ATTRIBUTES) | set(pikaconnection.TRANSPORT_METHODS))
    assert own == {"_reads", "_read_bytes", "_awaited"}
    assert touched - declared == set(), "pikaconnection touches private names it does not declare"
    assert imported == {TRANSPORT}


# -- the checker, shown to fail -------------------------------------------------------------------

class _ReadFrameTakesALimit(pika.SelectConnection):
    def _read_frame(self, limit):
        return super()._read_frame()


class _NoOutputMarshaledFrames(pika.SelectConnection):
    _output_marshaled_frames = None


class _FrameBufferRenamed(pika.SelectConnection):
    def _init_connection_state(self):
        super()._init_connection_state()
        self._frame_data = self.__dict__.pop("_frame_buffer")


class _EmitTakesMore(pika.SelectConnection):
    def _adapter_emit_data(self, data, flush):
        pass


class _TxBuffersRenamed(io_services_utils._AsyncPlaintextTransport):
    def __init__(self, sock, protocol, nbio):
        super().__init__(sock, protocol, nbio)
        self._tx_queue = self.__dict__.pop("_tx_buffers")


class _BufferTxTakesMore(io_services_utils._AsyncPlaintextTransport):
    def _buffer_tx_data(self, data, urgent):
        pass


class _NoMaxRecv(io_services_utils._AsyncPlaintextTransport):
    _MAX_RECV_BYTES = None


def _module(transport: type | None) -> types.SimpleNamespace:
    namespace = types.SimpleNamespace(__name__="pika.adapters.utils.io_services_utils")
    if transport is not None:
        setattr(namespace, TRANSPORT, transport)
    return namespace


@pytest.mark.parametrize(("connection_class", "transport", "expected"), [
    (_ReadFrameTakesALimit, io_services_utils._AsyncPlaintextTransport,
     "_ReadFrameTakesALimit._read_frame(self, limit) differs from the override TolerantConnection._read_frame"),
    (_NoOutputMarshaledFrames, io_services_utils._AsyncPlaintextTransport,
     "_NoOutputMarshaledFrames._output_marshaled_frames is gone: TolerantConnection overrides it"),
    (_FrameBufferRenamed, io_services_utils._AsyncPlaintextTransport,
     "_FrameBufferRenamed's init no longer sets _frame_buffer"),
    (_EmitTakesMore, io_services_utils._AsyncPlaintextTransport,
     "_EmitTakesMore._adapter_emit_data(self, data, flush) no longer takes (self, data)"),
    (pika.SelectConnection, None, "io_services_utils._AsyncPlaintextTransport is gone"),
    (pika.SelectConnection, _TxBuffersRenamed, "_AsyncPlaintextTransport's init no longer sets _tx_buffers"),
    (pika.SelectConnection, _BufferTxTakesMore,
     "_AsyncPlaintextTransport._buffer_tx_data(self, data, urgent) no longer takes (self, data)"),
    (pika.SelectConnection, _NoMaxRecv, "_AsyncPlaintextTransport._MAX_RECV_BYTES is no longer an int"),
], ids=["override-signature", "override-gone", "attribute-gone", "called-signature", "transport-gone",
        "transport-attribute-gone", "transport-method-signature", "transport-class-attribute-gone"])
def test_the_checker_names_what_changed_in_an_altered_pika(connection_class, transport, expected):
    found = pika_differences(connection_class, _module(transport))
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("line", [
    "from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport",
    "import pika.adapters.base_connection",
    "from pika.connection import Connection",
])
def test_the_import_contract_refuses_pikas_internals_anywhere_but_pikaconnection(tmp_path, line):
    """tests/test_architecture.py runs the contracts on the tree as it is; here one module of a copy imports
    a private pika module, and the pika-internals contract breaks, naming it."""
    for package in ("inspector", "plugins"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "inspector" / "worker" / "consumer.py").open("a") as module:
        module.write(f"\n{line}  # noqa: E402\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=environment, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0, run.stdout
    assert "only worker/pikaconnection.py imports pika's private internals BROKEN" in run.stdout, run.stdout
    assert re.search(r"Contracts: \d+ kept, 1 broken\.", run.stdout), run.stdout
    assert "inspector.worker.consumer -> pika." in run.stdout, run.stdout
