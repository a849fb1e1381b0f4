"""``python -m dockpoint``: an echo daemon, a frontend that starts it on demand, a
status report that shows the state of any app's endpoint, and a way to stop its holder.

``serve`` and ``send`` are the whole auto-spawning client-daemon pattern built only on
the public API; ``status`` (a printer of :func:`dockpoint.probe`) and ``stop`` (of
:func:`dockpoint.stop`) are what a user runs when their own daemon misbehaves. Here too:
the command-line parser, the help texts and :func:`main`.
"""

from __future__ import annotations

# The C module, not signal.py (which imports enum): signal.py adds 8-10 ms to every
# ``python -m dockpoint`` (3.12, -X importtime, 3 runs), of a cold send of about 60 ms.
import _signal as signal  # type: ignore[import-not-found]
import os
import sys
from time import monotonic

import dockpoint

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only
    from collections.abc import Sequence
    from types import FrameType
    from typing import Any, NoReturn, TextIO

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


#: What a daemon that ``send`` starts runs: ``serve`` without runpy (the frontend waits for
#: the daemon's start-up). The arguments are ``serve APP INSTANCE IDLE``.
DAEMON_CODE = "import sys;from dockpoint.__main__ import daemon;sys.exit(daemon(sys.argv[1:]))"


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
    stem = _stem(app, instance)
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


# --------------------------------------------------------------------------- status, stop

#: ``status``'s exit status for each :attr:`dockpoint.Probe.state`.
STATUS_CODES = {
    "listening": EXIT_OK,
    "busy": EXIT_NOBODY,
    "absent": EXIT_NOBODY,
    "stale": EXIT_NOBODY,
    "missing-socket": EXIT_NOBODY,
    "elsewhere": EXIT_NOBODY,
    "unsafe": EXIT_ERROR,
    "foreign": EXIT_ERROR,
    "blocked": EXIT_ERROR,
}


def status(app: str, instance: str, timeout: float) -> int:
    """Print what :func:`dockpoint.probe` found; return the exit status."""
    found = dockpoint.probe(app, instance, timeout=timeout)
    report = [("endpoint", _stem(app, instance)), ("state", found.state)]
    report.append(("address", found.address))
    if found.pid is not None:
        report.append(("pid", str(found.pid)))
    if found.info is not None:
        report.append(("info", found.info))
    report.append(("reason", found.reason))
    width = max(len(key) for key, _ in report)
    for key, value in report:
        _say(sys.stdout, f"{key.ljust(width)}  {value}")
    code = STATUS_CODES[found.state]
    if code == EXIT_ERROR:
        _log(f"error: {found.reason}")
    return code


def stop(app: str, instance: str, timeout: float) -> int:
    """Ask the holder of ``(app, instance)`` to exit; say what happened."""
    stem = _stem(app, instance)
    try:
        pid = dockpoint.stop(app, instance, timeout=timeout)
    except TimeoutError as exc:
        _log(f"error: {exc}")
        return EXIT_STUCK
    if pid is None:
        found = dockpoint.probe(app, instance, timeout=0)
        _say(sys.stdout, f"dockpoint: nothing to stop for {stem} ({found.state}): {found.reason}")
        return EXIT_NOBODY
    _say(sys.stdout, f"dockpoint: stopped {stem} (pid {pid} released the claim and exited)")
    return EXIT_OK


# --------------------------------------------------------------------------- the command line

PROG = "python -m dockpoint"

#: Each command's positional arguments and options: option -> the argument it sets, and
#: each argument's default. An option whose default is a bool is a flag (it negates it);
#: ``timeout`` and ``idle`` take seconds, ``instance`` a name.
COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, str], dict[str, Any]]] = {
    "serve": (("APP",), {"--idle": "idle"}, {"idle": None}),
    "send": (
        ("APP", "MESSAGE"),
        {
            "--timeout": "timeout",
            "--idle": "idle",
            "--no-spawn": "spawn",
            "-v": "verbose",
            "--verbose": "verbose",
        },
        {
            "timeout": DEFAULT_SEND_TIMEOUT,
            "idle": DEFAULT_SPAWN_IDLE,
            "spawn": True,
            "verbose": False,
        },
    ),
    "status": (("APP",), {"--timeout": "timeout"}, {"timeout": DEFAULT_STATUS_TIMEOUT}),
    "stop": (("APP",), {"--timeout": "timeout"}, {"timeout": DEFAULT_STOP_TIMEOUT}),
}

PROTOCOL = """\
protocol: a client sends one line (bytes ending in a newline); the daemon answers
with its own process id, a space and the same line, then closes the connection.
Example: request b'hello\\n', reply b'4242 hello\\n'."""

FAILED = "  2  usage error, or a problem to fix first (a bad name, an unsafe directory, ...)"

COMMON_OPTIONS = """\
  APP                  the app name (letters, digits, _ . -)
  -i, --instance NAME  which endpoint of APP (default: default)
  -h, --help           show this help and exit"""

