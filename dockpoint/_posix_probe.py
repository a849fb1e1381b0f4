"""POSIX: what is at an endpoint, read-only (for :func:`dockpoint.probe` and
:func:`dockpoint.stop`). Nothing here creates a file in the endpoint directory or takes a
lock, so a probe never makes a concurrent claim fail; its one connection attempt comes from
a socket bound to a name the listener recognises and drops (:data:`PROBE_ENDS`).
"""

from __future__ import annotations

import _socket as socket  # not socket.py: see _posix_stream
import errno
import itertools
import os
import sys
from stat import S_ISREG, S_ISSOCK

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from . import _posix_dir as _dir  # noqa: E402
from ._names import lock_record, posix_directory  # noqa: E402
from ._posix_dir import (  # noqa: E402
    DIR_FLAGS,
    LINUX,
    _bind_directory,
    _check_runtime_dir,
    _checked_lstat,
    _directory,
    _needs_dirfd,
    _place,
)
from ._posix_stream import SLICE, _peer  # noqa: E402

_PROBES = itertools.count()


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
    return (st, *lock_record(raw))


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


def _bind_probe(sock: socket.socket, prefix: str, where: str) -> str | None:
    """Bind a probe's client socket to a name the listener recognises: a Linux abstract
    name, elsewhere a short path in the socket's own (checked) directory, which the
    caller unlinks; returns that path."""
    while True:
        name = f"~{os.getpid():x}-{next(_PROBES)}.probe"
        try:
            if _dir.ABSTRACT:
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
        dfd = os.open(where, DIR_FLAGS)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # _socket: no "with"
        bound = None
        try:
            prefix = _bind_directory(where, name, dfd)
            bound = _bind_probe(sock, prefix, where)
            target = prefix + "/" + name
            # A slice at most (settimeout overflows past time_t): the connect of a Unix
            # socket either completes, is refused or (Linux, full backlog) fails at once.
            sock.settimeout(None if timeout is None else min(timeout, SLICE))
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
                    reason = "nobody holds the claim and no daemon has run here: start the daemon"
                    return "absent", address, None, None, reason
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
        reason = (
            f"something that is not a socket is at {address}; no daemon can serve {stem} "
            "until it is removed: move or delete it"
        )
        return "blocked", address, pid, info, reason
    if st is not None:
        knocked, value = _knock(where, name, timeout if held else 0.0)
        if knocked == "ok":
            pid = value if value is not None else pid
            who = f"pid {pid}" if pid is not None else "a process"
            reason = f"a daemon of this user ({who}) accepted a connection at {address}"
            return "listening", address, pid, info, reason
        if knocked == "foreign":
            reason = (
                f"the endpoint {address} is served by uid {value}, not by this user "
                f"(uid {uid}): do not send it anything; find out who runs it"
            )
            return "foreign", address, None, None, reason
        if held and (knocked == "timeout" or not LINUX):  # macOS/BSD: a full backlog refuses
            if timeout is None:
                reason = f"the holder ({who}) is alive but does not accept connections"
            else:
                reason = (
                    f"the holder ({who}) is alive but did not accept a connection within "
                    f"{timeout:g} s: it is busy or stuck; wait, or stop it and start it again"
                )
            return "busy", address, pid, info, reason
    if held:
        reason = (
            f"{who} holds the claim but its socket {address} is gone or replaced (a cleaner "
            "such as systemd-tmpfiles may have deleted it): stop the daemon and start it again"
        )
        return "missing-socket", address, pid, info, reason
    if st is not None or pid is not None or os.path.lexists(where + "/" + name[:-5] + ".new"):
        reason = (
            f"files left by a holder ({who}) that is gone; the next claim replaces them: "
            "start the daemon"
        )
        return "stale", address, pid, info, reason
    reason = "nobody holds the claim and no daemon is serving: start the daemon"
    return "absent", address, None, None, reason


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


def inspect(stem: str, timeout: float | None) -> tuple[str, str, int | None, str | None, str]:
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
            reason = (
                f"nothing at {address} ({setting}), but a daemon of this user"
                f"{'' if pid is None else f' (pid {pid})'} answers at {other}: it was started "
                "with another XDG_RUNTIME_DIR; run daemon and clients with the same environment"
            )
            return "elsewhere", other, pid, info, reason
    return state, address, pid, info, reason


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
