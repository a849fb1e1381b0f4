"""The contract's asyncio half (``dockpoint.aio``), ``fileno()`` and many accepting threads.

Every wait is bounded: each asyncio test runs inside ``asyncio.wait_for``; children have
timeouts. Random cancellation points are seeded (``DOCKPOINT_TEST_SEED`` overrides the seed).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Child, child_env, claimed, run_python

import dockpoint
import dockpoint.aio
from dockpoint import DockpointClosedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator
    from typing import TypeVar

    T = TypeVar("T")

WINDOWS = sys.platform == "win32"
ROOT = not WINDOWS and os.geteuid() == 0
NOBODY = 65534
posix_only = pytest.mark.skipif(WINDOWS, reason="POSIX only (files, users, signals)")
as_root = pytest.mark.skipif(not ROOT, reason="needs root to become another user (uid 65534)")
SEED = int(os.environ.get("DOCKPOINT_TEST_SEED", "20261201"))
EXAMPLE_DOC = Path(__file__).resolve().parent.parent / "docs" / "asyncio.md"


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def open_fds() -> set[int]:
    """This process's open descriptors (POSIX; Windows: nothing to compare, empty)."""
    if WINDOWS:
        return set()
    where = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    fds = set()
    for name in os.listdir(where):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:  # the directory listing's own descriptor, closed by now
            continue
        fds.add(fd)
    return fds


async def echo_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await reader.readline()
        writer.write(line)
        await writer.drain()
    finally:
        writer.close()


# --------------------------------------------------------------------------- basics


def test_import_dockpoint_does_not_load_asyncio() -> None:
    done = run_python("import sys, dockpoint\nprint('asyncio' in sys.modules)")
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr


def test_server_and_client_round_trip_and_release(app: str) -> None:
    async def main() -> None:
        assert await dockpoint.aio.open_connection(app) is None  # nobody there
        server = await dockpoint.aio.start_server(echo_line, app)
        assert server is not None
        assert server.address == dockpoint.address(app)
        assert server.is_serving()
        assert await dockpoint.aio.start_server(echo_line, app) is None  # claimed
        assert dockpoint.claim(app) is None
        async with server:
            got = await dockpoint.aio.open_connection(app)
            assert got is not None
            reader, writer = got
            writer.write(b"hello\n")
            assert await reader.readline() == b"hello\n"
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            # the blocking client meets the asyncio daemon too
            conn = dockpoint.connect(app)
            assert conn is not None
            with conn:
                conn.write(b"blocking\n")
                reader_done = asyncio.get_running_loop().run_in_executor(None, conn.read, 100)
                assert await reader_done == b"blocking\n"
        assert server.closed and not server.is_serving()
        assert WINDOWS or not os.path.exists(
            server.address
        )  # removed, as Dockpoint.close removes it
        again = dockpoint.claim(app)  # and the claim is free
        assert again is not None
        again.close()

    before = open_fds()
    run(main())
    assert open_fds() == before


