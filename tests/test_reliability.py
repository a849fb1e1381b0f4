"""Reliability: close() from another thread, extreme timeouts, interpreter exit (these on
both backends); strict umasks, the claim's look-ups, and signals landing at every step of
claim() and close() (POSIX)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import LINUX, child_env, lock_file, run_python, wait_blocked

import dockpoint

WINDOWS = sys.platform == "win32"
#: Items 1-3 hold on both backends; the rest are about the POSIX claim's files and signals.
posix_only = pytest.mark.skipif(WINDOWS, reason="POSIX backend")


class Runner(threading.Thread):
    """A thread running ``fn``; keeps its result or exception."""

    def __init__(self, fn: object) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()  # type: ignore[operator]
        except BaseException as e:
            self.error = e


def trio(
    app: str,
) -> tuple[dockpoint.Dockpoint, dockpoint.DockpointConnection, dockpoint.DockpointConnection]:
    dp = dockpoint.claim(app)
    assert dp is not None
    client = dockpoint.connect(app)
    assert client is not None
    server = dp.accept(timeout=10)
    return dp, client, server


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("side", ["server", "client"])
def test_close_from_another_thread_ends_a_blocked_read(app: str, side: str) -> None:
    dp, client, server = trio(app)
    with dp, client, server:
        mine, peer = (server, client) if side == "server" else (client, server)
        reader = Runner(mine.read)
        reader.start()
        wait_blocked(reader)
        mine.close()
        reader.join(10)
        assert not reader.is_alive(), "read() still blocked 10 s after close()"
        assert isinstance(reader.error, dockpoint.DockpointClosedError), reader.error
        assert peer.read(timeout=10) == b""  # the peer sees end of stream


@pytest.mark.parametrize("side", ["server", "client"])
def test_close_from_another_thread_ends_a_blocked_write(app: str, side: str) -> None:
    dp, client, server = trio(app)
    payload = b"x" * (64 << 20)  # far more than the socket buffers hold
    with dp, client, server:
        mine, peer = (server, client) if side == "server" else (client, server)
        writer = Runner(lambda: mine.write(payload))
        writer.start()
        wait_blocked(writer)
        mine.close()
        writer.join(10)
        assert not writer.is_alive(), "write() still blocked 10 s after close()"
        assert isinstance(writer.error, dockpoint.DockpointClosedError), writer.error
        got = 0
        while True:  # what was queued before the close, then end of stream
            chunk = peer.read(1 << 20, timeout=10)
            if not chunk:
                break
            got += len(chunk)
        assert got < len(payload)


def test_two_timed_readers_never_block_past_their_timeout(app: str) -> None:
    # Longer than wait_blocked's 0.3 s sleep where it cannot see a thread's kernel wait.
    timeout = 0.2 if LINUX else 1.0
    dp, client, server = trio(app)
    with dp, client, server:
        for _ in range(20):  # the old race showed in some rounds only
            readers = [Runner(lambda: server.read(1, timeout=timeout)) for _ in range(2)]
            for r in readers:
                r.start()
            for r in readers:
                wait_blocked(r)
            client.write(b"x")
            for r in readers:
                r.join(10)
            stuck = [r for r in readers if r.is_alive()]
            if stuck:
                client.write(b"y" * len(stuck))  # free the stuck thread before failing
            assert not stuck, f"a read(timeout={timeout}) was still blocked 10 s later"
            got = sorted(repr(r.result if r.error is None else type(r.error)) for r in readers)
            assert got == sorted([repr(b"x"), repr(TimeoutError)]), got


# --------------------------------------------------------------------------- item 2

LONG = [math.inf, 1e300, 2**31 / 1000 + 1, 10**400, 30 * 86400]


@pytest.mark.parametrize("timeout", LONG, ids=["inf", "1e300", "2^31ms", "10^400", "30d"])
def test_long_and_infinite_timeouts_wait_and_work(app: str, timeout: float) -> None:
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        acceptor = Runner(lambda: dp.accept(timeout=timeout))
        acceptor.start()
        wait_blocked(acceptor)
        client = dockpoint.connect(app, timeout=timeout)
        assert client is not None
        acceptor.join(10)
        assert acceptor.error is None, acceptor.error
        server = acceptor.result
        assert isinstance(server, dockpoint.DockpointConnection)
        with client, server:
            reader = Runner(lambda: server.read(timeout=timeout))
            reader.start()
            wait_blocked(reader)
            client.write(b"ping")
            reader.join(10)
            assert reader.error is None, reader.error
            assert reader.result == b"ping"


@pytest.mark.parametrize("timeout", LONG, ids=["inf", "1e300", "2^31ms", "10^400", "30d"])
def test_long_and_infinite_timeouts_of_probe_stop_spawn_and_aio(
    app: str, timeout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dockpoint.aio
    from dockpoint.__main__ import daemon_command

    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # the daemon's dockpoint
    argv = daemon_command(app, "default", 60.0)
    assert dockpoint.probe(app, timeout=timeout).state == "absent"
    assert dockpoint.stop(app, timeout=timeout) is None
    try:
        spawner = Runner(lambda: dockpoint.connect_or_spawn(app, argv, timeout=timeout))
        spawner.start()  # waits for the daemon it starts to adopt the endpoint
        spawner.join(30)
        assert not spawner.is_alive(), "connect_or_spawn still waiting 30 s later"
        assert spawner.error is None, spawner.error
        conn = spawner.result
        assert isinstance(conn, dockpoint.DockpointConnection)
        with conn:
            pid = conn.peer_pid
            found = dockpoint.probe(app, timeout=timeout)  # knocks at a live holder
            assert (found.state, found.pid) == ("listening", pid), found
            with dockpoint.connect_or_spawn(app, argv, timeout=timeout) as again:
                assert again.peer_pid == pid  # found it: no second daemon

            async def streams() -> object:
                got = await dockpoint.aio.open_connection(app, timeout=timeout)
                assert got is not None
                got[1].close()
                await got[1].wait_closed()
                return got

            assert asyncio.run(asyncio.wait_for(streams(), 30)) is not None
        stopper = Runner(lambda: dockpoint.stop(app, timeout=timeout))
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "stop still waiting 30 s later"
        assert (stopper.error, stopper.result) == (None, pid)
    finally:
        dockpoint.stop(app, timeout=10)


@pytest.mark.parametrize("timeout", [0, 0.0, 1e-9, 5e-324])
def test_tiny_timeouts_expire(app: str, timeout: float) -> None:
    assert dockpoint.connect(app, timeout=timeout) is None  # nobody there
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        with pytest.raises(TimeoutError):
            dp.accept(timeout=timeout)
        client = dockpoint.connect(app, timeout=timeout)
        assert client is not None
        with client, dp.accept(timeout=10) as server, pytest.raises(TimeoutError):
            server.read(timeout=timeout)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (math.nan, ValueError),
        (-1, ValueError),
        (-1e-9, ValueError),
        (-math.inf, ValueError),
        (-(10**400), ValueError),
        (True, TypeError),
        (False, TypeError),
        ("1", TypeError),
        (1j, TypeError),
    ],
)
def test_bad_timeouts_are_refused_on_every_call(app: str, timeout: object, error: type) -> None:
    with pytest.raises(error):
        dockpoint.connect(app, timeout=timeout)  # type: ignore[arg-type]
    dp, client, server = trio(app)
    with dp, client, server:
        with pytest.raises(error):
            dp.accept(timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(error):
            server.read(timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(math.nan, ValueError), (-1e-9, ValueError), (-math.inf, ValueError), (True, TypeError)],
)
def test_bad_timeouts_are_refused_by_probe_stop_spawn_and_aio(
    app: str, timeout: object, error: type
) -> None:
    import dockpoint.aio

    never = [sys.executable, "-c", "raise SystemExit('must not start')"]
    with pytest.raises(error):
        dockpoint.probe(app, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(error):
        dockpoint.stop(app, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(error):
        dockpoint.connect_or_spawn(app, never, timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(error):
        asyncio.run(dockpoint.aio.open_connection(app, timeout=timeout))  # type: ignore[arg-type]
    assert dockpoint.probe(app).state == "absent"  # nothing was started or made


@pytest.mark.parametrize("wait", LONG, ids=["inf", "1e300", "2^31ms", "10^400", "30d"])
def test_claim_wait_long_on_a_free_name_claims_at_once(app: str, wait: float) -> None:
    dp = dockpoint.claim(app, wait=wait)
    assert dp is not None
    dp.close()


@pytest.mark.parametrize("wait", [0, 1e-9, 5e-324])
def test_claim_wait_tiny_on_a_held_name_gives_none(app: str, wait: float) -> None:
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        assert dockpoint.claim(app, wait=wait) is None


@pytest.mark.parametrize(
    ("wait", "error"),
    [
        (math.nan, ValueError),
        (-1, ValueError),
        (-math.inf, ValueError),
        (True, TypeError),
        ("1", TypeError),
    ],
)
def test_claim_bad_waits_are_refused(app: str, wait: object, error: type) -> None:
    with pytest.raises(error, match="wait"):
        dockpoint.claim(app, wait=wait)  # type: ignore[arg-type]
    assert not os.path.lexists(dockpoint.address(app))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_a_held_claim_costs_three_descriptors_until_a_thread_waits(app: str) -> None:
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = count()
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        assert count() - before == 3  # socket, lock file, directory
        with pytest.raises(TimeoutError):
            dp.accept(timeout=0)
        assert count() - before == 5  # and the wake pipe, once a thread has waited
    assert count() == before


# --------------------------------------------------------------------------- also: look-ups


def _proc_alias() -> bool:
    from dockpoint import _posix_dir

    return bool(_posix_dir.PROC_ALIAS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="binds through /proc/self/fd")
def test_claim_binds_and_renames_in_the_directory_it_checked(
    runtime: Path, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _proc_alias():
        pytest.skip("no /proc/self/fd alias (simulated macOS paths): binds by path")
    from dockpoint import _posix_claim

    endpoint, checked = runtime / "dockpoint", runtime / "checked"
    real = _posix_claim._bind

    def swap_then_bind(dfd: int, where: str, name: str) -> object:
        os.rename(endpoint, checked)  # the directory claim() checked and opened moves away
        endpoint.mkdir(mode=0o700)  # and another takes its path
        return real(dfd, where, name)

    monkeypatch.setattr(_posix_claim, "_bind", swap_then_bind)
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        name = os.path.basename(dp.address)
        assert stat.S_ISSOCK(os.lstat(checked / name).st_mode)  # bound and renamed there
        assert os.listdir(endpoint) == []  # nothing reached the directory now at the path


@posix_only
def test_claim_refuses_a_runtime_dir_swapped_after_its_check(
    runtime: Path, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dockpoint import _posix_claim

    xdg = Path(os.environ["XDG_RUNTIME_DIR"])
    moved = xdg.parent / (xdg.name + ".checked")
    real = _posix_claim._directory
    swaps = []

    def check_then_swap(check: bool, uid: int) -> str:
        got = real(check=check, uid=uid)  # XDG_RUNTIME_DIR checked: the user's own, 0700
        if check and not swaps:
            os.rename(xdg, moved)
            xdg.mkdir()
            os.chmod(xdg, 0o777)  # one anybody can write takes its path
            swaps.append(got)
        return got

    monkeypatch.setattr(_posix_claim, "_directory", check_then_swap)
    try:
        with pytest.raises(PermissionError, match="unsafe directory"):
            dockpoint.claim(app)
        assert swaps, "the claim never checked XDG_RUNTIME_DIR"
        assert os.listdir(xdg) == []  # nothing was made in it
    finally:
        if swaps:
            shutil.rmtree(xdg)
            os.rename(moved, xdg)


# --------------------------------------------------------------------------- item 3

EXIT_WITH_CYCLE = """
import sys, dockpoint
dp = dockpoint.claim(sys.argv[1])
assert dp is not None
cycle = [dp]
cycle.append(cycle)  # reachable only through a reference cycle at exit
dp.cycle = cycle
print(dp.address, flush=True)
"""


def test_unclosed_dockpoint_in_a_cycle_at_exit_is_silent_and_leaves_no_file(app: str) -> None:
    for _ in range(5):  # the old traceback showed every time
        done = run_python(EXIT_WITH_CYCLE, app)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        address = done.stdout.strip()
        if not WINDOWS:  # a pipe goes with its process
            assert address.endswith(".sock")
            assert not os.path.lexists(address)
        again = dockpoint.claim(app)  # and the claim is free
        assert again is not None
        again.close()


# --------------------------------------------------------------------------- item 4


def _as_unprivileged_child(body: object, xdg: Path) -> dict[str, object]:
    """Run ``body()`` in a forked child (uid/gid 65534 when root) and return its dict."""
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    if os.geteuid() == 0:
        os.chown(xdg, uid, 65534)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            if os.geteuid() == 0:
                # Loaded lazily by the short-path code; root's interpreter may be unreadable after.
                import hashlib  # noqa: F401

                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            os.environ["XDG_RUNTIME_DIR"] = str(xdg)
            out = body()  # type: ignore[operator]
            os.write(w, json.dumps(out).encode())
            code = 0
        except BaseException as e:
            os.write(w, json.dumps({"error": repr(e)}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    got = json.loads(data or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, got
    return dict(got)


def _claim_under_strict_umask(app: str) -> dict[str, object]:
    os.umask(0o177)
    dp = dockpoint.claim(app)
    assert dp is not None, "claim returned None"
    lock = lock_file(app)  # the socket may be in the short fallback, the lock is not
    modes = {
        "uid": os.geteuid(),
        "dir": stat.S_IMODE(os.lstat(os.path.dirname(dp.address)).st_mode),
        "lock_dir": stat.S_IMODE(os.lstat(lock.parent).st_mode),
        "lock": stat.S_IMODE(os.lstat(lock).st_mode),
        "sock": stat.S_IMODE(os.lstat(dp.address).st_mode),
    }
    conn = dockpoint.connect(app)
    assert conn is not None, "connect returned None"
    with conn, dp.accept(timeout=10) as server:
        conn.write(b"hi")
        modes["echo"] = server.read(timeout=10).decode()
    dp.close()
    os.umask(0o022)
    again = dockpoint.claim(app)  # a later claim under a normal umask works too
    assert again is not None
    again.close()
    return modes


@posix_only
@pytest.mark.parametrize("long_path", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "left-0600"])
def test_strict_umask_as_an_unprivileged_user(app: str, existing: bool, long_path: bool) -> None:
    # In /tmp, not $TMPDIR: the dropped child must be able to reach it.
    top = Path(tempfile.mkdtemp(prefix="dockpoint-umask-", dir="/tmp"))
    xdg = top
    if long_path:  # a socket path over the limit: the /proc alias, or the short fallback
        xdg = top / ("x" * 110)
        xdg.mkdir()
        os.chmod(top, 0o755)
    try:
        _strict_umask(app, existing, xdg)
    finally:
        shutil.rmtree(top)


def _strict_umask(app: str, existing: bool, xdg: Path) -> None:
    os.chmod(xdg, 0o700)
    if existing:  # what an earlier claim under umask 0177 used to leave
        (xdg / "dockpoint").mkdir()
        os.chmod(xdg / "dockpoint", 0o600)
        if os.geteuid() == 0:
            os.chown(xdg / "dockpoint", 65534, 65534)
    got = _as_unprivileged_child(lambda: _claim_under_strict_umask(app), xdg)
    assert got.get("uid") != 0, "the child must not be root (root ignores modes)"
    assert got == {**got, "dir": 0o700, "lock_dir": 0o700, "echo": "hi"}, got
    assert got["lock"] in (0o1600, 0o600) and got["sock"] in (0o1600, 0o600), got


# --------------------------------------------------------------------------- item 5

INJECT = r"""
import functools, gc, json, os, signal, sys, warnings
import dockpoint

