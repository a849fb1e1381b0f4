"""``connect_or_spawn``: the frontend claims, hands the endpoint to the daemon it starts and
connects; the daemon's ``claim`` adopts it after verifying it.

Real processes only. Daemons are small scripts written per test; each records what it saw
(its pid, the hand-over variable, its descriptors) in its replies. Every wait is bounded;
every daemon a test started is killed at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

import pytest
from conftest import LINUX, child_env, lock_file

import dockpoint

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="the hand-over of a claimed endpoint is POSIX-only so far"
)

HANDOVER = "DOCKPOINT_HANDOVER"
TIMEOUT = 30.0
KILL = getattr(signal, "SIGKILL", 9)

#: A daemon: claims APP, records its pid in PIDFILE, and answers each request line with a
#: JSON report of what it sees, until it has served COUNT clients or is idle for 30 s.
DAEMON = """\
import json, os, sys
import dockpoint

app, pidfile, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = os.environ.get("DOCKPOINT_HANDOVER")
dp = dockpoint.claim(app)
if dp is None:
    sys.exit(0)
with open(pidfile, "a") as f:
    f.write("%d\\n" % os.getpid())
with dp:
    for _ in range(count):
        try:
            conn = dp.accept(timeout=30)
        except TimeoutError:
            break
        with conn:
            data = b""
            while not data.endswith(b"\\n"):
                chunk = conn.read(timeout=10)
                if not chunk:
                    break
                data += chunk
            if data == b"stderr\\n":
                sys.stderr.write("x" * 200000 + "\\n")  # far more than a pipe holds
                sys.stderr.flush()
            proc_fd = "/proc/self/fd"
            fds = sorted(map(int, os.listdir(proc_fd))) if os.path.isdir(proc_fd) else []
            report = {
                "pid": os.getpid(),
                "before": before,
                "after": os.environ.get("DOCKPOINT_HANDOVER"),
                "sid": os.getsid(0),
                "inheritable": [fd for fd in fds if fd > 2 and _ok(fd) and os.get_inheritable(fd)],
                "stdin": os.path.realpath("/proc/self/fd/0") if fds else None,
                "stderr": os.path.realpath("/proc/self/fd/2") if fds else None,
                "address": dp.address,
            }
            conn.write(json.dumps(report).encode() + b"\\n")
""".replace(
    "import dockpoint\n",
    "import dockpoint\n\ndef _ok(fd):\n    try:\n        os.fstat(fd)\n        return True\n"
    "    except OSError:\n        return False\n",
)


class Spawned:
    """Pids of daemons started by a test (``on_spawn``); killed at the end."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def __call__(self, pid: int) -> None:
        self.pids.append(pid)

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, KILL)
            except OSError:
                pass


@pytest.fixture
def spawned() -> Iterator[Spawned]:
    tracker = Spawned()
    yield tracker
    tracker.kill_all()


@pytest.fixture
def daemon_py(tmp_path: Path) -> Path:
    path = tmp_path / "daemon.py"
    path.write_text(DAEMON, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemons import the dockpoint under test."""
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])


def ask(conn: dockpoint.DockpointConnection, line: bytes = b"hello\n") -> dict[str, object]:
    import json

    with conn:
        conn.write(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.read(timeout=TIMEOUT)
            assert chunk, f"the daemon closed without answering (got {data!r})"
            data += chunk
    report = json.loads(data)
    assert isinstance(report, dict)
    return report


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie has: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except OSError:
        return not LINUX


# --------------------------------------------------------------------------- hand-over


def test_hand_over(app: str, daemon_py: Path, tmp_path: Path, spawned: Spawned) -> None:
    """Nobody there: one daemon starts, adopts the endpoint (no second claim), is detached
    with nothing inherited, has no hand-over variable left, and is the connection's peer."""
    pidfile = tmp_path / "pids"
    argv = [sys.executable, str(daemon_py), app, str(pidfile), "3"]
    conn = dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT, on_spawn=spawned)
    assert len(spawned.pids) == 1
    (pid,) = spawned.pids
    assert conn.peer_pid == pid
    report = ask(conn)
    assert report["pid"] == pid
    before = report["before"]
    assert isinstance(before, str) and before.startswith(f"{app}@default:"), before
    assert report["after"] is None, "claim() left the hand-over variable for its children"
    assert report["address"] == dockpoint.address(app)
    assert report["sid"] == pid, "the daemon is not in its own session"
    if LINUX:
        assert report["inheritable"] == [], "the daemon's children would inherit these fds"
        assert report["stdin"] == os.devnull
        assert report["stderr"] == os.devnull, "early-stderr capture pipe still attached"
    # The lock file names the daemon, not the frontend that claimed first.
    lock = lock_file(app)
    assert lock.read_text().split("\n")[0] == str(pid)
    # A second call finds the daemon: no spawn.
    again = dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT, on_spawn=spawned)
    assert ask(again)["pid"] == pid
    assert spawned.pids == [pid]
    assert pidfile.read_text().split() == [str(pid)]
    assert dockpoint.claim(app) is None  # the daemon holds the claim


