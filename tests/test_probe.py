"""``dockpoint.probe()`` and ``python -m dockpoint status``: every state produced for real
(processes, sockets, other users), with what probe returns and what status prints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

if sys.platform == "win32":
    pytest.skip(
        "POSIX backend only: the Windows probe states are tested in test_windows.py",
        allow_module_level=True,
    )

from conftest import LINUX, Child, child_env

import dockpoint

ROOT = os.geteuid() == 0
NOBODY = 65534
as_root = pytest.mark.skipif(not ROOT, reason="needs root to become another user (uid 65534)")

#: Claims, says so, then waits on stdin: holds the claim without ever calling accept().
HOLDER = """
import dockpoint, os, sys
dp = dockpoint.claim(sys.argv[1], info=sys.argv[2] if len(sys.argv) > 2 else None)
print("claimed" if dp is not None else "lost", os.getpid(), dp and dp.address, flush=True)
sys.stdin.readline()
"""


def status(app: str, **env: str) -> tuple[int, dict[str, str], str]:
    """``python -m dockpoint status APP``: exit status, its "key  value" lines, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "dockpoint", "status", app, "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(**env),
        check=False,
    )
    fields = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    return done.returncode, fields, done.stderr


def check(runtime: Path, app: str, state: str, code: int, **env: str) -> dockpoint.Probe:
    """probe() and status agree on ``state``; status exits with ``code``; neither changes a
    file in the runtime directory or the fallback directories."""
    before = untouched(runtime)
    found = dockpoint.probe(app, timeout=0.5)
    assert found.state == state, found.reason
    assert found.state in dockpoint.PROBE_STATES
    assert found.reason and "\n" not in found.reason
    got, fields, err = status(app, **env)
    assert (got, fields.get("state")) == (code, state), (fields, err)
    assert fields["address"] == found.address
    assert fields["reason"] == found.reason
    if found.pid is not None:
        assert fields["pid"] == str(found.pid)
    assert ("error: " in err) == (code == 2), err
    assert "Traceback" not in err
    assert untouched(runtime) == before
    return found


#: Where a daemon started without XDG_RUNTIME_DIR keeps its endpoint.
FALLBACKS = (f"/run/user/{os.geteuid()}/dockpoint", f"/tmp/dockpoint-{os.geteuid()}")


def untouched(runtime: Path) -> list[dict[str, bytes | str]]:
    """What probe must not change: the runtime directory, and the fallback directories
    when this session has a private /tmp (elsewhere other processes may use them)."""
    import conftest

    return [snapshot(runtime), *(snapshot(Path(d)) for d in FALLBACKS if conftest.PRIVATE_TMP)]


def snapshot(runtime: Path) -> dict[str, bytes | str]:
    """Every path under ``runtime`` (itself included) with its contents or its mode."""
    out: dict[str, bytes | str] = {}
    if not os.path.lexists(runtime):
        return out
    for p in [runtime, *sorted(runtime.rglob("*"))]:
        out[str(p)] = (
            p.read_bytes() if p.is_file() and not p.is_symlink() else oct(p.lstat().st_mode)
        )
    return out


def holder(children: list[Child], app: str, *info: str, **env: str) -> tuple[int, str]:
    child = Child(HOLDER, app, *info, **env)
    children.append(child)
    _, pid, address = child.expect("claimed").split()
    return int(pid), address


# --------------------------------------------------------------------------- states


def test_absent_creates_nothing(runtime: Path, app: str) -> None:
    found = check(runtime, app, "absent", 1)
    assert (found.pid, found.info) == (None, None)
    assert found.address == dockpoint.address(app)
    assert list(runtime.iterdir()) == []


def test_listening(runtime: Path, app: str, children: list[Child]) -> None:
    pid, address = holder(children, app)
    before = snapshot(runtime)
    found = check(runtime, app, "listening", 0)
    assert (found.pid, found.address) == (pid, address)
    assert snapshot(runtime) == before  # read-only: the lock file still names the holder


def test_info_from_the_lock_file(runtime: Path, app: str, children: list[Child]) -> None:
    pid, _ = holder(children, app)
    lock = runtime / "dockpoint" / f"{app}@default.lock"
    assert lock.read_text() == f"{pid}\n"
    lock.write_text(f"{pid}\nversion 1.2 ü\n")  # the agreed format: pid, then one info line
    found = check(runtime, app, "listening", 0)
    assert found.info == "version 1.2 ü"
    assert status(app)[1]["info"] == "version 1.2 ü"


