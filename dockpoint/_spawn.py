"""``connect_or_spawn``: claim the endpoint, hand it to a daemon started for it, connect.

Loaded only when a frontend finds nobody there. The frontend starts the daemon with the
claimed endpoint inherited and named in ``DOCKPOINT_HANDOVER``, plus the write end of a
readiness pipe; the daemon's :func:`dockpoint.claim` adopts the endpoint and writes ``+``
(end of file without it: the daemon died or let go). Meanwhile the frontend connects: the
endpoint queues the connection until the daemon accepts. docs/protocol.md gives the
protocol for daemons in other languages.
"""

from __future__ import annotations

import os
import sys
from time import monotonic, sleep

from ._classes import DockpointConnection, SpawnError
from ._names import HANDOVER, handover_text
from ._signals import block_signals, restore_signals

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import subprocess
    from collections.abc import Callable, Mapping
    from typing import Any

    Connect = Callable[..., "DockpointConnection | None"]  # dockpoint.connect

#: Not inherited by children (``O_CLOEXEC`` on POSIX, ``O_NOINHERIT`` on Windows).
_PRIVATE = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)
#: How much of the daemon's early error output a SpawnError keeps.
TAIL_BYTES = 2048
#: Longest single wait for a holder that is not accepting yet, before claiming again
#: (the holder may be a daemon that is just exiting).
HOLDER_SLICE = 0.25


class Request:
    """One ``connect_or_spawn`` call (arguments checked by :func:`dockpoint.connect_or_spawn`)."""

    def __init__(
        self,
        names: tuple[str, str, str],
        argv: list[str | os.PathLike[str]],
        timeout: float | None,
        connect: Connect,
        *,
        log: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        on_spawn: Callable[[int], object] | None,
    ) -> None:
        self.app_name, self.instance, self.stem = names
        self.dial = connect
        self.argv = argv
        self.deadline = float("inf") if timeout is None else monotonic() + timeout
        self.log = log
        self.env = env
        self.on_spawn = on_spawn

    def left(self) -> float:
        return max(0.0, self.deadline - monotonic())

    def connect(self, timeout: float | None = None) -> DockpointConnection | None:
        return self.dial(self.app_name, self.instance, timeout=timeout)


def spawn_and_connect(req: Request, listen: Callable[[str, None], Any]) -> DockpointConnection:
    """The rest of :func:`dockpoint.connect_or_spawn` once a connect found nobody there;
    ``listen`` is the backend's."""
    app_name, instance, stem, connect = req.app_name, req.instance, req.stem, req.dial
    deadline = req.deadline
    while True:
        old = block_signals()  # until _hand_over's cleanup is armed: no claim is leaked
        try:
            got = listen(stem, None)
        except BaseException:
            restore_signals(old)
            raise
        if got is not None:
            return _hand_over(req, got[0], old)
        restore_signals(old)
        # Someone holds the claim: a daemon, or a frontend handing it over. Its endpoint
        # takes our connection into its queue as soon as it is in place.
        left = deadline - monotonic()
        conn = connect(app_name, instance, timeout=max(0.0, min(left, HOLDER_SLICE)))
        if conn is not None:
            return conn
        if monotonic() >= deadline:
            raise TimeoutError(
                f"no daemon for {stem} accepted a connection in time "
                "(another process holds the claim)"
            )
        conn = connect(app_name, instance)
        if conn is not None:
            return conn


def _open_log(log: str | os.PathLike[str] | None) -> tuple[int, int]:
    """The daemon's stdout/stderr descriptor and the log's size before it starts."""
    if log is None:
        return os.open(os.devnull, os.O_WRONLY | _PRIVATE), -1
    if sys.platform == "win32":  # O_APPEND is the C runtime's: the daemon's handle needs it
        return _open_append(log)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _PRIVATE, 0o600)
    return fd, os.fstat(fd).st_size


