"""asyncio streams on a dockpoint endpoint: :func:`start_server` and :func:`open_connection`.

Shaped like :func:`asyncio.start_unix_server` and :func:`asyncio.open_unix_connection`, with
dockpoint's claim, names and identity checks::

    import asyncio
    import dockpoint.aio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await dockpoint.aio.start_server(handle, "myapp")
        if server is None:
            return  # another process serves "myapp"
        async with server:
            await server.serve_forever()

This module is imported only by those who use it: ``import dockpoint`` does not load
:mod:`asyncio`.

POSIX: the event loop's own Unix-socket server runs on the claimed listening socket, so
clients are accepted inside the loop, never inside a task a cancellation could interrupt
with a client in hand. Each accepted client's identity is checked as
:meth:`dockpoint.Dockpoint.accept` checks it (the peer's user id, from the kernel) before
``client_connected_cb`` runs; a client of another user is closed unserved.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from weakref import WeakSet

from ._common import BUSY_GRACE, Dockpoint, check_timeout, endpoint_stem

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Awaitable, Callable
    from types import TracebackType
    from typing import Any, Union

    from typing_extensions import Self

    ClientConnected = Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Union[Awaitable[None], None]
    ]

__all__ = ["Server", "open_connection", "start_server"]

#: Keyword arguments :func:`start_server` decides itself.
_RESERVED = ("path", "sock", "backlog", "cleanup_socket")


def _unsupported() -> OSError:
    import errno

    return OSError(
        errno.ENOTSUP,
        "dockpoint.aio supports POSIX event loops only so far; on Windows use the blocking "
        "API (dockpoint.claim / dockpoint.connect) in threads",
    )


class Server:
    """A claimed endpoint served by the running event loop; from :func:`start_server`.

    Like :class:`asyncio.Server`: ``async with server:`` closes it at the end of the
    block. Closing releases the claim exactly as :meth:`dockpoint.Dockpoint.close` does
    (the endpoint is removed, then the claim is released), so the next
    :func:`dockpoint.claim` or :func:`start_server` succeeds. Connections already handed
    to ``client_connected_cb`` stay open until they are closed or
    :meth:`close_clients` / :meth:`abort_clients` is called.
    """

    def __init__(self, server: asyncio.AbstractServer, endpoint: Dockpoint) -> None:
        self._server = server
        self._endpoint = endpoint
        self._clients: WeakSet[asyncio.BaseTransport] = WeakSet()
        self._forever: asyncio.Future[None] | None = None
        #: Where the endpoint lives: the socket path on POSIX.
        self.address = endpoint.address

    def close(self) -> None:
        """Stop accepting and release the claim. Closing again does nothing.

        Clients still waiting in the OS's queue see end of stream unserved (they may
        connect again, to the next holder); :meth:`serve_forever` returns.
        """
        self._server.close()  # no more accepts in the loop; its copy of the socket closes
        self._endpoint.close()  # unlink and unlock, as Dockpoint.close always does
        forever, self._forever = self._forever, None
        if forever is not None and not forever.done():
            forever.set_result(None)

    def close_clients(self) -> None:
        """Close every connection this server has handed to ``client_connected_cb``
        (as :meth:`asyncio.StreamWriter.close`: queued data is sent first). Their pending
        reads return end of stream."""
        for transport in list(self._clients):
            transport.close()

    def abort_clients(self) -> None:
        """Close every connection handed to ``client_connected_cb`` at once, dropping data
        not yet sent."""
        for transport in list(self._clients):
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:  # pragma: no cover - stream transports are write transports
                transport.close()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._endpoint.closed

    def is_serving(self) -> bool:
        """Whether new clients are being accepted."""
        return not self._endpoint.closed and self._server.is_serving()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs in."""
        return self._server.get_loop()

    async def start_serving(self) -> None:
        """Start accepting, if ``start_server(..., start_serving=False)`` made the server."""
        if self._endpoint.closed:
            raise RuntimeError(f"{self!r} is closed")
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        """Accept clients until :meth:`close`. Cancelling this closes the server (and so
        releases the claim), as :meth:`asyncio.Server.serve_forever` does.

        :raises RuntimeError: the server is closed, or ``serve_forever`` already runs.
        """
        if self._endpoint.closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._forever is not None:
            raise RuntimeError(f"{self!r} is already being awaited on serve_forever()")
        forever = self._server.get_loop().create_future()
        self._forever = forever
        try:
            await self._server.start_serving()
            await forever
        finally:
            if self._forever is forever:
                self._forever = None
            self.close()

    async def wait_closed(self) -> None:
        """Wait until the server is closed (on Python 3.12 and later, as
        :meth:`asyncio.Server.wait_closed` does there, also until its connections are)."""
        await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<dockpoint.aio.Server {self.address!r}{state}>"


