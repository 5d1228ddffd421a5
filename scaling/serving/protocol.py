"""Connection-level limits of the HTTP server, which aiohttp's application layer cannot see.

aiohttp answers a request it cannot parse (a malformed request line or header) itself, in
plain text, before any handler or middleware runs; and it waits as long as a client likes
for the first request on a connection, so clients that connect and send nothing, or send
their headers a byte at a time, hold sockets forever. `JsonErrorServer` makes aiohttp's
connections `LimitedConnection`s, which answer those errors in JSON like every other error
of the server and close a connection that has not delivered a whole request within
`idle_timeout_s` of opening or of its last response. Request bodies have their own timeout
in the handler, and JSON depth is checked before parsing (`json_depth`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import signal
import socket
from http import HTTPStatus

from aiohttp import web, web_protocol, web_server

from scaling.errors import UserError


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost either server: body size, JSON depth and the time to send it.

    Both servers (the classifier's and the language model's) take the same three flags and
    hold requests to them the same way, so the limits live here with the rest of what the
    two share rather than in either server.
    """

    max_request_bytes: int = 4 << 20
    max_json_depth: int = 16
    body_timeout_s: float = 30.0


_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without parsing it
    (so a hostile depth costs one scan, never the parser's recursion)."""
    depth = deepest = 0
    in_string = False
    escaped_at = -1  # the position a backslash in a string escapes
    for match in _STRUCTURE.finditer(body):
        at, char = match.start(), match.group()
        if at == escaped_at:
            continue
        if in_string:
            if char == b"\\":
                escaped_at = at + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (b"]", b"}"):
            depth -= 1
    return deepest


class LimitedConnection(web_protocol.RequestHandler):
    """aiohttp's connection handler with JSON errors and an idle deadline."""

    idle_timeout_s = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_idle_check()

    def _arm_idle_check(self) -> None:
        self._served_at_arm = self._request_count
        self._idle_handle = self._loop.call_later(self.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        """No new whole request since the deadline was set: close, unless one is being
        handled (its own timeouts govern it)."""
        if self.transport is None:
            return
        if self._request_count == self._served_at_arm and not self._messages and \
                self._task_handler is not None and self._waiter is not None:
            self.transport.close()
            return
        self._arm_idle_check()

    def connection_lost(self, exc) -> None:
        handle = getattr(self, "_idle_handle", None)
        if handle is not None:
            handle.cancel()
        super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:  # a status the standard library does not name
            phrase = ""
        detail = message or (str(exc) if exc is not None else "") or phrase
        response = web.Response(status=status, content_type="application/json",
                                text=json.dumps({"error": f"{phrase}: {detail}".strip(": ")}))
        response.force_close()
        return response


class JsonErrorServer(web_server.Server):
    """aiohttp's server, making `LimitedConnection`s with its `idle_timeout_s`."""

    idle_timeout_s = LimitedConnection.idle_timeout_s

    def __call__(self) -> LimitedConnection:
        connection = LimitedConnection(self, loop=self._loop, **self._kwargs)
        connection.idle_timeout_s = self.idle_timeout_s
        return connection


def limit_connections(runner: web.AppRunner, idle_timeout_s: float) -> None:
    """Make a set-up runner's server hand out `LimitedConnection`s. aiohttp offers no
    setting for the connection class, so the server's class is swapped for the subclass
    above, which changes nothing but what it makes."""
    runner.server.__class__ = JsonErrorServer
    runner.server.idle_timeout_s = idle_timeout_s


def reserve(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before a model loads (as vLLM binds its own): the
    port, the one `--port=0` picks too, is known and taken from the start, and a client that
    connects early waits in the listen queue until the server answers. A port that cannot be
    bound is the user's error, naming `--port`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"--host={host}: cannot listen there ({e.strerror})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UserError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.setblocking(False)
    return sock


async def listen(application: web.Application, host: str, port: int, idle_timeout_s: float,
                 shutdown_grace_s: float, sock: socket.socket | None = None,
                 ) -> tuple[web.AppRunner, int, asyncio.Event]:
    """Starts serving `application`: (its runner, the bound port, an event that SIGTERM or
    SIGINT sets), on `sock` when one was reserved. A port that cannot be bound is the user's
    error, naming `--port`.

    After an early answer (408, 413) aiohttp reads what the client still sends for
    `lingering_time` before closing, so the client sees the answer, not a reset; a second is
    plenty on any network and bounds what a slow client can hold. `runner.cleanup()` later
    stops listening and waits (at most `shutdown_grace_s`) for the handlers in flight.
    """
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=shutdown_grace_s,
                           lingering_time=1.0)
    await runner.setup()
    limit_connections(runner, idle_timeout_s)
    try:
        await (web.SockSite(runner, sock) if sock is not None
               else web.TCPSite(runner, host, port)).start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return runner, runner.addresses[0][1], stop


def check_minimums(flag_values, minimums: tuple[tuple[str, float], ...]) -> None:
    """Each named flag is finite and at least its minimum, or a UserError naming it."""
    for name, minimum in minimums:
        value = flag_values[name].value
        if not (value >= minimum and math.isfinite(value)):
            raise UserError(f"--{name}={value}: must be at least {minimum}")


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"--port={port}: expected 0 to 65535 (0 picks a free port)")


# The limits both servers take, and their lowest sensible values.
LIMIT_MINIMUMS = (("max_request_bytes", 1), ("max_json_depth", 1), ("body_timeout_s", 0.001),
                  ("idle_timeout_s", 0.001), ("shutdown_grace_s", 0))


def parse_command_line(flag_values, argv: list[str]) -> None:
    """Parses a server's own flags; a bad flag or a stray argument is a UserError."""
    from absl import flags

    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise UserError(str(e)) from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {' '.join(rest[1:])}")