if sys.platform == "win32":

    def _open_append(log: str | os.PathLike[str]) -> tuple[int, int]:
        """A descriptor whose handle may only append (``FILE_APPEND_DATA``): every write of
        every process that inherits it lands at the end of the file."""
        import msvcrt

        from ._win32 import (
            FILE_APPEND_DATA,
            FILE_SHARE_DELETE,
            FILE_SHARE_READ,
            FILE_SHARE_WRITE,
            INVALID_HANDLE_VALUE,
            OPEN_ALWAYS,
            CloseHandle,
            CreateFileW,
            _error,
        )

        path = os.fspath(log)
        share = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
        handle = CreateFileW(path, FILE_APPEND_DATA, share, None, OPEN_ALWAYS, 0, None)
        if handle == INVALID_HANDLE_VALUE or not handle:
            raise _error(None, path)
        try:
            fd = msvcrt.open_osfhandle(handle, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            CloseHandle(handle)
            raise
        return fd, os.stat(path).st_size


def _popen(
    argv: list[str | os.PathLike[str]],
    out: int,
    err: int,
    pass_fds: tuple[int, ...],
    environ: Mapping[str, str],
) -> subprocess.Popen[bytes]:
    import subprocess

    common: dict[str, Any] = dict(
        stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True, env=environ
    )
    if sys.platform != "win32":
        # Own session: no terminal, no SIGHUP when the frontend's session ends.
        return subprocess.Popen(argv, pass_fds=pass_fds, start_new_session=True, **common)
    flags = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    info = subprocess.STARTUPINFO()
    info.lpAttributeList = {"handle_list": list(pass_fds)}  # these and stdio only
    for handle in pass_fds:  # the list's handles must be inheritable while it starts
        os.set_handle_inheritable(handle, True)
    try:
        return subprocess.Popen(argv, creationflags=flags, startupinfo=info, **common)
    finally:
        for handle in pass_fds:
            os.set_handle_inheritable(handle, False)


class _Daemon:
    """A daemon started detached with ``os.posix_spawn`` (``import subprocess`` would add
    25-28 ms to a frontend that has imported dockpoint: 3.12, ``-X importtime``, 5 runs), or
    with ``subprocess`` where the platform's ``posix_spawn`` cannot start a session.
    ``keep`` descriptors are inherited as :attr:`fds`, everything else is closed or
    close-on-exec."""

    def __init__(
        self,
        argv: list[str | os.PathLike[str]],
        stdio: tuple[int, int],
        keep: tuple[int, ...],
        environ: dict[str, str],
        variable: Callable[[tuple[int, ...]], str],
        *,
        sigmask: object = None,
    ) -> None:
        """``sigmask``: the signal mask the daemon starts with, from ``block_signals``
        (``None``: this thread's); the caller may have blocked signals meanwhile."""
        self.code: int | None = None
        self.pid = -1
        self.fds: tuple[int, ...] = keep
        self._popen: subprocess.Popen[bytes] | None = None
        out, err = stdio
        spawn = getattr(os, "posix_spawnp", None)
        if sys.platform == "win32" or spawn is None or not hasattr(os, "waitstatus_to_exitcode"):
            self._subprocess(argv, stdio, keep, environ, variable, sigmask)
            return
        null = os.open(os.devnull, os.O_RDONLY | _PRIVATE)
        try:
            # Every source is close-on-exec; copies above all of them (dup2 clears the flag)
            # become the daemon's stdio and the kept descriptors, whatever their numbers.
            sources = (null, out, err, *keep)
            top = max(sources) + 1
            actions: list[tuple[int, ...]] = [
                (os.POSIX_SPAWN_DUP2, fd, top + i) for i, fd in enumerate(sources)
            ]
            for i in range(3):
                actions += [(os.POSIX_SPAWN_DUP2, top + i, i), (os.POSIX_SPAWN_CLOSE, top + i)]
            mine = range(top, top + len(sources))
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable() if fd not in mine]
            self.fds = tuple(range(top + 3, top + 3 + len(keep)))
            environ[HANDOVER] = variable(self.fds)
            mask = {} if sigmask is None else {"setsigmask": sigmask}
            try:
                self.pid = spawn(argv[0], argv, environ, file_actions=actions, setsid=True, **mask)
            except NotImplementedError:  # no POSIX_SPAWN_SETSID here
                self._subprocess(argv, stdio, keep, environ, variable, sigmask)
        finally:
            os.close(null)

    def _subprocess(  # noqa: PLR0917 - the constructor's own arguments, passed on
        self,
        argv: list[str | os.PathLike[str]],
        stdio: tuple[int, int],
        keep: tuple[int, ...],
        environ: dict[str, str],
        variable: Callable[[tuple[int, ...]], str],
        sigmask: object,
    ) -> None:
        """Start it with ``subprocess`` (Windows, or no ``posix_spawn`` with a session)."""
        self.fds = keep  # Windows: inherited handles keep their values
        environ[HANDOVER] = variable(keep)
        restore_signals(sigmask)  # subprocess starts children with this thread's mask
        self._popen = _popen(argv, *stdio, keep, environ)
        self.pid = self._popen.pid

    def wait(self, timeout: float) -> int | None:
        """The exit status (negative: the signal), or ``None`` if it still runs."""
        if self._popen is not None:
            import subprocess

            try:
                return self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        if self.code is None and sys.platform != "win32":
            deadline = monotonic() + timeout
            while True:  # a dead daemon is reaped at once; stop()'s SIGKILL lands fast
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.code = os.waitstatus_to_exitcode(status)
                    break
                left = deadline - monotonic()
                if left <= 0:
                    break
                sleep(min(left, 0.001))
        return self.code

    def stop(self) -> None:
        """Kill a daemon that never adopted its endpoint (and its process group)."""
        try:
            if sys.platform != "win32":
                import signal

                os.killpg(self.pid, signal.SIGKILL)  # its own session: the group is its own
            elif self._popen is not None:
                self._popen.kill()
        except OSError:
            pass
        self.wait(5.0)

    def release(self) -> None:
        """Let go of a daemon meant to outlive this process."""
        if self._popen is not None:
            import warnings

            with warnings.catch_warnings():  # no "still running" ResourceWarning
                warnings.simplefilter("ignore", ResourceWarning)
                self._popen = None


