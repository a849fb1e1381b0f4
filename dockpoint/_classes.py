"""The public classes and errors: :class:`Dockpoint`, :class:`DockpointConnection`,
:class:`Probe`, and the argument checks of their methods. A backend supplies what is
underneath: a listener under each :class:`Dockpoint`, a channel under each connection.
"""

from __future__ import annotations

import errno
import os

# The C modules loaded at start-up, not threading, weakref, warnings: with those, bench row
# 13 (import dockpoint) is 2.54 x, 1.48 x, 1.10 x; row 10 (warm send) 1.24 x, 1.07 x, 1.00 x
# (3.12, bench.py --baseline-python, median of 21 rounds).
from _thread import RLock, allocate_lock, get_ident
from _weakref import ReferenceType, ref

from ._names import check_timeout
from ._signals import block_signals, restore_signals

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only, never imported at run time
    from types import TracebackType
    from typing import Protocol

    from typing_extensions import Self

    class Channel(Protocol):
        """A backend's connected byte stream. :class:`DockpointConnection` makes it safe
        to close from another thread: it calls :meth:`wake` while a call is in flight and
        :meth:`close` when none is."""

        peer_pid: int | None

        def recv(self, max_bytes: int) -> bytes:
            """Wait for 1 to ``max_bytes`` bytes, ``b""`` at end of stream (a reset peer
            may raise ``ConnectionResetError`` instead); may be the OS object's own."""

        def recv_within(self, max_bytes: int, timeout: float) -> bytes:
            """``recv`` within ``timeout`` seconds, else ``TimeoutError``."""

        def send(self, data: bytes | memoryview) -> None: ...
        def wake(self) -> None:
            """End the calls in flight soon; the stream is being closed."""

        def fileno(self) -> int: ...  # io.UnsupportedOperation where the OS has none
        def close(self) -> None:
            """Free the stream; again, also from two threads at once, does nothing."""

    class Listener(Protocol):
        """A backend's claimed endpoint."""

        def accept(self, timeout: float | None) -> Channel | None:
            """The next client's channel, never one made by a probe or of another user;
            ``None`` once woken; ``ClaimLostError`` when the claim can no longer be
            proved (the caller then closes the listener)."""

        def wake(self) -> None: ...
        def fileno(self) -> int: ...  # io.UnsupportedOperation where the OS has none
        def close(self) -> None: ...
        def forget(self) -> None: ...
        def handles(self) -> tuple[int, int]:
            """The listening socket's and the lock's descriptors (POSIX) or the free pipe
            instance's and the lock file's handles (Windows), for a daemon to adopt."""

        def let_go(self) -> None:
            """After :meth:`forget` in a hand-over, once the daemon has taken over (or died):
            release what it takes itself (Windows: the claim's locks); POSIX: nothing."""


#: ``read`` never asks the OS for more than this at once (a huge ``max_bytes`` is not an
#: allocation request).
READ_CHUNK_LIMIT = 1 << 20
#: How long a single-attempt ``connect`` keeps retrying a holder that is alive but cannot
#: take the connection yet (a full backlog on macOS/BSD answers "refused").
BUSY_GRACE = 5.0


class DockpointClosedError(OSError):
    """An operation was attempted on a closed :class:`Dockpoint` or
    :class:`DockpointConnection`, or the object was closed while the operation waited.

    A subclass of :class:`OSError` whose ``errno`` is ``EBADF``, the same on every platform.
    """


class ClaimLostError(DockpointClosedError):
    """The claim can no longer be proved (on POSIX: its lock file was deleted or replaced),
    so the endpoint was released: at most one process serves a name. Raised by
    :meth:`Dockpoint.accept`; the :class:`Dockpoint` is closed when it is raised.
    """


class SpawnError(ChildProcessError):
    """The daemon that :func:`dockpoint.connect_or_spawn` started ended, or gave up the
    endpoint it was handed, before it adopted it (a bad command, an import error, an early
    exit).

    :attr:`returncode` is its exit status (negative: the signal that ended it; ``None``
    if it still runs), :attr:`stderr` the tail of what it wrote to its standard error
    before adopting, :attr:`pid` its process id. The message holds all three.
    """

    def __init__(self, message: str, pid: int, returncode: int | None, stderr: str) -> None:
        super().__init__(errno.ECHILD, message)
        self.pid = pid
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return str(self.strerror)  # the message, without "[Errno 10]"


def closed_error(what: str) -> DockpointClosedError:
    return DockpointClosedError(errno.EBADF, f"{what} is closed")


def no_fileno(self: object) -> int:
    """A backend's ``fileno`` where the OS has no selectable descriptor."""
    import io

    raise io.UnsupportedOperation(
        "fileno: this platform has no selectable descriptor for a dockpoint endpoint "
        "or connection; use dockpoint.aio for event loops"
    )