def test_stderr_after_adoption_is_safe(
    app: str, daemon_py: Path, tmp_path: Path, spawned: Spawned
) -> None:
    """After adoption the daemon's stderr no longer leads to the frontend: writing far more
    than a pipe holds, after the frontend closed its end, neither blocks nor breaks it."""
    argv = [sys.executable, str(daemon_py), app, str(tmp_path / "pids"), "2"]
    first = dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT, on_spawn=spawned)
    ask(first)
    report = ask(dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT), b"stderr\n")
    assert report["pid"] == spawned.pids[0]


def test_storm_starts_one_daemon(app: str, daemon_py: Path, tmp_path: Path) -> None:
    """N frontends released at once against no daemon: all answered by one daemon, and
    exactly one spawn event among them."""
    number = 20
    pidfile = tmp_path / "pids"
    frontend = textwrap.dedent(
        """\
        import json, sys
        import dockpoint
        sys.stdin.buffer.read()  # the gate: end of file releases every frontend at once
        argv = [sys.executable, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]]
        events = []
        conn = dockpoint.connect_or_spawn(sys.argv[2], argv, timeout=60, on_spawn=events.append)
        with conn:
            conn.write(b"hi\\n")
            data = b""
            while not data.endswith(b"\\n"):
                chunk = conn.read(timeout=60)
                if not chunk:
                    break
                data += chunk
        print(json.dumps({"spawned": events, "reply": json.loads(data)["pid"]}))
        """
    )
    gate_r, gate_w = os.pipe()
    procs = []
    try:
        for _ in range(number):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        frontend,
                        str(daemon_py),
                        app,
                        str(pidfile),
                        str(number),
                    ],
                    stdin=gate_r,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        os.close(gate_r)
        gate_r = -1
        os.close(gate_w)
        gate_w = -1
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for fd in (gate_r, gate_w):
            if fd >= 0:
                os.close(fd)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
    import json

    daemons = pidfile.read_text().split() if pidfile.exists() else []
    try:
        for p, (_, err) in zip(procs, results):
            assert p.returncode == 0, err.decode()
        reports = [json.loads(out) for out, _ in results]
        events = [pid for r in reports for pid in r["spawned"]]
        replies = {r["reply"] for r in reports}
        assert len(events) == 1, f"{len(events)} frontends started a daemon: {events}"
        assert replies == set(events), (replies, events)
        assert daemons == [str(events[0])], daemons
    finally:
        for pid in daemons:
            try:
                os.kill(int(pid), KILL)
            except OSError:
                pass


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("code", "status", "needle"),
    [
        (
            "import no_such_module_for_dockpoint\n",
            1,
            "No module named 'no_such_module_for_dockpoint'",
        ),
        (
            "import sys\nsys.stderr.write('bad config: port 0\\n')\nsys.exit(3)\n",
            3,
            "bad config: port 0",
        ),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", -KILL, ""),
    ],
    ids=["import-error", "exit-3", "sigkill"],
)
def test_daemon_dies_before_adopting(
    app: str, tmp_path: Path, spawned: Spawned, *, code: str, status: int, needle: str
) -> None:
    """A daemon that dies at start makes connect_or_spawn raise SpawnError with its exit
    status and error output, long before the timeout; the endpoint is free again."""
    script = tmp_path / "broken.py"
    script.write_text(code, encoding="utf-8")
    start = monotonic()
    with pytest.raises(dockpoint.SpawnError) as info:
        dockpoint.connect_or_spawn(app, [sys.executable, str(script)], timeout=20, on_spawn=spawned)
    elapsed = monotonic() - start
    error = info.value
    print(f"after {elapsed:.2f} s: {error}")
    assert error.returncode == status
    assert error.pid == spawned.pids[0]
    assert needle in error.stderr
    assert needle in str(error)
    word = f"signal {-status}" if status < 0 else f"status {status}"
    assert word in str(error)
    assert app in str(error)
    dp = dockpoint.claim(app)
    assert dp is not None, "the dead daemon's claim was not released"
    dp.close()


