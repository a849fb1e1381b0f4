"""Platform-independent part of dockpoint.

The public classes, the public functions, errors, name validation and the pure functions
that compute where an endpoint lives. A backend (``_posix`` or ``_windows``) supplies a
few private operations; everything a user calls, and every argument check, is here.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module: no enum import
import os
import time
from _thread import RLock, allocate_lock, get_ident
from _weakref import ReferenceType, ref

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only, never imported at run time
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType
    from typing import Protocol

    from typing_extensions import Self

    class Channel(Protocol):
        """A backend's connected byte stream."""

        peer_pid: int | None

        def recv(self, max_bytes: int, timeout: float | None) -> bytes: ...
        def send(self, data: bytes | memoryview) -> None: ...
        def fileno(self) -> int: ...  # io.UnsupportedOperation where the OS has none
        def close(self) -> None: ...

    class Listener(Protocol):
        """A backend's claimed endpoint."""

        def accept(self, timeout: float | None) -> Channel | None:
            """``None`` once woken; ``ClaimLostError`` when the claim can no longer be
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

    class Backend(Protocol):
        """What a backend module provides."""

        def locate(self, stem: str) -> str: ...
        def listen(self, stem: str, info: str | None) -> tuple[Listener, str] | None:
            """One attempt to claim; runs with signals blocked (it must not block)."""

        def adopt(self, stem: str, info: str | None) -> tuple[Listener, str] | None:
            """The endpoint handed over by the spawning process (``connect_or_spawn``),
            verified, its lock file rewritten with ``info``; ``None`` when none is handed
            over for ``stem``. Runs with signals blocked, like ``listen``."""

        def dial(self, stem: str, timeout: float | None) -> Channel | None:
            """One attempt: ``None`` when nobody is there; ``BlockingIOError`` when the
            holder is alive but cannot take the connection yet."""

        # Optional (a backend without them gets the portable fallbacks of Api.probe/stop):
        # inspect(stem, timeout) -> (state, address, pid, info, reason), read-only;
        # holds(stem, pid) -> whether process pid holds the claim now, read-only;
        # ask_to_exit(pid) -> ask process pid to release the claim and exit (SIGTERM);
        # without them, stop() asks dial() for the server's pid and uses os.kill.


__all__ = [
    "MAX_INFO_LENGTH",
    "MAX_NAME_LENGTH",
    "NAME_CHARACTERS",
    "PROBE_STATES",
    "Api",
    "ClaimLostError",
    "Dockpoint",
    "DockpointClosedError",
    "DockpointConnection",
    "Probe",
    "SpawnError",
    "check_info",
    "check_timeout",
    "endpoint_stem",
    "no_fileno",
    "pipe_name",
    "posix_directory",
    "socket_filename",
    "validate_name",
]

#: Characters allowed in ``app_name`` and ``instance``; the first must not be ``.`` or ``-``.
NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
#: Longest allowed ``app_name`` or ``instance``.
MAX_NAME_LENGTH = 64
#: ``read`` never asks the OS for more than this at once (a huge ``max_bytes`` is not an
#: allocation request).
READ_CHUNK_LIMIT = 1 << 20
#: How long a single-attempt ``connect`` keeps retrying a holder that is alive but cannot
#: take the connection yet (a full backlog on macOS/BSD answers "refused").
BUSY_GRACE = 5.0
#: The environment variable naming an endpoint handed over by ``connect_or_spawn``.
HANDOVER = "DOCKPOINT_HANDOVER"
#: Longest ``info=`` text :func:`dockpoint.claim` publishes, in characters.
MAX_INFO_LENGTH = 200


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
        import errno

        super().__init__(errno.ECHILD, message)
        self.pid = pid
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return str(self.strerror)  # the message, without "[Errno 10]"


def _closed(what: str) -> DockpointClosedError:
    import errno

    return DockpointClosedError(errno.EBADF, f"{what} is closed")


# --------------------------------------------------------------------------- names


def validate_name(value: object, what: str) -> str:
    """Return the endpoint form of a valid name (lower case), or raise.

    :raises TypeError: ``value`` is not a ``str``.
    :raises ValueError: empty, longer than :data:`MAX_NAME_LENGTH`, starts with ``.`` or
        ``-``, or has a character outside :data:`NAME_CHARACTERS`.
    """
    if type(value) is not str:
        if not isinstance(value, str):
            raise TypeError(f"{what} must be a str, not {type(value).__name__}")
        value = str(value)
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(
            f"{what} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed"
        )
    if value.lstrip(NAME_CHARACTERS) or value[0] in ".-":
        raise ValueError(
            f"{what} {value!r} is not allowed: use ASCII letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-'"
        )
    return value.lower()


#: (app_name, instance) -> stem for names of type ``str`` that passed the rules (bounded):
#: a client that connects again skips the checks.
_STEMS: dict[tuple[str, str], str] = {}
_MAX_STEMS = 256


def endpoint_stem(app_name: object, instance: object) -> str:
    """The endpoint's base name, ``app@instance`` in lower case.

    Names are case-insensitive on every platform (Windows pipe names are), so
    ``"MyApp"`` and ``"myapp"`` name the same endpoint everywhere.
    """
    exact = type(app_name) is str and type(instance) is str
    if exact:
        stem = _STEMS.get((app_name, instance))  # type: ignore[arg-type]
        if stem is not None:
            return stem
    stem = validate_name(app_name, "app_name") + "@" + validate_name(instance, "instance")
    if exact and len(_STEMS) < _MAX_STEMS:
        _STEMS[(app_name, instance)] = stem  # type: ignore[index]
    return stem


def check_timeout(timeout: object, what: str = "timeout") -> float | None:
    """Return ``timeout`` as a float (``None`` stays ``None``), or raise.

    Any number of seconds ``>= 0`` is allowed; ``float("inf")`` (and an ``int`` too large
    for a float) means no limit, like ``None``. Long waits are made of bounded slices.

    :raises TypeError: not ``None``, an ``int`` or a ``float`` (``bool`` is refused).
    :raises ValueError: negative or NaN.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{what} must be None or a number of seconds, not {type(timeout).__name__}")
    try:
        t = float(timeout)
    except OverflowError:  # an int beyond float range: no limit in practice
        t = float("inf") if timeout > 0 else -1.0
    if not t >= 0.0:  # also rejects NaN
        raise ValueError(f"{what} must be None or a number >= 0 (seconds), not {timeout!r}")
    return t


