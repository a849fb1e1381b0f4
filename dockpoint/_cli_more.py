"""The rest of ``python -m dockpoint``: ``status``, ``stop``, and the argparse parser with
its help texts. Loaded only for a command line that :func:`dockpoint._cli.main`'s quick
``send`` parser does not take (``serve``, ``status``, ``stop``, ``--help``, a mistake).
"""

from __future__ import annotations

import sys

import dockpoint

from ._cli import (
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_SPAWN_IDLE,
    DEFAULT_STATUS_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    EXIT_ERROR,
    EXIT_NOBODY,
    EXIT_OK,
    EXIT_STUCK,
    _log,
    _parse_seconds,
    _say,
    _stem,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - names for type hints only
    import argparse

PROG = "python -m dockpoint"

PROTOCOL = (
    "protocol: a client sends one line (bytes ending in a newline); the daemon answers "
    "with its own process id, a space and the same line, then closes the connection. "
    "Example: request b'hello\\n', reply b'4242 hello\\n'."
)

EXIT_CODES = """\
exit status:
  0  success (for status: a daemon answered)
  1  no daemon answered (for stop: nothing to stop)
  2  usage error, or a problem to fix first (a bad name, an unsafe directory, ...)
  3  stop: the holder did not let go within --timeout"""
SERVE_EXIT = """\
exit status:
  0  stopped (idle, or by a signal), or another process already serves APP
  2  usage error, or a problem to fix first (a bad name, an unsafe directory, ...)"""
SEND_EXIT = """\
exit status:
  0  the reply was printed
  1  no daemon answered within --timeout (with --no-spawn: nobody is there)
  2  usage error, or a problem to fix first (a bad name, an unsafe directory, ...)"""
STATUS_EXIT = """\
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
  blocked         something that is not a socket sits at the socket path"""
STOP_EXIT = """\
exit status:
  0  the holder released the claim (it was sent SIGTERM, or on Windows ended,
     and let go in time)
  1  nobody holds the claim here (nothing was sent)
  2  a problem to fix first (a bad name, an unsafe directory, another user's
     endpoint)
  3  the holder still holds the claim after --timeout"""


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


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0."""
    value = _parse_seconds(text)
    if value is None:
        import argparse

        try:
            float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0: {text!r}")
    return value


def _help_formatter() -> type[argparse.HelpFormatter]:
    import argparse

    class _HelpFormatter(argparse.HelpFormatter):
        """Wraps each paragraph of a description on its own; keeps indented blocks (examples,
        tables) as written."""

        def _fill_text(self, text: str, width: int, indent: str) -> str:
            import textwrap

            paragraphs = []
            for paragraph in text.split("\n\n"):
                if "\n " in paragraph:
                    paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
                else:
                    words = " ".join(paragraph.split())
                    paragraphs.append(
                        textwrap.fill(words, width, initial_indent=indent, subsequent_indent=indent)
                    )
            return "\n\n".join(paragraphs)

    return _HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m dockpoint`` argument parser."""
    import argparse

    formatter = _help_formatter()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Try out and inspect dockpoint endpoints: an echo daemon, a frontend that "
            "starts it when nobody is there, and a status report for any app's endpoint."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} send demo hello    # the first call starts a daemon\n"
            f"  {PROG} send demo again    # later calls reuse it\n"
            f"  {PROG} status demo        # where it lives, who holds it\n"
            f"  {PROG} stop demo          # ask the daemon to exit\n\n" + EXIT_CODES
        ),
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"dockpoint {dockpoint.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True

    def command(name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=formatter,
        )
        sub.add_argument("app", metavar="APP", help="the app name (letters, digits, _ . -)")
        sub.add_argument(
            "-i",
            "--instance",
            default="default",
            metavar="NAME",
            help="which endpoint of APP (default: %(default)s)",
        )
        sub.set_defaults(parser=sub)  # for errors found after parsing
        return sub

    serve_cmd = command(
        "serve",
        "run an echo daemon for APP (exits quietly if one is already running)",
        "Claim APP's endpoint and answer every client, one at a time. Once it accepts "
        "clients it prints 'dockpoint: serving APP@NAME at ADDRESS (pid N)'. If another "
        "process holds the claim it exits 0 at once and prints nothing. SIGTERM, SIGINT "
        "and SIGHUP release the endpoint and exit.\n\n" + PROTOCOL,
        SERVE_EXIT,
    )
    serve_cmd.add_argument(
        "--idle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS without a client (default: serve until stopped)",
    )

    send_cmd = command(
        "send",
        "send MESSAGE to APP's daemon, starting the daemon if nobody is there",
        "Connect to APP's daemon and print its reply. When nobody is there, claim APP's "
        f"endpoint, start the echo daemon ('{PROG} serve APP') detached from this "
        "terminal with the endpoint handed over to it, and talk to it "
        "(dockpoint.connect_or_spawn). Any number of concurrent 'send's start one daemon "
        "and all talk to it. A daemon that fails at start is reported with its exit "
        "status and error output; one that has not started when --timeout runs out is "
        "stopped.\n\n" + PROTOCOL,
        SEND_EXIT,
    )
    send_cmd.add_argument("message", metavar="MESSAGE", help="one line of text to send")
    send_cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_SEND_TIMEOUT,
        metavar="SECONDS",
        help="give up after SECONDS without an answer (default: %(default)g)",
    )
    send_cmd.add_argument(
        "--idle",
        type=_seconds,
        default=DEFAULT_SPAWN_IDLE,
        metavar="SECONDS",
        help="a daemon this command starts exits after SECONDS without a client "
        "(default: %(default)g)",
    )
    send_cmd.add_argument(
        "--no-spawn",
        dest="spawn",
        action="store_false",
        help="never start a daemon; exit 1 if nobody is there",
    )
    send_cmd.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report on stderr what happens (daemon started, its pid, retries)",
    )

    status_cmd = command(
        "status",
        "show where APP's endpoint lives and whether a daemon answers",
        "Print what dockpoint.probe() finds: the endpoint's state, its address, the "
        "holder's pid and info when known, and one sentence on what to do. Never takes "
        "the claim and creates nothing. The check connects once and closes without "
        "sending anything.",
        STATUS_EXIT,
    )
    status_cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_STATUS_TIMEOUT,
        metavar="SECONDS",
        help="how long a claimed endpoint may take to accept the check (default: %(default)g)",
    )

    stop_cmd = command(
        "stop",
        "ask the process holding APP's endpoint to exit, and wait until it has",
        "Built on dockpoint.stop(): checks that the pid recorded in the lock file still "
        "holds the claim, sends it SIGTERM, and waits up to --timeout for the claim to "
        "be released. Any daemon that closes its endpoint on SIGTERM (as 'serve' does), "
        "or dies of it, stops this way. On Windows the pipe server's process is ended "
        "(TerminateProcess).",
        STOP_EXIT,
    )
    stop_cmd.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the holder to let go (default: %(default)g)",
    )
    return parser
