"""POSIX-only behaviour: files, permissions, other users, fork, signals, imports."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.platform == "win32":
    pytest.skip("POSIX backend only", allow_module_level=True)

import conftest
from conftest import (
    LINUX,
    PACKAGE_ROOT,
    Child,
    child_env,
    claimed,
    run_python,
    wait_pid_blocked,
)

import dockpoint
from dockpoint import _posix_dir, _posix_stream

ROOT = os.geteuid() == 0
NOBODY = 65534
as_root = pytest.mark.skipif(not ROOT, reason="needs root to become another user (uid 65534)")


def as_nobody(fn_code: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run ``fn_code`` in a child that has dropped to uid/gid 65534 before anything else."""
    # Import first: this interpreter's files may not be readable by uid 65534.
    prelude = (
        f"import os, socket, sys\nos.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + fn_code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd="/",
    )


def endpoint_dir(runtime: Path) -> Path:
    return runtime / "dockpoint"


def endpoint_files(directory: Path, sock: Path) -> list[Path]:
    """The files of the endpoint whose lock file is in ``directory`` and whose socket is
    ``sock``: all of ``directory``, and, where the socket is in the shared fallback
    directory (macOS paths), the entries there named after the socket."""
    found = set(directory.iterdir())
    if sock.parent != directory:
        found.update(p for p in sock.parent.iterdir() if p.name.startswith(sock.stem + "."))
    return sorted(found)


# --------------------------------------------------------------------------- files


def test_files_layout_modes_and_sticky_bits(runtime: Path, app: str) -> None:
    with claimed(app) as dp:
        d = endpoint_dir(runtime)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        sock = Path(dp.address)
        if conftest.simulating_macos_paths():  # the runtime dir is too long for sun_path
            assert sock.parent == Path(f"/tmp/dockpoint-{os.geteuid()}"), sock
            assert re.fullmatch(r"~[0-9a-f]{24}\.sock", sock.name), sock
            assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        else:
            assert sock.parent == d and sock.name == f"{app}@default.sock"
        st = sock.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) in (0o1600, 0o600)
        lock = d / f"{app}@default.lock"
        lst = lock.lstat()
        assert stat.S_ISREG(lst.st_mode)
        if LINUX:
            assert stat.S_IMODE(st.st_mode) == 0o1600
            assert stat.S_IMODE(lst.st_mode) == 0o1600
        assert lock.read_text() == f"{os.getpid()}\n"
        assert endpoint_files(d, sock) == sorted([sock, lock])
    # The socket goes; the lock file stays (unlinking it would split waiters) but is empty.
    assert endpoint_files(d, sock) == [lock]
    assert lock.read_text() == ""


def test_stale_socket_is_nobody_and_is_replaced(runtime: Path, app: str) -> None:
    path = dockpoint.address(app)
    endpoint_dir(runtime).mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a socket file with nobody behind it: a crashed daemon's leftover
    assert dockpoint.connect(app) is None
    assert dockpoint.connect(app, timeout=0.05) is None
    with claimed(app) as dp:
        conn = dockpoint.connect(app)
        assert conn is not None
        server = dp.accept(timeout=10)
        conn.write(b"fresh")
        assert server.read(timeout=10) == b"fresh"
        conn.close()
        server.close()


def test_regular_file_at_the_endpoint_is_left_alone(runtime: Path, app: str) -> None:
    path = Path(dockpoint.address(app))
    endpoint_dir(runtime).mkdir(mode=0o700)
    path.write_text("user data")
    assert dockpoint.connect(app) is None
    with pytest.raises(FileExistsError, match="not a socket") as info:
        dockpoint.claim(app)
    assert info.value.filename == str(path)
    assert path.read_text() == "user data"
    # The failed claim released the lock: removing the file is enough to claim.
    path.unlink()
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


def test_leftover_temporary_socket_is_cleaned(runtime: Path, app: str) -> None:
    path = dockpoint.address(app)
    endpoint_dir(runtime).mkdir(mode=0o700)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.bind(path[: -len(".sock")] + ".new")  # a holder died between bind and rename
    half.close()
    with claimed(app) as dp:
        assert os.path.exists(dp.address)
        assert not os.path.exists(path[: -len(".sock")] + ".new")


