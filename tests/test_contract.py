"""CONTRACT.md, written once against the public API; runs on every backend."""

from __future__ import annotations

import array
import os
import threading
import time
from functools import partial

import pytest
from conftest import Child, claimed, wait_blocked

import dockpoint
from dockpoint import Dockpoint, DockpointClosedError, DockpointConnection


def serve_once(dp: Dockpoint, reply: bytes | None = None) -> threading.Thread:
    """Accept one client in a thread; echo what it sends (or send ``reply``), then close."""

    def run() -> None:
        with dp.accept(timeout=20) as conn:
            data = conn.read(timeout=20)
            conn.write(reply if reply is not None else data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pair(dp: Dockpoint, app: str) -> tuple[DockpointConnection, DockpointConnection]:
    """A connected (client, server) pair through ``dp``."""
    box: list[DockpointConnection] = []
    t = threading.Thread(target=lambda: box.append(dp.accept(timeout=20)), daemon=True)
    t.start()
    client = dockpoint.connect(app, timeout=20)
    t.join(20)
    assert client is not None and box, "no connection"
    return client, box[0]


# --------------------------------------------------------------------------- claim


def test_claim_returns_dockpoint_and_second_claim_gets_none(app: str) -> None:
    dp = dockpoint.claim(app)
    assert isinstance(dp, Dockpoint)
    try:
        assert dockpoint.claim(app) is None
        assert dockpoint.claim(app, "default") is None
    finally:
        dp.close()


def test_refused_second_claim_does_not_lose_the_first(app: str) -> None:
    # 0.1.0a0 lost its lock here: closing any descriptor of the lock file dropped it.
    with claimed(app) as dp:
        for _ in range(3):
            assert dockpoint.claim(app) is None
        t = serve_once(dp)
        conn = dockpoint.connect(app, timeout=10)
        assert conn is not None
        with conn:
            conn.write(b"still mine")
            assert conn.read() == b"still mine"
        t.join(10)
        assert dockpoint.claim(app) is None


def test_instances_are_independent(app: str) -> None:
    with claimed(app) as a, claimed(app, "other") as b:
        assert a.address != b.address
        assert dockpoint.claim(app, "other") is None


def test_names_are_case_insensitive(app: str) -> None:
    with claimed(app.upper()) as dp:
        assert dockpoint.claim(app.lower()) is None
        t = serve_once(dp, b"same")
        conn = dockpoint.connect(app.lower(), timeout=10)
        assert conn is not None
        with conn:
            conn.write(b"x")
            assert conn.read() == b"same"
        t.join(10)


def test_claim_after_close_succeeds(app: str) -> None:
    for _ in range(5):
        dp = dockpoint.claim(app)
        assert dp is not None
        dp.close()
    assert dockpoint.connect(app) is None


def test_address_is_where_the_endpoint_lives(app: str) -> None:
    where = dockpoint.address(app)
    assert isinstance(where, str)
    assert where == dockpoint.address(app.upper(), "DEFAULT")
    assert where != dockpoint.address(app, "other")
    with claimed(app) as dp:
        assert dp.address == where
        assert repr(where) in repr(dp)


# --------------------------------------------------------------------------- connect


def test_connect_returns_none_when_nobody_is_there(app: str) -> None:
    assert dockpoint.connect(app) is None
    assert dockpoint.connect(app, "x") is None


def test_connect_with_timeout_gives_up_with_none(app: str) -> None:
    start = time.monotonic()
    assert dockpoint.connect(app, timeout=0.3) is None
    assert time.monotonic() - start >= 0.29  # kept trying all along (Windows clocks tick in ms)


def test_connect_with_timeout_waits_for_a_daemon_that_comes(app: str) -> None:
    got: list[DockpointConnection | None] = []
    t = threading.Thread(target=lambda: got.append(dockpoint.connect(app, timeout=20)), daemon=True)
    t.start()
    wait_blocked(t)  # it found nobody and sleeps before trying again
    assert not got
    with claimed(app) as dp:
        conn = dp.accept(timeout=20)
        t.join(20)
        assert got and got[0] is not None
        got[0].write(b"late")
        assert conn.read(timeout=10) == b"late"
        got[0].close()
        conn.close()


def test_round_trip_and_peer_pids(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            assert client.write(b"ping") == 4
            assert server.read() == b"ping"
            assert server.write(b"pong") == 4
            assert client.read() == b"pong"
            assert client.peer_pid == os.getpid()
            assert server.peer_pid == os.getpid()


def test_peer_pid_of_another_process(app: str, children: list[Child]) -> None:
    code = (
        "import dockpoint, sys\n"
        "c = dockpoint.connect(sys.argv[1], timeout=20)\n"
        "print(c.peer_pid); c.write(b'hi'); c.read(); c.close()\n"
    )
    with claimed(app) as dp:
        child = Child(code, app)
        children.append(child)
        with dp.accept(timeout=20) as conn:
            assert conn.peer_pid == child.pid
            assert conn.read(timeout=20) == b"hi"
            conn.write(b"bye")
        assert child.line() == str(os.getpid())


# --------------------------------------------------------------------------- read/write


def test_read_returns_at_most_max_bytes(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            client.write(b"0123456789")
            got = b""
            while len(got) < 10:
                chunk = server.read(3, timeout=10)
                assert 1 <= len(chunk) <= 3
                got += chunk
            assert got == b"0123456789"


def test_read_returns_empty_at_end_of_stream(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        client.write(b"last")
        client.close()
        with server:
            assert server.read(timeout=10) == b"last"
            assert server.read(timeout=10) == b""
            assert server.read(timeout=10) == b""


def test_read_blocks_until_data_arrives(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            got: list[bytes] = []
            t = threading.Thread(target=lambda: got.append(server.read()), daemon=True)
            t.start()
            wait_blocked(t)
            assert not got
            client.write(b"!")
            t.join(10)
            assert got == [b"!"]


def test_read_timeout(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                server.read(timeout=0.2)
            assert time.monotonic() - start >= 0.19
            with pytest.raises(TimeoutError):
                client.read(timeout=0)
            client.write(b"after")  # a timed-out read leaves the stream usable
            assert server.read(timeout=10) == b"after"


def test_write_takes_any_bytes_like_and_writes_everything(app: str) -> None:
    big = os.urandom(3 * 1024 * 1024 + 7)  # more than any socket or pipe buffer
    ints = array.array("i", range(1000))
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            received = bytearray()
            want = 5 + 5 + 3 + len(big) + ints.itemsize * 1000 + 4

            def drain() -> None:
                while len(received) < want:
                    chunk = server.read(timeout=20)
                    if not chunk:
                        return
                    received.extend(chunk)

            t = threading.Thread(target=drain, daemon=True)
            t.start()
            assert client.write(b"bytes") == 5
            assert client.write(bytearray(b"array")) == 5
            assert client.write(memoryview(b"xmvx")[1:3]) == 2
            assert client.write(memoryview(b"z")) == 1
            assert client.write(big) == len(big)
            assert client.write(ints) == ints.itemsize * 1000
            assert client.write(memoryview(ints)) == ints.itemsize * 1000
            t.join(30)
            assert bytes(received[:13]) == b"bytesarraymvz"
            assert bytes(received[13 : 13 + len(big)]) == big
            assert bytes(received[13 + len(big) :]) == ints.tobytes() + ints.tobytes()


@pytest.mark.parametrize("bad", ["text", 42, None, [1, 2]])
def test_write_rejects_non_bytes(app: str, bad: object) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server, pytest.raises(TypeError, match="bytes-like"):
            client.write(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-1, ValueError), ("1", TypeError), (1.5, TypeError), (True, TypeError)],
)
def test_read_rejects_bad_max_bytes(app: str, bad: object, error: type[Exception]) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            with pytest.raises(error, match="max_bytes"):
                client.read(bad)  # type: ignore[arg-type]
            server.write(b"ok")  # nothing was consumed by the refused read
            assert client.read(timeout=10) == b"ok"


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)],
)
def test_bad_timeouts_are_refused(app: str, bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout"):
        dockpoint.connect(app, timeout=bad)  # type: ignore[arg-type]
    with claimed(app) as dp:
        with pytest.raises(error, match="timeout"):
            dp.accept(timeout=bad)  # type: ignore[arg-type]
        client, server = pair(dp, app)
        with client, server, pytest.raises(error, match="timeout"):
            client.read(timeout=bad)  # type: ignore[arg-type]


def test_huge_max_bytes_is_not_an_allocation(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client, server:
            client.write(b"small")
            assert server.read(1 << 62, timeout=10) == b"small"


# --------------------------------------------------------------------------- accept


def test_accept_timeout(app: str) -> None:
    with claimed(app) as dp:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            dp.accept(timeout=0.2)
        assert time.monotonic() - start >= 0.19
        with pytest.raises(TimeoutError):
            dp.accept(timeout=0)
        t = serve_once(dp)  # still accepting after timeouts
        conn = dockpoint.connect(app, timeout=10)
        assert conn is not None
        with conn:
            conn.write(b"ok")
            assert conn.read(timeout=10) == b"ok"
        t.join(10)


def test_close_from_another_thread_wakes_accept(app: str) -> None:
    dp = dockpoint.claim(app)
    assert dp is not None
    errors: list[BaseException] = []

    def run() -> None:
        try:
            dp.accept()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_blocked(t)
    closer = threading.Thread(target=dp.close, daemon=True)  # a broken wake must not hang us
    closer.start()
    closer.join(5)
    t.join(5)
    assert not t.is_alive() and not closer.is_alive(), "accept() was not woken by close()"
    assert len(errors) == 1 and isinstance(errors[0], DockpointClosedError)
    assert dockpoint.connect(app) is None
    again = dockpoint.claim(app)  # released: the next claimer gets it
    assert again is not None
    again.close()


def test_close_wakes_several_accepting_threads(app: str) -> None:
    dp = dockpoint.claim(app)
    assert dp is not None
    errors: list[BaseException] = []

    def run() -> None:
        try:
            dp.accept(timeout=30)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        wait_blocked(t)
    closer = threading.Thread(target=dp.close, daemon=True)
    closer.start()
    closer.join(5)
    assert not closer.is_alive()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(errors) == 4
    assert all(isinstance(e, DockpointClosedError) for e in errors)


def test_accept_never_returns_a_probe(app: str) -> None:
    """probe() (and so status and stop) connects and leaves without a byte: accept() drops
    those connections, whether they queued before it ran or came while it waited."""
    with claimed(app) as dp:
        for _ in range(20):
            assert dockpoint.probe(app).state == "listening"
        with pytest.raises(TimeoutError):
            dp.accept(timeout=0.5)
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(dp.accept(timeout=20)), daemon=True)
        t.start()
        wait_blocked(t)
        for _ in range(20):
            assert dockpoint.probe(app).state == "listening"
        client = dockpoint.connect(app, timeout=10)
        assert client is not None
        t.join(20)
        with client:
            (served,) = got
            assert isinstance(served, DockpointConnection)
            with served:
                client.write(b"x")
                assert served.read(timeout=10) == b"x"


# --------------------------------------------------------------------------- close


def test_close_is_idempotent_and_use_after_close_raises(app: str) -> None:
    dp = dockpoint.claim(app)
    assert dp is not None
    client, server = pair(dp, app)
    for obj in (client, server):
        assert not obj.closed
        obj.close()
        obj.close()
        assert obj.closed
        for use in (obj.read, partial(obj.write, b"x"), obj.fileno):
            with pytest.raises(DockpointClosedError) as info:
                use()
            assert info.value.errno == 9
            assert info.value.strerror == "DockpointConnection is closed"  # not "while in use"
        assert "closed" in repr(obj)
    assert not dp.closed
    dp.close()
    dp.close()
    assert dp.closed
    with pytest.raises(DockpointClosedError):
        dp.accept(timeout=1)
    assert isinstance(DockpointClosedError(), OSError)


def test_context_managers_close(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        with client as c, server as s:
            assert c is client and s is server
        assert client.closed and server.closed
    assert dp.closed
    assert dockpoint.connect(app) is None


def test_writing_to_a_closed_peer_raises_broken_pipe(app: str) -> None:
    with claimed(app) as dp:
        client, server = pair(dp, app)
        server.close()
        with client, pytest.raises(BrokenPipeError):
            for _ in range(1000):
                client.write(b"x" * 65536)


# --------------------------------------------------------------------------- processes


HOLDER = """
import dockpoint, sys, threading
dp = dockpoint.claim(sys.argv[1])
print("claimed" if dp is not None else "refused", flush=True)
if dp is not None:
    def serve():
        while True:
            try:
                conn = dp.accept()
            except OSError:
                return
            with conn:
                conn.read(timeout=10)
                conn.write(str(__import__("os").getpid()).encode())
    threading.Thread(target=serve, daemon=True).start()
for line in sys.stdin:
    if line.strip() == "close" and dp is not None:
        dp.close()
        print("closed", flush=True)
"""


def ask_pid(app: str) -> int | None:
    conn = dockpoint.connect(app)
    if conn is None:
        return None
    with conn:
        conn.write(b"who")
        return int(conn.read(timeout=10))


def test_killed_holder_never_blocks_the_next_claim(app: str, children: list[Child]) -> None:
    holder = Child(HOLDER, app)
    children.append(holder)
    holder.expect("claimed")
    assert ask_pid(app) == holder.pid
    assert dockpoint.claim(app) is None
    holder.proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
    holder.proc.wait(10)
    assert dockpoint.connect(app) is None
    with claimed(app) as dp:  # the killed holder's claim is free again
        t = serve_once(dp)
        conn = dockpoint.connect(app, timeout=10)
        assert conn is not None
        with conn:
            conn.write(b"new")
            assert conn.read(timeout=10) == b"new"
        t.join(10)


WORKER = """
import dockpoint, sys
app = sys.argv[1]
dp = None
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "claim":
        dp = dockpoint.claim(app)
        print("won" if dp is not None else "lost", flush=True)
    elif cmd == "release":
        if dp is not None:
            dp.close()
            dp = None
        print("released", flush=True)
"""


def test_claim_race_has_exactly_one_winner(app: str, children: list[Child]) -> None:
    workers = [Child(WORKER, app) for _ in range(16)]
    children.extend(workers)
    for rnd in range(30):
        for w in workers:
            w.send("claim")
        results = [w.line() for w in workers]
        assert sorted(results) == ["lost"] * 15 + ["won"], f"round {rnd}: {results}"
        for w in workers:
            w.send("release")
        for w in workers:
            w.expect("released")


SPINNER = """
import dockpoint, os, sys, threading
app = sys.argv[1]
dp = None
def serve(d):
    while True:
        try:
            conn = d.accept()
        except OSError:
            return
        with conn:
            conn.write(str(os.getpid()).encode())
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "spin":  # keep claiming until it is ours
        while dp is None:
            dp = dockpoint.claim(app)
        threading.Thread(target=serve, args=(dp,), daemon=True).start()
        print("got", flush=True)
    elif cmd == "close":
        dp.close()
        dp = None
        print("closed", flush=True)
"""


def test_handover_torture(app: str, children: list[Child]) -> None:
    a, b = Child(SPINNER, app), Child(SPINNER, app)
    children.extend([a, b])
    a.send("spin")
    a.expect("got")
    holder, other = a, b
    for rnd in range(300):
        other.send("spin")  # spins on claim while the holder lets go
        holder.send("close")
        holder.expect("closed")
        other.expect("got")
        conn = dockpoint.connect(app)
        assert conn is not None, f"round {rnd}: the new holder is unreachable"
        with conn:
            assert conn.read(timeout=10) == str(other.pid).encode(), f"round {rnd}"
        holder, other = other, holder


def test_kill_during_accept_releases_the_claim(app: str, children: list[Child]) -> None:
    code = (
        "import dockpoint, sys\n"
        "dp = dockpoint.claim(sys.argv[1]); print('ready', flush=True); dp.accept()\n"
    )
    child = Child(code, app)
    children.append(child)
    child.expect("ready")
    child.proc.kill()
    child.proc.wait(10)
    dp = dockpoint.claim(app)
    assert dp is not None
    dp.close()


def test_children_compute_the_same_address(app: str, children: list[Child]) -> None:
    # Daemon and client find each other only if they compute the same endpoint.
    child = Child("import dockpoint, sys; print(dockpoint.address(sys.argv[1]))", app.upper())
    children.append(child)
    assert child.line() == dockpoint.address(app)
