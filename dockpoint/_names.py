"""The pure rules: which names are allowed, what a timeout or an ``info`` text may be,
where an endpoint lives, and the text of a lock file and of a hand-over. No I/O (the
hand-over is read from the environment), and nothing from the rest of the package."""

from __future__ import annotations

import os

#: Characters allowed in ``app_name`` and ``instance``; the first must not be ``.`` or ``-``.
NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
#: Longest allowed ``app_name`` or ``instance``.
MAX_NAME_LENGTH = 64
#: Longest ``info=`` text :func:`dockpoint.claim` publishes, in characters.
MAX_INFO_LENGTH = 200
#: The environment variable naming an endpoint handed over by ``connect_or_spawn``.
HANDOVER = "DOCKPOINT_HANDOVER"


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
#: a client that connects again skips the checks (3.12: 0.48 -> 0.11 us a connect, whose
#: connect+close costs about 6 us of CPU).
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


def pipe_name(user_sid: str, stem: str) -> str:
    """The Windows named pipe for ``stem``, scoped to the user ``user_sid``."""
    return f"\\\\.\\pipe\\dockpoint-{user_sid}-{stem}"


def lock_text(pid: int, info: str | None) -> bytes:
    """A lock file's content: the holder's pid (line 1), then its ``info`` (line 2)."""
    return f"{pid}\n{info}\n".encode() if info else f"{pid}\n".encode()


def lock_record(data: bytes) -> tuple[int | None, str | None]:
    """The holder's pid and ``info`` in a lock file's content (see :func:`lock_text`);
    ``None`` for what is not there (an emptied file, a file with only the pid)."""
    lines = data.decode("utf-8", "replace").split("\n")
    first = lines[0].strip()
    pid = int(first) if first.isascii() and first.isdigit() and 0 < int(first) < 1 << 31 else None
    info = lines[1].rstrip("\r") if len(lines) > 1 else ""
    return pid, info or None


def handover_text(stem: str, handles: tuple[int, ...], stderr: str) -> str:
    """The hand-over variable's value: ``<stem>:<socket>:<lock>:<ready>:<stderr>``, the
    descriptors (POSIX) or handles (Windows) the daemon inherits (docs/protocol.md)."""
    return ":".join((stem, *map(str, handles), stderr))


def take_handover(stem: str) -> tuple[int, int, int, str] | None:
    """The socket, lock and readiness descriptors and the stderr token that the
    environment hands over for ``stem`` (see :func:`handover_text`), or ``None``. The
    variable is removed once it names ``stem``, so the daemon's children never inherit it."""
    text = os.environ.get(HANDOVER)
    if not text or text.partition(":")[0] != stem:
        return None
    del os.environ[HANDOVER]
    fields = text.split(":")
    if len(fields) != 5 or not all(f.isdigit() for f in fields[1:4]):
        return None
    return int(fields[1]), int(fields[2]), int(fields[3]), fields[4]