def test_unsafe_directory_modes_are_refused(runtime: Path, app: str) -> None:
    d = endpoint_dir(runtime)
    d.mkdir(mode=0o700)
    os.chmod(d, 0o755)
    for call in (lambda: dockpoint.claim(app), lambda: dockpoint.connect(app)):
        with pytest.raises(PermissionError, match="lets group or others in") as info:
            call()
        assert info.value.filename == str(d)
    assert list(d.iterdir()) == []


def test_unsafe_runtime_dir_is_refused(runtime: Path, app: str) -> None:
    os.chmod(runtime, 0o777)
    with pytest.raises(PermissionError, match="0777") as info:
        dockpoint.claim(app)
    assert info.value.filename == str(runtime)
    assert list(runtime.iterdir()) == []


def test_symlinked_endpoint_directory_is_refused(runtime: Path, tmp_path: Path, app: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    endpoint_dir(runtime).symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="symbolic link"):
        dockpoint.claim(app)
    with pytest.raises(PermissionError, match="symbolic link"):
        dockpoint.connect(app)
    assert list(elsewhere.iterdir()) == []


def test_symlink_at_lock_path_is_not_followed(runtime: Path, tmp_path: Path, app: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    endpoint_dir(runtime).mkdir(mode=0o700)
    (endpoint_dir(runtime) / f"{app}@default.lock").symlink_to(victim)
    with pytest.raises(OSError) as info:
        dockpoint.claim(app)
    # O_NOFOLLOW refuses the symlink itself: ELOOP (EMLINK on FreeBSD), nothing followed.
    assert info.value.errno in (errno.ELOOP, errno.EMLINK), info.value
    assert victim.read_text() == "precious"


def test_overlong_directory_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    os.chmod(deep, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    app = "t" + uuid.uuid4().hex[:12]
    where = dockpoint.address(app)
    if _posix_dir.PROC_ALIAS:  # Linux: the real path, bound through /proc/self/fd
        assert len(os.fsencode(where)) > 107 and where.startswith(str(deep))
    else:  # macOS, BSD: the short per-user fallback, the lock file stays in deep
        assert where.startswith(f"/tmp/dockpoint-{os.geteuid()}/~"), where
        assert len(os.fsencode(where)) <= _posix_dir.SUN_PATH_MAX
    with claimed(app) as dp:
        assert dp.address == where and stat.S_ISSOCK(os.lstat(where).st_mode)
        assert (deep / "dockpoint" / f"{app}@default.lock").is_file()
        conn = dockpoint.connect(app)
        assert conn is not None
        server = dp.accept(timeout=10)
        conn.write(b"long")
        assert server.read(timeout=10) == b"long"
        conn.close()
        server.close()
        assert dockpoint.claim(app) is None  # the lock in deep decides
        assert dockpoint.probe(app).state == "listening"
    assert not os.path.exists(where)


def test_overlong_fallback_sockets_of_two_directories_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_posix_dir, "PROC_ALIAS", False)
    monkeypatch.setattr(_posix_dir, "SUN_PATH_MAX", 103)
    first, second = tmp_path / ("a" * 100), tmp_path / ("b" * 100)
    places = set()
    for d in (first, second):
        d.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
        places.add(dockpoint.address("app"))
    assert len(places) == 2, places  # same app, two runtime dirs: two endpoints


def test_longest_names_work(runtime: Path) -> None:
    app, instance = "a" * 64, "B" * 64
    where = dockpoint.address(app, instance)
    assert len(os.fsencode(where)) <= _posix_dir.SUN_PATH_MAX
    with claimed(app, instance) as dp:
        assert dockpoint.claim(app, instance.lower()) is None
        conn = dockpoint.connect(app, instance)
        assert conn is not None
        conn.close()
        dp.accept(timeout=10).close()


# --------------------------------------------------------------------------- fallback dir


@pytest.fixture
def no_xdg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    where = Path(os.path.dirname(dockpoint.address("x")))
    yield where


def test_fallback_location_is_documented_and_private(no_xdg: Path) -> None:
    uid = os.geteuid()
    run_user = Path(f"/run/user/{uid}")
    if run_user.is_dir() and run_user.stat().st_uid == uid and run_user.stat().st_mode & 0o077 == 0:
        assert no_xdg == run_user / "dockpoint"
    else:
        assert no_xdg == Path(f"/tmp/dockpoint-{uid}")
    app = "t" + uuid.uuid4().hex[:12]
    with claimed(app) as dp:
        assert os.path.dirname(dp.address) == str(no_xdg)
        st = os.lstat(no_xdg)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == uid
        assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
        lock = os.lstat(no_xdg / f"{app}@default.lock")
        assert lock.st_uid == uid and stat.S_IMODE(lock.st_mode) & 0o077 == 0
        assert stat.S_IMODE(os.lstat(dp.address).st_mode) & 0o077 == 0


def uid_without_fallback() -> int:
    """A uid that has no fallback directory (``/tmp/dockpoint-<uid>``) and no
    ``/run/user/<uid>``: its fallback is in ``/tmp`` and nothing is there, whatever other
    runs (the README demo as root, say) left in ``/tmp`` for real users."""
    for uid in range(61000, 62000):
        if not os.path.lexists(f"/tmp/dockpoint-{uid}") and not os.path.lexists(f"/run/user/{uid}"):
            return uid
    raise AssertionError("every uid 61000-61999 has a /tmp/dockpoint-<uid>")


#: Run as the victim uid (argv[1]) without XDG_RUNTIME_DIR: claim and connect ``argv[2]``,
#: print what each raised. Everything is imported before dropping root (the interpreter's
#: files may not be readable by that uid).
AS_VICTIM = """
import json, os, sys
import dockpoint, dockpoint._posix_claim, fcntl, select
uid, app = int(sys.argv[1]), sys.argv[2]
os.setgroups([]); os.setgid(uid); os.setuid(uid)
out = {"address": dockpoint.address(app)}
for name, call in (("claim", dockpoint.claim), ("connect", dockpoint.connect)):
    try:
        got = call(app)
        out[name] = ["no error", repr(got)]
    except OSError as exc:
        out[name] = [type(exc).__name__, exc.filename, str(exc)]
print(json.dumps(out))
"""


@as_root
@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_planted_fallback_directory_is_refused(kind: str) -> None:
    """Another user (65534) plants the victim's fallback directory before the victim's
    first use: a 0777 directory of its own, or a symbolic link to one. The victim's claim
    and connect refuse it (PermissionError naming it) and put nothing in it. The victim is
    a uid with no fallback yet, so the test runs whatever /tmp holds, on every OS."""
    victim = uid_without_fallback()
    planted = f"/tmp/dockpoint-{victim}"
    bait = f"/tmp/dockpoint-bait-{uuid.uuid4().hex[:8]}"
    plant = f"import os; os.mkdir({bait!r}, 0o777); os.chmod({bait!r}, 0o777)\n" + (
        f"os.mkdir({planted!r}, 0o777); os.chmod({planted!r}, 0o777)\n"
        if kind == "directory"
        else f"os.symlink({bait!r}, {planted!r})\n"
    )
    try:
        done = as_nobody(plant)
        assert done.returncode == 0, done.stderr
        assert os.lstat(planted).st_uid == NOBODY
        app = "t" + uuid.uuid4().hex[:12]
        env = child_env()
        env.pop("XDG_RUNTIME_DIR", None)
        run = subprocess.run(
            [sys.executable, "-c", AS_VICTIM, str(victim), app],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd="/",
        )
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert os.path.dirname(out["address"]) == planted
        why = "owned by uid 65534" if kind == "directory" else "symbolic link"
        for call in ("claim", "connect"):
            kind_of_error, filename, text = out[call]
            assert (kind_of_error, filename) == ("PermissionError", planted), out
            assert why in text, out
        assert os.listdir(bait) == []
        if kind == "directory":
            assert os.listdir(planted) == []
    finally:
        if os.path.islink(planted):
            os.unlink(planted)
        elif os.path.isdir(planted):
            os.rmdir(planted)
        if os.path.isdir(bait):
            os.rmdir(bait)


# --------------------------------------------------------------------------- other users


@pytest.fixture
def reachable_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 0700 runtime dir whose ancestors another user can traverse (pytest's are 0700)."""
    import shutil
    import tempfile

    rt = Path(tempfile.mkdtemp(prefix="dockpoint-test-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(rt))
    yield rt
    shutil.rmtree(rt, ignore_errors=True)


@as_root
def test_another_user_cannot_reach_the_socket(reachable_runtime: Path) -> None:
    runtime, app = reachable_runtime, "t" + uuid.uuid4().hex[:12]
    with claimed(app) as dp:
        os.chmod(runtime, 0o711)  # let uid 65534 traverse the runtime dir; ours stays 0700
        try:
            code = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n"
                "    print('denied')\nelse:\n    print('connected')\n"
            )
            done = as_nobody(code, dp.address)
            assert done.stdout.strip() == "denied", done.stderr
            with pytest.raises(TimeoutError):
                dp.accept(timeout=0.1)
        finally:
            os.chmod(runtime, 0o700)


@as_root
def test_daemon_drops_a_client_of_another_user(reachable_runtime: Path) -> None:
    runtime, app = reachable_runtime, "t" + uuid.uuid4().hex[:12]
    with claimed(app) as dp:
        d = endpoint_dir(runtime)
        # Simulate a permission mistake that lets another user reach the socket.
        os.chmod(runtime, 0o711)
        os.chmod(d, 0o711)
        os.chmod(dp.address, 0o777)
        try:
            code = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                "s.settimeout(10)\n"
                "try:\n    got = s.recv(10)\nexcept ConnectionResetError:\n    got = b''\n"
                "print('dropped' if got == b'' else 'served')\n"
            )
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import os, socket, sys\n"
                    f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n" + code,
                    dp.address,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=child_env(),
            )
            # One accept() for the whole exchange: it must skip the foreign client, however
            # late that child starts, and return the next client, which is ours.
            handed: list[object] = []
            acceptor = threading.Thread(
                target=lambda: handed.append(dp.accept(timeout=30)), daemon=True
            )
            acceptor.start()
            try:
                out, err = child.communicate(timeout=20)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
            assert out.strip() == "dropped", err
            assert not handed  # still waiting: the foreign client was not handed out
            ok = socket.socket(socket.AF_UNIX)
            ok.connect(dp.address)
            acceptor.join(10)
            assert len(handed) == 1
            conn = handed[0]
            assert isinstance(conn, dockpoint.DockpointConnection)
            assert conn.peer_pid == os.getpid()
            conn.close()
            ok.close()
        finally:
            os.chmod(d, 0o700)
            os.chmod(runtime, 0o700)


@as_root
def test_client_refuses_a_server_of_another_user(runtime: Path, app: str) -> None:
    d = endpoint_dir(runtime)
    d.mkdir(mode=0o700)
    path = dockpoint.address(app)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # macOS paths: the fallback
    # Bound by root inside our private directory, then listening as uid 65534: the peer
    # credentials the client sees are the listener's.
    code = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s.listen(8); print('ready', flush=True); sys.stdin.readline()\n"
    )
    impostor = Child(code, path)
    try:
        impostor.expect("ready")
        with pytest.raises(PermissionError, match="served by uid 65534") as info:
            dockpoint.connect(app)
        assert info.value.filename == path
    finally:
        impostor.stop()
        os.unlink(path)