def check_info(info: object) -> str | None:
    """Return a valid ``info=`` text for :func:`dockpoint.claim`, or raise.

    :raises TypeError: not ``None`` or a ``str``.
    :raises ValueError: longer than :data:`MAX_INFO_LENGTH` characters, or not one line
        of printable characters (no line breaks, tabs or control characters).
    """
    if info is None:
        return None
    if not isinstance(info, str):
        raise TypeError(f"info must be None or a str, not {type(info).__name__}")
    if len(info) > MAX_INFO_LENGTH:
        raise ValueError(
            f"info is {len(info)} characters long; at most {MAX_INFO_LENGTH} are allowed"
        )
    if not info.isprintable():
        raise ValueError(
            f"info {info!r} is not allowed: use one line of printable characters "
            "(no line breaks, tabs or control characters)"
        )
    try:
        info.encode()
    except UnicodeEncodeError:
        raise ValueError(f"info {info!r} is not valid text (it has lone surrogates)") from None
    return str(info)


# --------------------------------------------------------------------------- signals

# Claiming and releasing run with signals blocked, so a signal (Ctrl+C, an alarm) that
# arrives meanwhile is handled just after: never between two steps of the claim.
_sigmask = getattr(_signal, "pthread_sigmask", None)
_ALL_SIGNALS = _signal.valid_signals() if _sigmask is not None else set()


def block_signals() -> object:
    """Block every signal for this thread; return what :func:`restore_signals` needs."""
    if _sigmask is None:
        return None
    return _sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)


def restore_signals(old: object) -> None:
    """Undo :func:`block_signals`; a signal that arrived meanwhile is handled here."""
    if old is not None:
        _sigmask(_signal.SIG_SETMASK, old)  # type: ignore[misc]


# --------------------------------------------------------------------------- locations


