"""The public functions, over the backend of this OS: the argument checks and the retry
loops are here, once; what they ask of the OS is the backend's (see the README's
Architecture section for the contract).
"""

from __future__ import annotations

import errno
import os
import sys
import time

from ._classes import BUSY_GRACE, Dockpoint, DockpointConnection, Probe
from ._names import check_info, check_timeout, endpoint_stem
from ._signals import block_signals, restore_signals

if sys.platform == "win32":
    from ._windows import backend
else:
    from ._posix import backend

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only
    from collections.abc import Callable, Generator, Mapping, Sequence
    from typing import Any

__all__ = ["address", "backend", "claim", "connect", "connect_or_spawn", "probe", "retries", "stop"]

#: Default ``timeout`` of :func:`probe`.
PROBE_TIMEOUT = 2.0
#: Default ``timeout`` of :func:`stop`.
STOP_TIMEOUT = 10.0


def claim(
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
    dp = _claim_once(stem, info, adopt=True)
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
        dp = _claim_once(stem, info)
        if dp is not None:
            return dp


def _claim_once(stem: str, info: str | None, adopt: bool = False) -> Dockpoint | None:
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
    app_name: str, instance: str = "default", *, timeout: float | None = None
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
    if timeout is None:
        try:
            channel = backend.dial(stem, None)
        except BlockingIOError:  # a holder that cannot take us yet: not "nobody there"
            pass
        else:
            return None if channel is None else DockpointConnection(channel)
    attempts = retries(stem, timeout, blocking=True)
    try:
        while True:
            time.sleep(next(attempts))
    except StopIteration as done:
        return None if done.value is None else DockpointConnection(done.value)


def retries(stem: str, timeout: float | None, *, blocking: bool) -> Generator[float, None, Any]:
    """:func:`connect`'s attempts after a first one that found the holder busy
    (``timeout`` ``None``: for :data:`BUSY_GRACE` while the holder is there) or within
    ``timeout``: yields each pause to sleep, returns the channel or ``None``. Without
    ``blocking`` each attempt is non-blocking (an event loop's)."""
    dial = backend.dial
    busy_only = timeout is None
    deadline = time.monotonic() + (BUSY_GRACE if timeout is None else timeout)
    pause = 0.001
    while True:
        try:
            channel = dial(stem, max(0.0, deadline - time.monotonic()) if blocking else 0.0)
        except BlockingIOError:
            channel = None
        else:
            if channel is None and busy_only:
                return None  # the busy holder has gone
        if channel is not None:
            return channel
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        yield min(pause, left)
        pause = min(pause * 2, 0.05)


def connect_or_spawn(
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
            "argv must be a sequence of str or path arguments, e.g. [sys.executable, 'daemon.py']"
        )
    if not argv:
        raise ValueError("argv must name the daemon's program: it is empty")
    conn = connect(app_name, instance)
    if conn is not None:
        return conn
    # Loaded by the first spawn only: import dockpoint takes 1.2 x as long with it (3.12,
    # -X importtime, median of 25).
    from ._spawn import Request, spawn_and_connect

    names = (app_name, instance, stem)
    request = Request(names, list(argv), timeout, connect, log=log, env=env, on_spawn=on_spawn)
    return spawn_and_connect(request, backend.listen)


def probe(
    app_name: str, instance: str = "default", *, timeout: float | None = PROBE_TIMEOUT
) -> Probe:
    """Tell what is at the endpoint for ``(app_name, instance)``, and why.

    Read-only: never takes the claim and leaves nothing behind, so a concurrent
    :func:`claim` is unaffected, and a daemon never sees it. On POSIX its connection
    attempt comes from a socket bound to a probe's name (abstract on Linux; elsewhere a
    file next to the endpoint's socket, removed before this returns), closed without a
    byte sent, and the listener's ``accept`` drops it unseen. On Windows it never opens
    a live holder's pipe: ``WaitNamedPipeW`` tells whether an instance is free.

    :param timeout: how long a holder may take to accept the check; ``None`` waits
        for ever.
    :returns: a :class:`Probe`; its ``reason`` is one sentence a user can act on.
    :raises TypeError: a name is not a ``str``, or ``timeout`` is not a number.
    :raises ValueError: a name breaks the naming rules, or ``timeout`` is negative.
    """
    stem = endpoint_stem(app_name, instance)
    timeout = check_timeout(timeout)
    return Probe(*backend.inspect(stem, timeout))


def stop(app_name: str, instance: str = "default", *, timeout: float = STOP_TIMEOUT) -> int | None:
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

    On Windows the pid recorded in the lock file, once checked to hold the claim, is
    ended with ``TerminateProcess`` (``os.kill``), which gives it no chance to clean
    up; its pipe and lock die with it.
    """
    stem = endpoint_stem(app_name, instance)
    if timeout is None:
        raise TypeError("timeout must be a number of seconds, not None")
    wait = check_timeout(timeout)
    assert wait is not None
    holds = backend.holds
    found = probe(app_name, instance, timeout=min(wait, PROBE_TIMEOUT))
    if found.state in ("unsafe", "foreign"):
        raise PermissionError(errno.EACCES, found.reason, found.address)
    pid = found.pid
    if found.state not in ("listening", "busy", "missing-socket") or pid is None:
        return None
    if not holds(stem, pid):
        return None  # it let go on its own in the meantime
    try:
        backend.ask_to_exit(pid)
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


def address(app_name: str, instance: str = "default") -> str:
    """Where the endpoint for ``(app_name, instance)`` lives, claimed or not.

    The socket path on POSIX, the pipe name on Windows: for logs, documentation and
    clients written in other languages. Creates nothing.

    :raises TypeError: a name is not a ``str``.
    :raises ValueError: a name breaks the naming rules.
    """
    return backend.locate(endpoint_stem(app_name, instance))