# --------------------------------------------------------------------------- fork


FORKER = """
import dockpoint, os, sys
app = sys.argv[1]
dp = dockpoint.claim(app)
pid = os.fork()
if pid == 0:
    dp.close()          # the child's copy only
    os._exit(0)
os.waitpid(pid, 0)
print("child-closed", os.path.exists(dp.address), flush=True)
sys.stdin.readline()    # the test checks the endpoint now
conn = dp.accept(timeout=10)
conn.write(b"parent"); conn.close()
sys.stdin.readline()
dp.close()
print("parent-closed", flush=True)
sys.stdin.readline()
"""


def test_forked_child_close_leaves_parent_claimed(app: str) -> None:
    parent = Child(FORKER, app)
    try:
        assert parent.line() == "child-closed True"
        assert dockpoint.claim(app) is None  # still claimed by the parent
        parent.send("go")
        conn = dockpoint.connect(app, timeout=10)
        assert conn is not None
        with conn:
            assert conn.read(timeout=10) == b"parent"
        assert conn.peer_pid == parent.pid
        parent.send("close")
        parent.expect("parent-closed")
        dp = dockpoint.claim(app)
        assert dp is not None
        dp.close()
    finally:
        parent.stop()


LINGERING_CHILD = """
import dockpoint, os, sys
dp = dockpoint.claim(sys.argv[1])
r, w = os.pipe()
pid = os.fork()
if pid == 0:            # keeps its inherited copies open and waits
    os.close(w)
    os.read(r, 1)
    os._exit(0)
os.close(r)
dp.close()
print("parent-closed", flush=True)
sys.stdin.readline()
os.close(w)
os.waitpid(pid, 0)
"""