HELP = {
    None: f"""\
usage: {PROG} [-h] [--version] COMMAND ...

Try out and inspect dockpoint endpoints: an echo daemon, a frontend that starts it
when nobody is there, and a status report for any app's endpoint.

commands:
  serve    run an echo daemon for APP (exits quietly if one is already running)
  send     send MESSAGE to APP's daemon, starting the daemon if nobody is there
  status   show where APP's endpoint lives and whether a daemon answers
  stop     ask the process holding APP's endpoint to exit, and wait until it has

options:
  -h, --help  show this help and exit
  --version   show dockpoint's version and exit

'{PROG} COMMAND --help' shows a command's options.

examples:
  {PROG} send demo hello    # the first call starts a daemon
  {PROG} send demo again    # later calls reuse it
  {PROG} status demo        # where it lives, who holds it
  {PROG} stop demo          # ask the daemon to exit

exit status:
  0  success (for status: a daemon answered)
  1  no daemon answered (for stop: nothing to stop)
{FAILED}
  3  stop: the holder did not let go within --timeout""",
    "serve": f"""\
usage: {PROG} serve [-h] [-i NAME] [--idle SECONDS] APP

Claim APP's endpoint and answer every client, one at a time. Once it accepts clients
it prints 'dockpoint: serving APP@NAME at ADDRESS (pid N)'. If another process holds
the claim it exits 0 at once and prints nothing. SIGTERM, SIGINT and SIGHUP release
the endpoint and exit.

{PROTOCOL}

arguments:
{COMMON_OPTIONS}
  --idle SECONDS       exit after SECONDS without a client
                       (default: serve until stopped)

exit status:
  0  stopped (idle, or by a signal), or another process already serves APP
{FAILED}""",
    "send": f"""\
usage: {PROG} send [-h] [-i NAME] [--timeout SECONDS] [--idle SECONDS]
                               [--no-spawn] [-v] APP MESSAGE

Connect to APP's daemon and print its reply. When nobody is there, claim APP's
endpoint, start the echo daemon ('{PROG} serve APP') detached from this
terminal with the endpoint handed over to it, and talk to it
(dockpoint.connect_or_spawn). Any number of concurrent 'send's start one daemon and
all talk to it. A daemon that fails at start is reported with its exit status and
error output; one that has not started when --timeout runs out is stopped.

{PROTOCOL}

arguments:
{COMMON_OPTIONS}
  MESSAGE              one line of text to send (to begin it with '-': -- MESSAGE)
  --timeout SECONDS    give up after SECONDS without an answer (default: {DEFAULT_SEND_TIMEOUT:g})
  --idle SECONDS       a daemon this command starts exits after SECONDS without a client
                       (default: {DEFAULT_SPAWN_IDLE:g})
  --no-spawn           never start a daemon; exit 1 if nobody is there
  -v, --verbose        report on stderr what happens (daemon started, its pid, retries)

exit status:
  0  the reply was printed
  1  no daemon answered within --timeout (with --no-spawn: nobody is there)
{FAILED}""",
    "status": f"""\
usage: {PROG} status [-h] [-i NAME] [--timeout SECONDS] APP

Print what dockpoint.probe() finds: the endpoint's state, its address, the holder's pid
and info when known, and one sentence on what to do. Never takes the claim. A daemon
never sees the check: it is not handed a connection its peer left without a byte.

arguments:
{COMMON_OPTIONS}
  --timeout SECONDS    how long a claimed endpoint may take to answer the check
                       (default: {DEFAULT_STATUS_TIMEOUT:g})

exit status:
  0  a daemon answered (state: listening)
  1  no daemon answered here (busy, absent, stale, missing-socket, elsewhere)
  2  a problem to fix first (unsafe, foreign, blocked; a bad name;
     XDG_RUNTIME_DIR missing, not a directory or unsafe)

states:
  listening       a daemon of this user accepted a connection
  busy            the holder is alive but did not accept within --timeout
  absent          nobody holds the claim, nothing is left behind
  stale           files left by a holder that is gone (the next claim replaces them)
  missing-socket  the claim is held but the socket is gone or replaced: restart it
  elsewhere       nothing here, but a daemon answers where XDG_RUNTIME_DIR set/unset
                  would put it: run daemon and clients with the same environment
  unsafe          a directory or file fails the checks (owner, mode, symlink)
  foreign         another user serves the endpoint
  blocked         something that is not a socket sits at the socket path""",
    "stop": f"""\
usage: {PROG} stop [-h] [-i NAME] [--timeout SECONDS] APP

Built on dockpoint.stop(): checks that the pid recorded in the lock file still holds
the claim, asks it to exit, and waits up to --timeout for the claim to be released.
On POSIX it is sent SIGTERM: any daemon that closes its endpoint on SIGTERM (as
'serve' does), or dies of it, stops this way. On Windows it is ended
(TerminateProcess).

arguments:
{COMMON_OPTIONS}
  --timeout SECONDS    how long to wait for the holder to let go (default: {DEFAULT_STOP_TIMEOUT:g})

exit status:
  0  the holder released the claim and exited
  1  nobody holds the claim here (nothing was sent)
  2  a problem to fix first (a bad name, an unsafe directory, another user's endpoint)
  3  the holder still holds the claim after --timeout""",
}


