"""The worker's HTTP endpoints under slow clients: sockets that trickle a request a byte at a time.

`bounded` runs the worker's own server (`Metrics.serve`); `unbounded` the server as it was before the
whole-request deadline: a timeout per read and new connections refused while 16 are open.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hostile import Case
from inspector.config import MetricsSettings
from inspector.worker.metrics import HTTP_MAX_CONNECTIONS, Metrics

TRICKLE_EVERY_S = 4.0  # well inside the former 10 s timeout per read
GIVE_UP_S = 120.0  # the bounded figure must be seconds; this only stops a run that has lost the race


class _FormerServer(ThreadingHTTPServer):
    """The former server: at most 16 connections, a 17th closed at once, 10 s timeout per read."""

    daemon_threads = True

    def __init__(self) -> None:
        self._slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
        super().__init__(("127.0.0.1", 0), _FormerHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _FormerHandler(BaseHTTPRequestHandler):
    timeout = 10.0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _trickle(port: int, count: int, stop: threading.Event) -> list[socket.socket]:
    """`count` connections each sending a request line one byte every TRICKLE_EVERY_S, until `stop`."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    line = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 1000

    def run() -> None:
        position = 0
        while True:
            for connection in sockets:
                try:
                    connection.sendall(line[position : position + 1])
                except OSError:
                    pass
            position += 1
            if stop.wait(TRICKLE_EVERY_S):
                return

    threading.Thread(target=run, daemon=True).start()
    return sockets


def _probe_until_answered(port: int) -> str:
    """/healthz asked every 0.25 s, as a kubelet probe would keep asking, until it answers."""
    started = time.monotonic()
    attempts = 0
    while time.monotonic() - started < GIVE_UP_S:
        attempts += 1
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return f"{response.status} after {attempts} probe(s)"
        except urllib.error.HTTPError as error:
            return f"{error.code} after {attempts} probe(s)"
        except OSError:
            time.sleep(0.25)
    return f"no answer in {GIVE_UP_S:.0f} s"


def healthz_with_trickling_clients_now() -> str:
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    port = metrics.serve()
    stop = threading.Event()
    sockets = _trickle(port, HTTP_MAX_CONNECTIONS, stop)
    try:
        time.sleep(0.2)  # every slot taken
        return _probe_until_answered(port)
    finally:
        stop.set()
        for connection in sockets:
            connection.close()
        metrics.close()


def healthz_with_trickling_clients_before() -> str:
    server = _FormerServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    stop = threading.Event()
    sockets = _trickle(port, HTTP_MAX_CONNECTIONS, stop)
    try:
        time.sleep(0.2)
        return _probe_until_answered(port)
    finally:
        stop.set()
        for connection in sockets:
            connection.close()
        server.shutdown()


def _hung_up_after(port: int) -> str:
    """One connection trickling a byte every 0.5 s: how long until the server closes it."""
    started = time.monotonic()
    line = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100_000
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.settimeout(0.5)
        for byte in line:
            try:
                connection.sendall(bytes([byte]))
                if connection.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
            if time.monotonic() - started > GIVE_UP_S:
                return f"still open after {GIVE_UP_S:.0f} s"
    return f"closed after {time.monotonic() - started:.1f} s"


def one_trickled_request_now() -> str:
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    try:
        return _hung_up_after(metrics.serve())
    finally:
        metrics.close()


def one_trickled_request_before() -> str:
    server = _FormerServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return _hung_up_after(server.server_address[1])
    finally:
        server.shutdown()


CASES = [
    Case(f"/healthz answered while {HTTP_MAX_CONNECTIONS} sockets trickle a byte every {TRICKLE_EVERY_S:.0f} s",
         healthz_with_trickling_clients_now, healthz_with_trickling_clients_before, unbounded_limit_s=40.0),
    Case("a request trickled a byte every 0.5 s: held until hung up on",
         one_trickled_request_now, one_trickled_request_before, unbounded_limit_s=40.0),
]