def _inheritable() -> list[int]:
    """This process's inheritable descriptors from 3 up, which a daemon must not get."""
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(where)
        except OSError:
            continue
        found = []
        for name in names:
            fd = int(name)
            try:
                if fd > 2 and os.get_inheritable(fd):
                    found.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return found
    return []


def _hand_over(req: Request, listener: Any, old: object) -> DockpointConnection:
    """Hand ``listener``, claimed with signals blocked (``old`` restores them, once what
    the hand-over opens is accounted for), to a daemon started for it; connect to it."""
    stem, log = req.stem, req.log
    ours: list[int] = []
    proc = None
    try:
        sock, lock = listener.handles()
        ready_r, ready_w = os.pipe()
        ours += (ready_r, ready_w)
        out, log_start = _open_log(log)
        ours.append(out)
        if log is None:  # capture early stderr in a pipe until the daemon adopts
            err_r, err = os.pipe()
            ours += (err_r, err)
            capture = "pipe" if sys.platform == "win32" else str(os.fstat(err).st_ino)
        else:
            err_r, err, capture = -1, out, "-"
        ready = ready_w
        if sys.platform == "win32":  # the daemon is handed handles, not descriptors
            import msvcrt

            ready = msvcrt.get_osfhandle(ready_w)
        environ = dict(os.environ if req.env is None else req.env)
        proc = _Daemon(
            req.argv,
            (out, err),
            (sock, lock, ready),
            environ,
            lambda fds: handover_text(stem, fds, capture),
            sigmask=old,
        )
    except BaseException:

        def undo() -> None:
            if proc is None:
                listener.close()  # nobody got it: unlink, unlock
            else:
                listener.forget()
                listener.let_go()
            for fd in ours:
                os.close(fd)

        try:
            undo()  # signals are still blocked here
        finally:
            restore_signals(old)
        raise
    listener.forget()  # the daemon's copies keep the endpoint (POSIX: and the claim)
    for fd in (ready_w, err, out) if err != out else (ready_w, out):
        os.close(fd)
    try:
        restore_signals(old)  # only now: what is left to close is closed below
        if req.on_spawn is not None:
            req.on_spawn(proc.pid)
        _wait_adopted(req, proc, (ready_r, err_r), log_start, listener.let_go)
        # Connected only now, so peer_pid names the daemon (the kernel records the
        # listener's pid at connect time); the daemon may still be on its way to accept(),
        # the connection waits in its queue meanwhile.
        conn = req.connect()
        if conn is None:  # it adopted, then closed at once: ask again like any client
            conn = req.connect(req.left())
            if conn is None:
                raise TimeoutError(f"the daemon for {stem} adopted its endpoint but closed it")
        if sys.platform == "win32" and conn.peer_pid == os.getpid():
            # A pipe reports the process that made the instance: this one made the instance
            # the daemon adopted and serves this connection on.
            conn.peer_pid = proc.pid
        return conn
    finally:

        def done() -> None:
            listener.let_go()  # Windows: once the daemon holds the hand-over range, or died
            os.close(ready_r)
            if err_r >= 0:
                os.close(err_r)
            proc.release()

        # Inline, not a helper: a signal can land as any function is entered.
        try:
            again = block_signals()
        except BaseException:
            done()
            raise
        try:
            done()
        finally:
            restore_signals(again)


