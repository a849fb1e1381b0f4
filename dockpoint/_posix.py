"""POSIX backend: a Unix-domain stream socket guarded by an ``flock``-ed sidecar file.

The lock file decides who holds the claim; the socket is only where clients meet the
holder. Only the lock holder binds, renames or unlinks the socket path.

This module is what a client needs: where the endpoint is, ``connect`` and the
connection's streams. Claiming, listening, self-repair, hand-over and probing are in
:mod:`dockpoint._posix_claim`, loaded by the first call that needs them: a frontend that
finds its daemon running never loads it.
"""

from __future__ import annotations

# The C module under the socket module: ``socket.py`` imports enum, selectors and more,
# most of what ``import dockpoint`` would cost a frontend; dockpoint needs none of it.
import _socket as socket
import errno
import os
import sys
from stat import S_ISDIR, S_ISLNK
from time import monotonic

from ._common import (
    Api,
    DockpointClosedError,
    posix_directory,
    socket_filename,
)

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from ._posix_claim import _Listener

_LINUX = sys.platform.startswith("linux")
_DARWIN = sys.platform == "darwin"
#: Longest socket path ``bind``/``connect`` accept (``sun_path`` less its NUL).
SUN_PATH_MAX = 107 if _LINUX else 103
#: Whether ``/proc/self/fd/<n>`` gives a short alias of an open directory (Linux).
_PROC_ALIAS = _LINUX
#: Whether a probe binds its socket to an abstract name (Linux) rather than a path.
_ABSTRACT = _LINUX
_BACKLOG = max(socket.SOMAXCONN, 4096)  # the kernel caps it at its own maximum
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at the lock path must not hang open().
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_POLLIN = 1  # select.POLLIN on every POSIX; select is imported only by a wait
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, not SIGPIPE (macOS: SO_NOSIGPIPE)
_SO_NOSIGPIPE = 0x1022 if _DARWIN else 0
# What a connect attempt raises when nobody is listening (socket.timeout and BlockingIOError:
# a timed connect met a full backlog; the caller's retry loop tries again).
_NOBODY = (FileNotFoundError, BlockingIOError, socket.timeout)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: The longest single wait (poll, connect): longer timeouts are made of such slices.
_SLICE = 3600.0
#: How often a waiting accept() checks that its socket and lock files are still its own.
CHECK_INTERVAL = 0.5
#: Counts forks; a channel made before the last fork holds the parent's bookkeeping.
_FORKS = [0]
_LOCK_SH, _LOCK_EX, _LOCK_NB, _LOCK_UN = 1, 2, 4, 8  # flock(2): the same on every POSIX
_SIGTERM = 15  # signal.SIGTERM on every POSIX (signal.py imports enum)


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


# --------------------------------------------------------------------------- directory


def _unsafe(path: str, st: os.stat_result, uid: int, label: str = "") -> PermissionError | None:
    mode = st.st_mode
    if S_ISLNK(mode):
        why = "it is a symbolic link"
    elif not S_ISDIR(mode):
        why = "it is not a directory"
    elif st.st_uid != uid:
        why = f"it is owned by uid {st.st_uid}, not by uid {uid}"
    elif mode & 0o077:
        why = f"its mode {mode & 0o7777:04o} lets group or others in (must be 0700)"
    else:
        return None
    return PermissionError(errno.EACCES, f"unsafe directory for dockpoint{label}: {why}", path)


#: A directory passes _unsafe() when these bits of its mode are exactly S_IFDIR (a
#: directory, so not a symbolic link, and nothing for group or others) and it is ours.
_KIND_AND_OPEN, _S_IFDIR = 0o170077, 0o040000


def _checked_lstat(path: str, uid: int) -> os.stat_result:
    st = os.lstat(path)
    bad = _unsafe(path, st, uid)
    if bad is not None:
        raise bad
    return st


def _directory(check: bool, uid: int) -> str:
    """The endpoint directory; with ``check``, its parent is verified (not created)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and xdg[0] == "/":
        if check:
            _check_runtime_dir(xdg, uid)
        return posix_directory(xdg, uid, None)
    return _fallback(uid)


def _check_runtime_dir(xdg: str, uid: int) -> None:
    """Verify ``$XDG_RUNTIME_DIR``; the errors name the variable."""
    try:
        st = os.lstat(xdg)
    except (FileNotFoundError, NotADirectoryError):  # also: below a file
        raise FileNotFoundError(
            errno.ENOENT,
            "XDG_RUNTIME_DIR names a directory that does not exist "
            "(create it with mode 0700, or unset XDG_RUNTIME_DIR)",
            xdg,
        ) from None
    bad = _unsafe(xdg, st, uid, " in XDG_RUNTIME_DIR")
    if bad is not None:
        raise bad


def _fallback(uid: int) -> str:
    """The directory used without ``XDG_RUNTIME_DIR``: ``/run/user/<uid>/dockpoint`` when
    that is the user's own, else ``/tmp/dockpoint-<uid>``."""
    run_user = f"/run/user/{uid}"
    try:
        st = os.lstat(run_user)
    except OSError:
        run_user = ""
    else:
        if _unsafe(run_user, st, uid) is not None:
            run_user = ""  # not the user's own: use the /tmp fallback
    return posix_directory(None, uid, run_user or None)


