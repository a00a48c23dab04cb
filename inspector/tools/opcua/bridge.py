"""`inspector opcua`: runs the OPC UA server, the results feed and the board together until SIGTERM.

One asyncio task owns the board and the nodes: results, connection changes and the end of each reject
pulse reach it in turn, so no two writes race. The feed's thread only hands bodies over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from inspector.config import OpcuaSettings, Settings
from inspector.errors import ConfigError
from inspector.messages import printable

log = logging.getLogger(__name__)

MISSING = ("inspector opcua needs asyncua, which the worker does not install: "
           "pip install 'inspector[opcua]' (or pip install 'asyncua>=1.1.5,<2')")
MALFORMED_LOGGED_EVERY = 100  # the first malformed result is logged, then every 100th


def run_bridge(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 0 then. ConfigError for what the operator must fix."""
    try:
        import asyncua  # noqa: F401 - only to say which extra to install when it is missing
    except ImportError:
        raise ConfigError(MISSING) from None
    asyncio.run(_serve(settings))
    return 0


def _one_user_manager(username: str, password: str) -> Any:
    from asyncua.crypto.permission_rules import User, UserRole

    class OneUser:
        """The configured user may read and subscribe; everyone else is refused."""

        def get_user(self, iserver: Any, username: Any = None, password: Any = None, certificate: Any = None):
            given = password.encode() if isinstance(password, str) else bytes(password or b"")
            if username == expected_name and hmac.compare_digest(given, expected_password):
                return User(role=UserRole.User, name=username)
            return None

    expected_name, expected_password = username, password.encode()
    return OneUser()


async def make_server(opcua: OpcuaSettings) -> Any:
    """An initialised asyncua Server with the configured endpoint, security and users. The certificate and
    key are read first, so that one that cannot be read fails before the slow part (asyncua's standard
    address space)."""
    from asyncua import Server, ua
    from asyncua.crypto import uacrypto

    keys = {}
    for key, load in (("certificate", uacrypto.load_certificate), ("private_key", uacrypto.load_private_key)):
        path = getattr(opcua, key)
        if not path:
            continue
        try:
            keys[key] = await load(Path(path).expanduser())
        except OSError as exc:
            raise ConfigError(f"opcua.{key} {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            form = "PEM" if Path(path).suffix == ".pem" else "DER (a name ending .pem is read as PEM)"
            raise ConfigError(f"opcua.{key} {path}: not a {key.replace('_', ' ')} in {form}: {exc}") from None
    user_manager = None
    if opcua.username:
        user_manager = _one_user_manager(opcua.username, opcua.password.get_secret_value())
    server = Server(user_manager=user_manager)
    await server.init()
    server.set_endpoint(opcua.endpoint)
    server.set_server_name("inspector verdicts")
    policies = {"none": ua.SecurityPolicyType.NoSecurity,
                "sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                "sign_and_encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
    server.set_security_policy([policies[mode] for mode in opcua.security])
    server.set_identity_tokens([ua.UserNameIdentityToken] if opcua.username else [ua.AnonymousIdentityToken])
    if keys:
        server.iserver.certificate, server.iserver.private_key = keys["certificate"], keys["private_key"]
    return server


async def _serve(settings: Settings) -> None:
    from inspector.tools.opcua.board import Board, parse_result
    from inspector.tools.opcua.feed import ResultFeed
    from inspector.tools.opcua.namespace import Namespace

    opcua = settings.opcua
    chatter = logging.getLogger("asyncua")
    quiet = max(logging.WARNING, logging.getLogger().level)
    chatter.setLevel(quiet)  # its INFO (every standard node it adds) is chatter
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, inbox.put_nowait, ("stop",))

    server = await make_server(opcua)
    index = await server.register_namespace(opcua.namespace)
    namespace = Namespace(server, index)
    await namespace.build()
    board = Board(opcua.max_sources, [(s.line, s.camera) for s in opcua.sources], opcua.reject_pulse_s)
    for source, state in board.sources.items():
        await namespace.add_source(source, state)

    def post(item: tuple) -> None:
        """From the feed's thread; after the loop has closed (a stop that outlasted the join) nothing is left
        to tell."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(inbox.put_nowait, item)

    feed = ResultFeed(settings, deliver=lambda body, ack: post(("result", body, ack)),
                      connected=lambda up: post(("connected", up)))
    chatter.setLevel(logging.CRITICAL)  # a port in use: asyncua logs a traceback, the error below says it all
    try:
        await server.start()
    except OSError as exc:
        with contextlib.suppress(Exception):
            await server.stop()
        reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
        raise ConfigError(f"opcua.endpoint {opcua.endpoint}: cannot listen ({reason}); choose a free port") from None
    finally:
        chatter.setLevel(quiet)
    received = malformed = 0
    try:
        feed.start()
        log.info("serving OPC UA on %s, namespace %s (index %d)", opcua.endpoint, opcua.namespace, index)
        getting: asyncio.Task = asyncio.ensure_future(inbox.get())
        while True:
            expiry = board.next_expiry()
            timeout = None if expiry is None else max(0.0, expiry - time.monotonic())
            done, _ = await asyncio.wait({getting}, timeout=timeout)
            for source in board.expire(time.monotonic()):
                await namespace.write_reject(source, False)
            if not done:
                continue
            item = getting.result()
            getting = asyncio.ensure_future(inbox.get())
            if item[0] == "stop":
                getting.cancel()
                break
            if item[0] == "connected":
                await namespace.write_bridge("BrokerConnected", item[1])
                continue
            _, body, ack = item
            try:
                result = parse_result(body)
            except ValueError as exc:
                malformed += 1
                if malformed % MALFORMED_LOGGED_EVERY == 1:
                    log.warning("a message on %s is not a result (%d so far): %s", settings.broker.exchanges.results,
                                malformed, printable(str(exc), 300))
                await namespace.write_bridge("ResultsMalformed", malformed)
                ack()
                continue
            source, state, new = board.apply(result, time.monotonic())
            if new:
                await namespace.add_source(source, state)
            else:
                await namespace.write_source(source, state)
            received += 1
            await namespace.write_bridge("ResultsReceived", received)
            await namespace.write_bridge("ResultsOverCap", board.over_cap)
            ack()
    finally:
        feed.stop()
        await server.stop()
    log.info("stopped: %d results served, %d malformed", received, malformed)
