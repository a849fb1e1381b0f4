"""``connect_or_spawn``: the frontend claims, hands the endpoint to the daemon it starts and
connects; the daemon's ``claim`` adopts it after verifying it.

Real processes only, on every backend. The daemons are ``spawn_children.py daemon``; each
records what it saw (its pid, the hand-over variable, its descriptors) in its replies.
Every wait is bounded; every daemon a test started is killed at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

import pytest
from conftest import LINUX, WINDOWS, child_env, lock_file

import dockpoint

if TYPE_CHECKING:
    from collections.abc import Iterator

HANDOVER = "DOCKPOINT_HANDOVER"
TIMEOUT = 30.0
KILL = getattr(signal, "SIGKILL", 9)
CHILDREN = str(Path(__file__).with_name("spawn_children.py"))


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


def daemon_argv(app: str, pidfile: Path, count: int) -> list[str]:
    return [sys.executable, CHILDREN, "daemon", app, str(pidfile), str(count)]


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
    if WINDOWS:  # os.kill(pid, 0) would terminate it
        import _winapi

        try:
            handle = _winapi.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        except OSError:
            return True
        try:
            return _winapi.WaitForSingleObject(handle, 0) == 0  # WAIT_OBJECT_0
        finally:
            _winapi.CloseHandle(handle)
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


def test_hand_over(app: str, tmp_path: Path, spawned: Spawned) -> None:
    """Nobody there: one daemon starts, adopts the endpoint (no second claim), is detached
    with nothing inherited, has no hand-over variable left, and is the connection's peer."""
    pidfile = tmp_path / "pids"
    argv = daemon_argv(app, pidfile, 3)
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
    if not WINDOWS:
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