def test_log_file_gets_output_and_error_tail(app: str, tmp_path: Path, spawned: Spawned) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('out line')\nsys.exit('fatal: from the log')\n")
    log = tmp_path / "daemon.log"
    log.write_text("an earlier run's line\n")
    with pytest.raises(dockpoint.SpawnError) as info:
        dockpoint.connect_or_spawn(app, [sys.executable, str(script)], log=log, on_spawn=spawned)
    assert info.value.returncode == 1
    assert info.value.stderr.endswith("fatal: from the log")
    assert "earlier run" not in info.value.stderr
    assert log.read_text() == "an earlier run's line\nout line\nfatal: from the log\n"


def test_missing_program_releases_the_claim(app: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dockpoint.connect_or_spawn(app, [str(tmp_path / "no-such-program")])
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


def test_timeout_stops_a_daemon_that_never_adopts(
    app: str, tmp_path: Path, spawned: Spawned
) -> None:
    """A daemon that never claims is stopped when the frontend gives up: nothing is left
    running that was started for nothing."""
    script = tmp_path / "stuck.py"
    script.write_text("import sys\nsys.stdout.flush()\nimport time\ntime.sleep(120)\n")
    with pytest.raises(TimeoutError, match="did not adopt"):
        dockpoint.connect_or_spawn(
            app, [sys.executable, str(script)], timeout=0.5, on_spawn=spawned
        )
    (pid,) = spawned.pids
    assert gone(pid)
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


@pytest.mark.parametrize(
    "argv", [[], "python daemon.py", [b"python"], [1]], ids=["empty", "str", "bytes", "int"]
)
def test_bad_argv(app: str, argv: object) -> None:
    with pytest.raises(ValueError if argv == [] else TypeError, match="argv"):
        dockpoint.connect_or_spawn(app, argv)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adoption

#: Run in a child: claim APP with whatever hand-over the environment names, and report.
CLAIMER = """\
import json, os, sys
import dockpoint

dp = dockpoint.claim(sys.argv[1])
out = {"after": os.environ.get("DOCKPOINT_HANDOVER")}
if dp is not None:
    out["address"] = dp.address
    lock = os.environ["XDG_RUNTIME_DIR"] + "/dockpoint/" + sys.argv[1] + "@default.lock"
    out["lock"] = open(lock).read().split()[0]
    dp.close()
out["claimed"] = dp is not None
open_fds = []
for fd in map(int, sys.argv[2:]):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
out["still_open"] = open_fds
print(json.dumps(out))
"""


def claimer(app: str, handover: str, pass_fds: tuple[int, ...]) -> dict[str, object]:
    import json

    run = subprocess.run(
        [sys.executable, "-c", CLAIMER, app, *map(str, pass_fds)],
        env=child_env(**{HANDOVER: handover}),
        pass_fds=pass_fds,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()
    result = json.loads(run.stdout)
    assert isinstance(result, dict)
    return result


def raw_claim(app: str) -> tuple[object, int, int]:
    """Claim ``app`` below the public API (as connect_or_spawn does): the listener and
    its socket and lock descriptors."""
    from dockpoint._common import endpoint_stem

    got = dockpoint._api._backend.listen(endpoint_stem(app, "default"))
    assert got is not None
    listener = got[0]
    sock_fd, lock_fd = listener.handles()  # type: ignore[attr-defined]
    return listener, sock_fd, lock_fd


def test_adopts_a_real_hand_over(app: str) -> None:
    """The control case for the forgeries below: a genuine hand-over is adopted (the child
    holds the claim without claiming anew: the endpoint's lock is the inherited one)."""
    listener, sock_fd, lock_fd = raw_claim(app)
    try:
        got = claimer(app, f"{app}@default:{sock_fd}:{lock_fd}:99:-", (sock_fd, lock_fd))
    finally:
        listener.forget()  # type: ignore[attr-defined]
    assert got["claimed"] is True
    assert got["after"] is None
    assert got["address"] == dockpoint.address(app)
    dp = dockpoint.claim(app)  # the child closed the adopted claim: free again, no leftovers
    assert dp is not None
    dp.close()


@pytest.mark.parametrize(
    "forgery",
    ["closed-fds", "not-a-socket", "another-app", "foreign-socket", "unlocked", "garbled"],
)
def test_forged_hand_over_is_not_adopted(app: str, forgery: str) -> None:
    """claim() verifies what the environment names: a forged hand-over is ignored (the
    descriptors are left alone), the variable is removed, and claim() claims as usual
    (which gives ``None`` where the forger holds this endpoint's lock)."""
    stem = f"{app}@default"
    keep: list[int] = []
    listener = None
    others = []
    try:
        if forgery == "closed-fds":
            handover, fds = f"{stem}:900:901:902:-", ()
        elif forgery == "not-a-socket":
            r, w = os.pipe()
            keep += (r, w)
            handover, fds = f"{stem}:{r}:{w}:{w}:-", (r, w)
        elif forgery == "another-app":
            listener, sock_fd, lock_fd = raw_claim(app + "-other")
            handover, fds = f"{stem}:{sock_fd}:{lock_fd}:{lock_fd}:-", (sock_fd, lock_fd)
        elif forgery == "foreign-socket":  # this endpoint's held lock, another's socket
            listener, _, lock_fd = raw_claim(app)
            other, sock_fd, _ = raw_claim(app + "-other")
            others.append(other)
            handover, fds = f"{stem}:{sock_fd}:{lock_fd}:{lock_fd}:-", (sock_fd, lock_fd)
        elif forgery == "unlocked":
            import fcntl

            listener, sock_fd, lock_fd = raw_claim(app)
            lock_path = str(lock_file(app))
            fake = os.open(lock_path, os.O_RDWR)
            keep.append(fake)
            fcntl.flock(lock_fd, fcntl.LOCK_UN)  # the lock is nobody's now
            handover, fds = f"{stem}:{sock_fd}:{fake}:{fake}:-", (sock_fd, fake)
        else:
            handover, fds = f"{stem}:x:y", ()
        got = claimer(app, handover, fds)
    finally:
        if listener is not None:
            listener.close()  # type: ignore[attr-defined]
        for other in others:
            other.close()  # type: ignore[attr-defined]
        for fd in keep:
            os.close(fd)
    assert got["after"] is None
    assert got["still_open"] == list(fds), "claim() closed descriptors it did not adopt"
    if forgery == "foreign-socket":
        assert got["claimed"] is False, "adopted another endpoint's socket"
        return
    assert got["claimed"] is True, "the forged hand-over kept claim() from claiming"
    assert got["address"] == dockpoint.address(app)
    assert got["lock"].isdigit() and int(got["lock"]) != os.getpid()  # type: ignore[union-attr]


def test_hand_over_for_another_endpoint_is_left_alone(app: str) -> None:
    """A variable naming another app's endpoint stays for the claim it is meant for."""
    other = f"{app}-x@default:3:4:5:-"
    got = claimer(app, other, ())
    assert got["claimed"] is True
    assert got["after"] == other
