"""The fast half of ``python -m dockpoint``: ``serve`` and ``send`` (what a frontend and the
daemon it starts run), the helpers every command shares, and :func:`main`.

``status``, ``stop`` and the argparse parser with its help texts live in
:mod:`dockpoint._cli_more`, loaded only by a command line the quick ``send`` parser does
not take: a frontend pays for every module it loads, the daemon it starts too.
"""

from __future__ import annotations

import os
import sys
from time import monotonic

import dockpoint

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only
    import argparse
    from collections.abc import Callable, Sequence
    from types import FrameType
    from typing import Any, TextIO

#: Exit statuses (documented in ``--help``).
EXIT_OK = 0
EXIT_NOBODY = 1
EXIT_ERROR = 2
EXIT_STUCK = 3

#: Longest request line the echo daemon reads; a longer one is dropped unanswered.
MAX_LINE = 65536
#: Seconds the echo daemon waits for a client's request line before dropping it.
REQUEST_TIMEOUT = 5.0
#: Default idle time of a daemon that ``send`` starts.
DEFAULT_SPAWN_IDLE = 600.0
#: Default for how long ``send`` keeps trying to get an answer.
DEFAULT_SEND_TIMEOUT = 10.0
#: Default for how long ``status`` waits for a claimed endpoint to accept its probe.
DEFAULT_STATUS_TIMEOUT = 2.0
#: ``send`` asks at most this many times when a daemon closes without answering (it was
#: exiting, idle, just as we came).
MAX_ATTEMPTS = 3
#: Default for how long ``stop`` waits for the holder to release the claim.
DEFAULT_STOP_TIMEOUT = 10.0


class UserError(Exception):
    """A problem the user has to fix; reported on stderr without a traceback."""


# --------------------------------------------------------------------------- helpers


def _say(stream: TextIO | None, text: str) -> None:
    """Write a line to ``stream`` (stdout/stderr), ignoring a closed or missing stream
    (a detached daemon's streams are the null device; under pythonw they are ``None``)."""
    if stream is None:
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def _log(text: str) -> None:
    _say(sys.stderr, "dockpoint: " + text)


