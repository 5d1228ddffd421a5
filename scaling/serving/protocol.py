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

import json
import re
from http import HTTPStatus

from aiohttp import web, web_protocol, web_server

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