@pytest.mark.skipif(WINDOWS, reason="Windows always starts daemons with subprocess")
def test_hand_over_through_subprocess(
    app: str, tmp_path: Path, spawned: Spawned, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where os.posix_spawnp is missing (or cannot start a session), subprocess starts the
    daemon: the same hand-over, the same detached daemon."""
    monkeypatch.delattr(os, "posix_spawnp")
    conn = dockpoint.connect_or_spawn(
        app, daemon_argv(app, tmp_path / "pids", 1), timeout=TIMEOUT, on_spawn=spawned
    )
    (pid,) = spawned.pids
    assert conn.peer_pid == pid
    report = ask(conn)
    assert report["pid"] == pid
    assert report["after"] is None
    assert report["sid"] == pid, "the daemon is not in its own session"
    if LINUX:
        assert report["inheritable"] == []
        assert report["stderr"] == os.devnull


def test_stderr_after_adoption_is_safe(app: str, tmp_path: Path, spawned: Spawned) -> None:
    """After adoption the daemon's stderr no longer leads to the frontend: writing far more
    than a pipe holds, after the frontend closed its end, neither blocks nor breaks it."""
    argv = daemon_argv(app, tmp_path / "pids", 2)
    first = dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT, on_spawn=spawned)
    ask(first)
    report = ask(dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT), b"stderr\n")
    assert report["pid"] == spawned.pids[0]


def test_storm_starts_one_daemon(app: str, tmp_path: Path) -> None:
    """N frontends released at once against no daemon: all answered by one daemon, and
    exactly one spawn event among them."""
    number = 20
    pidfile = tmp_path / "pids"
    gate_r, gate_w = os.pipe()
    procs = []
    try:
        for _ in range(number):
            procs.append(
                subprocess.Popen(
                    [sys.executable, CHILDREN, "frontend", app, str(pidfile), str(number)],
                    stdin=gate_r,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        os.close(gate_r)
        gate_r = -1
        os.close(gate_w)
        gate_w = -1
        results = [p.communicate(timeout=180) for p in procs]
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
        pytest.param(
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
            -KILL,
            "",
            marks=pytest.mark.skipif(WINDOWS, reason="Windows has no signals to die of"),
        ),
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


@pytest.mark.skipif(not LINUX, reason="counts descriptors through /proc/self/fd")
def test_keyboard_interrupt_anywhere_leaks_nothing(app: str) -> None:
    """KeyboardInterrupt at every call and return of a whole connect_or_spawn run (its
    daemon exits without adopting): afterwards no descriptor is open that was not before,
    and the claim is free."""
    import json
    import shutil

    program = shutil.which("true")
    assert program is not None
    run = subprocess.run(
        [sys.executable, CHILDREN, "inject", app, program],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    print(report)
    assert report["failures"] == []
    assert report["tried"] > 500, "a whole run makes far more calls than that"
    assert report["hits"] == report["tried"] - 1, "some interrupts did not reach the caller"


@pytest.mark.parametrize(
    "argv", [[], "python daemon.py", [b"python"], [1]], ids=["empty", "str", "bytes", "int"]
)
def test_bad_argv(app: str, argv: object) -> None:
    with pytest.raises(ValueError if argv == [] else TypeError, match="argv"):
        dockpoint.connect_or_spawn(app, argv)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- adoption


def claimer(app: str, handover: str, handles: tuple[int, ...]) -> dict[str, object]:
    """Run the ``claimer`` child with ``handover`` in its environment and ``handles``
    (descriptors on POSIX, handles on Windows) inherited; its report."""
    import json

    argv = [sys.executable, CHILDREN, "claimer", app, *map(str, handles)]
    env = child_env(**{HANDOVER: handover})
    if WINDOWS:
        info = subprocess.STARTUPINFO()
        info.lpAttributeList = {"handle_list": list(handles)}
        for handle in handles:
            os.set_handle_inheritable(handle, True)
        try:
            proc = subprocess.Popen(
                argv, env=env, startupinfo=info, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        finally:  # at once: a frontend thread may close the lock handle meanwhile
            for handle in handles:
                os.set_handle_inheritable(handle, False)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=TIMEOUT)
        run = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    else:
        run = subprocess.run(
            argv, env=env, pass_fds=handles, capture_output=True, timeout=TIMEOUT, check=False
        )
    assert run.returncode == 0, run.stderr.decode()
    result = json.loads(run.stdout)
    assert isinstance(result, dict)
    return result


def raw_claim(app: str) -> tuple[object, int, int]:
    """Claim ``app`` below the public API (as connect_or_spawn does): the listener and
    its socket and lock descriptors."""
    from dockpoint._api import backend
    from dockpoint._names import endpoint_stem

    got = backend.listen(endpoint_stem(app, "default"))
    assert got is not None
    listener = got[0]
    sock, lock = listener.handles()  # type: ignore[attr-defined]
    return listener, sock, lock


def test_adopts_a_real_hand_over(app: str) -> None:
    """The control case for the forgeries below: a genuine hand-over is adopted (the child
    holds the claim without claiming anew: the endpoint's lock is the inherited one)."""
    listener, sock, lock = raw_claim(app)
    try:
        if WINDOWS:  # the child takes the locks itself: answer its "h" as a frontend does
            got, seen = _windows_hand_over(app, listener, sock, lock)
            assert seen == [b"h", b"+"]
        else:
            got = claimer(app, f"{app}@default:{sock}:{lock}:99:-", (sock, lock))
    finally:
        listener.forget()  # type: ignore[attr-defined]
        listener.let_go()  # type: ignore[attr-defined]
    assert got["claimed"] is True
    assert got["after"] is None
    assert got["address"] == dockpoint.address(app)
    dp = dockpoint.claim(app)  # the child closed the adopted claim: free again, no leftovers
    assert dp is not None
    dp.close()


def _windows_hand_over(
    app: str, listener: object, sock: int, lock: int
) -> tuple[dict[str, object], list[bytes]]:
    import msvcrt
    import threading

    r, w = os.pipe()
    seen: list[bytes] = []

    def frontend() -> None:
        seen.append(os.read(r, 1))
        listener.let_go()  # type: ignore[attr-defined]
        seen.append(os.read(r, 1))

    thread = threading.Thread(target=frontend)
    thread.start()
    try:
        ready = msvcrt.get_osfhandle(w)
        got = claimer(app, f"{app}@default:{sock}:{lock}:{ready}:-", (sock, lock, ready))
    finally:
        os.close(w)  # the reader sees end of file if the child wrote nothing
        thread.join(TIMEOUT)
        os.close(r)
    assert not thread.is_alive()
    return got, seen


@pytest.mark.skipif(not WINDOWS, reason="on POSIX the lock is handed over with its descriptor")
def test_daemon_gives_up_when_the_frontend_never_lets_go(app: str) -> None:
    """Windows: a daemon that holds the hand-over range but never gets the claim range
    (its frontend does not let go) gives up after a bound, closes what it was handed, so
    the frontend reads end of file, and claims as usual (``None``: the claim is held)."""
    import msvcrt
    import threading

    listener, sock, lock = raw_claim(app)
    r, w = os.pipe()
    seen: list[bytes] = []

    def frontend() -> None:  # reads everything, lets go of nothing
        while True:
            chunk = os.read(r, 16)
            if not chunk:
                break
            seen.append(chunk)

    thread = threading.Thread(target=frontend)
    thread.start()
    try:
        ready = msvcrt.get_osfhandle(w)
        start = monotonic()
        got = claimer(app, f"{app}@default:{sock}:{lock}:{ready}:-", (sock, lock, ready))
        waited = monotonic() - start
    finally:
        os.close(w)
        thread.join(TIMEOUT)
        os.close(r)
        listener.close()  # type: ignore[attr-defined]
    assert not thread.is_alive()
    assert got["claimed"] is False
    assert got["still_open"] == [], "handles of a hand-over it gave up on stay open"
    assert b"".join(seen) == b"h"
    assert waited < 20


FORGERIES = ["closed-fds", "not-a-socket", "another-app", "foreign-socket", "unlocked", "garbled"]


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_hand_over_is_not_adopted(app: str, forgery: str, tmp_path: Path) -> None:
    """claim() verifies what the environment names: a forged hand-over is ignored (the
    descriptors or handles are left alone), the variable is removed, and claim() claims as
    usual (which gives ``None`` where the forger holds this endpoint's lock)."""
    stem = f"{app}@default"
    keep: list[int] = []
    listener = None
    others = []

    def handle(fd: int) -> int:  # what a child inherits: Windows hands out handles
        if WINDOWS:
            import msvcrt

            return int(msvcrt.get_osfhandle(fd))
        return fd

    try:
        if forgery == "closed-fds":
            handover, fds = f"{stem}:900:901:902:-", ()
        elif forgery == "not-a-socket":
            r, w = os.pipe()
            f = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
            keep += (r, w, f)
            handover, fds = f"{stem}:{handle(r)}:{handle(f)}:{handle(w)}:-", (handle(r), handle(f))
        elif forgery == "another-app":
            listener, sock, lock = raw_claim(app + "-other")
            handover, fds = f"{stem}:{sock}:{lock}:{lock}:-", (sock, lock)
        elif forgery == "foreign-socket":  # this endpoint's held lock, another's socket
            listener, _, lock = raw_claim(app)
            other, sock, _ = raw_claim(app + "-other")
            others.append(other)
            handover, fds = f"{stem}:{sock}:{lock}:{lock}:-", (sock, lock)
        elif forgery == "unlocked":
            listener, sock, lock = raw_claim(app)
            if WINDOWS:
                listener.let_go()  # type: ignore[attr-defined]
            else:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_UN)  # the lock is nobody's now
            fake = os.open(str(lock_file(app)), os.O_RDWR)
            keep.append(fake)
            handover, fds = f"{stem}:{sock}:{handle(fake)}:{handle(fake)}:-", (sock, handle(fake))
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