def test_info_given_to_claim(runtime: Path, app: str, children: list[Child]) -> None:
    pid, _ = holder(children, app, "myapp 2.0.1")
    found = check(runtime, app, "listening", 0)
    assert (found.pid, found.info) == (pid, "myapp 2.0.1")
    assert status(app)[1]["info"] == "myapp 2.0.1"
    children[-1].proc.kill()  # a frontend still sees which version was left behind
    children[-1].proc.wait(10)
    assert check(runtime, app, "stale", 1).info == "myapp 2.0.1"


def test_stale_after_sigkill(runtime: Path, app: str, children: list[Child]) -> None:
    pid, address = holder(children, app)
    children[-1].proc.kill()
    children[-1].proc.wait(10)
    found = check(runtime, app, "stale", 1)
    assert found.pid == pid and os.path.exists(address)
    assert dockpoint.connect(app) is None


def test_missing_socket_deleted_under_a_live_holder(
    runtime: Path, app: str, children: list[Child]
) -> None:
    pid, address = holder(children, app)  # never in accept(): it cannot heal the socket
    os.unlink(address)
    found = check(runtime, app, "missing-socket", 1)
    assert found.pid == pid
    assert dockpoint.connect(app) is None
    assert not os.path.exists(address)  # probe made nothing


def test_missing_socket_replaced_under_a_live_holder(
    runtime: Path, app: str, children: list[Child]
) -> None:
    pid, address = holder(children, app)
    os.unlink(address)
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(address)  # a socket nobody listens on, in place of the holder's
    found = check(runtime, app, "missing-socket", 1)
    assert found.pid == pid