app = sys.argv[1]
warnings.simplefilter("ignore", ResourceWarning)  # an interrupted claim's object is dropped
signal.signal(signal.SIGINT, signal.default_int_handler)
state = {"n": 0, "at": 0}

def prof(frame, event, arg):
    if arg is sys.setprofile:  # the harness's own call, after fn returned
        return
    state["n"] += 1
    if state["n"] == state["at"]:
        signal.raise_signal(signal.SIGINT)

def run(fn, at):
    state["n"], state["at"] = 0, at
    sys.setprofile(prof)
    try:
        out = fn()
        hit = False
    except KeyboardInterrupt:
        out, hit = None, True
    sys.setprofile(None)
    return out, hit, state["n"]

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def free():
    dp = dockpoint.claim(app)
    if dp is None:
        return False
    dp.close()
    return True

address = dockpoint.address(app)
for _ in range(2):  # warm up: lazy imports done, the directory exists
    dockpoint.claim(app).close()
base = fds()
report = {}
for what in ("claim", "close"):
    total = None
    failures = []
    tried = 0
    at = 0
    while at < 3000:
        at += 1
        try:
            if what == "claim":
                dp, hit, n = run(functools.partial(dockpoint.claim, app), at)
                if dp is not None:
                    dp.close()
                gc.collect()
                ok = free()
                why = "held after claim raised"
            else:
                dp = dockpoint.claim(app)
                if dp is None:
                    failures.append([at, "held before the close test could claim"])
                    break
                _, hit, n = run(dp.close, at)
                ok = free()
                why = "held after close raised"
                if not ok:
                    dp.close()  # a retried close must release it
                    ok = free()
                    why = "held after a retried close"
                del dp
                gc.collect()
        except BaseException as e:
            failures.append([at, "harness: " + repr(e)])
            gc.collect()
            continue
        if not hit:
            if n < at:  # the whole call ran before event `at`: every point was tried
                total = n
                break
            failures.append([at, "the SIGINT raised here never surfaced"])
            continue
        tried += 1
        if not ok:
            failures.append([at, why])
        if fds() != base:
            failures.append([at, "descriptors leaked: %d" % (len(fds()) - len(base))])
            base = fds()
        if os.path.lexists(address) or os.path.lexists(address[:-5] + ".new"):
            failures.append([at, "socket file left"])
    report[what] = {"tried": tried, "events": total, "failures": failures}
print(json.dumps(report))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_sigint_at_every_call_and_return_inside_claim_and_close(app: str) -> None:
    done = run_python(INJECT, app, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({k: {"tried": v["tried"], "events": v["events"]} for k, v in report.items()}))
    for what in ("claim", "close"):
        assert report[what]["tried"] >= 10, report  # the injection reached inside the call
        assert report[what]["failures"] == [], (what, report[what]["failures"][:20])
        assert report[what]["tried"] == report[what]["events"], report  # each event once
    dp = dockpoint.claim(app)  # free for another process too
    assert dp is not None
    dp.close()
