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

POSIX: the event loop watches the claimed listening socket and, when it is readable, calls
:meth:`dockpoint.Dockpoint.accept` with a timeout of 0 from a plain loop callback: clients
are accepted inside the loop, never inside a task a cancellation could interrupt with a
client in hand, and each client's identity is checked by the blocking API's own code (the
peer's user id, from the kernel) before ``client_connected_cb`` runs. Each accepted socket
is handed to :meth:`asyncio.loop.connect_accepted_socket` with asyncio's own
:class:`asyncio.StreamReaderProtocol`. (asyncio's own ``Server`` is not used: on Python
3.9-3.13 it leaks, until garbage collection, a connection it accepted in the same loop
iteration as its ``close()``.)
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from weakref import WeakSet

from ._api import backend, claim, connect, retries
from ._classes import Dockpoint, DockpointClosedError, DockpointConnection
from ._names import check_timeout, endpoint_stem

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


def _unsupported() -> OSError:
    import errno

    return OSError(
        errno.ENOTSUP,
        "dockpoint.aio on Windows needs asyncio's proactor event loop (the default one); "
        "this loop has no named-pipe support",
    )


def _proactor(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's named-pipe transport factory (Windows' ProactorEventLoop)."""
    make = getattr(loop, "_make_duplex_pipe_transport", None)
    if make is None or getattr(loop, "_proactor", None) is None:
        raise _unsupported()
    return make


def _pipe_transport(
    loop: asyncio.AbstractEventLoop,
    conn: DockpointConnection,
    protocol: asyncio.BaseProtocol,
    waiter: asyncio.Future[None] | None,
) -> asyncio.BaseTransport:
    """Windows: move ``conn``'s pipe handle into a proactor transport of ``loop``.

    asyncio internals used: ``loop._make_duplex_pipe_transport`` (what
    ``loop.connect_pipe`` and ``start_serving_pipe`` use) and
    ``asyncio.windows_utils.PipeHandle``; the proactor associates the handle with its
    completion port on the first read.
    """
    if sys.platform != "win32":
        raise _unsupported()
    from asyncio import windows_utils

    make = _proactor(loop)
    channel: Any = conn._take_channel()  # the Windows backend's channel: it has detach()
    handle = windows_utils.PipeHandle(channel.detach())
    try:
        transport: asyncio.BaseTransport = make(
            handle, protocol, waiter, extra={"peer_pid": conn.peer_pid}
        )
    except BaseException:
        handle.close()
        raise
    return transport


async def _open_pipe(
    app_name: str, instance: str, timeout: float | None, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Windows: :func:`dockpoint.connect` in a thread (its waits block), then streams."""
    loop = asyncio.get_running_loop()
    _proactor(loop)
    dialing = loop.run_in_executor(None, lambda: connect(app_name, instance, timeout=timeout))
    try:
        conn = await asyncio.shield(dialing)
    except asyncio.CancelledError:  # the connect still runs: close what it brings

        def close(done: asyncio.Future[DockpointConnection | None]) -> None:
            if not done.cancelled() and done.exception() is None:
                got = done.result()
                if got is not None:
                    got.close()

        dialing.add_done_callback(close)
        raise
    if conn is None:
        return None
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    waiter: asyncio.Future[None] = loop.create_future()
    transport = _pipe_transport(loop, conn, protocol, waiter)
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    assert isinstance(transport, asyncio.WriteTransport)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _Protocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, telling its server when the connection ends."""

    def __init__(self, server: Server, reader: asyncio.StreamReader) -> None:
        super().__init__(reader, server._callback, loop=server._loop)
        self._dockpoint_server = server
        self._dockpoint_counted = False  # its end has been counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._dockpoint_server._clients.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._dockpoint_server._ended(self)


class Server:
    """A claimed endpoint served by the running event loop; from :func:`start_server`.

    Like :class:`asyncio.Server`: ``async with server:`` closes it at the end of the
    block. Closing releases the claim exactly as :meth:`dockpoint.Dockpoint.close` does
    (the endpoint is removed, then the claim is released), so the next
    :func:`dockpoint.claim` or :func:`start_server` succeeds. Connections already
    accepted stay open until they are closed or :meth:`close_clients` /
    :meth:`abort_clients` is called.
    """

    def __init__(self, endpoint: Dockpoint, callback: ClientConnected, limit: int) -> None:
        self._endpoint = endpoint
        self._callback = callback
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        if sys.platform == "win32":
            _proactor(self._loop)
            self._watch = None
            self._acceptor: threading.Thread | None = None
        else:
            # The loop waits on its own descriptor of the claimed socket; the endpoint
            # keeps the original, so closing the endpoint stays Dockpoint.close.
            self._watch = socket.socket(fileno=os.dup(endpoint.fileno()))
        self._serving = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._clients: WeakSet[asyncio.BaseTransport] = WeakSet()
        self._active = 0  # accepted connections not yet ended
        self._adopting: set[asyncio.Task[None]] = set()  # strong references: see _accepted
        self._forever: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        #: Where the endpoint lives: the socket path on POSIX.
        self.address = endpoint.address

    # The loop calls this when the listening socket is readable: clients are accepted
    # here, in a plain callback of the loop, never inside a task that a cancellation
    # could interrupt while it holds a client.
    def _ready(self) -> None:
        endpoint = self._endpoint
        for _ in range(100):  # then let the loop run other work; it calls again
            try:
                # The blocking API's own accept: the same identity check, the same drop of
                # other users' clients. A timeout of 0 never waits.
                conn = endpoint.accept(timeout=0)
            except TimeoutError:
                return
            except DockpointClosedError as exc:  # the claim was lost: serve_forever raises it
                self._end(exc)
                return
            except OSError as exc:  # out of descriptors, say: pause, as asyncio does
                self._stop_watching()
                self._retry = self._loop.call_later(1.0, self._start_watching)
                self._loop.call_exception_handler(
                    {"message": "dockpoint.aio: accept failed; retrying in 1 s", "exception": exc}
                )
                return
            try:
                sock = socket.socket(fileno=os.dup(conn.fileno()))
            finally:
                conn.close()
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        self._active += 1
        started = False

        async def adopt() -> None:
            nonlocal started
            started = True  # from here asyncio owns the socket and closes it on failure
            reader = asyncio.StreamReader(limit=self._limit, loop=self._loop)
            protocol = _Protocol(self, reader)
            try:
                await self._loop.connect_accepted_socket(lambda: protocol, sock)
            except BaseException:
                if not protocol._dockpoint_counted:
                    self._ended(protocol)
                raise

        def done(task: asyncio.Task[None]) -> None:
            self._adopting.discard(task)
            if not started:  # cancelled before it ran (the loop shut down): ours to close
                sock.close()
                self._active -= 1
                self._check_idle()
            elif not task.cancelled() and task.exception() is not None:
                self._loop.call_exception_handler(
                    {
                        "message": "dockpoint.aio: a client could not be set up",
                        "exception": task.exception(),
                    }
                )

        task = self._loop.create_task(adopt())
        self._adopting.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(done)

    def _ended(self, protocol: _Protocol) -> None:
        if protocol._dockpoint_counted:
            return
        protocol._dockpoint_counted = True
        self._active -= 1
        self._check_idle()

    def _check_idle(self) -> None:
        idle = self._idle
        if idle is not None and self._active == 0 and self._closed and not idle.done():
            idle.set_result(None)

    def _start_watching(self) -> None:
        self._retry = None
        if self._serving or self._closed:
            return
        self._serving = True
        if self._watch is not None:
            self._loop.add_reader(self._watch.fileno(), self._ready)
        elif self._acceptor is None:  # Windows: one thread waits in the blocking accept
            self._acceptor = threading.Thread(
                target=self._accept_pipes, name=f"dockpoint.aio {self.address}", daemon=True
            )
            self._acceptor.start()

    def _stop_watching(self) -> None:
        if self._serving:
            if self._watch is not None:
                self._loop.remove_reader(self._watch.fileno())
            self._serving = False

    # Windows: a named pipe cannot be watched for readiness, so a thread of the server's
    # own (not the loop's executor, and no task) sits in Dockpoint.accept for the server's
    # whole life: its pipe instances, security descriptor and checks are the blocking
    # API's. Each client is handed to the loop with call_soon_threadsafe; close() wakes
    # the thread as it wakes any thread in accept().
    def _accept_pipes(self) -> None:
        endpoint, loop = self._endpoint, self._loop
        while True:
            try:
                conn = endpoint.accept()
            except DockpointClosedError as exc:
                try:
                    loop.call_soon_threadsafe(self._lost, exc)
                except RuntimeError:  # the loop is closed
                    pass
                return
            except BaseException as exc:
                try:
                    loop.call_soon_threadsafe(self._failed, exc)
                except RuntimeError:
                    pass
                return
            try:
                loop.call_soon_threadsafe(self._adopt_pipe, conn)
            except RuntimeError:  # the loop is closed: nobody can serve it
                conn.close()
                return

    def _lost(self, exc: DockpointClosedError) -> None:
        if not self._closed:  # not our own close(): the endpoint stopped under us
            self._end(exc)

    def _failed(self, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {"message": "dockpoint.aio: accept failed; the server stops", "exception": exc}
        )
        self._end(exc)

    def _end(self, exc: BaseException) -> None:
        """Close the server; :meth:`serve_forever` raises ``exc``."""
        forever = self._forever
        if forever is not None and not forever.done():
            forever.set_exception(exc)
        self.close()

    def _adopt_pipe(self, conn: DockpointConnection) -> None:
        self._active += 1
        protocol = _Protocol(self, asyncio.StreamReader(limit=self._limit, loop=self._loop))
        try:
            _pipe_transport(self._loop, conn, protocol, None)
        except BaseException:
            self._ended(protocol)
            raise

    def close(self) -> None:
        """Stop accepting and release the claim. Closing again does nothing.

        Clients still waiting in the OS's queue see end of stream unserved (they may
        connect again, to the next holder); :meth:`serve_forever` returns.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_watching()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._watch is not None:
            self._watch.close()
        self._endpoint.close()  # unlink and unlock, as Dockpoint.close always does
        forever, self._forever = self._forever, None
        if forever is not None and not forever.done():
            forever.set_result(None)
        self._check_idle()

    def close_clients(self) -> None:
        """Close every connection this server has accepted (as
        :meth:`asyncio.StreamWriter.close`: queued data is sent first). Their pending
        reads return end of stream."""
        for transport in list(self._clients):
            transport.close()

    def abort_clients(self) -> None:
        """Close every connection this server has accepted at once, dropping data not
        yet sent."""
        for transport in list(self._clients):
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:  # pragma: no cover - stream transports are write transports
                transport.close()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._closed

    def is_serving(self) -> bool:
        """Whether new clients are being accepted."""
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs in."""
        return self._loop

    async def start_serving(self) -> None:
        """Start accepting, if ``start_server(..., start_serving=False)`` made the server."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._start_watching()

    async def serve_forever(self) -> None:
        """Accept clients until :meth:`close`. Cancelling this closes the server (and so
        releases the claim), as :meth:`asyncio.Server.serve_forever` does.

        :raises RuntimeError: the server is closed, or ``serve_forever`` already runs.
        :raises DockpointClosedError: the endpoint stopped working under the server (its
            :meth:`dockpoint.Dockpoint.accept` raised it); the server is closed.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._forever is not None:
            raise RuntimeError(f"{self!r} is already being awaited on serve_forever()")
        forever = self._loop.create_future()
        self._forever = forever
        try:
            self._start_watching()
            await forever
        finally:
            if self._forever is forever:
                self._forever = None
            self.close()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection it accepted has ended
        (as :meth:`asyncio.Server.wait_closed` does on Python 3.12 and later)."""
        if self._idle is None:
            self._idle = self._loop.create_future()
        self._check_idle()
        await asyncio.shield(self._idle)

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
    *,
    limit: int = 2**16,
    start_serving: bool = True,
) -> Server | None:
    """Claim the endpoint for ``(app_name, instance)`` and serve it in the running loop.

    Like :func:`asyncio.start_unix_server`: ``client_connected_cb(reader, writer)`` is
    called with an :class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` for
    each client; if it is a coroutine function, it runs as a task. Clients are accepted
    by :meth:`dockpoint.Dockpoint.accept` itself, so each one's identity is checked
    exactly as there before the callback runs: clients of another user are closed
    unserved.

    :param limit: the buffer limit of each :class:`asyncio.StreamReader`.
    :param start_serving: ``False`` claims without accepting yet (see
        :meth:`Server.start_serving`).
    :returns: the serving :class:`Server`, or ``None`` if another process holds the
        claim.
    :raises TypeError: a name is not a ``str``, or ``client_connected_cb`` is not callable.
    :raises ValueError: a name breaks the naming rules (see :func:`dockpoint.claim`).
    :raises PermissionError: the endpoint directory is unsafe.
    :raises OSError: with ``errno.ENOTSUP`` on Windows, which this module does not
        support yet.
    """
    if not callable(client_connected_cb):
        raise TypeError(
            f"client_connected_cb must be callable, not {type(client_connected_cb).__name__}"
        )
    endpoint_stem(app_name, instance)  # argument errors before anything else
    loop = asyncio.get_running_loop()  # outside a running loop: RuntimeError before the claim
    if sys.platform == "win32":
        _proactor(loop)  # a loop without named pipes: refused before the claim
    # Nothing below suspends, so a cancellation cannot land between claim and return.
    endpoint = claim(app_name, instance)
    if endpoint is None:
        return None
    try:
        server = Server(endpoint, client_connected_cb, limit)
    except BaseException:
        endpoint.close()
        raise
    if start_serving:
        server._start_watching()
    return server