#: Every value of :attr:`Probe.state`.
PROBE_STATES = (
    "listening",
    "busy",
    "absent",
    "stale",
    "missing-socket",
    "elsewhere",
    "unsafe",
    "foreign",
    "blocked",
)


class Probe:
    """What :func:`dockpoint.probe` found at an endpoint.

    ``state`` is one of :data:`PROBE_STATES`:

    - ``"listening"``: a daemon of this user accepted a connection.
    - ``"busy"``: the holder is alive but did not accept within the timeout.
    - ``"absent"``: nobody holds the claim and nothing is left behind.
    - ``"stale"``: files left by a holder that is gone (the next claim replaces them).
    - ``"missing-socket"``: the claim is held but the socket is gone or replaced.
    - ``"elsewhere"``: nothing here, but a daemon of this user answers at the other
      location it could have used (``XDG_RUNTIME_DIR`` set vs unset); ``address`` is that.
    - ``"unsafe"``: a directory or file fails dockpoint's checks (or
      ``XDG_RUNTIME_DIR`` names a missing directory).
    - ``"foreign"``: the endpoint is served by another user.
    - ``"blocked"``: something that is not a socket is in the way.

    On Windows ``"elsewhere"`` and ``"blocked"`` cannot occur (a pipe name does not depend
    on the environment, and only a pipe can be at it); ``"missing-socket"`` means the lock
    is held but no pipe instance exists (a daemon starting, or one that could not make one).
    """

    __slots__ = ("address", "info", "pid", "reason", "state")

    def __init__(
        self, state: str, address: str, pid: int | None, info: str | None, reason: str
    ) -> None:
        #: One of :data:`PROBE_STATES`.
        self.state = state
        #: The endpoint's address (for ``"elsewhere"``: where the daemon was found).
        self.address = address
        #: The holder's process id, when known.
        self.pid = pid
        #: The text the holder gave ``claim(info=...)``, when it gave one.
        self.info = info
        #: One sentence saying what was found and what to do about it.
        self.reason = reason

    def __repr__(self) -> str:
        return (
            f"Probe(state={self.state!r}, address={self.address!r}, pid={self.pid!r}, "
            f"info={self.info!r})"
        )