def posix_directory(xdg_runtime_dir: str | None, uid: int, run_user_dir: str | None) -> str:
    """The directory that holds a user's endpoints on POSIX.

    ``$XDG_RUNTIME_DIR/dockpoint`` when ``XDG_RUNTIME_DIR`` is set to an absolute path;
    else ``<run_user_dir>/dockpoint`` when the caller found ``/run/user/<uid>`` to be the
    user's own; else ``/tmp/dockpoint-<uid>``.
    """
    if xdg_runtime_dir and xdg_runtime_dir.startswith("/"):
        return xdg_runtime_dir.rstrip("/") + "/dockpoint"
    if run_user_dir:
        return run_user_dir.rstrip("/") + "/dockpoint"
    return f"/tmp/dockpoint-{uid}"


def socket_filename(directory: str, stem: str, limit: int) -> str:
    """The socket's file name in ``directory``.

    ``<stem>.sock``, unless that path would be longer than ``limit`` bytes (the OS's
    ``sun_path``), then a fixed-length hashed name ``~<24 hex digits>.sock``.
    """
    name = stem + ".sock"
    if len(os.fsencode(directory)) + 1 + len(name) <= limit:
        return name
    import hashlib

    return "~" + hashlib.sha256(stem.encode()).hexdigest()[:24] + ".sock"


def no_fileno(self: object) -> int:
    """A backend's ``fileno`` where the OS has no selectable descriptor."""
    import io

    raise io.UnsupportedOperation(
        "fileno: this platform has no selectable descriptor for a dockpoint endpoint "
        "or connection; use dockpoint.aio for event loops"
    )


def pipe_name(user_sid: str, stem: str) -> str:
    """The Windows named pipe for ``stem``, scoped to the user ``user_sid``."""
    return f"\\\\.\\pipe\\dockpoint-{user_sid}-{stem}"


# --------------------------------------------------------------------------- probe

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
#: Default ``timeout`` of :func:`dockpoint.probe`.
PROBE_TIMEOUT = 2.0
#: Default ``timeout`` of :func:`dockpoint.stop`.
STOP_TIMEOUT = 10.0


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


def _terminate(pid: int) -> None:
    """End process ``pid`` (for backends without ``ask_to_exit``; on Windows
    ``os.kill`` is ``TerminateProcess``, and the endpoint dies with the process)."""
    import signal

    os.kill(pid, signal.SIGTERM)


# --------------------------------------------------------------------------- classes


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