@pytest.mark.skipif(not LINUX, reason="Linux-only: fills the backlog; macOS/BSD refuse instead")
def test_busy_when_the_backlog_is_full(runtime: Path, app: str, children: list[Child]) -> None:
    import resource

    pid, address = holder(children, app)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    queued: list[socket.socket] = []
    try:
        while True:  # fill the holder's backlog: it never accepts
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(address)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
            assert len(queued) <= 70000, "the backlog never filled"
        found = check(runtime, app, "busy", 1)
        assert found.pid == pid
        assert "0.5 s" in found.reason
    finally:
        for s in queued:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_elsewhere_daemon_started_without_xdg_runtime_dir(
    runtime: Path, app: str, children: list[Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = child_env()
    del env["XDG_RUNTIME_DIR"]  # the daemon uses the fallback directory
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, app],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        _, pid, address = proc.stdout.readline().split()
        assert not address.startswith(str(runtime))
        assert dockpoint.connect(app) is None  # the seed's contract: None here
        found = check(runtime, app, "elsewhere", 1)
        assert (found.pid, found.address) == (int(pid), address)
        assert "XDG_RUNTIME_DIR" in found.reason
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        assert dockpoint.probe(app).state == "listening"  # seen from its own environment
    finally:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("how", ["directory mode", "lock symlink", "runtime dir mode"])
def test_unsafe(runtime: Path, app: str, tmp_path: Path, how: str) -> None:
    directory = runtime / "dockpoint"
    if how == "directory mode":
        directory.mkdir()
        os.chmod(directory, 0o755)
    elif how == "lock symlink":
        directory.mkdir(mode=0o700)
        (tmp_path / "victim").write_text("x")
        (directory / f"{app}@default.lock").symlink_to(tmp_path / "victim")
    else:
        os.chmod(runtime, 0o755)
    try:
        found = check(runtime, app, "unsafe", 2)
        assert found.pid is None
    finally:
        os.chmod(runtime, 0o700)


def test_unsafe_when_xdg_runtime_dir_is_missing(
    runtime: Path, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(runtime / "gone")
    monkeypatch.setenv("XDG_RUNTIME_DIR", missing)
    found = check(runtime, app, "unsafe", 2, XDG_RUNTIME_DIR=missing)
    assert "XDG_RUNTIME_DIR" in found.reason and missing in found.reason
    assert not os.path.exists(missing)


def test_blocked_by_a_regular_file(runtime: Path, app: str) -> None:
    address = Path(dockpoint.address(app))
    (runtime / "dockpoint").mkdir(mode=0o700)
    address.parent.mkdir(mode=0o700, exist_ok=True)  # the fallback, for a long runtime dir
    address.write_text("not a socket")
    try:
        found = check(runtime, app, "blocked", 2)
        assert str(address) in found.reason
        assert address.read_text() == "not a socket"
    finally:
        address.unlink()


@as_root
def test_foreign(runtime: Path, app: str) -> None:
    d = runtime / "dockpoint"
    d.mkdir(mode=0o700)
    path = dockpoint.address(app)
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s.listen(8); print('ready', flush=True); sys.stdin.readline()\n"
    )
    impostor = Child(code, path)
    try:
        impostor.expect("ready")
        found = check(runtime, app, "foreign", 2)
        assert "uid 65534" in found.reason and found.pid is None
    finally:
        impostor.stop()


# --------------------------------------------------------------------------- read-only


CLAIMER = """
import dockpoint, sys, time
lost = 0
for _ in range(int(sys.argv[2])):
    dp = dockpoint.claim(sys.argv[1])
    if dp is None:
        lost += 1
    else:
        dp.close()
    time.sleep(0.0005)  # not synchronisation: leaves the endpoint free most of the time
print("lost", lost, flush=True)
"""


def test_probe_never_takes_the_claim(
    runtime: Path, app: str, children: list[Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe running all the time never makes a claim fail (a probe that took the lock,
    even for an instant, would make some of these claims return None), and it never asks
    for a lock at all: an instant's lock rarely meets a claim, so that is checked too."""
    import fcntl

    locks: list[tuple[object, ...]] = []

    def no_lock(*args: object) -> None:
        locks.append(args)
        raise AssertionError(f"probe asked for a lock: {args}")

    for module, name in ((fcntl, "flock"), (fcntl, "lockf"), (os, "lockf")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, no_lock)
    stop = threading.Event()
    states: set[str] = set()

    def probe_forever() -> None:
        while not stop.is_set():
            states.add(dockpoint.probe(app, timeout=0.05).state)

    prober = threading.Thread(target=probe_forever)
    prober.start()
    try:
        claimer = Child(CLAIMER, app, "400")
        children.append(claimer)
        assert claimer.line(60) == "lost 0"
    finally:
        stop.set()
        prober.join(30)
    assert states <= {"absent", "listening", "missing-socket", "stale"}, states
    assert "absent" in states  # probed while the lock was free (before the claimer ran)
    assert locks == []


def test_bad_arguments(runtime: Path) -> None:
    with pytest.raises(ValueError, match="app_name"):
        dockpoint.probe("a/b")
    with pytest.raises(ValueError, match="timeout"):
        dockpoint.probe("ok", timeout=-1)
    with pytest.raises(TypeError, match="timeout"):
        dockpoint.probe("ok", timeout="1")  # type: ignore[arg-type]
    assert list(runtime.iterdir()) == []


def test_stop_with_the_library(runtime: Path, app: str, children: list[Child]) -> None:
    assert dockpoint.stop(app) is None  # nobody there
    pid, _ = holder(children, app)
    assert dockpoint.stop(app, timeout=10) == pid  # the holder dies of SIGTERM
    assert children[-1].proc.wait(10) == -15
    assert dockpoint.probe(app).state == "stale"  # SIGTERM's default action: no clean-up
    with pytest.raises(TypeError):
        dockpoint.stop(app, timeout=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the contract


def test_the_states_are_exactly_the_documented_ones() -> None:
    assert dockpoint.PROBE_STATES == (
        "listening",
        "busy",
        "absent",
        "stale",
        "missing-socket",
        "elsewhere",
        "unsafe",
        "foreign",
        "blocked",
    )
    readme = (Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md").read_text(
        encoding="utf-8"
    )
    table = readme.split("| `Probe.state` |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:]]
    assert tuple(rows) == dockpoint.PROBE_STATES


@pytest.mark.parametrize("state", dockpoint.PROBE_STATES)
def test_status_prints_what_probe_returns(
    state: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` is a printer of probe(): whatever probe answers is what it prints, and
    its exit status follows from the state alone (it inspects nothing itself)."""
    from dockpoint import __main__ as cli

    asked = []

    def fake(app: str, instance: str = "default", *, timeout: float = 0) -> dockpoint.Probe:
        asked.append((app, instance, timeout))
        return dockpoint.Probe(state, "/nowhere/x.sock", 4242, "v 9", f"because {state}")

    monkeypatch.setattr(dockpoint, "probe", fake)
    code = cli.status("no-such-app", "other", 0.25)
    out, err = capsys.readouterr()
    assert asked == [("no-such-app", "other", 0.25)]
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields == {
        "endpoint": "no-such-app@other",
        "state": state,
        "address": "/nowhere/x.sock",
        "pid": "4242",
        "info": "v 9",
        "reason": f"because {state}",
    }
    want = {"listening": 0, "unsafe": 2, "foreign": 2, "blocked": 2}.get(state, 1)
    assert code == want
    assert err == (f"dockpoint: error: because {state}\n" if want == 2 else "")
