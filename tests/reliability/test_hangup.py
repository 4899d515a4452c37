"""``gateway/hangup.py`` on real sockets: the listener stops accepting, accepted connections see the
end of the stream, and nothing else (a client socket of the same process, another port) is touched."""

from __future__ import annotations

import socket
import sys

import pytest

from infergate.gateway.hangup import hang_up

pytestmark = [pytest.mark.reliability, pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux only)")]


def test_hang_up_stops_the_listener_and_ends_accepted_connections():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    other = socket.create_server(("127.0.0.1", 0))  # another port: left alone
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    bystander = socket.create_connection(other.getsockname())
    bystander_peer, _ = other.accept()
    try:
        assert hang_up(port) == (1, 1)
        client.settimeout(5)
        assert client.recv(1) == b""  # the gateway's side was shut down: the client sees the end
        with pytest.raises(OSError):  # no new connection is made (the attempt goes unanswered)
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        bystander.sendall(b"x")  # the other port's connection still carries data both ways
        assert bystander_peer.recv(1) == b"x"
        bystander_peer.sendall(b"y")
        assert bystander.recv(1) == b"y"
        assert accepted.fileno() >= 0  # shut down, not closed: the descriptor is still its owner's
    finally:
        for sock in (client, accepted, bystander, bystander_peer, listener, other):
            sock.close()