class DockpointConnection(_Closable):
    """A connected byte stream between a daemon and one client.

    Obtained from :meth:`Dockpoint.accept` (daemon side) or :func:`dockpoint.connect`
    (client side); not created directly. A context manager: leaving the block closes it.
    """

    __slots__ = ("__weakref__", "_ch", "peer_pid")

    def __init__(self, channel: Channel) -> None:
        self._ch: Channel | None = channel
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
        ch = self._ch
        if ch is None:
            raise _closed("DockpointConnection")
        if max_bytes.__class__ is not int:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
                raise TypeError(f"max_bytes must be an int, not {type(max_bytes).__name__}")
            max_bytes = int(max_bytes)
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        # Not min(): a builtin call costs more than this test on the hot path.
        max_bytes = max_bytes if max_bytes <= READ_CHUNK_LIMIT else READ_CHUNK_LIMIT
        if timeout is not None:
            timeout = check_timeout(timeout)
        return ch.recv(max_bytes, timeout)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``.

        :param data: any bytes-like object (``bytes``, ``bytearray``, ``memoryview``, ...).
        :returns: the number of bytes written, always all of them.
        :raises TypeError: ``data`` is a ``str`` or not bytes-like.
        :raises BrokenPipeError: the peer has closed the stream.
        :raises DockpointClosedError: the connection is closed.
        """
        ch = self._ch
        if ch is None:
            raise _closed("DockpointConnection")
        if data.__class__ is bytes:
            ch.send(data)
            return len(data)
        if isinstance(data, str):
            raise TypeError("write() takes a bytes-like object, not str; encode it first")
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(
                f"write() takes a bytes-like object, not {type(data).__name__}"
            ) from None
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        ch.send(view)
        return view.nbytes

    def fileno(self) -> int:
        """The OS descriptor of the connection, for ``selectors``, ``select`` and event
        loops: it is readable when :meth:`read` would return without waiting.

        The descriptor stays owned by the connection: do not close it or read from it
        directly, and do not use it after :meth:`close`.

        :raises io.UnsupportedOperation: the OS has no selectable descriptor for it
            (Windows, where a named pipe cannot be selected).
        :raises DockpointClosedError: the connection is closed.
        """
        ch = self._ch
        if ch is None:
            raise _closed("DockpointConnection")
        return ch.fileno()

    def close(self) -> None:
        """Close the connection. Closing again does nothing."""
        ch, self._ch = self._ch, None
        if ch is not None:
            ch.close()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._ch is None

    def __repr__(self) -> str:
        state = "closed" if self._ch is None else f"peer_pid={self.peer_pid}"
        return f"<DockpointConnection {state}>"


try:  # ``warnings.warn`` itself, from the C module loaded at start-up: ``__del__`` may run
    # when imports no longer work, and ``warnings.py`` is a module a daemon need not load.
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
                raise _closed("Dockpoint")
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
            raise _closed("Dockpoint")
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
            raise _closed("Dockpoint")
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


class Api:
    """The public functions, bound to one backend."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def claim(
        self,
        app_name: str,
        instance: str = "default",
        *,
        info: str | None = None,
        wait: float | None = None,
    ) -> Dockpoint | None:
        """Claim the endpoint for ``(app_name, instance)`` for the current user.

        Atomic: of any number of processes claiming at once, exactly one gets a
        :class:`Dockpoint`. The claim ends with :meth:`Dockpoint.close` or with the process.
        A signal that arrives during the claim is handled once nothing is half-made: if
        its handler raises, nothing is held and no descriptor is left open.

        :param app_name: your program's name; see :func:`validate_name` for the rules.
        :param instance: which of several endpoints of the same program.
        :param info: a short text published with the holder's pid (on POSIX, line 2 of
            the lock file), e.g. the daemon's version; see :func:`check_info`.
        :param wait: ``None`` makes one attempt. A number of seconds waits up to that long
            for the current holder to let go, then claims (``inf``: no limit).
        :returns: the claimed :class:`Dockpoint`, or ``None`` if another process holds it
            (still holds it when ``wait`` ends).
        :raises TypeError: a name is not a ``str``, or a bad ``info``/``wait`` type.
        :raises ValueError: a name breaks the naming rules, the endpoint path would be
            longer than the OS allows, or a bad ``info``/``wait`` value.
        :raises PermissionError: the endpoint directory is unsafe (owned by another user,
            a symlink, or open to group/others); the message names it.
        :raises FileExistsError: something that is not a socket sits at the endpoint path.

        A daemon started by :func:`dockpoint.connect_or_spawn` adopts the endpoint that
        the frontend claimed and handed over to it (after checking that it is this
        endpoint and that this process holds its lock) instead of claiming anew.
        """
        stem = endpoint_stem(app_name, instance)
        info = check_info(info)
        wait = check_timeout(wait, "wait")
        dp = self._claim_once(stem, info, adopt=True)
        if dp is not None or not wait:
            return dp
        deadline = time.monotonic() + wait
        pause = 0.002
        while True:  # the holder's lock cannot be waited for portably: retry in slices
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))  # interruptible; nothing is held here
            pause = min(pause * 2, 0.05)
            dp = self._claim_once(stem, info)
            if dp is not None:
                return dp

    def _claim_once(self, stem: str, info: str | None, adopt: bool = False) -> Dockpoint | None:
        backend = self._backend
        old = block_signals()
        try:
            got = backend.adopt(stem, info) if adopt else None
            if got is None:
                got = backend.listen(stem, info)
            dp = None if got is None else Dockpoint(*got)
        except BaseException:
            restore_signals(old)
            raise
        try:
            restore_signals(old)  # a signal that came meanwhile is handled here
        except BaseException:
            if dp is not None:
                dp.close()
            raise
        return dp

    def connect(
        self, app_name: str, instance: str = "default", *, timeout: float | None = None
    ) -> DockpointConnection | None:
        """Connect to the daemon holding ``(app_name, instance)`` for the current user.

        :param timeout: ``None`` makes one attempt. A number of seconds keeps trying until
            a daemon accepts or the time is up: the "retry-connect" step after spawning
            a daemon.
        :returns: the connection, or ``None`` if nobody is there (no endpoint, a stale
            one, or a refusal) when the attempts end.
        :raises TypeError: a name is not a ``str``.
        :raises ValueError: a name breaks the naming rules.
        :raises PermissionError: the endpoint belongs to another user, or its directory
            is unsafe.
        """
        stem = endpoint_stem(app_name, instance)
        if timeout is not None:
            timeout = check_timeout(timeout)
        dial = self._backend.dial
        busy_only = False
        if timeout is None:
            try:
                channel = dial(stem, None)
            except BlockingIOError:  # a holder that cannot take us yet: not "nobody there"
                timeout, busy_only = BUSY_GRACE, True
            else:
                return None if channel is None else DockpointConnection(channel)
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                channel = dial(stem, max(0.0, deadline - time.monotonic()))
            except BlockingIOError:
                channel = None
            else:
                if channel is None and busy_only:
                    return None  # the busy holder has gone
            if channel is not None:
                return DockpointConnection(channel)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def connect_or_spawn(
        self,
        app_name: str,
        argv: Sequence[str | os.PathLike[str]],
        instance: str = "default",
        *,
        timeout: float | None = 10.0,
        log: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        on_spawn: Callable[[int], object] | None = None,
    ) -> DockpointConnection:
        """Connect to the daemon for ``(app_name, instance)``, starting it if nobody is there.

        When nobody is there this call claims the endpoint itself, starts ``argv``
        detached (its own session, standard input on the null device, no inherited
        descriptors but the endpoint's) with the claimed endpoint handed over to it, and
        connects at once: the connection waits in the endpoint's queue until the daemon,
        whose :func:`dockpoint.claim` adopts the endpoint, accepts it. Of any number of
        frontends racing, exactly one starts a daemon; the others connect to the endpoint
        it holds. Returns once the daemon has adopted the endpoint.

        :param argv: the daemon's command line, e.g. ``[sys.executable, "daemon.py"]``; the
            daemon must call :func:`dockpoint.claim` for the same ``app_name`` and
            ``instance``.
        :param timeout: seconds to wait at most for a connection (``None``: for ever).
        :param log: a file the daemon's standard output and error are appended to
            (created ``0600``); by default they go to the null device once the daemon has
            adopted the endpoint (its earlier error output is kept for :class:`SpawnError`).
        :param env: the daemon's environment (default: this process's).
        :param on_spawn: called with the daemon's process id right after it starts.
        :returns: the connection to the daemon.
        :raises SpawnError: the daemon ended (or let go of the endpoint) before adopting
            it; the message gives its exit status and the tail of its error output.
        :raises TimeoutError: no connection within ``timeout``; a daemon this call started
            that had not adopted the endpoint by then is killed.
        :raises TypeError: a name is not a ``str``, or ``argv`` is not a sequence of
            strings or paths.
        :raises ValueError: a name breaks the naming rules, or ``argv`` is empty.
        :raises OSError: the daemon could not be started (e.g. ``FileNotFoundError`` for a
            missing program), or the reasons :func:`claim` and :func:`connect` give.
        """
        stem = endpoint_stem(app_name, instance)
        timeout = check_timeout(timeout)
        if isinstance(argv, (str, bytes)) or not all(
            isinstance(arg, (str, os.PathLike)) for arg in argv
        ):
            raise TypeError(
                "argv must be a sequence of str or path arguments, "
                "e.g. [sys.executable, 'daemon.py']"
            )
        if not argv:
            raise ValueError("argv must name the daemon's program: it is empty")
        conn = self.connect(app_name, instance)
        if conn is not None:
            return conn
        from ._spawn import Request, connect_or_spawn

        names = (app_name, instance, stem)
        request = Request(self, names, list(argv), timeout, log=log, env=env, on_spawn=on_spawn)
        return connect_or_spawn(request)

    def probe(
        self, app_name: str, instance: str = "default", *, timeout: float | None = PROBE_TIMEOUT
    ) -> Probe:
        """Tell what is at the endpoint for ``(app_name, instance)``, and why.

        Read-only: creates nothing and never takes the claim, so a concurrent
        :func:`claim` is unaffected. A connection attempt, if made, is closed at once
        without a byte sent.

        :param timeout: how long a holder may take to accept the check; ``None`` waits
            for ever.
        :returns: a :class:`Probe`; its ``reason`` is one sentence a user can act on.
        :raises TypeError: a name is not a ``str``, or ``timeout`` is not a number.
        :raises ValueError: a name breaks the naming rules, or ``timeout`` is negative.
        """
        stem = endpoint_stem(app_name, instance)
        timeout = check_timeout(timeout)
        inspect = getattr(self._backend, "inspect", None)
        if inspect is not None:
            return Probe(*inspect(stem, timeout))
        address = self._backend.locate(stem)
        try:  # what a connect can tell
            channel = self._backend.dial(stem, timeout)
        except PermissionError as exc:
            return Probe("foreign", address, None, None, f"{exc.strerror}: do not send it anything")
        except BlockingIOError:
            return Probe(
                "busy", address, None, None, "the holder did not accept within the timeout"
            )
        if channel is None:
            return Probe("absent", address, None, None, "nobody is serving: start the daemon")
        pid = channel.peer_pid
        channel.close()
        return Probe("listening", address, pid, None, "a daemon of this user answered")

    def stop(
        self, app_name: str, instance: str = "default", *, timeout: float = STOP_TIMEOUT
    ) -> int | None:
        """Ask the process holding ``(app_name, instance)`` to exit, and wait until it
        has released the claim.

        On POSIX the holder gets ``SIGTERM``, only after checking that the pid it recorded
        in its lock file still holds the claim. A daemon that closes its
        :class:`Dockpoint` on ``SIGTERM`` (or dies of it) releases the endpoint.

        :param timeout: seconds to wait for the release.
        :returns: the pid that was stopped, or ``None`` if nobody held the claim here
            (see :func:`probe` for the details, e.g. a daemon found ``"elsewhere"``).
        :raises TimeoutError: the holder still holds the claim after ``timeout``.
        :raises PermissionError: the endpoint is another user's or its directory unsafe.

        On Windows the holder is the server process of the pipe a connection reaches
        (its pid from ``GetNamedPipeServerProcessId``); it is ended with
        ``TerminateProcess`` (``os.kill``), which gives it no chance to clean up, and the
        pipe dies with it.
        """
        import errno

        stem = endpoint_stem(app_name, instance)
        if timeout is None:
            raise TypeError("timeout must be a number of seconds, not None")
        wait = check_timeout(timeout)
        assert wait is not None
        backend = self._backend
        holds = getattr(backend, "holds", None) or self._serves
        ask = getattr(backend, "ask_to_exit", None) or _terminate
        found = self.probe(app_name, instance, timeout=min(wait, PROBE_TIMEOUT))
        if found.state in ("unsafe", "foreign"):
            raise PermissionError(errno.EACCES, found.reason, found.address)
        pid = found.pid
        if found.state not in ("listening", "busy", "missing-socket") or pid is None:
            return None
        if not holds(stem, pid):
            return None  # it let go on its own in the meantime
        try:
            ask(pid)
        except ProcessLookupError:
            return pid
        deadline = time.monotonic() + wait
        pause = 0.001
        while holds(stem, pid):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"pid {pid} still holds {stem} {wait:g} s after it was asked to exit"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
        return pid

    def _serves(self, stem: str, pid: int) -> bool:
        """Whether process ``pid`` serves ``stem`` (for backends without ``holds``: the
        server of the endpoint a connection reaches is its holder)."""
        try:
            channel = self._backend.dial(stem, PROBE_TIMEOUT)
        except BlockingIOError:
            return True  # busy: still there
        if channel is None:
            return False
        served = channel.peer_pid == pid
        channel.close()
        return served

    def address(self, app_name: str, instance: str = "default") -> str:
        """Where the endpoint for ``(app_name, instance)`` lives, claimed or not.

        The socket path on POSIX, the pipe name on Windows: for logs, documentation and
        clients written in other languages. Creates nothing.

        :raises TypeError: a name is not a ``str``.
        :raises ValueError: a name breaks the naming rules.
        """
        return self._backend.locate(endpoint_stem(app_name, instance))