def _place(directory: str, stem: str, uid: int) -> tuple[str, str]:
    """The directory and file name of the socket of ``stem`` whose lock file lives in
    ``directory``.

    Normally ``directory`` itself (the name hashed when it would not fit ``sun_path``).
    Where even the hashed name does not fit and the OS has no ``/proc/self/fd`` alias
    (macOS, BSD), the socket moves to the short per-user ``/tmp/dockpoint-<uid>`` under a
    name hashed from the directory and stem, computed alike by daemon and client; the lock
    file, which decides the claim, stays in ``directory``.
    """
    name = socket_filename(directory, stem, SUN_PATH_MAX)
    if _PROC_ALIAS or len(os.fsencode(directory)) + 1 + len(name) <= SUN_PATH_MAX:
        return directory, name
    import hashlib

    key = os.fsencode(directory) + b"\0" + stem.encode()
    return posix_directory(None, uid, None), "~" + hashlib.sha256(key).hexdigest()[:24] + ".sock"


def _bind_directory(directory: str, name: str, dfd: int | None) -> str:
    """A directory prefix under which ``name`` fits in ``sun_path``."""
    path = directory + "/" + name
    size = len(os.fsencode(path))
    if size <= SUN_PATH_MAX:
        return directory
    if _PROC_ALIAS and dfd is not None:
        return f"/proc/self/fd/{dfd}"  # short alias of the same, already checked, directory
    raise ValueError(
        f"socket path {path!r} is {size} bytes; this OS allows at most {SUN_PATH_MAX} "
        "(sun_path): set XDG_RUNTIME_DIR to a shorter directory"
    )


def _needs_dirfd(directory: str, name: str) -> bool:
    return _PROC_ALIAS and len(os.fsencode(directory)) + 1 + len(name) > SUN_PATH_MAX


#: What ``dial`` computed from (XDG_RUNTIME_DIR, uid, stem, SUN_PATH_MAX, _PROC_ALIAS): a
#: pure function of the key, cached (bounded) so a connect only checks, never recomputes.
_SPOTS: dict[tuple[str | bytes, int, str, int, bool], tuple[str, str, str, str, bool]] = {}
_MAX_SPOTS = 64


def _spot(directory: str, stem: str, uid: int) -> tuple[str, str, str, str, bool]:
    """The endpoint directory, the socket's directory and name, its path, and whether
    that path is short enough to connect to as it is."""
    where, name = _place(directory, stem, uid)
    target = where + "/" + name
    return directory, where, name, target, len(target) <= SUN_PATH_MAX and target.isascii()


# --------------------------------------------------------------------------- identity


def _ints(raw: bytes, count: int) -> list[int]:
    if len(raw) < 4 * count:
        raise OSError(errno.EPROTO, "the kernel gave short peer credentials")
    return [int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, 4 * count, 4)]


if _LINUX:
    _SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)

    _LITTLE = sys.byteorder == "little"

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        # struct ucred {pid, uid, gid} (3 x 32 bits), the creds of the peer's connect/listen;
        # on every connection, so decoded with one int.from_bytes.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, 12)
        if len(raw) != 12:
            raise OSError(errno.EPROTO, "the kernel gave short peer credentials")
        if _LITTLE:
            creds = int.from_bytes(raw, "little")
            return creds & 0xFFFFFFFF, creds >> 32 & 0xFFFFFFFF
        creds = int.from_bytes(raw, "big")
        return creds >> 64, creds >> 32 & 0xFFFFFFFF

elif _DARWIN or sys.platform.startswith(("freebsd", "dragonfly")):

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        # getsockopt(SOL_LOCAL=0, LOCAL_PEERCRED=1): struct xucred {u_int cr_version (0);
        # uid_t cr_uid; ...}; macOS adds LOCAL_PEERPID=2.
        version, uid = _ints(sock.getsockopt(0, 1, 128), 2)
        if version != 0:
            raise OSError(errno.EPROTO, f"unknown xucred version {version}")
        pid = _ints(sock.getsockopt(0, 2, 4), 1)[0] if _DARWIN else None
        return pid, uid

