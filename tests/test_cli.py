"""``python -m dockpoint`` end to end: the auto-spawn pattern under a spawn storm, restart
after a crash, a client burst, ``status`` in each state, and the error paths.

Real processes and sockets only. Every test runs in its own ``XDG_RUNTIME_DIR`` (a private
0700 directory) with its own app name, bounds every wait, and kills every daemon it caused
to be started (their pids come back in the replies and in ``send -v``'s report).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from time import monotonic, sleep
from typing import TYPE_CHECKING

import pytest
from conftest import LINUX, child_env, simulating_macos_paths

import dockpoint
from dockpoint.__main__ import DEFAULT_SPAWN_IDLE, DEFAULT_STOP_TIMEOUT, main, parse
from dockpoint._names import endpoint_stem

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

POSIX = sys.platform != "win32"
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # SIGTERM is TerminateProcess on Windows
#: Bound for one CLI call; a hung call fails the test instead of hanging it.
CLI_TIMEOUT = 20.0
#: A reply from the echo daemon: its pid, a space, the message.
REPLY = re.compile(rb"(\d+) (.*)\n")
SPAWNED = re.compile(rb"started one \(pid (\d+)\)")

EXIT_NOBODY_CODE = 1
posix_only = pytest.mark.skipif(not POSIX, reason="POSIX endpoint files (socket, lock file)")


# --------------------------------------------------------------------------- processes

if sys.platform == "win32":
    import ctypes
    from ctypes import wintypes

    _k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    _k32.OpenProcess.restype = wintypes.HANDLE
    _k32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    _k32.WaitForSingleObject.restype = wintypes.DWORD
    _k32.CloseHandle.argtypes = [wintypes.HANDLE]
    _k32.CloseHandle.restype = wintypes.BOOL
    _SYNCHRONIZE = 0x00100000

    def wait_gone(pid: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s for process ``pid`` to end; ``True`` if it has."""
        handle = _k32.OpenProcess(_SYNCHRONIZE, False, pid)
        if not handle:
            return True  # no such process
        try:
            return _k32.WaitForSingleObject(handle, int(timeout * 1000)) == 0
        finally:
            _k32.CloseHandle(handle)

    def pid_alive(pid: int) -> bool:
        return not wait_gone(pid, 0)

else:
    import select

    def pid_alive(pid: int) -> bool:
        """Whether ``pid`` runs (a zombie does not: nobody reaps orphans in some containers)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return True
        return state not in (b"Z", b"X")

    def wait_gone(pid: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s for process ``pid`` to end; ``True`` if it has."""
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return True
            except OSError:  # an old kernel: poll below
                pass
            else:
                try:
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)  # readable once the process has ended
                    return bool(poller.poll(int(timeout * 1000)))
                finally:
                    os.close(fd)
        deadline = monotonic() + timeout
        while pid_alive(pid):
            if monotonic() >= deadline:
                return False
            sleep(0.01)
        return True


def daemon_processes(app: str, *, serving: bool = True) -> set[int]:
    """Pids of running ``dockpoint serve`` processes for ``app`` (Linux: from /proc); with
    ``serving=False``, of every process with ``app`` (unique to a test) in its command line."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (b"serve" in argv or not serving) and app.encode() in argv and pid_alive(int(entry)):
            found.add(int(entry))
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, KILL)
    except OSError:  # already gone
        pass


class Daemons:
    """The daemons a test caused to be started; all are killed when the test ends."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.pids: set[int] = set()

    def add(self, pid: int) -> int:
        self.pids.add(pid)
        return pid

    def kill_all(self) -> None:
        pids = set(self.pids)
        if LINUX:
            # The processes that still run with this test's app name: no pid-reuse accident,
            # and none that the test did not hear about.
            pids = daemon_processes(self.app, serving=False)
        for pid in pids:
            kill(pid)
        until = monotonic() + 10
        lingering = [pid for pid in pids if not wait_gone(pid, max(0.0, until - monotonic()))]
        assert not lingering, f"daemons {lingering} survived SIGKILL"


@pytest.fixture
def env(runtime: Path) -> dict[str, str]:
    """The environment of every subprocess: this test's runtime directory, and the
    ``dockpoint`` under test importable from anywhere."""
    return child_env(XDG_RUNTIME_DIR=str(runtime))


@pytest.fixture
def daemons(app: str) -> Iterator[Daemons]:
    tracker = Daemons(app)
    yield tracker
    tracker.kill_all()


