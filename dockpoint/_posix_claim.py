"""POSIX backend, the claim side: claiming and listening, the listener's accept and
self-repair, the hand-over to a spawned daemon, and the read-only probe.

Loaded on first use by :mod:`dockpoint._posix` (which a client needs alone). Settings a
test or a platform shim may change at run time (``SUN_PATH_MAX``, ``_PROC_ALIAS``) are read
from that module when used.
"""

from __future__ import annotations

import _socket as socket
import errno
import itertools
import os
import sys
from _thread import RLock
from stat import S_ISFIFO, S_ISREG, S_ISSOCK
from time import monotonic

from ._common import ClaimLostError, block_signals, posix_directory, restore_signals

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from . import _posix as _p  # noqa: E402 - after the assert: _posix is POSIX-only too
from ._posix import (  # noqa: E402
    _BACKLOG,
    _DIR_FLAGS,
    _LINUX,
    _LOCK_FLAGS,
    _LOCK_NB,
    _LOCK_SH,
    _LOCK_UN,
    _POLLIN,
    _SLICE,
    _SO_NOSIGPIPE,
    CHECK_INTERVAL,
    _bind_directory,
    _Channel,
    _check_runtime_dir,
    _checked_lstat,
    _directory,
    _ms,
    _needs_dirfd,
    _peer,
    _place,
    _unsafe,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

#: A poll that returns sooner than this did not sleep: a client was queued already, so the
#: next accept() tries accept4 before polling (an accept4 that finds nobody raises, which
#: costs more than the poll it saves).
_SLEPT = 0.00002


def _open_directory(directory: str, uid: int) -> int:
    """Open the checked directory ``directory``, creating it ``0700`` if missing.

    Every step goes through a descriptor of the parent, checked again (unless it is the
    shared ``/tmp``), so the directory made, checked and opened is one and the same.
    """
    parent, _, name = directory.rpartition("/")
    pfd = os.open(parent or "/", _DIR_FLAGS)
    try:
        if directory != f"/tmp/dockpoint-{uid}":  # the user's own runtime directory
            bad = _unsafe(parent, os.fstat(pfd), uid)
            if bad is not None:
                raise bad
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        st = os.lstat(name, dir_fd=pfd)
        bad = _unsafe(directory, st, uid)
        if bad is not None:
            raise bad
        if st.st_mode & 0o700 != 0o700:  # made under a strict umask (0177 gives 0600)
            os.chmod(name, 0o700, dir_fd=pfd)
        dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    finally:
        os.close(pfd)
    fst = os.fstat(dfd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_mode & 0o777 != 0o700:
        os.close(dfd)  # swapped under us
        raise PermissionError(errno.EACCES, "unsafe directory for dockpoint: it changed", directory)
    return dfd


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
        "_waits",
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
        import fcntl  # loaded by the claim already; close() must not import (interpreter exit)

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
        # Whether the next accept() polls before trying accept4: set when accept4 found
        # nobody (clients come one at a time), cleared when a poll found one queued.
        self._waits = False

    def accept(self, timeout: float | None) -> _Channel | None:
        deadline = None if timeout is None else monotonic() + timeout
        poller = None
        try_first = not self._waits  # a client is likely waiting already: take it at once
        polled_first = not try_first
        try:
            while True:
                conn = None
                if try_first:
                    try:
                        fd, peer = self._sock._accept()  # type: ignore[attr-defined]  # accept4
                    except BlockingIOError:  # none yet: clients come one at a time
                        self._waits = True
                    except ConnectionAbortedError:  # one came and went
                        pass
                    else:
                        if peer and peer[-6:] in _PROBE_ENDS:  # probe(): never handed out
                            os.close(fd)
                            continue
                        # Family, type and protocol given: fewer questions to the kernel.
                        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
                try_first = True
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
                    if polled_first:  # a poll that did not sleep found a client queued
                        polled_first = False
                        self._waits = monotonic() - now > _SLEPT
                    if not ready:
                        if deadline is not None and monotonic() >= deadline:
                            raise TimeoutError(f"no client arrived within {timeout} s")
                        try_first = False  # a check interval passed with nobody: poll on
                        continue
                    for fd, _ in ready:
                        if fd == self._wake_r:
                            return None
                    continue
                # BSD accept() inherits O_NONBLOCK from the listener; Linux's never does,
                # so there only a socket.setdefaulttimeout() needs undoing.
                if not _LINUX or conn.gettimeout() is not None:
                    conn.setblocking(True)
                if _SO_NOSIGPIPE:
                    conn.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
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
        poller.register(wake, _POLLIN)
        poller.register(self._sock, _POLLIN)
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
                self._flock(self._lock, _LOCK_UN)  # also for copies a fork may hold
                self._flock(self._dfd, _LOCK_UN)
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
        flock(dfd, _LOCK_SH | _LOCK_NB)
    except OSError:  # held exclusively (a cleaner at work right now), or unsupported
        return False
    return True


def _lock(dfd: int, directory: str, stem: str, uid: int, info: str | None) -> int | None:
    import fcntl  # here, not at the top: a client that only connects never loads it

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
        # For status tools: the holder's pid, then its info= text; the lock decides.
        text = b"%d\n" % os.getpid()
        if info:
            text += info.encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
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
        if _p._PROC_ALIAS:  # bind in the directory checked and opened, not by its path again
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


# --------------------------------------------------------------------------- inspection
# Read-only: nothing here creates a file or takes a lock (a probe must never make a
# concurrent claim fail).


def _lock_record(path: str, uid: int) -> tuple[os.stat_result | None, int | None, str | None]:
    """The lock file's status and what its holder recorded: line 1 the pid, line 2 the
    ``info`` text. ``(None, None, None)`` when there is no lock file.

    :raises PermissionError: the lock file is a symlink or not a regular file of ``uid``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:  # ELOOP: a symlink; EACCES; ...
        raise PermissionError(
            errno.EACCES, f"unsafe lock file: {exc.strerror or exc}", path
        ) from None
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode) or st.st_uid != uid:
            raise PermissionError(
                errno.EACCES, "unsafe lock file: not a regular file of this user", path
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    lines = raw.decode("utf-8", "replace").split("\n")
    first = lines[0].strip()
    pid = int(first) if first.isdigit() and 0 < int(first) < 1 << 31 else None
    info = lines[1] if len(lines) > 1 and lines[1] else None
    return st, pid, info


def _flock_owner(st: os.stat_result) -> tuple[bool | None, int | None]:
    """Whether an ``flock`` is held on the file ``st`` and by which pid, from Linux's
    ``/proc/locks``; ``(None, None)`` where that cannot be told."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; a waiter's line has "->".
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, ino = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(ino)) == wanted:
                return True, int(fields[4])
        except ValueError:
            continue
    return False, None


def _fd_holds(pid: int, st: os.stat_result) -> bool | None:
    """Whether process ``pid`` has the file ``st`` open with an ``flock`` on it (Linux
    ``/proc/<pid>/fdinfo``); ``None`` where that cannot be told. Compares the file through
    the process's own descriptor, so it also holds where ``/proc/locks`` names another
    device than ``stat`` does (overlayfs)."""
    base = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(base)
    except FileNotFoundError:
        return False if os.path.isdir("/proc/self/fd") else None  # gone, or no /proc
    except OSError:
        return None
    for fd in fds:
        try:
            fst = os.stat(f"{base}/{fd}")
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                if any(line.split()[2:3] == ["FLOCK"] for line in f if line.startswith("lock:")):
                    return True
        except OSError:
            continue
    return False


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it holds no locks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists and belongs to someone else
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:  # no /proc (macOS, BSD), or it has just ended
        return True
    return state not in ([b"Z"], [b"X"])


def _claim_holder(lock_path: str, uid: int) -> tuple[bool, int | None, str | None]:
    """Whether the claim is held, the holder's pid and info, without taking the lock.

    Linux reads the ``flock`` from ``/proc/locks``; elsewhere a claim counts as held while
    the pid the holder wrote lives (a clean release empties the file).
    """
    st, pid, info = _lock_record(lock_path, uid)
    if st is None:
        return False, None, None
    if pid is not None and _fd_holds(pid, st):
        return True, pid, info
    held, owner = _flock_owner(st)
    if held is None:
        return pid is not None and _pid_alive(pid), pid, info
    if held and pid is None:
        pid = owner
    return held, pid, info


#: The ends of the names a probe's socket is bound to: the listener drops such a
#: connection at accept, so a daemon never serves (or writes to) a probe.
_PROBE_ENDS = (".probe", b".probe")
_PROBES = itertools.count()


def _bind_probe(sock: socket.socket, prefix: str, where: str) -> str | None:
    """Bind a probe's client socket to a name the listener recognises: a Linux abstract
    name, elsewhere a short path in the socket's own (checked) directory, which the
    caller unlinks; returns that path."""
    while True:
        name = "~%x-%d.probe" % (os.getpid(), next(_PROBES))
        try:
            if _p._ABSTRACT:
                sock.bind(b"\0dockpoint" + name.encode())
                return None
            sock.bind(prefix + "/" + name)
            return where + "/" + name
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # taken: a name left by a killed probe
                raise


def _knock(where: str, name: str, timeout: float | None) -> tuple[str, int | None]:
    """One connection attempt to the socket ``name`` in the directory ``where``, closed
    at once without a byte sent: ``("ok", pid)``, ``("foreign", uid)``, ``("refused",
    None)`` or ``("timeout", None)``."""
    dfd = None
    if _needs_dirfd(where, name):
        dfd = os.open(where, _DIR_FLAGS)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # _socket: no "with"
        bound = None
        try:
            prefix = _bind_directory(where, name, dfd)
            bound = _bind_probe(sock, prefix, where)
            target = prefix + "/" + name
            # A slice at most (settimeout overflows past time_t): the connect of a Unix
            # socket either completes, is refused or (Linux, full backlog) fails at once.
            sock.settimeout(None if timeout is None else min(timeout, _SLICE))
            try:
                sock.connect(target)
            except (ConnectionRefusedError, FileNotFoundError):
                return "refused", None
            except (BlockingIOError, socket.timeout):
                return "timeout", None
            pid, peer_uid = _peer(sock)
        finally:
            sock.close()
            if bound is not None:
                os.unlink(bound)
    finally:
        if dfd is not None:
            os.close(dfd)
    if peer_uid != os.geteuid():
        return "foreign", peer_uid
    return "ok", pid


def _inspect_at(  # noqa: PLR0911 - one return per state
    directory: str, stem: str, uid: int, timeout: float | None
) -> tuple[str, str, int | None, str | None, str]:
    """The state of ``stem``'s endpoint whose lock file lives in ``directory``."""
    where, name = _place(directory, stem, uid)
    address = where + "/" + name
    try:
        for path in (directory, where):
            try:
                _checked_lstat(path, uid)
            except FileNotFoundError:
                if path == directory:
                    return (
                        "absent",
                        address,
                        None,
                        None,
                        ("nobody holds the claim and no daemon has run here: start the daemon"),
                    )
        held, pid, info = _claim_holder(directory + "/" + stem + ".lock", uid)
    except PermissionError as exc:
        return "unsafe", address, None, None, _unsafe_reason(exc)
    try:
        st = os.lstat(address)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return "unsafe", address, pid, info, _unsafe_reason(exc)
    who = f"pid {pid}" if pid is not None else "a process"
    if st is not None and not S_ISSOCK(st.st_mode):
        return (
            "blocked",
            address,
            pid,
            info,
            (
                f"something that is not a socket is at {address}; no daemon can serve {stem} "
                "until it is removed: move or delete it"
            ),
        )
    if st is not None:
        knocked, value = _knock(where, name, timeout if held else 0.0)
        if knocked == "ok":
            pid = value if value is not None else pid
            who = f"pid {pid}" if pid is not None else "a process"
            return (
                "listening",
                address,
                pid,
                info,
                (f"a daemon of this user ({who}) accepted a connection at {address}"),
            )
        if knocked == "foreign":
            return (
                "foreign",
                address,
                None,
                None,
                (
                    f"the endpoint {address} is served by uid {value}, not by this user "
                    f"(uid {uid}): do not send it anything; find out who runs it"
                ),
            )
        if held and (knocked == "timeout" or not _LINUX):  # macOS/BSD: a full backlog refuses
            return (
                "busy",
                address,
                pid,
                info,
                (
                    f"the holder ({who}) is alive but did not accept a connection within "
                    f"{timeout:g} s: it is busy or stuck; wait, or stop it and start it again"
                    if timeout is not None
                    else f"the holder ({who}) is alive but does not accept connections"
                ),
            )
    if held:
        return (
            "missing-socket",
            address,
            pid,
            info,
            (
                f"{who} holds the claim but its socket {address} is gone or replaced (a cleaner "
                "such as systemd-tmpfiles may have deleted it): stop the daemon and start it again"
            ),
        )
    leftover = os.path.lexists(where + "/" + name[:-5] + ".new")
    if st is not None or pid is not None or leftover:
        gone = f"pid {pid}" if pid is not None else "a process"
        return (
            "stale",
            address,
            pid,
            info,
            (
                f"files left by a holder ({gone}) that is gone; the next claim replaces them: "
                "start the daemon"
            ),
        )
    return (
        "absent",
        address,
        None,
        None,
        ("nobody holds the claim and no daemon is serving: start the daemon"),
    )


def _unsafe_reason(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    where = f" {exc.filename}" if exc.filename is not None else ""
    return (
        f"{what}:{where}; dockpoint refuses to use it: fix its owner and mode (0700), or remove it"
    )


def _other_directories(directory: str, uid: int) -> list[str]:
    """The other endpoint directories this user's processes could be using."""
    found = []
    for candidate in (f"/run/user/{uid}/dockpoint", posix_directory(None, uid, None)):
        if candidate != directory and candidate not in found:
            found.append(candidate)
    return found


def _elsewhere(directory: str, stem: str, uid: int) -> tuple[str, int | None, str | None] | None:
    """A daemon of this user answering for ``stem`` in another directory, if any."""
    for other in _other_directories(directory, uid):
        where, name = _place(other, stem, uid)
        try:
            for path in (other, where):
                _checked_lstat(path, uid)
            if not S_ISSOCK(os.lstat(where + "/" + name).st_mode):
                continue
            knocked, pid = _knock(where, name, 0.0)
        except OSError:
            continue
        if knocked == "ok":
            try:
                _, recorded, info = _lock_record(other + "/" + stem + ".lock", uid)
            except OSError:
                recorded, info = None, None
            return where + "/" + name, pid if pid is not None else recorded, info
    return None


def _inspect(stem: str, timeout: float | None) -> tuple[str, str, int | None, str | None, str]:
    uid = os.geteuid()
    directory = _directory(check=False, uid=uid)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    problem = None
    if xdg and xdg[0] == "/":
        try:
            _check_runtime_dir(xdg, uid)
        except OSError as exc:
            problem = exc
    if problem is None:
        state, address, pid, info, reason = _inspect_at(directory, stem, uid, timeout)
    else:
        state, address, pid, info = "unsafe", "/".join(_place(directory, stem, uid)), None, None
        reason = (
            f"{problem.strerror}: {problem.filename}"
            if isinstance(problem, FileNotFoundError)
            else _unsafe_reason(problem)
        )
    if state in ("absent", "stale") or isinstance(problem, FileNotFoundError):
        found = _elsewhere(directory, stem, uid)
        if found is not None:
            other, pid, info = found
            setting = f"XDG_RUNTIME_DIR={xdg}" if xdg else "XDG_RUNTIME_DIR unset"
            return (
                "elsewhere",
                other,
                pid,
                info,
                (
                    f"nothing at {address} ({setting}), but a daemon of this user"
                    f"{'' if pid is None else f' (pid {pid})'} answers at {other}: it was "
                    "started with another "
                    "XDG_RUNTIME_DIR; run daemon and clients with the same environment"
                ),
            )
    return state, address, pid, info, reason


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


#: The environment variable that hands a claimed endpoint to a spawned daemon (see
#: ``connect_or_spawn``): ``<stem>:<socket fd>:<lock fd>:<ready fd>:<stderr>``.
HANDOVER = "DOCKPOINT_HANDOVER"


def _adopt(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
    """Adopt the endpoint ``stem`` handed over in the environment, after verifying it.

    ``None`` when the environment hands over nothing for ``stem``, or when what it names
    is not this endpoint, claimed by this process (then the caller claims as usual). The
    variable is removed either way once it names ``stem``, so children never inherit it.
    """
    text = os.environ.get(HANDOVER)
    if not text or text.partition(":")[0] != stem:
        return None
    del os.environ[HANDOVER]
    fields = text.split(":")
    if len(fields) != 5 or not all(f.isdigit() for f in fields[1:4]):
        return None
    sock_fd, lock_fd, ready_fd = int(fields[1]), int(fields[2]), int(fields[3])
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
        record = b"%d\n" % os.getpid()
        if info is not None:
            record += info.encode() + b"\n"
        os.pwrite(lock_fd, record, 0)
    except BaseException:
        if sock is not None:
            sock.detach()
        _close(fds)
        raise
    import fcntl

    lock_at: tuple[str, int | None] = (stem + ".lock", dfd)
    if sdfd != dfd:  # as listen() does: the listener keeps the socket's directory
        os.close(dfd)
        lock_at = (directory + "/" + stem + ".lock", None)
    shared = _share_lock(fcntl.flock, sdfd)
    listener = _Listener(
        sock, sdfd, lock_fd, (where, name, ino), lock_at=lock_at, dir_locked=shared
    )
    _ready(ready_fd, fields[4])
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
    return base == name[:-5] + ".new" and (prefix == directory or (alias and _p._PROC_ALIAS))


def _our_lock(fd: int, stem: str, dfd: int) -> bool:
    import fcntl

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


# --------------------------------------------------------------------------- entry points
# What dockpoint._posix._Backend calls.

adopt = _adopt
inspect = _inspect


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
            import fcntl

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


def holds(stem: str, pid: int) -> bool:
    uid = os.geteuid()
    lock_path = _directory(check=False, uid=uid) + "/" + stem + ".lock"
    try:
        st, recorded, _ = _lock_record(lock_path, uid)
    except OSError:
        return False
    if st is None or recorded != pid:
        return False
    by_fd = _fd_holds(pid, st)
    if by_fd is not None:
        return by_fd
    held, owner = _flock_owner(st)
    if held is None:
        return _pid_alive(pid)
    return held and owner == pid