def test_parent_close_releases_while_a_forked_child_lives(app: str) -> None:
    # flock belongs to the open file description, which the child shares: the parent's
    # close() must unlock explicitly, not merely close its descriptor.
    parent = Child(LINGERING_CHILD, app)
    try:
        parent.expect("parent-closed")
        dp = dockpoint.claim(app)
        assert dp is not None, "the forked child's copy kept the claim"
        dp.close()
        parent.send("done")
        assert parent.proc.wait(10) == 0
    finally:
        parent.stop()


def test_sigint_during_accept_raises_keyboardinterrupt(app: str, children: list[Child]) -> None:
    code = (
        "import dockpoint, sys\n"
        "dp = dockpoint.claim(sys.argv[1])\n"
        "try:\n    print('ready', flush=True)\n    dp.accept()\nexcept KeyboardInterrupt:\n"
        "    dp.close(); print('interrupted', flush=True)\n"
    )
    child = Child(code, app)
    children.append(child)
    child.expect("ready")
    wait_pid_blocked(child.pid)  # inside accept(), not before it
    child.proc.send_signal(signal.SIGINT)
    child.expect("interrupted")
    assert child.proc.wait(10) == 0
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


def test_close_in_a_signal_handler_during_accept(app: str, children: list[Child]) -> None:
    code = (
        "import dockpoint, signal, sys\n"
        "dp = dockpoint.claim(sys.argv[1])\n"
        "signal.signal(signal.SIGTERM, lambda *a: dp.close())\n"
        "print('ready', flush=True)\n"
        "try:\n    dp.accept()\nexcept dockpoint.DockpointClosedError:\n"
        "    print('closed', flush=True)\n"
    )
    child = Child(code, app)
    children.append(child)
    child.expect("ready")
    wait_pid_blocked(child.pid)
    child.proc.send_signal(signal.SIGTERM)
    child.expect("closed")
    assert child.proc.wait(10) == 0
    assert dockpoint.connect(app) is None
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