async def start_server(
    client_connected_cb: ClientConnected,
    app_name: str,
    instance: str = "default",
    **kw: Any,
) -> Server | None:
    """Claim the endpoint for ``(app_name, instance)`` and serve it in the running loop.

    Like :func:`asyncio.start_unix_server`: ``client_connected_cb(reader, writer)`` is
    called with an :class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` for
    each client; if it is a coroutine function, it runs as a task. A client's identity is
    checked before the callback runs, exactly as :meth:`dockpoint.Dockpoint.accept`
    checks it: clients of another user are closed unserved.

    :param kw: passed to :func:`asyncio.start_unix_server` (``limit=``,
        ``start_serving=``, ...); the endpoint decides ``path``, ``sock``, ``backlog`` and
        ``cleanup_socket``.
    :returns: the serving :class:`Server`, or ``None`` if another process holds the
        claim.
    :raises TypeError: a name is not a ``str``, ``client_connected_cb`` is not callable,
        or ``kw`` names an argument the endpoint decides.
    :raises ValueError: a name breaks the naming rules (see :func:`dockpoint.claim`).
    :raises PermissionError: the endpoint directory is unsafe.
    :raises OSError: with ``errno.ENOTSUP`` on Windows, which this module does not
        support yet.
    """
    if not callable(client_connected_cb):
        raise TypeError(
            f"client_connected_cb must be callable, not {type(client_connected_cb).__name__}"
        )
    for name in _RESERVED:
        if name in kw:
            raise TypeError(f"start_server() decides {name!r} itself; do not pass it")
    endpoint_stem(app_name, instance)  # argument errors before anything else
    if sys.platform == "win32":
        raise _unsupported()
    from . import _posix, claim

    asyncio.get_running_loop()  # outside a running loop: RuntimeError before the claim
    endpoint = claim(app_name, instance)
    if endpoint is None:
        return None
    uid = os.geteuid()
    peer = _posix._peer
    server: Server | None = None

    def connected(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Awaitable[None] | None:
        transport = writer.transport
        try:
            _, peer_uid = peer(writer.get_extra_info("socket"))
        except OSError:
            peer_uid = -1
        if peer_uid != uid:  # another user's client (or no credentials): drop it unserved
            transport.abort()
            return None
        if server is not None:
            server._clients.add(transport)
        return client_connected_cb(reader, writer)

    start = kw.pop("start_serving", True)
    if sys.version_info >= (3, 13):
        kw["cleanup_socket"] = False  # the endpoint removes its own socket, if still its own
    try:
        # The loop's server gets its own descriptor of the claimed socket; the endpoint
        # keeps the original, so closing the endpoint stays Dockpoint.close.
        sock = socket.socket(fileno=os.dup(endpoint.fileno()))
        try:
            # No suspension inside with start_serving=False: nothing to lose to a cancel.
            inner = await asyncio.start_unix_server(
                connected, sock=sock, backlog=_posix._BACKLOG, start_serving=False, **kw
            )
        except BaseException:
            sock.close()
            raise
        server = Server(inner, endpoint)
        if start:
            await inner.start_serving()
    except BaseException:
        if server is not None:
            server.close()
        else:
            endpoint.close()
        raise
    return server


async def open_connection(
    app_name: str,
    instance: str = "default",
    *,
    timeout: float | None = None,
    **kw: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect to the daemon holding ``(app_name, instance)``, as :func:`dockpoint.connect`
    does, and return asyncio streams on the connection.

    The endpoint directory and the daemon's identity are checked exactly as
    :func:`dockpoint.connect` checks them. Cancelling the call leaves nothing open.

    :param timeout: ``None`` makes one attempt (a busy daemon is waited for briefly, never
        taken for "nobody there"); a number of seconds keeps trying until a daemon
        accepts or the time is up.
    :param kw: passed to :func:`asyncio.open_unix_connection` (``limit=``).
    :returns: ``(reader, writer)``, or ``None`` if nobody is there when the attempts end.
    :raises TypeError: a name is not a ``str``.
    :raises ValueError: a name breaks the naming rules, or a negative ``timeout``.
    :raises PermissionError: the endpoint belongs to another user, or its directory is
        unsafe.
    :raises OSError: with ``errno.ENOTSUP`` on Windows, which this module does not
        support yet.
    """
    stem = endpoint_stem(app_name, instance)
    timeout = check_timeout(timeout)
    for name in ("path", "sock"):
        if name in kw:
            raise TypeError(f"open_connection() decides {name!r} itself; do not pass it")
    if sys.platform == "win32":
        raise _unsupported()
    sock = await _dial(stem, timeout)
    if sock is None:
        return None
    # The transport takes the socket at once (no suspension before it does) and closes it
    # if this call is cancelled while it starts.
    return await asyncio.open_unix_connection(sock=sock, **kw)


async def _dial(stem: str, timeout: float | None) -> socket.socket | None:
    """The connected, checked socket; :meth:`dockpoint.connect`'s attempts, with the
    waits between them in the loop. Each attempt never blocks: a full backlog is
    "busy", which one attempt waits out for a while, as ``connect`` does."""
    if sys.platform == "win32":
        raise _unsupported()
    from . import _posix

    dial = _posix._Backend.dial  # a timeout of 0 makes its connect non-blocking
    loop = asyncio.get_running_loop()
    busy_only = False
    if timeout is None:
        try:
            channel = dial(stem, 0.0)
        except BlockingIOError:  # a holder that cannot take us yet: not "nobody there"
            timeout, busy_only = BUSY_GRACE, True
        else:
            return None if channel is None else channel._sock
    deadline = loop.time() + timeout
    pause = 0.001
    while True:
        try:
            channel = dial(stem, 0.0)
        except BlockingIOError:
            channel = None
        else:
            if channel is None and busy_only:
                return None  # the busy holder has gone
        if channel is not None:
            return channel._sock
        left = deadline - loop.time()
        if left <= 0:
            return None
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