elif sys.platform.startswith("openbsd"):

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        uid, _, pid = _ints(sock.getsockopt(socket.SOL_SOCKET, 0x1022, 12), 3)
        return pid, uid  # SO_PEERCRED: struct sockpeercred {uid, gid, pid}

elif sys.platform.startswith("netbsd"):

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        pid, uid, _ = _ints(sock.getsockopt(0, 3, 12), 3)
        return pid, uid  # LOCAL_PEEREID=3: struct unpcbid {pid, euid, egid}

else:

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        raise OSError(errno.ENOTSUP, f"dockpoint cannot check peer credentials on {sys.platform}")


# --------------------------------------------------------------------------- streams


def _closed_meanwhile() -> DockpointClosedError:
    return DockpointClosedError(errno.EBADF, "DockpointConnection was closed while in use")


class _Channel:
    # close() from another thread must end a recv/send blocked in the kernel, and must
    # not free the descriptor under it (a reused number would be read by the old call).
    # So each call registers in _busy (list appends are atomic); close() marks the
    # channel shut, shuts the socket down if a call is in flight (that wakes it, and the
    # peer sees end of stream) and the last call to leave closes the descriptor.
    __slots__ = ("_busy", "_gen", "_shut", "_sock", "peer_pid")

    def __init__(self, sock: socket.socket, peer_pid: int | None) -> None:
        self._sock = sock
        self.peer_pid = peer_pid
        self._busy: list[None] = []
        self._shut = False
        self._gen = _FORKS[0]

    def recv(self, max_bytes: int, timeout: float | None) -> bytes:
        busy = self._busy
        busy.append(None)
        try:
            if self._shut:
                raise _closed_meanwhile()
            if timeout is None:
                data = self._sock.recv(max_bytes)
            else:
                data = self._timed_recv(max_bytes, timeout)
        except ConnectionResetError:  # the peer closed with our data unread: end of stream
            data = b""
        except OSError:
            if self._shut:
                raise _closed_meanwhile() from None
            raise
        finally:
            busy.pop()
            if self._shut:
                self._finish()
        if self._shut:
            raise _closed_meanwhile()
        return data

    def _timed_recv(self, max_bytes: int, timeout: float) -> bytes:
        sock = self._sock
        deadline = monotonic() + timeout
        import select  # here: a client that never waits with a timeout does not load it

        poller = select.poll()
        poller.register(sock, _POLLIN)
        while True:
            if poller.poll(_ms(deadline - monotonic())):
                try:  # another thread may have taken the data since the poll: poll again
                    return sock.recv(max_bytes, _DONTWAIT)
                except BlockingIOError:
                    continue
            if monotonic() >= deadline:
                raise TimeoutError(f"nothing to read within {timeout} s")

    def send(self, data: bytes | memoryview) -> None:
        busy = self._busy
        busy.append(None)
        try:
            if self._shut:
                raise _closed_meanwhile()
            self._sock.sendall(data, _NOSIGNAL)  # a gone peer: BrokenPipeError, not SIGPIPE
        except OSError:
            if self._shut:
                raise _closed_meanwhile() from None
            raise
        finally:
            busy.pop()
            if self._shut:
                self._finish()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._gen != _FORKS[0]:  # a forked copy: the parent's calls are not ours
            self._busy.clear()
        self._shut = True
        if self._busy:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the calls in flight
            except OSError:
                pass
        self._finish()

    def _finish(self) -> None:
        if not self._busy:
            self._sock.close()  # idempotent: the socket object forgets its descriptor


