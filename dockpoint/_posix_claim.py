"""POSIX: the claim. The lock file's ``flock`` decides it; only the holder binds, renames
or unlinks the socket. Here: claiming (:func:`listen`), the listener (``accept`` and
self-repair), and adopting an endpoint handed over by ``connect_or_spawn``.
"""

from __future__ import annotations

import _socket as socket  # not socket.py: see _posix_stream
import errno
import fcntl
import os
import sys
from _thread import RLock  # not threading: see _classes
from stat import S_ISFIFO, S_ISREG, S_ISSOCK
from time import monotonic

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from . import _posix_dir as _dir  # noqa: E402
from ._classes import ClaimLostError  # noqa: E402
from ._names import lock_text, take_handover  # noqa: E402
from ._posix_dir import LINUX, PROBE_ENDS, _bind_directory, _directory, _open_directory, _place  # noqa: E402
from ._posix_stream import POLLIN, SO_NOSIGPIPE, _Channel, _ms, _peer  # noqa: E402
from ._signals import block_signals, restore_signals  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

_BACKLOG = max(socket.SOMAXCONN, 4096)  # the kernel caps it at its own maximum
# O_NONBLOCK: a FIFO planted at the lock path must not hang open().
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: How often a waiting accept() checks that its socket and lock files are still its own.
CHECK_INTERVAL = 0.5