# --------------------------------------------------------------------------- burst


def test_burst_of_clients_queues_in_the_backlog(app: str) -> None:
    # macOS and the BSDs cap the backlog at kern.ipc.somaxconn (128 by default).
    n = 600 if LINUX else 100
    with claimed(app) as dp:
        clients = []
        try:
            for _ in range(n):  # nobody accepts yet: each one must wait in the backlog
                conn = dockpoint.connect(app, timeout=5)
                assert conn is not None, f"refused after {len(clients)} clients"
                clients.append(conn)
            served = []
            for _ in range(n):
                served.append(dp.accept(timeout=10))
            assert len(served) == n
        finally:
            for c in clients:
                c.close()
        for s in served:
            assert s.read(timeout=10) == b""
            s.close()


# --------------------------------------------------------------------------- import


def test_import_pulls_in_no_ctypes_nor_typing_helpers() -> None:
    code = (
        f"import socket, sys; sys.path.insert(0, {PACKAGE_ROOT!r})\n"
        "before = set(sys.modules)\n"
        "import dockpoint\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=PACKAGE_ROOT,
    )
    assert done.returncode == 0, done.stderr
    new = set(done.stdout.split())
    assert "ctypes" not in new
    assert not new & {"typing", "typing_extensions", "threading", "re", "hashlib", "struct"}
    allowed = {"dockpoint", "errno", "__future__"} | {
        f"dockpoint.{m}"
        for m in ("_api", "_classes", "_names", "_signals", "_posix", "_posix_dir", "_posix_stream")
    }
    assert new <= allowed, new


CLIENT_MODULES = """
import sys
before = set(sys.modules)  # what start-up loaded (a site-packages .pth may load enum)
import dockpoint
conn = dockpoint.connect(sys.argv[1])
conn.write(b"x")
assert conn.read() == b"x"
conn.close()
heavy = {"fcntl", "select", "signal", "enum", "socket", "warnings"}
heavy |= {"dockpoint._posix_claim", "dockpoint._posix_probe"}
print(" ".join(sorted(heavy & (set(sys.modules) - before))) or "none")
"""