def test_probes_never_reach_the_callback(app: str) -> None:
    calls: list[None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls.append(None)
        await echo_line(reader, writer)

    async def main() -> None:
        server = await dockpoint.aio.start_server(handle, app)
        assert server is not None
        async with server:
            loop = asyncio.get_running_loop()
            for _ in range(50):
                found = await loop.run_in_executor(None, dockpoint.probe, app)
                assert found.state == "listening"
            got = await dockpoint.aio.open_connection(app, timeout=10)
            assert got is not None
            reader, writer = got
            writer.write(b"hello\n")
            assert await reader.readline() == b"hello\n"
            writer.close()
            await writer.wait_closed()
        assert calls == [None], f"the callback ran {len(calls)} times for one client"

    run(main())


def test_server_works_with_blocking_clients_and_serve_forever_ends_on_close(app: str) -> None:
    async def main() -> None:
        server = await dockpoint.aio.start_server(echo_line, app, start_serving=False)
        assert server is not None and not server.is_serving()
        forever = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        assert server.is_serving()
        with pytest.raises(RuntimeError, match="already"):
            await server.serve_forever()

        def client() -> bytes:
            conn = dockpoint.connect(app, timeout=10)
            assert conn is not None
            with conn:
                conn.write(b"x\n")
                return conn.read(10, timeout=10)

        assert await asyncio.get_running_loop().run_in_executor(None, client) == b"x\n"
        server.close()
        await forever  # returns, not hangs
        with pytest.raises(RuntimeError, match="closed"):
            await server.serve_forever()

    run(main())


def test_argument_errors(app: str) -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="callable"):
            await dockpoint.aio.start_server(None, app)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="backlog"):
            await dockpoint.aio.start_server(echo_line, app, backlog=5)
        with pytest.raises(TypeError, match="sock"):
            await dockpoint.aio.open_connection(app, sock=None)
        with pytest.raises(ValueError, match="not allowed"):
            await dockpoint.aio.start_server(echo_line, "a/b")
        with pytest.raises(TypeError, match="must be a str"):
            await dockpoint.aio.open_connection(5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await dockpoint.aio.open_connection(app, timeout=-1)
        dp = dockpoint.claim(app)
        assert dp is not None  # nothing was claimed by the failures
        dp.close()

    run(main())


def test_open_connection_timeout_waits_for_a_server_that_comes(app: str) -> None:
    async def main() -> None:
        connecting = asyncio.ensure_future(dockpoint.aio.open_connection(app, timeout=20))
        await asyncio.sleep(0)
        assert not connecting.done()
        server = await dockpoint.aio.start_server(echo_line, app)
        assert server is not None
        async with server:
            got = await connecting
            assert got is not None
            reader, writer = got
            writer.write(b"late\n")
            assert await reader.readline() == b"late\n"
            writer.close()
            await writer.wait_closed()
        assert await dockpoint.aio.open_connection(app, timeout=0.05) is None

    run(main())


@posix_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's backlog answers EAGAIN")
def test_open_connection_waits_for_a_busy_daemon_instead_of_saying_none(app: str) -> None:
    """A full backlog means a busy daemon, not "nobody there": a wrong ``None`` would
    make a frontend spawn a second daemon."""
    with claimed(app) as dp:
        queued: list[socket.socket] = []
        try:
            while True:  # fill the kernel's backlog; the daemon accepts nobody yet
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                try:
                    s.connect(dp.address)
                except BlockingIOError:
                    s.close()
                    break
                queued.append(s)
                assert len(queued) < 100_000, "the backlog never filled"

            async def main() -> None:
                connecting = asyncio.ensure_future(dockpoint.aio.open_connection(app))
                for _ in range(3):
                    await asyncio.sleep(0)
                assert not connecting.done(), "open_connection gave up on a busy daemon"
                dp.accept(timeout=10).close()  # one slot frees up
                got = await asyncio.wait_for(connecting, 10)
                assert got is not None
                got[1].close()
                await got[1].wait_closed()

            run(main())
        finally:
            for s in queued:
                s.close()


# --------------------------------------------------------------------------- many clients


def test_many_concurrent_clients_are_served_exactly_once(app: str) -> None:
    clients = 400
    seen: Counter[bytes] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            seen[line] += 1
            writer.write(b"for " + line)
            await writer.drain()
        finally:
            writer.close()

    async def client(i: int) -> bytes:
        got = await dockpoint.aio.open_connection(app, timeout=20)
        assert got is not None
        reader, writer = got
        try:
            writer.write(b"%d\n" % i)
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()

    async def main() -> list[bytes]:
        server = await dockpoint.aio.start_server(handle, app)
        assert server is not None
        async with server:
            return await asyncio.gather(*(client(i) for i in range(clients)))

    before = open_fds()
    replies = run(main(), timeout=120)
    assert replies == [b"for %d\n" % i for i in range(clients)]
    assert seen == Counter(b"%d\n" % i for i in range(clients))  # each once, none twice
    assert open_fds() == before


# --------------------------------------------------------------------------- cancellation


class Ledger:
    """Who was served, and every way a connection ended, across server restarts."""

    def __init__(self) -> None:
        self.served: Counter[int] = Counter()
        self.abandoned = 0  # callbacks that met a client gone before asking (cancelled)
        self.generation = 0  # +1 whenever a server is closed
        self.cancelled_connects = 0
        self.cancelled_reads = 0
        self.unserved = 0  # connections ended unserved by a server that was closed
        self.restarts = 0


async def cancel_at_random(task: asyncio.Future[T], rng: random.Random) -> None:
    """Cancel ``task`` after 0-6 loop iterations (a random point of its progress)."""
    for _ in range(rng.randrange(7)):
        await asyncio.sleep(0)
    task.cancel()


async def one_round(app: str, rng: random.Random, clients: int, ledger: Ledger) -> None:
    reply_size = 3000  # several small reads per reply, so reads are cancelled mid-reply
    cancellers: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                ledger.abandoned += 1
                return
            cid = int(line)
            ledger.served[cid] += 1
            writer.write(line.rstrip(b"\n") * (reply_size // len(line)) + b"\n")
            await writer.drain()
        except ConnectionError:
            ledger.abandoned += 1
        finally:
            writer.close()

    async def client(cid: int) -> None:
        want = str(cid).encode() * (reply_size // (len(str(cid)) + 1)) + b"\n"
        while True:
            generation = ledger.generation
            connecting = asyncio.ensure_future(dockpoint.aio.open_connection(app, timeout=20))
            if rng.random() < 0.3:
                cancellers.append(asyncio.ensure_future(cancel_at_random(connecting, rng)))
            try:
                got = await connecting
            except asyncio.CancelledError:
                ledger.cancelled_connects += 1
                continue
            assert got is not None, "no daemon within 20 s"
            reader, writer = got
            data = b""
            try:
                writer.write(b"%d\n" % cid)
                while True:
                    reading = asyncio.ensure_future(reader.read(rng.choice((7, 100, 4096))))
                    if rng.random() < 0.3:
                        cancellers.append(asyncio.ensure_future(cancel_at_random(reading, rng)))
                    try:
                        chunk = await reading
                    except asyncio.CancelledError:
                        ledger.cancelled_reads += 1
                        continue  # a cancelled read loses no byte: read on
                    if not chunk:
                        break
                    data += chunk
            except ConnectionError:
                data = b""
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except ConnectionError:
                    pass
            if data == want:
                return
            # Only a server that has been closed since may end a connection unserved.
            assert data == b"", f"client {cid} got a partial reply {len(data)}/{len(want)}"
            assert ledger.generation > generation, f"client {cid} was dropped unserved"
            ledger.unserved += 1

    async def restarter(server: dockpoint.aio.Server, stop: asyncio.Event) -> None:
        """Cancel serve_forever at random points and claim the endpoint again."""
        while not stop.is_set():
            serving = asyncio.ensure_future(server.serve_forever())
            for _ in range(rng.randrange(1, 40)):
                await asyncio.sleep(0)
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
            assert server.closed  # cancelling serve_forever closed it
            ledger.generation += 1  # closed from here on: its clients may end unserved
            if WINDOWS:  # the pipe name lives until the connections it accepted end
                await server.wait_closed()
            ledger.restarts += 1
            again = await dockpoint.aio.start_server(handle, app)
            assert again is not None, "the cancelled server kept the claim"
            server = again
        server.close()
        await server.wait_closed()

    baseline = open_fds()
    server = await dockpoint.aio.start_server(handle, app)
    assert server is not None
    stop = asyncio.Event()
    restarting = asyncio.ensure_future(restarter(server, stop))
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        stop.set()
        await restarting
        await asyncio.gather(*cancellers)
    # Callbacks of abandoned connections end a few loop iterations after their client
    # closed; let them (bounded), so the caller's check finds every descriptor closed.
    for _ in range(1000):
        if open_fds() == baseline:
            break
        await asyncio.sleep(0)


def test_cancelling_connects_reads_and_serve_forever_loses_no_client(app: str) -> None:
    rounds, clients = 100, 30
    totals = Ledger()
    before = open_fds()
    for r in range(rounds):
        rng = random.Random(SEED + r)
        ledger = Ledger()
        run(one_round(f"{app}-{r}", rng, clients, ledger), timeout=60)
        # Every client was served exactly once, however its connects, reads and the
        # server were cancelled; each callback that met no request was a cancelled client.
        assert ledger.served == Counter(range(clients)), f"round {r} (seed {SEED + r})"
        assert ledger.abandoned <= ledger.cancelled_connects + ledger.unserved
        for name in ("abandoned", "cancelled_connects", "cancelled_reads", "unserved"):
            setattr(totals, name, getattr(totals, name) + getattr(ledger, name))
        totals.restarts += ledger.restarts
        assert open_fds() == before, f"round {r} leaked descriptors"
        assert WINDOWS or not os.path.exists(dockpoint.address(f"{app}-{r}"))
    # The random points must really have hit every kind of cancellation.
    assert totals.cancelled_connects > 0 and totals.cancelled_reads > 0
    assert totals.restarts > rounds and totals.unserved + totals.abandoned > 0
    print(
        f"{rounds} rounds, {rounds * clients} clients served once each; cancelled "
        f"{totals.cancelled_connects} connects, {totals.cancelled_reads} reads, "
        f"{totals.restarts} serve_forever; {totals.unserved} unserved by a closed server "
        f"(then served by the next), {totals.abandoned} abandoned connections"
    )


def test_cancelled_start_server_keeps_no_claim(app: str) -> None:
    async def main() -> None:
        for steps in range(4):
            starting = asyncio.ensure_future(dockpoint.aio.start_server(echo_line, app))
            for _ in range(steps):
                await asyncio.sleep(0)
            starting.cancel()
            try:
                server = await starting
            except asyncio.CancelledError:
                server = None
            if server is not None:  # the cancel came too late: a normal server
                server.close()
            dp = dockpoint.claim(app)  # free again either way
            assert dp is not None, f"cancel after {steps} steps kept the claim"
            dp.close()

    before = open_fds()
    run(main())
    assert open_fds() == before


# --------------------------------------------------------------------------- close wakes


def test_close_from_another_thread_wakes_pending_reads(app: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiting = loop.create_future()
        server_read: asyncio.Future[bytes] = loop.create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if waiting.done():  # a later client: serve until it leaves
                    await reader.read()
                    return
                waiting.set_result(None)
                server_read.set_result(await reader.read(10))  # pending until woken
            finally:
                writer.close()

        server = await dockpoint.aio.start_server(handle, app)
        assert server is not None
        async with server:
            got = await dockpoint.aio.open_connection(app)
            assert got is not None
            reader, writer = got
            await waiting  # the callback now waits in read()
            client_read = asyncio.ensure_future(reader.read(10))
            await asyncio.sleep(0)
            assert not client_read.done()
            # close_clients from another thread ends the server's read and the client's
            closer = threading.Thread(
                target=lambda: loop.call_soon_threadsafe(server.close_clients)
            )
            closer.start()
            assert await asyncio.wait_for(server_read, 10) == b""
            assert await asyncio.wait_for(client_read, 10) == b""
            closer.join(10)
            writer.close()
            await writer.wait_closed()

            # the client's own writer.close() from another thread ends its pending read
            got = await dockpoint.aio.open_connection(app)
            assert got is not None
            reader, writer = got
            client_read = asyncio.ensure_future(reader.read(10))
            await asyncio.sleep(0)
            assert not client_read.done()
            closer = threading.Thread(target=lambda: loop.call_soon_threadsafe(writer.close))
            closer.start()
            assert await asyncio.wait_for(client_read, 10) == b""
            closer.join(10)
            await writer.wait_closed()

            # server.close() from another thread ends serve_forever
            forever = asyncio.ensure_future(server.serve_forever())
            await asyncio.sleep(0)
            closer = threading.Thread(target=lambda: loop.call_soon_threadsafe(server.close))
            closer.start()
            await asyncio.wait_for(forever, 10)
            closer.join(10)
            assert server.closed

    run(main())


def test_closing_the_daemons_writer_ends_a_blocking_clients_read(app: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        writers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await writers.put(writer)

        server = await dockpoint.aio.start_server(handle, app)
        assert server is not None
        async with server:
            conn = await loop.run_in_executor(None, dockpoint.connect, app)
            assert conn is not None
            blocked = loop.run_in_executor(None, conn.read, 10)  # a blocking read, in a thread
            writer = await writers.get()
            writer.close()
            assert await asyncio.wait_for(blocked, 10) == b""
            conn.close()

    run(main())


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


AS_NOBODY = f"import os, socket, sys\nos.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"


@posix_only
@as_root
def test_foreign_clients_are_dropped_before_the_callback(reachable_runtime: Path) -> None:
    app = "t" + uuid.uuid4().hex[:12]
    called: list[int | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        called.append(writer.get_extra_info("peername"))
        writer.write(b"served\n")
        await writer.drain()
        writer.close()

    foreign = (
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
        "try:\n    s.sendall(b'hi\\n'); got = s.recv(100)\n"
        "except (BrokenPipeError, ConnectionResetError):\n    got = b''\n"
        "print('dropped' if got == b'' else 'served')\n"
    )

    async def main() -> None:
        server = await dockpoint.aio.start_server(handle, app)
        assert server is not None
        d = reachable_runtime / "dockpoint"
        # A permission mistake that lets another user reach the socket.
        os.chmod(reachable_runtime, 0o711)
        os.chmod(d, 0o711)
        os.chmod(server.address, 0o777)
        try:
            async with server:
                for _ in range(3):
                    child = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-c",
                        AS_NOBODY + foreign,
                        server.address,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        env=child_env(),
                        cwd="/",
                    )
                    out, err = await asyncio.wait_for(child.communicate(), 20)
                    assert out.decode().strip() == "dropped", err
                    assert called == []  # the callback never saw the foreign client
                os.chmod(d, 0o700)
                os.chmod(reachable_runtime, 0o700)
                got = await dockpoint.aio.open_connection(app)
                assert got is not None
                reader, writer = got
                assert await reader.readline() == b"served\n"
                assert len(called) == 1
                writer.close()
                await writer.wait_closed()
        finally:
            os.chmod(d, 0o700)
            os.chmod(reachable_runtime, 0o700)

    run(main())


@posix_only
@as_root
def test_open_connection_refuses_a_server_of_another_user(runtime: Path, app: str) -> None:
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
        before = open_fds()

        async def main() -> None:
            with pytest.raises(PermissionError, match="served by uid 65534") as info:
                await dockpoint.aio.open_connection(app)
            assert info.value.filename == path

        run(main())
        assert open_fds() == before
    finally:
        impostor.stop()


@posix_only
def test_open_connection_checks_the_directory(runtime: Path, app: str) -> None:
    d = runtime / "dockpoint"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o755)

    async def main() -> None:
        with pytest.raises(PermissionError, match="unsafe directory") as info:
            await dockpoint.aio.open_connection(app)
        assert info.value.filename == str(d)

    try:
        run(main())
    finally:
        os.chmod(d, 0o700)


# --------------------------------------------------------------------------- fileno


@pytest.mark.skipif(not WINDOWS, reason="the Windows backend has no selectable descriptor")
def test_fileno_is_unsupported_on_windows(app: str) -> None:
    with claimed(app) as dp:
        with pytest.raises(io.UnsupportedOperation):
            dp.fileno()
        conn = dockpoint.connect(app)
        assert conn is not None
        with conn, dp.accept(timeout=10) as served:
            for obj in (conn, served):
                with pytest.raises(io.UnsupportedOperation):
                    obj.fileno()
    with pytest.raises(DockpointClosedError):
        dp.fileno()


@posix_only
def test_fileno_works_with_selectors(app: str) -> None:
    with claimed(app) as dp, selectors.DefaultSelector() as sel:
        sel.register(dp, selectors.EVENT_READ, "listener")
        assert sel.select(0) == []  # nobody waiting
        conn = dockpoint.connect(app)
        assert conn is not None
        with conn:
            ready = sel.select(10)
            assert [key.data for key, _ in ready] == ["listener"]
            served = dp.accept(timeout=0)  # readable means accept does not wait
            with served:
                sel.register(served, selectors.EVENT_READ, "served")
                sel.register(conn, selectors.EVENT_READ, "client")
                assert sel.select(0) == []
                conn.write(b"ping")
                assert [key.data for key, _ in sel.select(10)] == ["served"]
                assert served.read(10, timeout=0) == b"ping"
                served.write(b"pong")
                assert [key.data for key, _ in sel.select(10)] == ["client"]
                assert conn.read(10, timeout=0) == b"pong"
                sel.unregister(served)
                sel.unregister(conn)
            assert os.get_inheritable(conn.fileno()) is False
        for obj in (conn, served):
            with pytest.raises(DockpointClosedError):
                obj.fileno()
        sel.unregister(dp)
    with pytest.raises(DockpointClosedError):
        dp.fileno()


# --------------------------------------------------------------------------- threads


def test_many_threads_in_accept_serve_every_client_exactly_once(app: str) -> None:
    threads, clients = 8, 400
    seen: Counter[bytes] = Counter()
    lock = threading.Lock()
    with claimed(app) as dp:

        def serve() -> None:
            while True:
                try:
                    conn = dp.accept(timeout=30)
                except DockpointClosedError:
                    return
                with conn:
                    line = conn.read(100, timeout=10)
                    with lock:
                        seen[line] += 1
                    conn.write(b"for " + line)

        def clients_of(start: int) -> None:
            for i in range(start, clients, 4):
                conn = dockpoint.connect(app, timeout=10)
                assert conn is not None
                with conn:
                    conn.write(b"%d" % i)
                    replies[i] = conn.read(100, timeout=10)

        replies: list[bytes] = [b""] * clients
        servers = [threading.Thread(target=serve, daemon=True) for _ in range(threads)]
        callers = [threading.Thread(target=clients_of, args=(k,), daemon=True) for k in range(4)]
        for t in servers + callers:
            t.start()
        for t in callers:
            t.join(60)
            assert not t.is_alive()
        closer = threading.Thread(target=dp.close, daemon=True)  # ends every accepting thread
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() did not end the accepting threads"
        for t in servers:
            t.join(10)
            assert not t.is_alive()
    assert replies == [b"for %d" % i for i in range(clients)]
    assert seen == Counter(b"%d" % i for i in range(clients))


# --------------------------------------------------------------------------- spawned daemon

#: The child programs' module (roles ``aio-daemon`` and ``frontend``).
CHILDREN = Path(__file__).resolve().parent / "aio_children.py"
SPAWN_TIMEOUT = 60.0


def ended(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for process ``pid`` to end; reap it if it is ours."""
    import time

    if WINDOWS:
        return _ended_windows(pid, timeout)
    deadline = time.monotonic() + timeout
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (ESRCH), or no pidfd here: poll
            pidfd = -1
    try:
        while not _gone(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd >= 0:
                import select

                select.select([pidfd], [], [], left)  # readable once it has ended
            else:
                time.sleep(min(left, 0.01))  # no pidfd (macOS, BSD): a bounded poll
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (POSIX); reaps it if it is this process's child."""
    try:
        # our child (started from this process): ended once reaped
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not ours: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except OSError:
        return True
    return state in (b"Z", b"X")  # ended; its parent has not reaped it yet


def _ended_windows(pid: int, timeout: float) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
    if not handle:
        return True  # no such process
    try:
        ms = max(0, int(timeout * 1000))
        return bool(kernel32.WaitForSingleObject(ctypes.c_void_p(handle), ms) == 0)
    finally:
        kernel32.CloseHandle(ctypes.c_void_p(handle))


class Daemons:
    """The daemons a test's frontends started: ``on_spawn`` pids and the start log every
    ``aio-daemon`` writes. Whatever still runs at the end is killed (bounded)."""

    def __init__(self, starts: Path) -> None:
        self.starts = starts
        self.spawned: list[int] = []

    def __call__(self, pid: int) -> None:  # on_spawn
        self.spawned.append(pid)

    def started(self) -> list[int]:
        """Every aio-daemon that ran, in the order they started."""
        if not self.starts.exists():
            return []
        return [int(p) for p in self.starts.read_text(encoding="utf-8").split()]

    def argv(self, app: str) -> list[str]:
        return [sys.executable, str(CHILDREN), "aio-daemon", app, str(self.starts)]

    def kill_all(self) -> None:
        for pid in {*self.spawned, *self.started()}:
            try:
                os.kill(pid, signal.SIGKILL if not WINDOWS else signal.SIGTERM)
            except OSError:
                continue
            ended(pid, 10)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    tracker = Daemons(tmp_path / "starts")
    yield tracker
    tracker.kill_all()


def ask_daemon(conn: dockpoint.DockpointConnection, line: bytes) -> dict[str, object]:
    """Send ``line``, return the daemon's JSON reply (bounded)."""
    import json

    with conn:
        conn.write(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.read(timeout=SPAWN_TIMEOUT)
            assert chunk, f"the daemon closed without answering (got {data!r})"
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def check_adopted(app: str, reply: dict[str, object], pid: int) -> None:
    """``reply`` comes from the asyncio daemon ``pid``, whose ``start_server`` found the
    hand-over for this endpoint and consumed it."""
    assert reply["pid"] == pid, "not answered by the daemon that was spawned"
    assert reply["served_by"] == "dockpoint.aio"
    before = reply["before"]
    assert isinstance(before, str), "the daemon was started without a hand-over"
    assert before.startswith(f"{app}@default:"), before
    assert reply["after"] is None, "start_server left the hand-over variable"
    assert reply["address"] == dockpoint.address(app)


def stop_daemon(app: str, pid: int) -> None:
    """Ask the daemon to stop; it has released the claim when it answers; it exits."""
    conn = dockpoint.connect(app, timeout=10)
    assert conn is not None, "the daemon no longer answers"
    assert ask_daemon(conn, b"stop\n")["pid"] == pid
    assert ended(pid, 30), f"daemon {pid} did not exit within 30 s of being asked to"
    dp = dockpoint.claim(app, wait=10)  # released, and nothing is left in the way
    assert dp is not None, "the stopped daemon kept the claim"
    dp.close()


def test_a_spawned_asyncio_daemon_adopts_the_handed_over_endpoint(
    app: str, daemons: Daemons
) -> None:
    """``connect_or_spawn`` claims, starts an ``aio-daemon`` and hands it the endpoint:
    that daemon's ``dockpoint.aio.start_server`` adopts it (if it claimed anew instead,
    it would find the claim held, give up and exit, and ``connect_or_spawn`` would raise
    ``SpawnError``). The frontend's connection is served by that very process; a second
    frontend finds it and spawns nothing."""
    conn = dockpoint.connect_or_spawn(
        app, daemons.argv(app), timeout=SPAWN_TIMEOUT, env=child_env(), on_spawn=daemons
    )
    assert len(daemons.spawned) == 1
    (pid,) = daemons.spawned
    assert conn.peer_pid == pid, "the connection's other end is not the spawned daemon"
    check_adopted(app, ask_daemon(conn, b"hello\n"), pid)
    assert daemons.started() == [pid]
    if not WINDOWS:  # the lock file names the daemon, not the frontend that claimed
        from conftest import lock_file

        assert lock_file(app).read_text().split("\n")[0] == str(pid)
    assert dockpoint.claim(app) is None  # the daemon holds the claim

    again = dockpoint.connect_or_spawn(
        app, daemons.argv(app), timeout=SPAWN_TIMEOUT, env=child_env(), on_spawn=daemons
    )
    assert again.peer_pid == pid
    assert ask_daemon(again, b"again\n")["pid"] == pid
    assert daemons.spawned == [pid], "a second frontend spawned another daemon"
    stop_daemon(app, pid)
    assert daemons.started() == [pid]


def test_racing_frontends_start_one_asyncio_daemon_and_all_get_replies(
    app: str, daemons: Daemons
) -> None:
    """Ten frontend processes released at once against no daemon: exactly one spawn among
    them, one ``aio-daemon`` ever started, and every frontend's request answered by it
    over a connection whose peer is that daemon."""
    import json

    number = 10
    gate_r, gate_w = os.pipe()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(number):
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(CHILDREN), "frontend", app, str(daemons.starts)],
                    stdin=gate_r,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=child_env(),
                )
            )
        os.close(gate_r)
        gate_r = -1
        os.close(gate_w)  # end of file: every frontend goes at once
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
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()
    reports = [json.loads(out) for out, _ in results]
    events = [pid for r in reports for pid in r["spawned"]]
    daemons.spawned += events
    assert len(events) == 1, f"{len(events)} frontends started a daemon: {events}"
    (pid,) = events
    assert daemons.started() == [pid], "more than one aio-daemon was started"
    (spawner,) = [r["pid"] for r in reports if r["spawned"]]
    early = 0
    for report in reports:
        check_adopted(app, report["reply"], pid)
        assert report["reply"]["line"] == f"hello from {report['pid']}\n"
        if report["pid"] == spawner:  # it connects once the daemon has adopted
            assert report["peer_pid"] == pid
        elif report["peer_pid"] != pid:
            # A connection made while the spawning frontend still held the endpoint names
            # the spawner, not the daemon that serves it: POSIX records the pid of the
            # process that had called listen() when the client connected, Windows the
            # process that made the pipe instance (docs/protocol.md, the hand-over).
            # Known, reported; nothing else may appear there.
            assert report["peer_pid"] == spawner, report
            early += 1
    print(f"{early} of {number - 1} racing frontends' peer_pid named the spawning frontend")
    assert len({r["pid"] for r in reports}) == number
    stop_daemon(app, pid)


# --------------------------------------------------------------------------- docs/asyncio.md


EXAMPLE = re.compile(r"^<!-- asyncio: (\S+) -->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
APP_LINE = re.compile(r'^APP = "[^"\n]*"$', re.MULTILINE)


def example_files() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, code in EXAMPLE.findall(EXAMPLE_DOC.read_text(encoding="utf-8")):
        assert name not in found, f"docs/asyncio.md has two '<!-- asyncio: {name} -->' blocks"
        found[name] = code
    assert sorted(found) == ["aio_client.py", "aio_daemon.py"], (
        "docs/asyncio.md must hold the asyncio example as ```python blocks, each right after a "
        f"'<!-- asyncio: aio_daemon.py -->' / '<!-- asyncio: aio_client.py -->' line; "
        f"found {sorted(found)}"
    )
    return found


@posix_only
def test_readme_asyncio_example_runs(tmp_path: Path, runtime: Path, app: str) -> None:
    folder = tmp_path / "example"
    folder.mkdir()
    for name, code in example_files().items():
        ours, count = APP_LINE.subn(f'APP = "{app}"', code)
        assert count == 1, f"{name} in docs/asyncio.md must set APP in one 'APP = \"...\"' line"
        (folder / name).write_text(ours, encoding="utf-8")
    env = child_env(XDG_RUNTIME_DIR=str(runtime))
    daemon = subprocess.Popen(
        [sys.executable, str(folder / "aio_daemon.py")],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        line = daemon.stdout.readline()  # bounded: the daemon prints it or dies
        assert line == f"serving at {dockpoint.address(app)}\n", line + daemon.stderr.read()
        second = subprocess.run(
            [sys.executable, str(folder / "aio_daemon.py")],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (second.returncode, second.stdout) == (0, "already running\n"), second
        client = subprocess.run(
            [sys.executable, str(folder / "aio_client.py")],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (client.returncode, client.stderr) == (0, ""), client
        assert client.stdout.splitlines() == [f"echo: hello {i}" for i in range(10)]
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
        assert (daemon.returncode, out, err) == (0, "", "")
        assert not os.path.exists(dockpoint.address(app))
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate(timeout=20)


@pytest.mark.skipif(not WINDOWS, reason="Windows event loops only")
def test_a_windows_loop_without_named_pipes_is_refused_clearly(app: str) -> None:
    async def main() -> None:
        with pytest.raises(OSError, match="proactor") as info:
            await dockpoint.aio.start_server(echo_line, app)
        assert info.value.errno == errno.ENOTSUP
        with pytest.raises(OSError, match="proactor") as info:
            await dockpoint.aio.open_connection(app)
        assert info.value.errno == errno.ENOTSUP
        dp = dockpoint.claim(app)  # the refused start_server kept no claim
        assert dp is not None
        dp.close()

    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