class _Closable:
    """``with obj:`` closes ``obj`` at the end of the block."""

    __slots__ = ()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_args(max_bytes: object, timeout: object) -> tuple[int, float | None]:
    """``read``'s arguments checked, ``max_bytes`` capped at :data:`READ_CHUNK_LIMIT`."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int, not {type(max_bytes).__name__}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
    return min(int(max_bytes), READ_CHUNK_LIMIT), check_timeout(timeout)


def _closed_meanwhile() -> DockpointClosedError:
    return DockpointClosedError(errno.EBADF, "DockpointConnection was closed while in use")


def _bytes_view(data: object) -> memoryview:
    """``write``'s argument as a flat (1-D, byte-sized items) view; ``TypeError`` if it is
    not bytes-like."""
    if isinstance(data, str):
        raise TypeError("write() takes a bytes-like object, not str; encode it first")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"write() takes a bytes-like object, not {type(data).__name__}") from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


#: Counts forks; a connection made before the last fork holds the parent's bookkeeping.
_FORKS = [0]


def _forked() -> None:
    _FORKS[0] += 1


class DockpointConnection(_Closable):
    """A connected byte stream between a daemon and one client.

    Obtained from :meth:`Dockpoint.accept` (daemon side) or :func:`dockpoint.connect`
    (client side); not created directly. A context manager: leaving the block closes it.
    """

    # close() from another thread must end a read/write in flight and must not free the
    # channel under it (a reused descriptor number would be read by the old call). So each
    # call registers in _busy (list appends are atomic) and then checks _shut; close() sets
    # _shut, wakes the channel if a call is in flight, and the last call to leave closes it.
    __slots__ = ("__weakref__", "_busy", "_ch", "_gen", "_recv", "_shut", "peer_pid")

    def __init__(self, channel: Channel) -> None:
        self._ch = channel
        self._recv = channel.recv
        self._busy: list[None] = []
        self._shut = False
        self._gen = _FORKS[0]
        #: Process id of the other end where the OS reports it, else ``None``.
        self.peer_pid: int | None = channel.peer_pid

    def read(self, max_bytes: int = 65536, *, timeout: float | None = None) -> bytes:
        """Read up to ``max_bytes`` bytes.

        Blocks until at least one byte has arrived or the peer has closed the stream.

        :param max_bytes: the most bytes to return; at least 1.
        :param timeout: seconds to wait at most; ``None`` waits for ever.
        :returns: 1 to ``max_bytes`` bytes, or ``b""`` at end of stream.
        :raises ValueError: ``max_bytes < 1`` or a negative ``timeout``.
        :raises TimeoutError: nothing arrived within ``timeout``.
        :raises DockpointClosedError: the connection is closed.
        """
        # One test on the hot path; the checks only for unusual arguments.
        if (
            timeout is not None
            or max_bytes.__class__ is not int
            or not 0 < max_bytes <= READ_CHUNK_LIMIT
        ):
            max_bytes, timeout = _read_args(max_bytes, timeout)
        busy = self._busy
        busy.append(None)
        try:
            if self._shut:
                raise closed_error("DockpointConnection")
            if timeout is None:
                data = self._recv(max_bytes)
            else:
                data = self._ch.recv_within(max_bytes, timeout)
        except ConnectionResetError:  # the peer closed with our data unread: end of stream
            data = b""
        except OSError as exc:
            if self._shut and not isinstance(exc, DockpointClosedError):
                raise _closed_meanwhile() from None
            raise
        finally:
            busy.pop()
            if self._shut:
                self._let_go()
        if self._shut:
            raise _closed_meanwhile()
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``.

        :param data: any bytes-like object (``bytes``, ``bytearray``, ``memoryview``, ...).
        :returns: the number of bytes written, always all of them.
        :raises TypeError: ``data`` is a ``str`` or not bytes-like.
        :raises BrokenPipeError: the peer has closed the stream.
        :raises DockpointClosedError: the connection is closed.
        """
        if data.__class__ is not bytes:
            data = _bytes_view(data)
        # read()'s guard, written out again: a shared helper would add a call to each write.
        busy = self._busy
        busy.append(None)
        try:
            if self._shut:
                raise closed_error("DockpointConnection")
            self._ch.send(data)
        except OSError as exc:
            if self._shut and not isinstance(exc, DockpointClosedError):
                raise _closed_meanwhile() from None
            raise
        finally:
            busy.pop()
            if self._shut:
                self._let_go()
        return len(data)  # a flat view of bytes: its length is its size in bytes

    def fileno(self) -> int:
        """The OS descriptor of the connection, for ``selectors``, ``select`` and event
        loops: it is readable when :meth:`read` would return without waiting.

        The descriptor stays owned by the connection: do not close it or read from it
        directly, and do not use it after :meth:`close`.

        :raises io.UnsupportedOperation: the OS has no selectable descriptor for it
            (Windows, where a named pipe cannot be selected).
        :raises DockpointClosedError: the connection is closed.
        """
        if self._shut:
            raise closed_error("DockpointConnection")
        return self._ch.fileno()

    def close(self) -> None:
        """Close the connection; a :meth:`read` or :meth:`write` in flight in another
        thread raises :class:`DockpointClosedError`. Closing again does nothing."""
        if self._gen != _FORKS[0]:  # a forked copy: the parent's calls are not ours
            self._busy.clear()
        self._shut = True
        if self._busy:
            self._ch.wake()
        self._let_go()

    def _let_go(self) -> None:
        """Close the channel if no call is in flight (again: it may already be closed)."""
        if not self._busy:
            self._ch.close()

    def _take_channel(self) -> Channel:
        """Take the backend's channel out, leaving the connection closed (dockpoint.aio)."""
        if self._shut or self._busy:
            raise closed_error("DockpointConnection")
        self._shut = True
        return self._ch

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._shut

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"peer_pid={self.peer_pid}"
        return f"<DockpointConnection {state}>"


try:  # ``warnings.warn`` itself, from the C module (figures above)
    from _warnings import warn as _warn
except ImportError:  # pragma: no cover - an interpreter without it
    from warnings import warn as _warn

#: id -> weak reference of every open Dockpoint of this process, for the fork hook.
_LIVE: dict[int, ReferenceType[Dockpoint]] = {}