def test_a_client_loads_only_what_a_connect_needs(app: str) -> None:
    """import dockpoint, connect, write, read, close: the claim side (and fcntl, select)
    stays unloaded, so a frontend whose daemon runs pays for none of it."""
    env = child_env()
    env.pop("PYTHONWARNINGS", None)  # -W options would load warnings.py at start-up
    with claimed(app) as dp:
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENT_MODULES, app],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            with dp.accept(timeout=30) as server:
                server.write(server.read(timeout=30))
            out, err = child.communicate(timeout=30)
        finally:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err
    assert out.split() == ["none"]


EXEC_PARENT = """
import dockpoint, subprocess, sys
dp = dockpoint.claim(sys.argv[1])
kid = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                       stdin=subprocess.PIPE, close_fds=False)
print(kid.pid, flush=True)
sys.stdin.readline()
"""


def test_exec_children_do_not_inherit_the_claim(app: str, children: list[Child]) -> None:
    parent = Child(EXEC_PARENT, app)
    children.append(parent)
    kid = int(parent.line())
    try:
        parent.proc.kill()  # the holder dies; its exec'd child lives on
        parent.proc.wait(10)
        os.kill(kid, 0)  # still running
        # The kernel may finish closing the exec'd child's close-on-exec descriptors a
        # moment after the holder saw exec succeed; an inherited lock would never go.
        deadline = time.monotonic() + 5
        dp = dockpoint.claim(app)
        while dp is None and time.monotonic() < deadline:
            time.sleep(0.01)
            dp = dockpoint.claim(app)
        assert dp is not None, "an exec'd child kept the claim alive"
        dp.close()
    finally:
        os.kill(kid, signal.SIGKILL)
        try:
            os.waitpid(kid, 0)
        except ChildProcessError:
            pass  # not our child: reaped by init


# --------------------------------------------------------------------------- robustness

SIGNAL_CLOSE_LOOP = """
import dockpoint, signal, sys
app = sys.argv[1]
for round_ in range(40):
    dp = dockpoint.claim(app)
    signal.signal(signal.SIGALRM, lambda *a: dp.close())
    signal.setitimer(signal.ITIMER_REAL, 0.0002 * (round_ % 7 + 1))
    n = 0
    while True:  # the alarm lands anywhere in accept(), locks held or not
        n += 1
        try:
            dp.accept(timeout=0)
        except TimeoutError:
            pass
        except dockpoint.DockpointClosedError:
            break
    assert dockpoint.connect(app) is None
print("ok", flush=True)
"""


def test_close_in_a_signal_handler_never_deadlocks(app: str) -> None:
    done = run_python(SIGNAL_CLOSE_LOOP, app)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


FORK_THEN_KILL = """
import dockpoint, os, sys
dp = dockpoint.claim(sys.argv[1])
pid = os.fork()
if pid == 0:  # a worker that never heard of dockpoint: keeps whatever it inherited
    try:
        dp.accept(timeout=1)
    except dockpoint.DockpointClosedError:
        os.write(1, b"child: closed %r\\n" % dp.closed)  # one write: no interleaving
    sys.stdin.readline()
    os._exit(0)
os.write(1, b"%d\\n" % pid)
sys.stdin.readline()
"""


def test_forked_child_does_not_keep_a_killed_holders_claim(app: str) -> None:
    holder = Child(FORK_THEN_KILL, app)
    worker = 0
    try:
        first, second = holder.line(), holder.line()
        lines = {first, second}
        assert "child: closed True" in lines
        worker = int((lines - {"child: closed True"}).pop())
        holder.proc.kill()  # the holder dies; its forked worker lives on
        holder.proc.wait(10)
        os.kill(worker, 0)
        assert dockpoint.connect(app) is None  # not an orphaned backlog that never answers
        dp = dockpoint.claim(app)
        assert dp is not None, "the forked worker kept the claim"
        dp.close()
    finally:
        if worker:
            os.kill(worker, signal.SIGKILL)
        holder.stop()


NO_FDS = """
import dockpoint, os, resource, sys
app = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
for spare in range(1, 9):  # run out of descriptors at every step of claim()
    fds = []
    try:
        while True:
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for fd in fds[-spare:]:
        os.close(fd)
    try:
        dp = dockpoint.claim(app)
    except OSError:
        dp = None
    for fd in fds[:-spare]:
        os.close(fd)
    if dp is not None:
        dp.close()
    # The endpoint's files: its directory, and where the socket is in the shared short
    # fallback (macOS paths), the entries there named after this endpoint's socket.
    home = os.path.join(os.environ["XDG_RUNTIME_DIR"], "dockpoint")
    where, sock = os.path.split(dockpoint.address(app))
    left = set(os.listdir(home))
    if where != home and os.path.isdir(where):  # the fallback is made by the first bind
        left.update(n for n in os.listdir(where) if n.startswith(sock[: -len(".sock")] + "."))
    left = sorted(left)
    again = dockpoint.claim(app)
    print(spare, left, again is not None, flush=True)
    again.close()
"""