class _Pipes:
    """Waits for output on the readiness and capture pipes: ``poll`` on POSIX; on
    Windows, whose anonymous pipes cannot be waited on, ``PeekNamedPipe`` every 1 ms."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        if sys.platform != "win32":
            import select

            self._poller = select.poll()
            for fd in fds:
                self._poller.register(fd, select.POLLIN)

    def drop(self, fd: int) -> None:
        self.fds.remove(fd)
        if sys.platform != "win32":
            self._poller.unregister(fd)

    def wait(self, left: float) -> list[tuple[int, bytes]]:
        """Each pipe with output (``b""``: end of file) within ``left`` seconds."""
        if sys.platform != "win32":
            # At most an hour a poll (poll takes a C int of ms): the caller's loop goes on.
            ms = max(0, int(min(left, 3600.0) * 1000) + 1)
            return [(fd, os.read(fd, 4096)) for fd, _ in self._poller.poll(ms)]
        deadline = monotonic() + left
        while True:
            got = []
            for fd in self.fds:
                chunk = _peek_read(fd)
                if chunk is not None:
                    got.append((fd, chunk))
            if got or monotonic() >= deadline:
                return got
            sleep(0.001)


if sys.platform == "win32":

    def _peek_read(fd: int) -> bytes | None:
        """What the pipe ``fd`` has (``b""`` at end of file), ``None`` if nothing yet."""
        import ctypes
        import msvcrt
        from ctypes.wintypes import DWORD

        from ._win32 import PeekNamedPipe

        avail = DWORD()
        handle = msvcrt.get_osfhandle(fd)
        if not PeekNamedPipe(handle, None, 0, None, ctypes.byref(avail), None):
            return b""  # ERROR_BROKEN_PIPE: the writers have all closed
        return os.read(fd, min(avail.value, 65536)) if avail.value else None

else:

    def _peek_read(fd: int) -> bytes | None:  # pragma: no cover - Windows only
        raise NotImplementedError


def _wait_adopted(
    req: Request,
    proc: _Daemon,
    pipes: tuple[int, int],
    log_start: int,
    let_go: Callable[[], None],
) -> None:
    """Return once the daemon has adopted the endpoint; raise if it ends first. On
    ``h`` (Windows: the daemon holds the hand-over range) call ``let_go``."""
    ready_r, err_r = pipes
    stem, log, deadline = req.stem, req.log, req.deadline

    tail = bytearray()
    waiter = _Pipes([ready_r] if err_r < 0 else [ready_r, err_r])
    adopted = None
    while adopted is None:
        ready = waiter.wait(max(0.0, deadline - monotonic()))
        if not ready:
            if deadline - monotonic() > 0:
                continue
            proc.stop()
            raise TimeoutError(
                f"the daemon started for {stem} (pid {proc.pid}) did not adopt its endpoint "
                f"in time; it was stopped{_said(_tail(tail, err_r, log, log_start))}"
            )
        for fd, data in ready:
            if fd == ready_r:
                if data[:1] == b"h":  # Windows: it can take the claim now
                    let_go()
                    if len(data) == 1:
                        continue
                adopted = data[-1:] == b"+"
            elif data:
                tail += data
                del tail[:-TAIL_BYTES]
            else:
                waiter.drop(fd)
    if adopted:
        return
    # End of file without "+": it died, or closed the descriptors without adopting.
    code = proc.wait(max(0.0, min(5.0, deadline - monotonic())))
    if code is None:
        proc.stop()
    text = _tail(tail, err_r, log, log_start)
    program = os.fsdecode(req.argv[0])
    if code is None:
        what = "closed the endpoint it was handed without adopting it; it was stopped"
    elif code < 0:
        what = f"was killed by signal {-code} before it adopted its endpoint"
    else:
        what = f"exited with status {code} before it adopted its endpoint"
    raise SpawnError(
        f"the daemon started for {stem} ({program}, pid {proc.pid}) {what}{_said(text)}",
        proc.pid,
        code,
        text,
    )


def _said(text: str) -> str:
    return f"; its last error output:\n{text}" if text else "; it wrote no error output"


def _tail(tail: bytearray, err_r: int, log: str | os.PathLike[str] | None, log_start: int) -> str:
    """The end of the daemon's early error output, from the capture pipe or the log."""
    if err_r >= 0:
        if sys.platform != "win32":
            os.set_blocking(err_r, False)
        while True:
            try:
                chunk = os.read(err_r, 65536) if sys.platform != "win32" else _peek_read(err_r)
            except BlockingIOError:  # a grandchild still holds the pipe open
                break
            if not chunk:
                break
            tail += chunk
            del tail[:-TAIL_BYTES]
        data = bytes(tail)
    elif log is not None and log_start >= 0:
        try:
            with open(log, "rb") as f:
                size = f.seek(0, 2)
                f.seek(max(log_start, size - TAIL_BYTES))
                data = f.read(TAIL_BYTES)
        except OSError:
            data = b""
    else:
        data = b""
    return data.decode(errors="replace").strip()