def _describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` without the ``[Errno N]`` noise."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None:
            text += f": {exc.filename!r}"
        return text
    return str(exc) or type(exc).__name__


def _parse_seconds(text: str) -> float | None:
    """A finite number of seconds >= 0, or ``None``."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not value >= 0.0 or value == float("inf"):
        return None
    return value


def _read_line(conn: dockpoint.DockpointConnection, deadline: float) -> bytes:
    """Read up to and including a newline, or to end of stream, before ``deadline``.

    :raises TimeoutError: the line did not complete in time.
    """
    data = b""
    while not data.endswith(b"\n") and len(data) < MAX_LINE:
        left = deadline - monotonic()
        if left <= 0:
            raise TimeoutError("no complete line in time")
        chunk = conn.read(MAX_LINE - len(data), timeout=left)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- serve


def serve(app: str, instance: str, idle: float | None) -> int:
    """Run the echo daemon for ``(app, instance)`` until idle, closed or signalled."""
    dp = dockpoint.claim(app, instance)
    if dp is None:
        return EXIT_OK  # another daemon holds the claim: it serves this app's clients
    with dp:
        _stop_on_signals(dp)
        pid = os.getpid()
        prefix = b"%d " % pid
        _say(sys.stdout, f"dockpoint: serving {_stem(app, instance)} at {dp.address} (pid {pid})")
        while True:
            try:
                conn = dp.accept(timeout=idle)
            except TimeoutError:
                _say(sys.stdout, f"dockpoint: no client for {idle:g} s; stopping")
                break
            except dockpoint.DockpointClosedError:
                _say(sys.stdout, "dockpoint: stopped")
                break
            with conn:
                try:
                    line = _read_line(conn, monotonic() + REQUEST_TIMEOUT)
                    if line.endswith(b"\n"):
                        conn.write(prefix + line)
                    elif line and len(line) < MAX_LINE:  # the stream ended without a newline
                        conn.write(prefix + line + b"\n")
                except OSError:  # the client was too slow or went away: drop it
                    pass
    return EXIT_OK


def _stop_on_signals(dp: dockpoint.Dockpoint) -> None:
    """Make SIGTERM, SIGINT, SIGHUP (SIGBREAK on Windows) release the endpoint cleanly."""
    # The C module: signal.py imports enum (and with it functools, collections, ...), which
    # a daemon started by send would load between adopting its endpoint and accepting.
    import _signal as signal  # type: ignore[import-not-found]

    def stop(signum: int, frame: FrameType | None) -> None:
        dp.close()  # wakes accept(), which raises DockpointClosedError

    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK"):
        number = getattr(signal, name, None)
        if number is not None:
            try:
                signal.signal(number, stop)
            except (OSError, ValueError):  # not settable here (not the main thread, ...)
                pass


# --------------------------------------------------------------------------- send


#: What a daemon that ``send`` starts runs: ``serve`` without runpy and argparse (the
#: frontend waits for the daemon's start-up). The arguments are ``serve APP INSTANCE IDLE``.
DAEMON_CODE = "import sys;from dockpoint._cli import daemon;sys.exit(daemon(sys.argv[1:]))"


def daemon_command(app: str, instance: str, idle: float) -> list[str]:
    """The command line of the echo daemon that ``send`` starts for ``(app, instance)``."""
    if not sys.executable:
        raise UserError("cannot start a daemon: the Python executable is unknown")
    return [sys.executable, "-c", DAEMON_CODE, "serve", app, instance, repr(idle)]


def daemon(args: Sequence[str]) -> int:
    """Entry point of :func:`daemon_command`: ``serve APP INSTANCE IDLE``."""
    _, app, instance, idle = args
    return serve(app, instance, float(idle))


def send(
    app: str,
    instance: str,
    message: bytes,
    *,
    timeout: float,
    spawn: bool,
    idle: float,
    verbose: bool,
) -> int:
    """Send ``message`` to the daemon, starting one if nobody is there; print the reply."""
    stem = f"{app}@{instance}".lower()  # how messages name the endpoint
    deadline = monotonic() + timeout
    started: list[int] = []

    def spawned(pid: int) -> None:
        started.append(pid)
        if verbose:
            _log(f"no daemon answered for {stem}; started one (pid {pid})")

    conn: dockpoint.DockpointConnection | None
    for _attempt in range(MAX_ATTEMPTS):
        left = max(0.0, deadline - monotonic())
        if spawn:
            earlier = len(started)
            try:
                conn = dockpoint.connect_or_spawn(
                    app,
                    daemon_command(app, instance, idle),
                    instance,
                    timeout=left,
                    on_spawn=spawned,
                )
            except TimeoutError as exc:
                # A daemon this call started did not adopt (it was stopped) or closed at
                # once: it serves nothing. The message says which.
                del started[earlier:]
                code = _give_up(stem, timeout, "no daemon answered", started)
                _log(str(exc))
                return code
            except dockpoint.SpawnError as exc:
                raise UserError(str(exc)) from None
        else:
            conn = dockpoint.connect(app, instance)
            if conn is None:
                _log(f"no daemon is serving {stem} (not starting one: --no-spawn)")
                return EXIT_NOBODY
        with conn:
            if verbose:
                _log(f"connected to {stem} (daemon pid {conn.peer_pid})")
            try:
                conn.write(message + b"\n")
                reply = _read_line(conn, max(deadline, monotonic() + 0.5))
            except TimeoutError:
                return _give_up(stem, timeout, "the daemon did not answer", started)
            except OSError:  # the daemon went away while we talked to it
                reply = b""
        if reply:
            out = getattr(sys.stdout, "buffer", None)
            if out is not None:
                out.write(reply if reply.endswith(b"\n") else reply + b"\n")
                out.flush()
            return EXIT_OK
        if verbose:
            _log(f"the daemon for {stem} closed without answering; trying again")
        if monotonic() >= deadline:
            break
    return _give_up(stem, timeout, "no daemon answered", started)


def _give_up(stem: str, timeout: float, why: str, started: list[int]) -> int:
    _log(f"{why} for {stem} within {timeout:g} s")
    for pid in started:  # it adopted the endpoint (else it was stopped): it stays
        _log(f"the daemon started for {stem} (pid {pid}) keeps running; it serves later calls")
    return EXIT_NOBODY


def _stem(app: str, instance: str) -> str:
    return f"{app}@{instance}".lower()


def _reporting(command: Callable[[], int]) -> int:
    """Run ``command``; report a problem to fix on stderr in one line, not a traceback."""
    try:
        return command()
    except KeyboardInterrupt:
        return 130
    except (UserError, OSError, ValueError) as exc:
        _log(f"error: {_describe(exc)}")
        return EXIT_ERROR


def _quick_send(argv: Sequence[str]) -> dict[str, Any] | None:
    """The arguments of a well-formed ``send`` command line, parsed without argparse (a
    frontend pays for every import); ``None`` for anything else, which argparse parses
    (and reports errors in) as usual."""
    if not argv or argv[0] != "send":
        return None
    args: dict[str, Any] = {
        "instance": "default",
        "timeout": DEFAULT_SEND_TIMEOUT,
        "idle": DEFAULT_SPAWN_IDLE,
        "spawn": True,
        "verbose": False,
    }
    positional = []
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("-v", "--verbose"):
            args["verbose"] = True
        elif arg == "--no-spawn":
            args["spawn"] = False
        elif arg in ("-i", "--instance"):
            args["instance"] = next(rest, None)
        elif arg in ("--timeout", "--idle"):
            args[arg[2:]] = _parse_seconds(next(rest, "-"))
        elif arg[:1] == "-":
            return None
        else:
            positional.append(arg)
    if len(positional) != 2 or None in args.values():
        return None
    args["app"], text = positional
    try:
        dockpoint.address(args["app"], args["instance"])  # checks the names
    except (TypeError, ValueError):
        return None
    args["message"] = os.fsencode(text)
    if b"\n" in args["message"] or b"\r" in args["message"]:
        return None
    return args


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one per command
    """Run ``python -m dockpoint`` with ``argv`` (default: the command line)."""
    quick = _quick_send(sys.argv[1:] if argv is None else argv)
    if quick is not None:
        return _reporting(lambda: send(**quick))
    from ._cli_more import build_parser, status, stop

    parser = build_parser()
    args = parser.parse_args(argv)
    sub: argparse.ArgumentParser = args.parser
    try:
        dockpoint.address(args.app, args.instance)  # checks the names
    except (TypeError, ValueError) as exc:
        sub.error(str(exc))
    try:
        if args.command == "serve":
            return serve(args.app, args.instance, args.idle)
        if args.command == "send":
            message = os.fsencode(args.message)
            if b"\n" in message or b"\r" in message:
                sub.error("MESSAGE must be a single line (no line breaks)")
            return send(
                args.app,
                args.instance,
                message,
                timeout=args.timeout,
                spawn=args.spawn,
                idle=args.idle,
                verbose=args.verbose,
            )
        if args.command == "stop":
            return stop(args.app, args.instance, args.timeout)
        return status(args.app, args.instance, args.timeout)
    except KeyboardInterrupt:
        return 130
    except (UserError, OSError, ValueError) as exc:
        # OSError: an unsafe directory, a file in the way, no permission, ...
        # ValueError: a valid name whose path is too long for this OS.
        _log(f"error: {_describe(exc)}")
        return EXIT_ERROR