def test_running_out_of_descriptors_leaves_nothing_claimed(app: str) -> None:
    done = run_python(NO_FDS, app)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8
    for line in lines:  # at most the lock file (never unlinked), and claimable again
        assert line.split(" ", 1)[1] in ("[] True", f"['{app}@default.lock'] True"), lines


def test_a_dropped_dockpoint_warns_and_releases(app: str) -> None:
    import gc

    def leak() -> None:
        assert dockpoint.claim(app) is not None

    with pytest.warns(ResourceWarning, match="unclosed"):
        leak()
        gc.collect()
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


SIGPIPE_DEFAULT = """
import dockpoint, signal, sys, threading
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as CLIs do so that `| head` works
app = sys.argv[1]
dp = dockpoint.claim(app)
t = threading.Thread(target=lambda: dp.accept(timeout=10).close())
t.start()
conn = dockpoint.connect(app, timeout=10)
t.join(10)
try:
    for _ in range(1000):
        conn.write(b"x" * 65536)
except BrokenPipeError:
    print("BrokenPipeError", flush=True)
"""


def test_writing_to_a_gone_peer_never_raises_sigpipe(app: str) -> None:
    done = run_python(SIGPIPE_DEFAULT, app)
    assert done.returncode == 0, f"killed by signal {-done.returncode}: {done.stderr}"
    assert done.stdout.strip() == "BrokenPipeError"


def test_default_socket_timeout_does_not_leak_into_connections(app: str) -> None:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.05)
    try:
        with claimed(app) as dp:
            client = dockpoint.connect(app)
            assert client is not None
            server = dp.accept(timeout=10)
            got: list[object] = []

            def read() -> None:
                try:
                    got.append(client.read())
                except Exception as e:
                    got.append(e)

            t = threading.Thread(target=read, daemon=True)
            t.start()
            t.join(0.5)  # a leaked 0.05 s default would have ended the read by now
            assert t.is_alive() and not got, got
            server.write(b"late")
            t.join(10)
            assert got == [b"late"]
            client.close()
            server.close()
    finally:
        socket.setdefaulttimeout(old)


def test_missing_runtime_dir_means_nobody(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "logged-out"))
    assert dockpoint.connect("app") is None
    with pytest.raises(FileNotFoundError) as info:
        dockpoint.claim("app")
    assert info.value.filename == str(tmp_path / "logged-out")


@pytest.mark.parametrize("below", [False, True])
def test_runtime_dir_that_is_a_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, below: bool
) -> None:
    """``XDG_RUNTIME_DIR`` naming a file (or a path below one): connect and claim raise
    the documented errors naming the variable, not a bare ``NotADirectoryError``."""
    (tmp_path / "file").write_text("")
    xdg = str(tmp_path / "file" / "sub" if below else tmp_path / "file")
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    if below:  # as a missing runtime dir: nobody there, and claim names the variable
        assert dockpoint.connect("app") is None
        with pytest.raises(FileNotFoundError) as missing:
            dockpoint.claim("app")
        assert "XDG_RUNTIME_DIR" in str(missing.value) and missing.value.filename == xdg
        return
    for call in (dockpoint.connect, dockpoint.claim):
        with pytest.raises(PermissionError) as info:
            call("app")
        assert "XDG_RUNTIME_DIR" in str(info.value) and "not a directory" in str(info.value)
        assert info.value.filename == xdg


def test_holder_pid_probe(runtime: Path, app: str) -> None:
    d = str(endpoint_dir(runtime))
    stem = f"{app}@default"
    assert not _posix_stream._holder_alive(d, stem)  # no lock file
    with claimed(app):
        assert _posix_stream._holder_alive(d, stem)
    assert not _posix_stream._holder_alive(d, stem)  # released: emptied
    Path(d, stem + ".lock").write_text("999999999\n")  # a crashed holder's dead pid
    assert not _posix_stream._holder_alive(d, stem)
