"""The worker's pika connection: a SelectConnection that reads and writes frames more cheaply and survives a
content header it cannot decode.

Both need pika's private internals (methods of its connection classes, attributes of its plaintext
transport), which pika may change in any release. So every use of them lives in this module and nowhere
else: pyproject.toml pins pika to the versions this was tested with, the import-linter contract
`pika-internals` keeps pika's private modules out of every other module, and tests/test_pika_internals.py
checks each name below against the installed pika and names what changed.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024  # one socket read at most (pika's own is 4 KiB): two body frames at RabbitMQ's frame_max
CONSUME_BYTES = RECV_BYTES  # read per readable event before the IOLoop serves its timers and callbacks again
MERGED_WRITE_BYTES = 64 * 1024  # writes up to this size are merged into one send (results, acks; not dead letters)

# What this module relies on inside pika besides the methods TolerantConnection overrides (tests check each).
CONNECTION_ATTRIBUTES = ("_frame_buffer", "bytes_sent", "frames_sent")  # set by pika's connection init
CONNECTION_METHODS = {"_adapter_emit_data": ("self", "data")}  # called, not overridden: its parameters
TRANSPORT_ATTRIBUTES = ("_tx_buffers", "_tx_buffered_byte_count", "_state")  # set by the transport's init
TRANSPORT_CLASS_ATTRIBUTES = ("_STATE_ACTIVE", "_MAX_RECV_BYTES", "_MAX_CONSUME_BYTES")
TRANSPORT_METHODS = {"_buffer_tx_data": ("self", "data")}  # wrapped by _merge_tx_data: its parameters


class UndecodableProperties(pika.BasicProperties):
    """The properties of a delivery pika could not decode (a table nested too deep, a time out of
    range): empty, with the reason and the raw bytes, so the capture is still answered."""

    def __init__(self, reason: str, raw: bytes) -> None:
        super().__init__()
        self.decode_error = reason
        self.raw = raw


class TolerantConnection(pika.SelectConnection):
    """A SelectConnection that survives a content header it cannot decode: pika would raise out of
    the IOLoop and drop the connection on every redelivery, so one hostile capture would stall the
    worker and drag innocent captures past their delivery limit.

    It also reads captures at a frame's cost, not the square of it: pika reads 4 KiB at a time and
    appends each read to one bytes buffer, copying the whole buffer every time, so a 128 KiB body frame
    cost 32 reads and about 2 MiB of copying. Here reads are RECV_BYTES and kept aside until the frame
    they belong to is complete, then joined once and parsed by pika as before. And it writes small
    messages whole: pika hands the socket each frame of a publish (method, header, body) and each ack
    as a write of its own, one send() apiece; here the frames of a message go as one write, and small
    writes waiting for the socket are merged, so a batch of results and their acks leave in one send().
    """

    def _init_connection_state(self) -> None:
        super()._init_connection_state()
        self._reads: list[bytes] = []  # reads not yet handed to pika's frame buffer
        self._read_bytes = 0
        self._awaited = 0  # bytes still missing from the frame at the buffer's start

    def _proto_connection_made(self, transport: Any) -> None:
        transport._MAX_RECV_BYTES = max(RECV_BYTES, getattr(transport, "_MAX_RECV_BYTES", 0))
        transport._MAX_CONSUME_BYTES = max(CONSUME_BYTES, getattr(transport, "_MAX_CONSUME_BYTES", 0))
        if isinstance(transport, _AsyncPlaintextTransport):  # TLS retries a send with the same buffer: left alone
            transport._buffer_tx_data = functools.partial(_merge_tx_data, transport, transport._buffer_tx_data)
        super()._proto_connection_made(transport)

    def _output_marshaled_frames(self, marshaled_frames: Any) -> None:
        if len(marshaled_frames) < 2 or sum(map(len, marshaled_frames)) > MERGED_WRITE_BYTES:
            super()._output_marshaled_frames(marshaled_frames)
            return
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)
        self.frames_sent += len(marshaled_frames)
        self._adapter_emit_data(data)

    def _on_data_available(self, data_in: bytes) -> None:
        self._reads.append(data_in)
        self._read_bytes += len(data_in)
        if self._read_bytes < self._awaited:
            return
        data = self._reads[0] if len(self._reads) == 1 else b"".join(self._reads)
        self._reads, self._read_bytes = [], 0
        try:
            super()._on_data_available(data)
        finally:
            self._awaited = _missing_bytes(self._frame_buffer)

    def _read_frame(self) -> Any:
        try:
            return super()._read_frame()
        except pika.exceptions.InvalidFrameError:
            raise
        except Exception as exc:  # noqa: BLE001 - RecursionError, OverflowError, ValueError from the decoder
            salvaged = _salvage_header(self._frame_buffer, exc)
            if salvaged is None:
                raise
            return salvaged


def _merge_tx_data(transport: Any, buffer_tx_data: Callable[[bytes], None], data: bytes) -> None:
    """pika's plaintext transport buffering one write, merged into the last write still waiting while both
    are small: the socket then takes them in one send() (a partial send is requeued by pika as before)."""
    buffers = transport._tx_buffers
    if (data and buffers and transport._state == transport._STATE_ACTIVE and len(data) < MERGED_WRITE_BYTES
            and len(buffers[-1]) < MERGED_WRITE_BYTES):
        buffers[-1] += data
        transport._tx_buffered_byte_count += len(data)
    else:
        buffer_tx_data(data)


def _missing_bytes(buffer: bytes) -> int:
    """How many more bytes the frame at the start of `buffer` needs before pika can parse it; 0 when it
    may parse now (empty, complete, or a protocol header, which pika reads itself)."""
    if not buffer or buffer[:1] == b"A":  # b"AMQP...": a protocol header, 8 bytes
        return 0
    if len(buffer) < pika.spec.FRAME_HEADER_SIZE:
        return pika.spec.FRAME_HEADER_SIZE - len(buffer)
    _type, _channel, size = struct.unpack_from(">BHL", buffer, 0)
    return max(0, pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE - len(buffer))


def _salvage_header(data: bytes, error: BaseException) -> tuple[int, pika.frame.Header] | None:
    """The content header frame at the start of `data` with its properties replaced, or None when the
    frame that failed is not a content header."""
    try:
        frame_type, channel, size = struct.unpack_from(">BHL", data, 0)
        if frame_type != pika.spec.FRAME_HEADER:
            return None
        frame_end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        payload = data[pika.spec.FRAME_HEADER_SIZE:frame_end - 1]
        _class_id, _weight, body_size = struct.unpack_from(">HHQ", payload, 0)
    except struct.error:
        return None
    reason = f"{type(error).__name__}: {str(error)[:200]}"
    log.warning("a delivery's properties could not be decoded (%s); it is answered as headers_undecodable", reason)
    return frame_end, pika.frame.Header(channel, body_size, UndecodableProperties(reason, bytes(payload[12:])))
