"""POSIX: connecting to an endpoint, and the connected stream on both sides.

A connect checks the endpoint directory (one ``lstat``) and the peer's credentials: the
daemon must be this user's. The stream's ``wake()`` (a ``close()`` from another thread)
ends a ``recv`` or ``send`` blocked in the kernel.
"""

from __future__ import annotations

# The C module, not socket.py (which imports enum, selectors, ...): with socket.py, bench
# row 13 (import dockpoint) is 4.00 x, row 10 (warm send) 1.39 x (3.12, median of 21
# rounds). The other POSIX modules use it too.
import _socket as socket
import errno
import os
import sys
from time import monotonic

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from . import _posix_dir as _dir  # noqa: E402
from ._names import posix_directory  # noqa: E402
from ._posix_dir import (  # noqa: E402
    _KIND_AND_OPEN,
    _MAX_SPOTS,
    _S_IFDIR,
    _SPOTS,
    DIR_FLAGS,
    LINUX,
    _bind_directory,
    _checked_lstat,
    _directory,
    _fallback,
    _needs_dirfd,
    _spot,
)

_DARWIN = sys.platform == "darwin"
POLLIN = 1  # select.POLLIN on every POSIX; select is imported only by a wait
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # EPIPE, not SIGPIPE (macOS: SO_NOSIGPIPE)
SO_NOSIGPIPE = 0x1022 if _DARWIN else 0
# What a connect attempt raises when nobody is listening (socket.timeout and BlockingIOError:
# a timed connect met a full backlog; the caller's retry loop tries again).
_NOBODY = (FileNotFoundError, BlockingIOError, socket.timeout)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: The longest single wait (poll, connect): longer timeouts are made of such slices.
SLICE = 3600.0
# --------------------------------------------------------------------------- identity


def _ints(raw: bytes, count: int) -> list[int]:
    if len(raw) < 4 * count:
        raise OSError(errno.EPROTO, "the kernel gave short peer credentials")
    return [int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, 4 * count, 4)]


if LINUX:
    _SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)

    _LITTLE = sys.byteorder == "little"

    def _peer(sock: socket.socket) -> tuple[int | None, int]:
        # struct ucred {pid, uid, gid} (3 x 32 bits), the creds of the peer's connect/listen;
        # on every connection, so decoded with one int.from_bytes (3.12: 0.19 us, not the
        # 0.72 us of _ints, on each side of a connect that costs about 6 us of CPU).
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


class _Channel:
    # DockpointConnection guards the calls against a close() from another thread: wake()
    # shuts the socket down, which ends a recv/send blocked in the kernel (and the peer
    # sees end of stream); close() comes once no call is in flight.
    __slots__ = ("_sock", "peer_pid", "recv")

    def __init__(self, sock: socket.socket, peer_pid: int | None) -> None:
        self._sock = sock
        self.peer_pid = peer_pid
        self.recv = sock.recv  # the socket's own: no Python frame on the hot path

    def recv_within(self, max_bytes: int, timeout: float) -> bytes:
        sock = self._sock
        deadline = monotonic() + timeout
        import select  # here: a client that never waits with a timeout does not load it

        poller = select.poll()
        poller.register(sock, POLLIN)
        while True:
            if poller.poll(_ms(deadline - monotonic())):
                try:  # another thread may have taken the data since the poll: poll again
                    return sock.recv(max_bytes, _DONTWAIT)
                except BlockingIOError:
                    continue
            if monotonic() >= deadline:
                raise TimeoutError(f"nothing to read within {timeout} s")

    def send(self, data: bytes | memoryview) -> None:
        self._sock.sendall(data, _NOSIGNAL)  # a gone peer: BrokenPipeError, not SIGPIPE

    def wake(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


def _ms(seconds: float) -> int:
    """A poll timeout: rounded up (a short wait is not a busy loop), at most a slice."""
    if seconds >= SLICE:
        return int(SLICE * 1000)
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


def dial(stem: str, timeout: float | None) -> _Channel | None:
    uid = os.geteuid()
    environ = os.environ
    # os.environ's own dict (bytes on POSIX, kept current by os.environ[...] = ...):
    # read without the Mapping's encode/decode calls (3.12: 0.30 -> 0.06 us a connect).
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
        key = (xdg, uid, stem, _dir.SUN_PATH_MAX, _dir.PROC_ALIAS)
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
        dfd = os.open(where, DIR_FLAGS)
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
                sock.settimeout(None if timeout is None else min(timeout, SLICE))
            try:
                sock.connect(target)
            except ConnectionRefusedError:
                sock.close()
                if not LINUX and _holder_alive(directory, stem):
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
            if SO_NOSIGPIPE:
                sock.setsockopt(socket.SOL_SOCKET, SO_NOSIGPIPE, 1)
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
