from __future__ import annotations

import socket

import pytest
from loopback import RedisServer

pytestmark = pytest.mark.redis


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def test_redis_fixture_serves_and_restarts(redis_server: RedisServer) -> None:
    """The fixture's server answers, can be killed (refused) and comes back on the same port."""
    assert _ping(redis_server.port) == b"+PONG\r\n"
    redis_server.kill()
    with pytest.raises(ConnectionRefusedError):
        _ping(redis_server.port)
    redis_server.start()
    assert _ping(redis_server.port) == b"+PONG\r\n"


def test_stalled_redis_accepts_but_does_not_answer(redis_server: RedisServer) -> None:
    """SIGSTOP leaves the port open and silent, the shape of a hung Redis."""
    redis_server.stall()
    try:
        with (
            socket.create_connection(("127.0.0.1", redis_server.port), timeout=1) as sock,
        ):
            sock.settimeout(0.2)
            sock.sendall(b"PING\r\n")
            with pytest.raises(TimeoutError):
                sock.recv(64)
    finally:
        redis_server.resume()
    assert _ping(redis_server.port) == b"+PONG\r\n"