def _after_fork_in_child() -> None:
    for weak in list(_LIVE.values()):
        dp = weak()
        if dp is not None:
            dp._drop_after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forked)
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Dockpoint(_Closable):
    """A claimed endpoint: the one well-known place where this process serves clients.

    Obtained from :func:`dockpoint.claim`; not created directly. The claim lasts until
    :meth:`close` or until the process ends, however it ends. It belongs to the claiming
    process: in a child made by ``os.fork()`` the object is already closed (it holds no
    descriptor of the endpoint), so the claim never outlives its holder. A context
    manager: leaving the block closes it.
    """

    def __init__(self, listener: Listener, address: str) -> None:
        self._listener: Listener | None = listener
        #: Where the endpoint lives: the socket path on POSIX, the pipe name on Windows.
        self.address = address
        self._mutex = RLock()  # re-entered when close() runs in a signal handler
        self._idle = allocate_lock()  # held while any thread is inside accept()
        self._accepting: list[int] = []  # idents of the threads inside accept()
        self._closing = False
        key = id(self)
        _LIVE[key] = ref(self, lambda _, key=key: _LIVE.pop(key, None))  # type: ignore[misc]

    def accept(self, *, timeout: float | None = None) -> DockpointConnection:
        """Wait for the next client and return the connection to it.

        Clients of another user are dropped without being served, and so are the
        connections of :func:`dockpoint.probe` (and ``status``, ``stop``): a daemon never
        has to survive one. :meth:`close` from another thread ends the wait with
        :class:`DockpointClosedError`.

        :param timeout: seconds to wait at most; ``None`` waits for ever.
        :raises TimeoutError: no client arrived within ``timeout``.
        :raises DockpointClosedError: the endpoint is closed, or was closed while waiting.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        with self._mutex:
            listener = self._listener
            if listener is None or self._closing:
                raise closed_error("Dockpoint")
            if not self._accepting:
                self._idle.acquire()
            me = get_ident()
            self._accepting.append(me)
        lost = False
        try:
            # close() may have run in a signal handler while this thread held the mutex.
            channel = None if self._closing else listener.accept(timeout)
        except ClaimLostError:
            lost = True
            raise
        finally:
            with self._mutex:
                self._accepting.remove(me)
                if lost and not self._closing:  # release it; other accepting threads leave
                    self._closing = True
                    if self._accepting:
                        listener.wake()
                if not self._accepting:
                    self._idle.release()
                finish = self._closing and not self._accepting and self._listener is listener
            if finish:  # close() ran while this thread accepted and left the release to it
                self._release(listener)
        if channel is None:
            raise closed_error("Dockpoint")
        return DockpointConnection(channel)

    def fileno(self) -> int:
        """The OS descriptor of the listening endpoint, for ``selectors``, ``select`` and
        event loops: it is readable when a client is waiting, so :meth:`accept` would
        return without waiting (unless another thread takes that client first, or the
        client turns out to be another user's and is dropped).

        The descriptor stays owned by the endpoint: do not close it or accept from it
        directly, and do not use it after :meth:`close`.

        :raises io.UnsupportedOperation: the OS has no selectable descriptor for it
            (Windows, where a named pipe cannot be selected).
        :raises DockpointClosedError: the endpoint is closed.
        """
        listener = self._listener
        if listener is None or self._closing:
            raise closed_error("Dockpoint")
        return listener.fileno()

    def close(self) -> None:
        """Release the endpoint; a thread blocked in :meth:`accept` raises
        :class:`DockpointClosedError`. Closing again does nothing.

        This removes the endpoint and then releases the claim, so the next
        :func:`dockpoint.claim` succeeds. The release runs with signals blocked; if a
        signal interrupts the wait for accepting threads, calling ``close()`` again
        finishes the release (and the last accepting thread finishes it anyway).
        """
        # A signal handler may run close() on a thread that holds the mutex in accept().
        reentered = self._mutex._is_owned()  # type: ignore[attr-defined]
        with self._mutex:
            listener = self._listener
            if listener is None:
                return
            busy = bool(self._accepting)
            if busy:
                self._closing = True
            inside = reentered or get_ident() in self._accepting
        if busy:
            listener.wake()
            if inside:  # this thread is inside accept(): it finishes the close on its way out
                return
            # Accepting threads still use the OS handles: let them leave before freeing them.
            self._idle.acquire()
            self._idle.release()
        self._release(listener)

    def _release(self, listener: Listener) -> None:
        """Release ``listener`` unless that is done already; signals wait until it is."""
        old = block_signals()
        try:
            with self._mutex:
                if self._listener is not listener:
                    return  # released already
                self._closing = True
                if self._accepting:  # one started meanwhile: the last one out releases
                    listener.wake()
                    return
                try:
                    listener.close()
                finally:
                    self._listener = None
                    _LIVE.pop(id(self), None)
        finally:
            restore_signals(old)

    def _drop_after_fork(self) -> None:
        # Only the forking thread survives in the child: new locks, no accepting threads.
        # The child's copies are closed without unlinking or unlocking the parent's.
        self._mutex = RLock()
        self._idle = allocate_lock()
        self._accepting = []
        listener, self._listener = self._listener, None
        if listener is not None:
            _LIVE.pop(id(self), None)
            listener.forget()

    def __del__(self) -> None:
        # No imports here: at interpreter exit the import system is gone already.
        if getattr(self, "_listener", None) is not None:
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._listener is None or self._closing

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<Dockpoint {self.address!r}{state}>"