def _ms(seconds: float) -> int:
    """A poll timeout: rounded up (a short wait is not a busy loop), at most a slice."""
    if seconds >= _SLICE:
        return int(_SLICE * 1000)
    return int(-(-seconds * 1000 // 1)) if seconds > 0 else 0


def _holder_alive(directory: str, stem: str) -> bool:
    """Whether the pid the claim holder wrote into the lock file is a live process."""
    try:
        fd = os.open(directory + "/" + stem + ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        text = os.read(fd, 32)
    finally:
        os.close(fd)
    try:
        pid = int(text.partition(b"\n")[0])  # line 1; line 2 is the holder's info
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's pid: the kernel recycled it, or a foreign daemon
    return True


# --------------------------------------------------------------------------- backend


class _Backend:
    # The claim side lives in _posix_claim, imported on first use (see the module docstring).

    @staticmethod
    def adopt(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
        from . import _posix_claim

        return _posix_claim.adopt(stem, info)

    @staticmethod
    def locate(stem: str) -> str:
        uid = os.geteuid()
        return "/".join(_place(_directory(check=False, uid=uid), stem, uid))

    @staticmethod
    def listen(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
        from . import _posix_claim

        return _posix_claim.listen(stem, info)

    @staticmethod
    def inspect(stem: str, timeout: float | None) -> tuple[str, str, int | None, str | None, str]:
        from . import _posix_claim

        return _posix_claim.inspect(stem, timeout)

    @staticmethod
    def holds(stem: str, pid: int) -> bool:
        from . import _posix_claim

        return _posix_claim.holds(stem, pid)

    @staticmethod
    def ask_to_exit(pid: int) -> None:
        os.kill(pid, _SIGTERM)

    @staticmethod
    def dial(stem: str, timeout: float | None) -> _Channel | None:
        uid = os.geteuid()
        environ = os.environ
        # os.environ's own dict (bytes on POSIX, kept current by os.environ[...] = ...):
        # read without the Mapping's encode/decode calls.
        data = getattr(environ, "_data", None)
        xdg: str | bytes | None
        if type(data) is dict:
            xdg = data.get(b"XDG_RUNTIME_DIR")
            absolute = xdg is not None and xdg[:1] == b"/"
        else:  # pragma: no cover - os.environ replaced by something else
            xdg = environ.get("XDG_RUNTIME_DIR")
            absolute = xdg is not None and xdg[:1] == "/"
        if absolute:  # where the endpoint is follows from the key alone
            assert xdg is not None
            key = (xdg, uid, stem, SUN_PATH_MAX, _PROC_ALIAS)
            spot = _SPOTS.get(key)
            if spot is None:
                spot = _spot(posix_directory(os.fsdecode(xdg), uid, None), stem, uid)
                if len(_SPOTS) < _MAX_SPOTS:
                    _SPOTS[key] = spot
        else:  # the fallback depends on /run/user/<uid>, looked at each time
            spot = _spot(_fallback(uid), stem, uid)
        directory, where, name, target, short = spot
        # One lstat: the endpoint directory's (see the README's security model); the peer's
        # uid, checked below, proves the daemon is this user's.
        try:
            st = os.lstat(directory)
            if st.st_mode & _KIND_AND_OPEN != _S_IFDIR or st.st_uid != uid:  # as _unsafe()
                st = _checked_lstat(directory, uid)  # raises, naming what is wrong
            if where != directory:  # the socket lives in the short fallback directory
                st = _checked_lstat(where, uid)
        except (FileNotFoundError, NotADirectoryError):
            # No runtime dir (logged out), no endpoint dir yet, or a runtime dir that is a
            # file: an unsafe runtime dir is reported as such (naming the variable).
            try:
                _directory(check=True, uid=uid)
            except FileNotFoundError:
                pass
            return None
        dfd = None
        if not short and _needs_dirfd(where, name):
            dfd = os.open(where, _DIR_FLAGS)
        try:
            if dfd is not None:
                fst = os.fstat(dfd)
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                    raise PermissionError(
                        errno.EACCES, "unsafe directory for dockpoint: it changed", where
                    )
            if not short:
                target = _bind_directory(where, name, dfd) + "/" + name
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                timed = timeout is not None or socket.getdefaulttimeout() is not None
                if timed:  # one slice at most: Api.connect's loop tries again
                    sock.settimeout(None if timeout is None else min(timeout, _SLICE))
                try:
                    sock.connect(target)
                except ConnectionRefusedError:
                    sock.close()
                    if not _LINUX and _holder_alive(directory, stem):
                        # macOS/BSD refuse when the backlog is full: busy, not absent
                        raise BlockingIOError(errno.EAGAIN, "the daemon is busy", target) from None
                    return None
                except BlockingIOError:  # a timed connect (Linux) met a full backlog: busy
                    sock.close()
                    raise BlockingIOError(errno.EAGAIN, "the daemon is busy", target) from None
                except _NOBODY:
                    sock.close()
                    return None
                if timed:
                    sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout() says
                if _SO_NOSIGPIPE:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_NOSIGPIPE, 1)
                pid, peer_uid = _peer(sock)
                if peer_uid != uid:
                    raise PermissionError(
                        errno.EACCES,
                        f"the endpoint is served by uid {peer_uid}, not by this user (uid {uid})",
                        where + "/" + name,
                    )
            except BaseException:
                sock.close()
                raise
            return _Channel(sock, pid)
        finally:
            if dfd is not None:
                os.close(dfd)


api = Api(_Backend())