class _Exit(Exception):
    """Parsing ends here: print ``text`` (to stdout for ``code`` 0, else stderr), exit."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _usage_error(command: str | None, message: str) -> NoReturn:
    usage = HELP[command].split("\n\n", 1)[0]
    where = PROG if command is None else f"{PROG} {command}"
    raise _Exit(EXIT_ERROR, f"{usage}\n{where}: error: {message}")


def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The command in ``argv`` and its arguments (``app``, ``instance``, and the
    command's own), with the names checked.

    :raises _Exit: for ``--help``, ``--version`` and every usage error.
    """
    if argv[:1] in (["-h"], ["--help"]):
        raise _Exit(EXIT_OK, HELP[None])
    if argv[:1] == ["--version"]:
        raise _Exit(EXIT_OK, f"dockpoint {dockpoint.__version__}")
    if not argv or argv[0][:1] == "-":
        what = "unknown option " + argv[0] if argv else "COMMAND is required"
        _usage_error(None, f"{what} (choose from {', '.join(COMMANDS)})")
    command = argv[0]
    if command not in COMMANDS:
        _usage_error(None, f"invalid choice: {command!r} (choose from {', '.join(COMMANDS)})")
    names, options, defaults = COMMANDS[command]
    args: dict[str, Any] = {"instance": "default", **defaults}
    positional: list[str] = []
    rest = iter(argv[1:])
    for arg in rest:
        option, equals, value = arg.partition("=") if arg[:2] == "--" else (arg, "", "")
        if arg == "--":
            positional.extend(rest)
        elif arg in ("-h", "--help"):
            raise _Exit(EXIT_OK, HELP[command])
        elif arg[:1] != "-" or arg == "-":
            positional.append(arg)
        elif option in ("-i", "--instance") or options.get(option) in ("timeout", "idle"):
            if not equals:
                value = next(rest, None)  # type: ignore[assignment]
                if value is None:
                    _usage_error(command, f"{option} needs a value")
            dest = options.get(option, "instance")
            if dest == "instance":
                args[dest] = value
            else:
                args[dest] = _seconds(command, option, value)
        elif option in options and not equals:
            args[options[option]] = not defaults[options[option]]
        else:
            _usage_error(command, f"unrecognized option: {arg}")
    if len(positional) < len(names):
        missing = " ".join(names[len(positional) :])
        _usage_error(command, f"the following arguments are required: {missing}")
    if len(positional) > len(names):
        _usage_error(command, f"unrecognized arguments: {' '.join(positional[len(names) :])}")
    args["app"] = positional[0]
    try:
        dockpoint.address(args["app"], args["instance"])  # checks the names
    except (TypeError, ValueError) as exc:
        _usage_error(command, str(exc))
    if command == "send":
        args["message"] = os.fsencode(positional[1])
        if b"\n" in args["message"] or b"\r" in args["message"]:
            _usage_error(command, "MESSAGE must be a single line (no line breaks)")
    return command, args


def _seconds(command: str, option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        _usage_error(command, f"{option}: not a number of seconds: {text!r}")
    if not 0.0 <= value < float("inf"):  # also NaN
        _usage_error(command, f"{option}: must be a finite number of seconds >= 0: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m dockpoint`` with ``argv`` (default: the command line)."""
    try:
        command, args = parse(sys.argv[1:] if argv is None else argv)
    except _Exit as done:
        _say(sys.stdout if done.code == EXIT_OK else sys.stderr, done.text)
        return done.code
    try:
        if command == "serve":
            return serve(args["app"], args["instance"], args["idle"])
        if command == "send":
            return send(**args)
        run = stop if command == "stop" else status
        return run(args["app"], args["instance"], args["timeout"])
    except KeyboardInterrupt:
        return 130
    except (UserError, OSError, ValueError) as exc:
        # OSError: an unsafe directory, a file in the way, no permission, ...
        # ValueError: a valid name whose path is too long for this OS.
        _log(f"error: {_describe(exc)}")
        return EXIT_ERROR


if __name__ == "__main__":
    _code = main()
    if sys.flags.dev_mode:  # let -X dev see what a normal exit reports
        sys.exit(_code)
    # Nothing is left to clean up (the daemon, if one was started, is detached): skip the
    # interpreter's teardown once the output is out.
    for _stream in (sys.stdout, sys.stderr):
        try:
            if _stream is not None:
                _stream.flush()
        except (OSError, ValueError):
            _code = _code or EXIT_ERROR
    os._exit(_code)