class _Listener:
    __slots__ = (
        "_dfd",
        "_dir_locked",
        "_directory",
        "_flock",
        "_ino",
        "_lock",
        "_lock_at",
        "_lock_id",
        "_mutex",
        "_name",
        "_next_check",
        "_owner",
        "_pollers",
        "_sock",
        "_uid",
        "_wake_r",
        "_wake_w",
        "_woken",
    )

    def __init__(
        self,
        sock: socket.socket,
        dfd: int,
        lock: int,
        where: tuple[str, str, int],
        *,
        lock_at: tuple[str, int | None],
        dir_locked: bool,
    ) -> None:
        self._flock = fcntl.flock
        self._sock = sock
        self._dfd = dfd
        self._dir_locked = dir_locked  # a shared flock on the directory (tmpfiles skips it)
        self._lock = lock
        st = os.fstat(lock)
        self._lock_id = (st.st_dev, st.st_ino)
        self._directory, self._name, self._ino = where  # the socket's directory, name, inode
        self._lock_at = lock_at  # the lock file's name in dfd, or its path
        self._uid = os.geteuid()
        self._owner = os.getpid()
        # Re-entrant: close() in a signal handler may wake() while this thread holds it.
        self._mutex = RLock()
        # The wake pipe is made when a thread first has to wait: a claim that is only
        # held costs three descriptors (socket, lock file, directory).
        self._wake_r = self._wake_w = -1
        self._woken = False
        self._next_check = monotonic() + CHECK_INTERVAL
        # Poll objects made by earlier waits, free for reuse (one thread polls each one).
        self._pollers: list[Any] = []

    def accept(self, timeout: float | None) -> _Channel | None:
        deadline = None if timeout is None else monotonic() + timeout
        poller = None
        try:
            while True:
                conn = None
                try:
                    fd, peer = self._sock._accept()  # type: ignore[attr-defined]  # accept4
                except (BlockingIOError, ConnectionAbortedError):  # none yet, or it left
                    pass
                else:
                    if peer and peer[-6:] in PROBE_ENDS:  # probe(): never handed out
                        os.close(fd)
                        continue
                    # Family, type and protocol given: fewer questions to the kernel.
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
                if conn is None:
                    if poller is None:
                        poller = self._poller()
                        if poller is None:
                            return None  # woken before the wake pipe existed
                    now = monotonic()
                    if now >= self._next_check:
                        self._next_check = now + CHECK_INTERVAL
                        self._check()
                    left = self._next_check - now
                    if deadline is not None and deadline - now < left:
                        left = deadline - now
                    ready = poller.poll(_ms(left))
                    if not ready:
                        if deadline is not None and monotonic() >= deadline:
                            raise TimeoutError(f"no client arrived within {timeout} s")
                        continue
                    for fd, _ in ready:
                        if fd == self._wake_r:
                            return None
                    continue
                # BSD accept() inherits O_NONBLOCK from the listener; Linux's never does,
                # so there only a socket.setdefaulttimeout() needs undoing.
                if not LINUX or conn.gettimeout() is not None:
                    conn.setblocking(True)
                if SO_NOSIGPIPE:
                    conn.setsockopt(socket.SOL_SOCKET, SO_NOSIGPIPE, 1)
                try:
                    pid, uid = _peer(conn)
                except OSError:
                    conn.close()
                    continue
                if uid != self._uid:  # another user's client: drop it unserved
                    conn.close()
                    continue
                return _Channel(conn, pid)
        finally:
            if poller is not None:
                self._pollers.append(poller)

    def _poller(self) -> Any:
        """A poll object watching the wake pipe and the socket, free for this thread:
        reused, or made (with the wake pipe) on first use; ``None`` once woken."""
        try:
            return self._pollers.pop()  # atomic: no two threads get the same one
        except IndexError:
            pass
        wake = self._wake_fd()
        if wake < 0:
            return None
        import select  # loaded by the first wait, not by import dockpoint

        poller = select.poll()  # one per thread at a time: a poll object cannot be shared
        poller.register(wake, POLLIN)
        poller.register(self._sock, POLLIN)
        return poller

    def _wake_fd(self) -> int:
        """The wake pipe's read end, made on first use; -1 once woken."""
        if self._wake_r < 0:
            with self._mutex:
                if self._wake_r < 0 and not self._woken:
                    old = block_signals()
                    try:
                        self._wake_r, self._wake_w = os.pipe()
                    finally:
                        restore_signals(old)  # a handler's wake() may run here
                if self._woken:  # woken before the pipe could carry it
                    return -1
        return self._wake_r

    def wake(self) -> None:
        with self._mutex:
            self._woken = True
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    # -------------------------------------------------------------- self-repair

    def _check(self) -> None:
        """Give up a claim whose lock file is gone; restore a deleted or replaced socket."""
        dfd = self._dfd
        lock_name, lock_dfd = self._lock_at
        try:
            st = os.lstat(lock_name, dir_fd=lock_dfd)
            lost = (st.st_dev, st.st_ino) != self._lock_id
        except FileNotFoundError:
            lost = True
        if lost:
            raise ClaimLostError(
                errno.EBADF,
                "the claim was lost: its lock file was deleted or replaced, so the "
                "endpoint was released (at most one process may serve it)",
                lock_name if lock_dfd is None else self._directory + "/" + lock_name,
            )
        if not self._dir_locked:  # tmpfiles was cleaning when we claimed: try again
            self._dir_locked = _share_lock(self._flock, dfd)
        try:
            st = os.lstat(self._name, dir_fd=dfd)
            intact = st.st_ino == self._ino and S_ISSOCK(st.st_mode)
            foreign = not S_ISSOCK(st.st_mode)  # a file was put there: leave it alone
        except FileNotFoundError:
            intact = foreign = False
        if intact or foreign or not self._mutex.acquire(False):
            return
        old = block_signals()
        try:
            try:
                sock, _, ino = _bind(dfd, self._directory, self._name)
            except OSError:
                return  # e.g. something planted meanwhile: try again at the next check
            try:  # same descriptor number: threads polling it see the new socket next time
                os.dup2(sock.fileno(), self._sock.fileno(), inheritable=False)
                self._ino = ino
            finally:
                sock.close()
        finally:
            self._mutex.release()
            restore_signals(old)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if os.getpid() != self._owner:  # never unlink or unlock for the parent
            self.forget()
            return
        try:  # remove the socket while still holding the lock, if it is still ours
            if os.lstat(self._name, dir_fd=self._dfd).st_ino == self._ino:
                os.unlink(self._name, dir_fd=self._dfd)
        except FileNotFoundError:
            pass
        finally:
            try:
                os.ftruncate(self._lock, 0)  # no holder pid for status tools
                self._flock(self._lock, fcntl.LOCK_UN)  # also for copies a fork may hold
                self._flock(self._dfd, fcntl.LOCK_UN)
            finally:
                self.forget()

    def handles(self) -> tuple[int, int]:
        """The listening socket's and the lock file's descriptors, for a hand-over."""
        return self._sock.fileno(), self._lock

    def forget(self) -> None:
        """Close this process's descriptors only."""
        self._pollers.clear()
        self._sock.close()
        for fd in (self._wake_r, self._wake_w, self._lock, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._lock = self._dfd = -1

    def let_go(self) -> None:
        """Nothing: the daemon's copy of the lock file's open description holds the lock."""


# --------------------------------------------------------------------------- backend


def _share_lock(flock: Callable[[int, int], None], dfd: int) -> bool:
    """Take a shared ``flock`` on the directory: ``systemd-tmpfiles --clean`` skips it."""
    try:
        flock(dfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held exclusively (a cleaner at work right now), or unsupported
        return False
    return True


def _lock(dfd: int, directory: str, stem: str, uid: int, info: str | None) -> int | None:
    name = stem + ".lock"
    fd = os.open(name, _LOCK_FLAGS, 0o600, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode) or st.st_uid != uid:
            raise PermissionError(
                errno.EACCES, "lock file is not a regular file of this user", directory + "/" + name
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if st.st_mode & 0o7777 != 0o1600:
            _chmod_sticky(lambda mode: os.fchmod(fd, mode))
        os.ftruncate(fd, 0)  # for status tools; the lock decides
        os.pwrite(fd, lock_text(os.getpid(), info), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chmod_sticky(chmod: object) -> None:
    # The sticky bit asks runtime-directory cleaners to leave the file alone (XDG spec);
    # some BSDs refuse it on non-directories (EFTYPE), where plain 0600 has to do.
    try:
        chmod(0o1600)  # type: ignore[operator]
    except OSError:
        chmod(0o600)  # type: ignore[operator]


def _bind(dfd: int, directory: str, name: str) -> tuple[socket.socket, str, int]:
    path = directory + "/" + name
    prefix = _bind_directory(directory, name, dfd)
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    else:
        if not S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                "something that is not a socket sits at the endpoint path; "
                "dockpoint leaves it alone (remove it to claim this endpoint)",
                path,
            )
    temp = name[:-5] + ".new"  # bound and set up here, then renamed into place
    try:
        os.unlink(temp, dir_fd=dfd)  # left by a holder that died mid-claim
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if _dir.PROC_ALIAS:  # bind in the directory checked and opened, not by its path again
            try:
                sock.bind(f"/proc/self/fd/{dfd}/{temp}")
            except FileNotFoundError:  # no /proc mounted
                sock.bind(prefix + "/" + temp)
        else:  # no bindat(2) here: the path, whose directory is the user's own
            sock.bind(prefix + "/" + temp)
        try:
            _chmod_sticky(lambda mode: os.chmod(temp, mode, dir_fd=dfd))
            ino = os.lstat(temp, dir_fd=dfd).st_ino
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            # Clients see either the old path or a listening, private socket: never a gap.
            os.rename(temp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
    except BaseException:
        sock.close()
        raise
    return sock, path, ino


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def adopt(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
    """Adopt the endpoint ``stem`` handed over in the environment, after verifying it.

    ``None`` when the environment hands over nothing for ``stem``, or when what it names
    is not this endpoint, claimed by this process (then the caller claims as usual). The
    variable is removed either way once it names ``stem``, so children never inherit it.
    """
    fields = take_handover(stem)
    if fields is None:
        return None
    sock_fd, lock_fd, ready_fd, stderr = fields
    uid = os.geteuid()
    directory = _directory(check=True, uid=uid)
    dfd = _open_directory(directory, uid)
    fds = [dfd]
    sock = None
    try:
        where, name = _place(directory, stem, uid)
        sdfd = dfd  # the socket's directory: the lock's, or the short fallback
        if where != directory:
            sdfd = _open_directory(where, uid)
            fds.append(sdfd)
        if not _handed_over(sock_fd, lock_fd, (sdfd, dfd), (where, stem, name)):
            _close(fds)
            return None
        sock = socket.socket(fileno=sock_fd)
        ino = os.lstat(name, dir_fd=sdfd).st_ino
        # Nothing may fail from here on: the descriptors are ours now.
        os.set_inheritable(sock_fd, False)  # exec'd children inherit nothing
        os.set_inheritable(lock_fd, False)
        sock.setblocking(False)
        sock.listen(_BACKLOG)  # again: clients' peer credentials now name this process
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, lock_text(os.getpid(), info), 0)
    except BaseException:
        if sock is not None:
            sock.detach()
        _close(fds)
        raise
    lock_at: tuple[str, int | None] = (stem + ".lock", dfd)
    if sdfd != dfd:  # as listen() does: the listener keeps the socket's directory
        os.close(dfd)
        lock_at = (directory + "/" + stem + ".lock", None)
    shared = _share_lock(fcntl.flock, sdfd)
    listener = _Listener(
        sock, sdfd, lock_fd, (where, name, ino), lock_at=lock_at, dir_locked=shared
    )
    _ready(ready_fd, stderr)
    return listener, where + "/" + name


def _handed_over(
    sock_fd: int, lock_fd: int, dfds: tuple[int, int], where: tuple[str, str, str]
) -> bool:
    """Whether ``sock_fd`` is the listening socket of the endpoint ``where`` (the socket's
    directory, stem, socket name) and ``lock_fd`` its lock file, locked through this very
    open file description; ``dfds`` are the socket's and the lock file's directories."""
    directory, stem, name = where
    sdfd, dfd = dfds
    try:
        return _our_socket(sock_fd, directory, name, sdfd) and _our_lock(lock_fd, stem, dfd)
    except OSError:  # EBADF (not open here), ENOTSOCK, ...
        return False


def _our_socket(fd: int, directory: str, name: str, dfd: int) -> bool:
    if not S_ISSOCK(os.fstat(fd).st_mode) or not S_ISSOCK(os.lstat(name, dir_fd=dfd).st_mode):
        return False
    probe = socket.socket(fileno=os.dup(fd))
    try:
        bound = probe.getsockname()
        if (
            probe.family != socket.AF_UNIX
            or probe.type != socket.SOCK_STREAM
            or not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            or not isinstance(bound, str)
        ):
            return False
    finally:
        probe.close()
    # Bound by listen() as <name>.new, then renamed into place (on Linux through the
    # /proc/self/fd alias of the directory, with the frontend's descriptor number).
    prefix, _, base = bound.rpartition("/")
    alias = prefix.startswith("/proc/self/fd/") and prefix[14:].isdigit()
    return base == name[:-5] + ".new" and (prefix == directory or (alias and _dir.PROC_ALIAS))


def _our_lock(fd: int, stem: str, dfd: int) -> bool:
    st, path = os.fstat(fd), os.lstat(stem + ".lock", dir_fd=dfd)
    if not S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return False
    if (st.st_dev, st.st_ino) != (path.st_dev, path.st_ino):
        return False
    # Held, and through the inherited open file description: a fresh one cannot take the
    # lock (someone holds it), the inherited one can (it has it already).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    other = os.open(stem + ".lock", flags, dir_fd=dfd)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass
    else:
        return False  # nobody held it: not a claim handed over
    finally:
        os.close(other)  # also drops a lock it took
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # held through another open file description: someone else's claim
    return True


def _ready(ready_fd: int, stderr: str) -> None:
    """Tell the spawning frontend the endpoint is adopted; stop its early-stderr capture."""
    try:
        st = os.fstat(2)
        if stderr.isdigit() and S_ISFIFO(st.st_mode) and st.st_ino == int(stderr):
            # fd 2 is the frontend's capture pipe, which it closes once told: point it at
            # the null device first, so later writes never meet EPIPE (or SIGPIPE).
            if sys.stderr is not None:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, 2)  # fd 2 stays inheritable: dup2 clears close-on-exec
            os.close(null)
    except OSError:
        pass
    try:
        if S_ISFIFO(os.fstat(ready_fd).st_mode):
            try:
                os.write(ready_fd, b"+")
            finally:
                os.close(ready_fd)
    except OSError:
        pass  # the frontend has gone: nothing to tell


def listen(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
    # Runs with signals blocked (Api.claim): every step either completes or is undone.
    uid = os.geteuid()
    directory = _directory(check=True, uid=uid)
    dfd = _open_directory(directory, uid)
    try:
        lock = _lock(dfd, directory, stem, uid, info)
        if lock is None:
            os.close(dfd)
            return None
        try:
            where, name = _place(directory, stem, uid)
            if where != directory:  # the socket lives in the short fallback directory
                sdfd = _open_directory(where, uid)
                os.close(dfd)  # the lock is open; the listener keeps the socket's dir
                dfd = sdfd
                lock_at: tuple[str, int | None] = (directory + "/" + stem + ".lock", None)
            else:
                lock_at = (stem + ".lock", dfd)
            shared = _share_lock(fcntl.flock, dfd)
            sock, path, ino = _bind(dfd, where, name)
            try:
                listener = _Listener(
                    sock, dfd, lock, (where, name, ino), lock_at=lock_at, dir_locked=shared
                )
            except BaseException:
                os.unlink(name, dir_fd=dfd)
                sock.close()
                raise
        except BaseException:
            os.ftruncate(lock, 0)
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
            raise
    except BaseException:
        os.close(dfd)
        raise
    return listener, path