async def open_connection(
    app_name: str,
    instance: str = "default",
    *,
    timeout: float | None = None,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """Connect to the daemon holding ``(app_name, instance)``, as :func:`dockpoint.connect`
    does, and return asyncio streams on the connection.

    The endpoint directory and the daemon's identity are checked exactly as
    :func:`dockpoint.connect` checks them. Cancelling the call leaves nothing open.

    :param timeout: ``None`` makes one attempt (a busy daemon is waited for briefly, never
        taken for "nobody there"); a number of seconds keeps trying until a daemon
        accepts or the time is up.
    :param limit: the buffer limit of the :class:`asyncio.StreamReader`.
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
    if sys.platform == "win32":
        return await _open_pipe(app_name, instance, timeout, limit)
    sock = await _dial(stem, timeout)
    if sock is None:
        return None
    # The transport takes the socket at once (no suspension before it does) and closes it
    # if this call is cancelled while it starts.
    return await asyncio.open_unix_connection(sock=sock, limit=limit)


def _stream_socket(raw: Any) -> socket.socket:
    """A :class:`socket.socket` (what asyncio expects) owning ``raw``'s descriptor."""
    if isinstance(raw, socket.socket):
        return raw
    return socket.socket(fileno=raw.detach())


async def _dial(stem: str, timeout: float | None) -> socket.socket | None:
    """The connected, checked socket: :func:`dockpoint.connect`'s attempts, each one
    non-blocking (a full backlog is "busy"), with the pauses between them in the loop."""
    if sys.platform == "win32":
        raise _unsupported()
    if timeout is None:
        try:
            channel = backend.dial(stem, 0.0)
        except BlockingIOError:  # a holder that cannot take us yet: not "nobody there"
            pass
        else:
            return None if channel is None else _stream_socket(channel._sock)
    attempts = retries(stem, timeout, blocking=False)
    try:
        while True:
            await asyncio.sleep(next(attempts))
    except StopIteration as done:
        channel = done.value
    return None if channel is None else _stream_socket(channel._sock)