def cli(
    env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT, python: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m dockpoint ARGS`` the way a user's script would: output captured.

    A daemon that kept the captured pipes open would make this hang: the timeout fails it.
    """
    return subprocess.run(
        [sys.executable, *python, "-m", "dockpoint", *args],
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def reply_pid(out: bytes, message: str) -> int:
    match = REPLY.fullmatch(out)
    assert match, f"not an echo reply: {out!r}"
    assert match.group(2) == message.encode()
    return int(match.group(1))


def assert_clean_error(result: subprocess.CompletedProcess[bytes], *needles: str) -> None:
    assert result.returncode == 2, result
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    for needle in needles:
        assert needle.encode() in result.stderr, result.stderr.decode()


class Reader:
    """Collects a pipe's output on a thread; ``wait_line`` is a bounded readline."""

    def __init__(self, stream: object) -> None:
        self.data = bytearray()
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        read = stream.read1  # type: ignore[attr-defined]
        while True:
            chunk = read(65536)
            with self._cond:
                if not chunk:
                    self.eof = True
                else:
                    self.data += chunk
                self._cond.notify_all()
            if not chunk:
                return

    def wait_line(self, timeout: float) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: b"\n" in self.data or self.eof, timeout)
            return bytes(self.data.partition(b"\n")[0]).rstrip(b"\r")  # \r: Windows text mode

    def wait_eof(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Server:
    """``python -m dockpoint serve`` run in the foreground, ready once it says so."""

    def __init__(self, env: dict[str, str], app: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockpoint", "serve", app, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = Reader(self.proc.stdout)
        self.err = Reader(self.proc.stderr)

    def wait_ready(self) -> None:
        line = self.out.wait_line(CLI_TIMEOUT)
        assert line.startswith(b"dockpoint: serving "), (line, bytes(self.err.data))
        assert b"(pid %d)" % self.proc.pid in line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(CLI_TIMEOUT)
        self.out.wait_eof(CLI_TIMEOUT)
        self.err.wait_eof(CLI_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


class EndpointFiles:
    """Where the files of ``app``'s default endpoint are (POSIX).

    The lock file is in the endpoint directory, ``$XDG_RUNTIME_DIR/dockpoint`` (private
    to the test); the socket is at :func:`dockpoint.address`: the same directory, except
    where its path does not fit ``sun_path`` on an OS without ``/proc/self/fd`` (macOS,
    ``--simulate-macos-paths``). There the socket is in the short per-user fallback
    directory, which every such endpoint shares, under a hashed name.
    """

    def __init__(self, app: str) -> None:
        self.directory = Path(os.environ["XDG_RUNTIME_DIR"]) / "dockpoint"
        self.lock = self.directory / (endpoint_stem(app, "default") + ".lock")
        self.socket = Path(dockpoint.address(app))
        if simulating_macos_paths():  # the runtime dir is too long for sun_path
            assert self.socket.parent == Path(f"/tmp/dockpoint-{os.geteuid()}"), self.socket
            assert re.fullmatch(r"~[0-9a-f]{24}\.sock", self.socket.name), self.socket
        else:
            assert self.socket.parent == self.directory, self.socket
        #: Where the socket is set up before it is renamed into place.
        self.temp = self.socket.with_suffix(".new")

    def present(self) -> list[Path]:
        """This endpoint's files: everything in the endpoint directory, and in a shared
        socket directory the entries named after this endpoint's socket."""
        found = set(self.directory.iterdir())
        if self.socket.parent != self.directory:
            prefix = self.socket.stem + "."
            found.update(p for p in self.socket.parent.iterdir() if p.name.startswith(prefix))
        return sorted(found)


# --------------------------------------------------------------------------- storm

#: ``python -m dockpoint ARGS`` held at a gate: everything is imported first, then it waits
#: for end of file on standard input. Every frontend of a storm waits there, and one close
#: of the pipe's write end releases them all at the same moment.
GATE = """\
import subprocess, sys
from dockpoint.__main__ import main
sys.stderr.write("at-gate\\n")
sys.stderr.flush()
sys.stdin.buffer.read()
sys.exit(main(sys.argv[1:]))
"""


class Frontend:
    """One ``send`` of a storm, held at the gate until released."""

    def __init__(self, env: dict[str, str], gate: int, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GATE, *args],
            env=env,
            stdin=gate,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = Reader(self.proc.stdout)
        self.err = Reader(self.proc.stderr)

    def finish(self, deadline: float) -> int:
        code = self.proc.wait(max(0.1, deadline - monotonic()))
        for reader in (self.out, self.err):
            assert reader.wait_eof(max(0.1, deadline - monotonic())), (
                "a frontend's output pipe stayed open after it exited: the daemon inherited it"
            )
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(CLI_TIMEOUT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


FRONTENDS = 30
ROUNDS = 4


def storm(env: dict[str, str], app: str, daemons: Daemons, number: int) -> tuple[int, str]:
    """One storm: FRONTENDS ``send``s released at once against no daemon.

    Returns the pid of the one daemon that served every frontend, and the round's
    numbers (daemons started, wall times) as a line for the report.
    """
    gate_r, gate_w = os.pipe()
    frontends: list[Frontend] = []
    launch = monotonic()
    try:
        for i in range(FRONTENDS):
            args = ["send", app, f"r{number}-m{i}", "-v", "--timeout", "30", "--idle", "120"]
            frontends.append(Frontend(env, gate_r, args))
        os.close(gate_r)
        gate_r = -1
        for f in frontends:
            assert f.err.wait_line(CLI_TIMEOUT) == b"at-gate", bytes(f.err.data)
        start = monotonic()
        os.close(gate_w)  # every frontend's standard input reaches end of file: go
        gate_w = -1
        deadline = start + 45
        codes = [f.finish(deadline) for f in frontends]
        wall = monotonic() - start
    finally:
        for fd in (gate_r, gate_w):
            if fd >= 0:
                os.close(fd)
        for f in frontends:
            f.close()
    spawned = set()
    for f in frontends:
        spawned.update(int(pid) for pid in SPAWNED.findall(bytes(f.err.data)))
    for pid in spawned:
        daemons.add(pid)
    for i, (f, code) in enumerate(zip(frontends, codes)):
        assert code == 0, (i, bytes(f.err.data))
    pids = {reply_pid(bytes(f.out.data), f"r{number}-m{i}") for i, f in enumerate(frontends)}
    assert len(pids) == 1, f"replies came from several daemons: {sorted(pids)}"
    (winner,) = pids
    assert winner in spawned, (winner, spawned)
    if POSIX:  # the endpoint is handed to the one daemon started (no hand-over on Windows yet)
        assert spawned == {winner}, f"{len(spawned)} daemons started: {sorted(spawned)}"
    losers = spawned - {winner}
    until = monotonic() + 15
    lingering = [pid for pid in losers if not wait_gone(pid, max(0.0, until - monotonic()))]
    assert not lingering, f"losing daemons {lingering} did not exit"
    assert pid_alive(winner)
    if LINUX:
        assert daemon_processes(app) == {winner}
    if POSIX:
        files = EndpointFiles(app)
        assert files.present() == sorted([files.lock, files.socket])
    return winner, (
        f"storm round {number}: {FRONTENDS} frontends at the gate in {start - launch:.2f} s; "
        f"released, all answered by daemon {winner} in {wall:.2f} s; {len(spawned)} daemons "
        f"started, 1 remained (losers gone {monotonic() - start - wall:.2f} s later)"
    )


def test_spawn_storm(env: dict[str, str], app: str, daemons: Daemons) -> None:
    """FRONTENDS ``send``s at the same moment, several times: all get a reply from one
    daemon, exactly one daemon remains, and the losers leave no files behind. Rounds
    start from a cleanly stopped daemon (SIGTERM) and from a crashed one (SIGKILL)."""
    for number in range(ROUNDS):
        winner, report = storm(env, app, daemons, number)
        print(report)
        how = signal.SIGTERM if number % 2 == 0 else KILL
        os.kill(winner, how)
        assert wait_gone(winner, CLI_TIMEOUT)
        if POSIX and how == signal.SIGTERM:  # a clean stop removes the socket
            files = EndpointFiles(app)
            assert files.present() == [files.lock]


def test_restart_after_sigkill(env: dict[str, str], app: str, daemons: Daemons) -> None:
    first = cli(env, "send", app, "one", "-v")
    assert first.returncode == 0, first.stderr
    pid1 = daemons.add(reply_pid(first.stdout, "one"))
    assert SPAWNED.findall(first.stderr) == [b"%d" % pid1]

    again = cli(env, "send", app, "two", "-v")
    assert again.returncode == 0, again.stderr
    assert reply_pid(again.stdout, "two") == pid1
    assert not SPAWNED.search(again.stderr), "a second daemon was started"

    os.kill(pid1, KILL)
    assert wait_gone(pid1, CLI_TIMEOUT)

    after = cli(env, "send", app, "three", "-v")
    assert after.returncode == 0, after.stderr
    pid2 = daemons.add(reply_pid(after.stdout, "three"))
    assert pid2 != pid1
    assert SPAWNED.findall(after.stderr) == [b"%d" % pid2]

    reuse = cli(env, "send", app, "four")
    assert reuse.returncode == 0, reuse.stderr
    assert reply_pid(reuse.stdout, "four") == pid2


def test_send_leaves_no_resource_warning(env: dict[str, str], app: str, daemons: Daemons) -> None:
    """The frontend lets go of the daemon it started without a "still running" warning."""
    result = cli(env, "send", app, "hi", python=["-X", "dev", "-W", "error"])
    assert result.returncode == 0, result.stderr
    daemons.add(reply_pid(result.stdout, "hi"))
    assert result.stderr == b""


#: The echo daemon's own code path (claim, signal handlers, an idle accept) and a quick
#: ``send``, in one process: what each of them loads.
CLI_MODULES = """
import sys
before = set(sys.modules)  # what start-up loaded (a site-packages .pth may load enum)
from dockpoint.__main__ import daemon, main
app = sys.argv[1]
served = daemon(["serve", app, "default", "0.05"])  # claims, sets handlers, idles out
sent = main(["send", app, "hi", "--no-spawn"])  # nobody there now: exit status 1
heavy = {"signal", "enum", "warnings", "argparse", "subprocess"}
print(served, sent, " ".join(sorted(heavy & (set(sys.modules) - before))) or "none")
"""


def test_serve_and_send_load_no_enum_nor_argparse(env: dict[str, str], app: str) -> None:
    """The daemon ``send`` starts sets its handlers through ``_signal`` (``signal.py``
    loads enum between adopting the endpoint and accepting) and claims without
    ``warnings.py``; a well-formed ``send`` is parsed without argparse."""
    quiet = {k: v for k, v in env.items() if k not in ("PYTHONWARNINGS", "PYTHONDEVMODE")}
    done = subprocess.run(
        [sys.executable, "-c", CLI_MODULES, app],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=quiet,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split() == ["0", "1", "none"], done.stdout


# --------------------------------------------------------------------------- burst

BURST = 500
#: How long the daemon waits for all BURST clients to queue before it starts accepting. A
#: Windows pipe has no backlog: its clients wait in WaitNamedPipeW until the daemon accepts.
QUEUE_WAIT = 30.0 if POSIX else 0.0

#: A daemon that accepts nobody until the test says "go" (by then all BURST clients are
#: queued in the backlog), then serves them one at a time.
SLOW_DAEMON = """\
import sys
import dockpoint

app, count = sys.argv[1], int(sys.argv[2])
dp = dockpoint.claim(app)
if dp is None:
    sys.exit("claim failed")
with dp:
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(count):
        with dp.accept(timeout=60) as conn:
            data = b""
            while not data.endswith(b"\\n"):
                chunk = conn.read(timeout=60)
                if not chunk:
                    break
                data += chunk
            conn.write(b"ok " + data)
"""


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for BURST sockets in this process."""
    try:
        import resource
    except ImportError:  # Windows: no descriptor limit of this kind
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = BURST + 200
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def read_reply(conn: dockpoint.DockpointConnection, timeout: float) -> bytes:
    deadline = monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.read(timeout=max(0.0, deadline - monotonic()))
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.usefixtures("many_files")
def test_burst_against_slow_daemon(env: dict[str, str], app: str, daemons: Daemons) -> None:
    """BURST clients connect at once to a daemon that is not accepting yet; every one
    gets a connection (never ``None``, never a refusal) and, once it accepts, a reply."""
    daemon = subprocess.Popen(
        [sys.executable, "-c", SLOW_DAEMON, app, str(BURST)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    daemons.add(daemon.pid)
    out, err = Reader(daemon.stdout), Reader(daemon.stderr)
    results: list[object] = [None] * BURST
    barrier = threading.Barrier(BURST + 1)
    cond = threading.Condition()
    tried = [0]

    def client(i: int) -> None:
        try:
            barrier.wait(CLI_TIMEOUT)
            try:
                conn = dockpoint.connect(app)  # one attempt: a queued client is never None
                if conn is not None:
                    conn.write(b"c%d\n" % i)
            finally:
                with cond:
                    tried[0] += 1
                    cond.notify_all()
            if conn is None:
                results[i] = "connect() returned None"
                return
            with conn:
                results[i] = read_reply(conn, 60)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(BURST)]
    try:
        assert out.wait_line(CLI_TIMEOUT) == b"ready", bytes(err.data)
        for t in threads:
            t.start()
        start = monotonic()
        barrier.wait(CLI_TIMEOUT)
        with cond:  # every client has connected (or failed) while the daemon waits
            cond.wait_for(lambda: tried[0] == BURST, QUEUE_WAIT)
            queued = tried[0]
        connect_time = monotonic() - start
        assert daemon.stdin is not None
        daemon.stdin.write(b"go\n")
        daemon.stdin.flush()
        deadline = monotonic() + 60
        for t in threads:
            t.join(max(0.1, deadline - monotonic()))
        assert not any(t.is_alive() for t in threads), "clients still waiting for replies"
        serve_time = monotonic() - start - connect_time
        assert daemon.wait(CLI_TIMEOUT) == 0, bytes(err.data)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(CLI_TIMEOUT)
        for stream in (daemon.stdin, daemon.stdout, daemon.stderr):
            if stream is not None:
                stream.close()
    bad = {i: r for i, r in enumerate(results) if r != b"ok c%d\n" % i}
    assert not bad, f"{len(bad)} of {BURST} clients not served, e.g. {list(bad.items())[:3]}"
    print(
        f"burst: {BURST} clients, {queued} queued before the first accept in "
        f"{connect_time:.2f} s, all served in {serve_time:.2f} s"
    )


# --------------------------------------------------------------------------- status


def status_fields(result: subprocess.CompletedProcess[bytes]) -> dict[str, str]:
    """``status``'s "key  value" lines as a dict."""
    fields = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    return fields


def test_status_nothing(env: dict[str, str], app: str, runtime: Path) -> None:
    result = cli(env, "status", app)
    assert result.returncode == 1, result
    fields = status_fields(result)
    assert fields["state"] == "absent", fields
    assert fields["address"] == dockpoint.address(app)
    assert "start the daemon" in fields["reason"]
    assert result.stderr == b""
    assert os.listdir(runtime) == [], "status created files"


def test_status_live_daemon(env: dict[str, str], app: str, servers: list[Server]) -> None:
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    result = cli(env, "status", app)
    assert result.returncode == 0, result
    pid = server.proc.pid
    fields = status_fields(result)
    assert (fields["state"], fields["pid"]) == ("listening", str(pid)), fields
    assert result.stderr == b""
    # The probe (connect, then close without a word) leaves the daemon serving.
    reply = cli(env, "send", app, "still there", "--no-spawn")
    assert reply.returncode == 0, reply.stderr
    assert reply_pid(reply.stdout, "still there") == pid


@posix_only
def test_status_after_clean_stop(env: dict[str, str], app: str, servers: list[Server]) -> None:
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(CLI_TIMEOUT) == 0
    result = cli(env, "status", app)
    assert result.returncode == 1, result
    assert status_fields(result)["state"] == "absent"
    files = EndpointFiles(app)
    assert files.present() == [files.lock]
    assert files.lock.read_bytes() == b""


@posix_only
def test_status_stale(env: dict[str, str], app: str, servers: list[Server]) -> None:
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    server.proc.kill()
    server.proc.wait(CLI_TIMEOUT)
    files = EndpointFiles(app)
    files.temp.write_bytes(b"")  # as left by a daemon killed half-way through its claim
    lock_before = files.lock.read_bytes()
    assert lock_before == b"%d\n" % server.proc.pid

    result = cli(env, "status", app)
    assert result.returncode == 1, result
    fields = status_fields(result)
    assert (fields["state"], fields["pid"]) == ("stale", str(server.proc.pid)), fields
    assert f"pid {server.proc.pid}) that is gone" in fields["reason"]
    assert fields["address"] == dockpoint.address(app)
    # status looks without touching: the next claim still finds the same state.
    assert files.lock.read_bytes() == lock_before
    assert files.present() == sorted([files.lock, files.socket, files.temp])


def make_unsafe(runtime: Path, how: str) -> Path:
    """Make the endpoint directory unsafe in the way ``how``; returns its path."""
    directory = runtime / "dockpoint"
    if how == "mode":
        directory.mkdir()
        os.chmod(directory, 0o755)
    elif how == "symlink":
        target = runtime / "elsewhere"
        target.mkdir(mode=0o700)
        directory.symlink_to(target)
    else:
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)
    return directory


UNSAFE = [
    "mode",
    "symlink",
    pytest.param(
        "owner",
        marks=pytest.mark.skipif(
            not POSIX or os.geteuid() != 0, reason="needs root to give a directory away"
        ),
    ),
]


@posix_only
@pytest.mark.parametrize("how", UNSAFE)
def test_status_unsafe_directory(env: dict[str, str], app: str, runtime: Path, how: str) -> None:
    directory = make_unsafe(runtime, how)
    result = cli(env, "status", app)
    assert_clean_error(result, "unsafe directory", str(directory))
    assert status_fields(result)["state"] == "unsafe"


@posix_only
@pytest.mark.parametrize("how", UNSAFE)
def test_send_and_serve_refuse_unsafe_directory(
    env: dict[str, str], app: str, runtime: Path, how: str
) -> None:
    directory = make_unsafe(runtime, how)
    before = sorted(os.listdir(runtime))
    for args in (["send", app, "hello"], ["serve", app]):
        result = cli(env, *args)
        assert_clean_error(result, "unsafe directory", str(directory))
        assert result.stdout == b""
    assert sorted(os.listdir(runtime)) == before
    assert os.listdir(directory) == []
    if LINUX:
        assert daemon_processes(app) == set()


@posix_only
def test_status_unsafe_runtime_dir(env: dict[str, str], app: str, runtime: Path) -> None:
    os.chmod(runtime, 0o755)
    result = cli(env, "status", app)
    assert_clean_error(result, "unsafe directory", str(runtime))


@posix_only
@pytest.mark.parametrize("how", ["missing", "file", "below-a-file", "unsafe"])
def test_broken_runtime_dir_is_named(
    env: dict[str, str], app: str, runtime: Path, how: str
) -> None:
    """serve, send, status and stop say in one line what is wrong with XDG_RUNTIME_DIR,
    naming the variable and the directory; exit 2; nothing is created, nothing started."""
    target = runtime / "xdg"
    if how in ("file", "below-a-file"):
        target.write_text("")
    elif how == "unsafe":
        target.mkdir(mode=0o755)
        os.chmod(target, 0o755)
    if how == "below-a-file":
        target = target / "sub"
    env = dict(env, XDG_RUNTIME_DIR=str(target))
    want = {
        "missing": "does not exist",
        "file": "not a directory",
        "below-a-file": "does not exist",
        "unsafe": "mode 0755",
    }[how]
    for args in (["serve", app], ["send", app, "hi"], ["status", app], ["stop", app]):
        result = cli(env, *args)
        assert_clean_error(result, "XDG_RUNTIME_DIR", want, str(target))
        assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
    assert sorted(os.listdir(runtime)) == (["xdg"] if how != "missing" else [])
    if LINUX:
        assert daemon_processes(app, serving=False) == set()


# --------------------------------------------------------------------------- stop


@posix_only
def test_stop_a_serving_daemon(env: dict[str, str], app: str, servers: list[Server]) -> None:
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    result = cli(env, "stop", app)
    assert result.returncode == 0, result
    assert b"stopped %s (pid %d " % (endpoint_stem(app, "default").encode(), server.proc.pid) in (
        result.stdout
    )
    assert server.proc.wait(CLI_TIMEOUT) == 0  # SIGTERM: serve released and exited cleanly
    assert server.out.wait_eof(CLI_TIMEOUT)
    assert b"dockpoint: stopped" in server.out.data
    assert dockpoint.probe(app).state == "absent"
    again = cli(env, "stop", app)
    assert again.returncode == 1, again
    assert b"nothing to stop" in again.stdout


def test_stop_on_every_os(env: dict[str, str], app: str, servers: list[Server]) -> None:
    """POSIX: SIGTERM, and serve exits cleanly; Windows: TerminateProcess. Either way the
    endpoint is free afterwards and a second stop finds nothing."""
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    result = cli(env, "stop", app)
    assert result.returncode == 0, result
    assert b"pid %d released the claim" % server.proc.pid in result.stdout
    server.proc.wait(CLI_TIMEOUT)
    # TerminateProcess gives the daemon no chance to empty its lock file: the pid stays
    # recorded, unheld ("stale"); the POSIX daemon exits cleanly ("absent").
    want = "stale" if sys.platform == "win32" else "absent"
    assert dockpoint.probe(app).state == want
    freed = dockpoint.claim(app)  # either way the endpoint is free
    assert freed is not None
    freed.close()
    again = cli(env, "stop", app)
    assert again.returncode == 1, again
    assert b"nothing to stop" in again.stdout


def test_stop_a_detached_daemon_that_send_started(
    env: dict[str, str], app: str, daemons: Daemons
) -> None:
    """The README demo's ending: ``stop`` ends the detached daemon ``send`` started (POSIX:
    SIGTERM; Windows: TerminateProcess), and the endpoint is free afterwards."""
    sent = cli(env, "send", app, "hello")
    assert sent.returncode == 0, sent
    pid = daemons.add(reply_pid(sent.stdout, "hello"))
    result = cli(env, "stop", app)
    assert result.returncode == 0, result
    assert b"pid %d released the claim and exited" % pid in result.stdout, result.stdout
    assert wait_gone(pid, CLI_TIMEOUT), "the daemon still runs after stop"
    freed = dockpoint.claim(app)
    assert freed is not None
    freed.close()


@pytest.mark.parametrize("flag", ["-i", "--instance"])
def test_stop_instance(env: dict[str, str], app: str, servers: list[Server], flag: str) -> None:
    """``stop --instance`` stops the holder of that instance, only that one."""
    default, second = Server(env, app), Server(env, app, "--instance", "second")
    servers.extend((default, second))
    default.wait_ready()
    second.wait_ready()
    result = cli(env, "stop", app, flag, "second")
    assert result.returncode == 0, result
    assert b"stopped %s@second (pid %d " % (app.encode(), second.proc.pid) in result.stdout
    second.proc.wait(CLI_TIMEOUT)
    assert default.proc.poll() is None
    conn = dockpoint.connect(app)
    assert conn is not None and conn.peer_pid == default.proc.pid
    conn.close()
    again = cli(env, "stop", app, flag, "second")
    assert again.returncode == 1, again


STUBBORN = """
import dockpoint, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
dp = dockpoint.claim(sys.argv[1])
print("claimed", flush=True)
sys.stdin.readline()
"""


@posix_only
def test_stop_a_holder_that_ignores_sigterm(env: dict[str, str], app: str) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, app],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"claimed\n"
        result = cli(env, "stop", app, "--timeout", "0.3")
        assert result.returncode == 3, result
        assert b"still holds" in result.stderr and b"Traceback" not in result.stderr
        assert holder.poll() is None
        assert dockpoint.claim(app) is None  # still held
    finally:
        holder.kill()
        holder.wait(CLI_TIMEOUT)
        for stream in (holder.stdin, holder.stdout):
            if stream is not None:
                stream.close()


@posix_only
def test_stop_never_signals_a_pid_that_does_not_hold_the_claim(
    env: dict[str, str], app: str
) -> None:
    """A lock file naming a live process that has the lock file open but does not hold
    the lock (and no socket to ask who serves): nothing is sent to it or to the holder."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c", STUBBORN.replace("signal.SIG_IGN", "signal.SIG_DFL"), app],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started.append(holder)
        assert holder.stdout is not None and holder.stdout.readline() == b"claimed\n"
        files = EndpointFiles(app)
        opener = "import sys; f = open(sys.argv[1]); print('open', flush=True); sys.stdin.read()"
        bystander = subprocess.Popen(
            [sys.executable, "-c", opener, str(files.lock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started.append(bystander)
        assert bystander.stdout is not None and bystander.stdout.readline() == b"open\n"
        files.lock.write_bytes(b"%d\n" % bystander.pid)
        files.socket.unlink()  # no peer to ask who serves
        result = cli(env, "stop", app, "--timeout", "1")
        assert result.returncode == 1, result
        assert bystander.poll() is None and holder.poll() is None
    finally:
        for proc in started:
            proc.kill()
            proc.wait(CLI_TIMEOUT)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


# --------------------------------------------------------------------------- detached


@pytest.mark.skipif(not LINUX, reason="reads /proc/<pid>/fd: Linux-only")
def test_spawned_daemon_is_detached(env: dict[str, str], app: str, daemons: Daemons) -> None:
    """The daemon ``send`` starts has its own session and process group, its standard
    streams on the null device (not the frontend's stdin pipe or captured output), and
    none of the frontend's inheritable descriptors (one low, one high: a descriptor the
    daemon's own set-up reuses would hide a leak)."""
    import fcntl

    read_end, write_end = os.pipe()  # inheritable descriptors of the frontend
    high = fcntl.fcntl(write_end, fcntl.F_DUPFD, 200)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dockpoint", "send", app, "hi"],
            env=env,
            input=b"",  # the frontend's stdin is a pipe
            capture_output=True,
            timeout=CLI_TIMEOUT,
            pass_fds=(write_end, high),
            check=False,
        )
        assert result.returncode == 0, result
        pid = reply_pid(result.stdout, "hi")
        daemons.add(pid)
        assert os.getsid(pid) == pid, "the daemon is not a session leader"
        assert os.getpgid(pid) == pid, "the daemon is not its own process group leader"
        assert os.getsid(pid) != os.getsid(0)
        ours = f"pipe:[{os.fstat(write_end).st_ino}]"
        links = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
        for fd in (0, 1, 2):
            assert links.get(fd) == os.devnull, (fd, links)
        assert ours not in links.values(), (ours, links)
    finally:
        for fd in (read_end, write_end, high):
            os.close(fd)


# --------------------------------------------------------------------------- serve


def test_serve_exits_quietly_when_claimed(
    env: dict[str, str], app: str, servers: list[Server]
) -> None:
    server = Server(env, app)
    servers.append(server)
    server.wait_ready()
    second = cli(env, "serve", app)
    assert (second.returncode, second.stdout, second.stderr) == (0, b"", b"")
    assert server.proc.poll() is None


def test_serve_idle_exit(env: dict[str, str], app: str, servers: list[Server]) -> None:
    server = Server(env, app, "--idle", "0.3")
    servers.append(server)
    server.wait_ready()
    assert server.proc.wait(CLI_TIMEOUT) == 0
    assert server.out.wait_eof(CLI_TIMEOUT)
    assert b"no client for 0.3 s; stopping" in server.out.data
    result = cli(env, "status", app)
    assert result.returncode == 1, result
    assert b"stale" not in result.stdout  # an idle exit releases cleanly


def test_send_no_spawn(env: dict[str, str], app: str, runtime: Path) -> None:
    result = cli(env, "send", app, "hello", "--no-spawn")
    assert result.returncode == 1, result
    assert b"no daemon is serving" in result.stderr
    assert result.stdout == b""
    assert os.listdir(runtime) == []


# --------------------------------------------------------------------------- help, errors


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``python -m dockpoint ARGS`` in this process: exit status, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, text, err = run_main(capsys, "--help")
    assert (code, err) == (0, "")
    assert text.startswith("usage: python -m dockpoint ")
    for word in ("serve", "send", "status", "stop", "exit status", "send demo hello"):
        assert word in text
    for command in ("serve", "send", "status", "stop"):
        for flag in ("-h", "--help"):
            code, text, err = run_main(capsys, command, "x", flag)
            assert (code, err) == (0, "")
            assert text.startswith(f"usage: python -m dockpoint {command} ")
            assert max(map(len, text.splitlines())) <= 88, text
    served = run_main(capsys, "serve", "--help")[1]
    assert "process id, a space and the same line" in " ".join(served.split())
    assert run_main(capsys, "--version") == (0, f"dockpoint {dockpoint.__version__}\n", "")


def test_help_is_written_by_python_m(env: dict[str, str]) -> None:
    result = cli(env, "send", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(b"usage: python -m dockpoint send ")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "COMMAND is required"),
        (["-x"], "unknown option -x"),
        (["launch", "x"], "invalid choice: 'launch'"),
        (["send", "x"], "required: MESSAGE"),
        (["status"], "required: APP"),
        (["send", "bad/name", "hi"], "app_name 'bad/name' is not allowed"),
        (["status", ".hidden"], "app_name '.hidden' is not allowed"),
        (["serve", "ok", "--instance", ""], "instance must not be empty"),
        (["serve", "ok", "--instance="], "instance must not be empty"),
        (["send", "x" * 65, "hi"], "at most 64"),
        (["send", "ok", "two\nlines"], "single line"),
        (["send", "ok", "hi", "--timeout", "soon"], "--timeout: not a number of seconds"),
        (["serve", "ok", "--idle", "-1"], ">= 0"),
        (["serve", "ok", "--idle=inf"], ">= 0"),
        (["stop", "ok", "--timeout"], "--timeout needs a value"),
        (["status", "ok", "--idle", "1"], "unrecognized option: --idle"),
        (["send", "ok", "hi", "--no-spawn=1"], "unrecognized option: --no-spawn=1"),
        (["send", "ok", "hi", "there"], "unrecognized arguments: there"),
    ],
)
def test_usage_errors(
    capsys: pytest.CaptureFixture[str], runtime: Path, args: list[str], needle: str
) -> None:
    code, out, err = run_main(capsys, *args)
    assert (code, out) == (2, ""), err
    assert err.startswith("usage: python -m dockpoint"), err
    assert needle in err.splitlines()[-1], err
    assert os.listdir(runtime) == [], "a rejected command created files"


def test_parse_takes_what_argparse_took() -> None:
    """Options before, between and after the arguments; ``--opt=value``; ``--`` ends
    the options, so a message may begin with '-'."""
    command, args = parse(["send", "-v", "ok", "--timeout=2.5", "-i", "Two", "--", "-n"])
    assert command == "send"
    assert args == {
        "app": "ok",
        "instance": "Two",
        "message": b"-n",
        "timeout": 2.5,
        "idle": DEFAULT_SPAWN_IDLE,
        "spawn": True,
        "verbose": True,
    }
    assert parse(["send", "ok", "-", "--no-spawn", "--idle", "0"])[1]["message"] == b"-"
    assert parse(["send", "ok", "-", "--no-spawn"])[1]["spawn"] is False
    assert parse(["serve", "ok"]) == ("serve", {"app": "ok", "instance": "default", "idle": None})
    assert parse(["stop", "--instance=x", "ok"])[1] == {
        "app": "ok",
        "instance": "x",
        "timeout": DEFAULT_STOP_TIMEOUT,
    }


# --------------------------------------------------------------------------- send: spawn

#: On PYTHONPATH of the send tests below: makes the daemon ``send`` starts (and only it,
#: the one process with the hand-over variable) fail at start-up.
FAILING_DAEMON = """\
import os, sys
if "DOCKPOINT_HANDOVER" in os.environ:
    sys.stderr.write("daemon-side failure: cannot open the database\\n")
    sys.stderr.flush()
    os._exit(4)
"""


def test_send_reports_the_daemon_error(env: dict[str, str], app: str, tmp_path: Path) -> None:
    """A daemon that fails at start: ``send`` says so at once, with the daemon's exit
    status and its own error line, and leaves the endpoint free."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_DAEMON, encoding="utf-8")
    env = dict(env, PYTHONPATH=str(site) + os.pathsep + env["PYTHONPATH"])
    result = cli(env, "send", app, "hello", "--timeout", "60")
    print(result.stderr.decode())
    assert_clean_error(
        result, "exited with status 4", "daemon-side failure: cannot open the database"
    )
    assert result.stdout == b""
    if LINUX:
        assert daemon_processes(app, serving=False) == set()
    dp = dockpoint.claim(app)
    assert dp is not None, "the failed daemon's claim was not released"
    dp.close()


def test_send_timeout_zero_leaves_no_daemon(env: dict[str, str], app: str) -> None:
    """``send --timeout 0`` gives up at once; the daemon it started for nothing is stopped."""
    result = cli(env, "send", app, "hello", "--timeout", "0", "-v")
    assert result.returncode == EXIT_NOBODY_CODE, result
    (pid,) = (int(p) for p in SPAWNED.findall(result.stderr))
    assert b"no daemon answered" in result.stderr
    assert b"(pid %d) did not adopt its endpoint in time; it was stopped" % pid in result.stderr
    assert b"keeps running" not in result.stderr, result.stderr
    assert wait_gone(pid, CLI_TIMEOUT), "the daemon started for nothing still runs"
    if LINUX:
        assert daemon_processes(app, serving=False) == set()
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


def test_send_verbose_names_the_daemon(env: dict[str, str], app: str, daemons: Daemons) -> None:
    """``send -v``: the pid it started, the connection's peer and the reply agree."""
    result = cli(env, "send", app, "hello", "-v")
    assert result.returncode == 0, result.stderr
    pid = daemons.add(reply_pid(result.stdout, "hello"))
    assert SPAWNED.findall(result.stderr) == [b"%d" % pid]
    assert b"(daemon pid %d)" % pid in result.stderr


@pytest.mark.parametrize("flag", ["-i", "--instance"])
def test_send_instance(env: dict[str, str], app: str, daemons: Daemons, flag: str) -> None:
    """``send`` talks to (and starts) the daemon of the instance it names, only that one."""
    result = cli(env, "send", app, "hello", flag, "second", "--timeout", "20", "-v")
    assert result.returncode == 0, result.stderr
    pid = daemons.add(reply_pid(result.stdout, "hello"))
    conn = dockpoint.connect(app, "second")
    assert conn is not None and conn.peer_pid == pid
    conn.close()
    assert dockpoint.connect(app) is None
