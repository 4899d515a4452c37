"""Closing the gateway's client connections at the TCP level, the last step of a drain.

Why: ``grpc_server_shutdown_and_notify`` (what ``server.stop`` calls) ends every call that grpc
core has received but not yet handed to the servicer, and every call that arrives after it, by
dropping it, and the client sees CANCELLED. Only then does core send GOAWAY, so a client that keeps
calling a replica that says NOT_SERVING loses the calls it sends in that window (0-7 in 9,000 in
the reliability test). grpc Python offers no way to send GOAWAY before stopping.

What: once the drain is over (in-flight calls done, the notice given), the gateway makes its
listening socket drop new connection attempts (a socket filter that drops every packet: SYNs go
unanswered, so no new connection is made, and grpc core's accept loop sees no error), shuts down
the sockets of its accepted connections (``shutdown(SHUT_RDWR)``), and stops the server in the same
step, with no await between. A client then sees its connection closed, and every call it had sent
or was sending on it ends UNAVAILABLE (retryable), never CANCELLED; its reconnection attempt is not
answered until the listener is closed, then refused (UNAVAILABLE). Shutting the listener down
instead would do the same but makes grpc core log an ERROR ("Failed accept4") at every stop. Every call in progress is over by then, so
no answer is lost that was owed.

Linux only (``/proc``): elsewhere nothing is closed and ``server.stop`` behaves as before.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from pathlib import Path


ESTABLISHED = "01"
LISTEN = "0A"
"""The kernel's TCP state codes in /proc/net/tcp."""
SO_ATTACH_FILTER = 26
_DROP_EVERYTHING = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
"""A classic BPF program of one instruction, ``ret #0``: keep no byte of any packet (drop it)."""


def socket_inodes(port: int, state: str, proc_net: Path = Path("/proc/net")) -> set[int]:
    """Inodes of TCP sockets in ``state`` whose local port is ``port`` (IPv4 and IPv6), any process."""
    inodes: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def socket_fds(inodes: set[int], fd_dir: Path = Path("/proc/self/fd")) -> list[int]:
    """This process's file descriptors that are the sockets ``inodes``."""
    fds = []
    try:
        entries = list(os.scandir(fd_dir))
    except OSError:
        return fds
    for entry in entries:
        try:
            target = os.readlink(entry.path)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            fds.append(int(entry.name))
    return fds


def hang_up(port: int) -> tuple[int, int]:
    """Stop taking new connections on ``port``, then shut down (both ways) the accepted connections
    on it; returns (listeners, connections) done.

    The listener first: a client whose connection closes reconnects at once, and a call it sends
    on a new connection before grpc core stops would be dropped (CANCELLED); with new connections
    dropped, that attempt goes unanswered until the listener is closed, then is refused (UNAVAILABLE). The file descriptors stay open and owned by grpc core,
    which sees them end and tears its listener and transports down; only ``shutdown`` is called on
    them, never ``close``. Log after the server has stopped, not here: every moment counts.
    """
    listeners = _shut(socket_fds(socket_inodes(port, LISTEN)), port, _drop_new_connections)
    connections = _shut(socket_fds(socket_inodes(port, ESTABLISHED)), port, _shut_down)
    return listeners, connections


def _drop_new_connections(sock: socket.socket) -> None:
    program = struct.pack("HL", 1, ctypes.addressof(_DROP_EVERYTHING))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)


def _shut_down(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_RDWR)


def _shut(fds: list[int], port: int, action) -> int:
    done = 0
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.getsockname()[1] != port:  # the descriptor was closed and reused since it was found
                continue
            action(sock)
            done += 1
        except OSError:  # already closed by the peer or by core
            pass
        finally:
            sock.detach()  # the descriptor remains core's
    return done
