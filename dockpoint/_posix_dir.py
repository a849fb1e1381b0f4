"""POSIX: where a user's endpoints live, and the checks that make the place safe to use.

The directory is ``$XDG_RUNTIME_DIR/dockpoint``, else ``/run/user/<uid>/dockpoint`` when that
is the user's own, else ``/tmp/dockpoint-<uid>``; it must be a real directory of the user,
mode ``0700``. Names in it: ``<stem>.lock`` (the claim), ``<stem>.sock`` (the socket, or a
hashed name when the path would not fit ``sun_path``), ``<stem>.new`` while a claim binds.

``SUN_PATH_MAX``, ``PROC_ALIAS`` and ``ABSTRACT`` are read through this module when used, so
a test can simulate macOS (``tests/simulate``).
"""

from __future__ import annotations

import errno
import os
import sys
from stat import S_ISDIR, S_ISLNK

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from ._names import posix_directory, socket_filename  # noqa: E402

LINUX = sys.platform.startswith("linux")
#: Longest socket path ``bind``/``connect`` accept (``sun_path`` less its NUL).
SUN_PATH_MAX = 107 if LINUX else 103
#: Whether ``/proc/self/fd/<n>`` gives a short alias of an open directory (Linux).
PROC_ALIAS = LINUX
#: Whether a probe binds its socket to an abstract name (Linux) rather than a path.
ABSTRACT = LINUX
#: The ends of the names a probe's socket is bound to: the listener drops such a
#: connection at accept, so a daemon never serves (or writes to) a probe.
PROBE_ENDS = (".probe", b".probe")
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    if PROC_ALIAS or len(os.fsencode(directory)) + 1 + len(name) <= SUN_PATH_MAX:
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
    if PROC_ALIAS and dfd is not None:
        return f"/proc/self/fd/{dfd}"  # short alias of the same, already checked, directory
    raise ValueError(
        f"socket path {path!r} is {size} bytes; this OS allows at most {SUN_PATH_MAX} "
        "(sun_path): set XDG_RUNTIME_DIR to a shorter directory"
    )


def _needs_dirfd(directory: str, name: str) -> bool:
    return PROC_ALIAS and len(os.fsencode(directory)) + 1 + len(name) > SUN_PATH_MAX


#: What ``dial`` computed from (XDG_RUNTIME_DIR, uid, stem, SUN_PATH_MAX, PROC_ALIAS): a
#: pure function of the key, cached (bounded) so a connect only checks, never recomputes
#: (3.12: 0.55 -> 0.06 us a connect, of about 6 us of CPU for connect+close).
_SPOTS: dict[tuple[str | bytes, int, str, int, bool], tuple[str, str, str, str, bool]] = {}
_MAX_SPOTS = 64


def _spot(directory: str, stem: str, uid: int) -> tuple[str, str, str, str, bool]:
    """The endpoint directory, the socket's directory and name, its path, and whether
    that path is short enough to connect to as it is."""
    where, name = _place(directory, stem, uid)
    target = where + "/" + name
    return directory, where, name, target, len(target) <= SUN_PATH_MAX and target.isascii()


def _open_directory(directory: str, uid: int) -> int:
    """Open the checked directory ``directory``, creating it ``0700`` if missing.

    Every step goes through a descriptor of the parent, checked again (unless it is the
    shared ``/tmp``), so the directory made, checked and opened is one and the same.
    """
    parent, _, name = directory.rpartition("/")
    pfd = os.open(parent or "/", DIR_FLAGS)
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
        dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    finally:
        os.close(pfd)
    fst = os.fstat(dfd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_mode & 0o777 != 0o700:
        os.close(dfd)  # swapped under us
        raise PermissionError(errno.EACCES, "unsafe directory for dockpoint: it changed", directory)
    return dfd
