"""dockpoint benchmark: what dockpoint costs on top of raw sockets (issue 4).

Run it from the repository root (it reports, it never fails on a missed target)::

    python tests/bench/bench.py            # rows 1-6, POSIX (about a minute)
    python tests/bench/bench.py --wine     # rows 1-6, then row 7 under Wine
    nox -s bench                           # the same, against the installed package

Method: ONE run; each compared pair is measured interleaved (A B A B ...) after one
warm-up round, each side repeated ``--reps`` times (at least 5, default 9); a ratio is the
median of the per-round ratios A/B. The echo side is always a separate process. Every row
keeps the issue's workload:

1. round trip: 20,000 x (1-byte write, 1-byte read) on one connection, vs a raw
   ``AF_UNIX`` socket and vs ``multiprocessing.connection`` (``send_bytes``/``recv_bytes``).
2. bulk: 256 MiB one way in 64 KiB writes, read with ``read(65536)``, vs a raw socket.
3. connect cycle: 3,000 x (connect, write 1 byte, read 1 byte, close), vs a raw socket
   connecting to a raw listener and vs ``multiprocessing.connection.Client``; also (for
   information) vs a raw client and listener that make the checks dockpoint keeps on
   every connection: the ``lstat`` of the socket's directory, and the peer's credentials
   on both sides. That line's ratio, dockpoint / (raw + the kept checks), is printed as
   the median (min-max) of the per-round ratios, against a target of <= 1.10 (issue 19).
4. claim cycle: 1,000 x (claim, close), absolute, plus a cProfile breakdown.
5. import: ``-X importtime`` in a fresh ``python -I -S``, median of 20: what
   ``import dockpoint`` adds once ``socket`` is imported.
6. burst: 1,000 clients (threads spread over 4 processes) connect at once to one
   daemon: served, ``None``/refused, p50/p99 connect latency.
7. (``--wine``) round trip and connect cycle of the Windows backend under Wine, as ratios
   to a raw ctypes named-pipe client and server (information only).
8-10. frontends, with ``--python`` (a venv's interpreter; bytecode written and cached):
   cold ``python -m dockpoint send`` (no daemon -> reply; the daemon is stopped after each)
   and the cold README recipe, each against ``python -c "import dockpoint"`` run twice in a
   row; warm ``send`` (daemon up) against one such import. Interleaved; median and range
   of the per-round ratios. For information, also ``python -m`` of a module that only
   imports dockpoint and ends with ``os._exit(0)``: what any ``python -m`` frontend pays
   (``runpy`` and its imports), whatever it then does.
11-12. storm: 30 and 100 ``send``s started at once against no daemon, against as many
   ``python -c "import dockpoint"`` at once: wall, CPU (the frontends'), daemons started;
   and as many of that ``python -m`` module at once (information).
13. cumulative ``import dockpoint`` (``-X importtime``) in the frontend interpreter.
14. 1-byte round trip (issue 19): 10,000 x (1-byte write, 1-byte read) on one connection
   per round, dockpoint vs a raw ``AF_UNIX`` socket; median (min-max) of the per-round
   ratios (information); below it, a bare Python wrapper of the raw socket (``read`` and
   ``write`` only forward, on both ends) vs raw: the floor of any Python API. Numbered
   last so that rows 1-13 keep their numbers.

In the ``same`` layout a process's random memory layout moves each side's round trip by
up to a third from run to run; ``setarch -R python tests/bench/bench.py ...`` (no
address-space randomisation) makes the ratios repeat.

Rows 1-3 and 14 run in two CPU layouts (``--pin``): ``split``, client on one CPU and the echo
servers on another (a frontend and a daemon on an idle machine: every wake-up crosses
CPUs), and ``same``, both on one CPU (every wake-up is a local context switch, so the
CPU work of each side shows). Left to the scheduler, a small VM flips between the two
from run to run, which makes the numbers bimodal.

Old tree vs new tree (issue 18), one command on POSIX::

    env -u PYTHONDONTWRITEBYTECODE python tests/bench/bench.py \
        --rows 3,8,9,10,11,12,13,14 --python NEW/bin/python --baseline-python OLD/bin/python

where NEW and OLD are venvs, each with its tree's dockpoint installed by pip (bytecode
compiled). Only the dockpoint side of each row runs, once per interpreter, the two taking
turns round by round (new old, then old new, ...) after one warm-up round: rows 1-3 and 14
through a ``--worker`` child of each interpreter (``-I``: its own installed dockpoint) that
runs the same client loops against an echo daemon of the same interpreter, in the CPU
layouts of ``--pin``; rows 8-13 as above, with apps of their own per interpreter; then
``bench_aio.py --baseline-python`` (the aio echo row; ``--no-aio`` skips it). Printed per
row: new, old (medians) and new/old, the median (min-max) of the per-round ratios of wall
time and, below it, of CPU time (rows 1-3, 14: client + echo daemon; 8-10: the frontend's;
11-12: the frontends'; aio: clients + daemon), marked when the median is above 1.03 (no
row more than 3 % worse). Rows 4-7 have no such form. It reports and never gates. About
4.5 minutes with the default ``--reps`` on a 2-core VM (the aio row is 2.5 of them).

``XDG_RUNTIME_DIR`` points at a private 0700 temporary directory for the run and every
child process; all children are killed at the end, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

RT_OPS = 20_000
RTT_OPS = 10_000
BULK_BYTES = 256 << 20
BULK_CHUNK = 64 << 10
CONNECT_CYCLES = 3_000
CLAIM_CYCLES = 1_000
IMPORT_RUNS = 20
BURST_CLIENTS = 1_000
BURST_PROCESSES = 4
BURST_ROUNDS = 3
WINE_RT_OPS = 2_000
WINE_CONNECT_CYCLES = 300

ECHO_APP = "dockpoint-bench-echo"
BURST_APP = "dockpoint-bench-burst"
CLAIM_APP = "dockpoint-bench-claim"
WINE_APP = "dockpoint-bench-wine"
BACKLOG = 4096
START_TIMEOUT = 30.0
BULK_HEADER = b"B"  # first byte of a bulk upload; anything else is echoed


def _import_dockpoint() -> Any:
    """The package under test: whatever ``import dockpoint`` finds (the installed one in
    ``nox -s bench``, or ``PYTHONPATH``), else this checkout."""
    try:
        import dockpoint
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        import dockpoint
    return dockpoint


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def interleave(sides: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run every side once as warm-up, then ``reps`` rounds of A B C ... ; return the
    measured values per side (round ``i`` of every side at index ``i``)."""
    names = list(sides)
    for name in names:
        sides[name]()
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            results[name].append(sides[name]())
    return results


def round_ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-round ratios a/b of two interleaved series."""
    return [x / y for x, y in zip(a, b)]


def spread(ratios: list[float], digits: int = 2) -> str:
    """``median (min-max)`` of per-round ratios."""
    return f"{median(ratios):.{digits}f} ({min(ratios):.{digits}f}-{max(ratios):.{digits}f})"


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios ``a[i] / b[i]``."""
    return median(round_ratios(a, b))


# --------------------------------------------------------------------------- processes


class Children:
    """Child processes of this run; :meth:`kill_all` ends every one of them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, *args: str, stdin: int = subprocess.DEVNULL, python: str | None = None
    ) -> subprocess.Popen[bytes]:
        """This script as a child: by default in this interpreter with ``-S`` (children
        need only the standard library and dockpoint, on PYTHONPATH; skipping
        site-packages' .pth hooks keeps process starts short); with ``python``, in that
        interpreter with ``-I``, so that it imports its own installed dockpoint (no
        PYTHONPATH, no script directory) and reads and writes bytecode as a user's does."""
        flags = [sys.executable, "-S"] if python is None else [python, "-I"]
        proc = subprocess.Popen(
            [*flags, str(Path(__file__).resolve()), *args],
            env=self.env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=None,
        )
        self.procs.append(proc)
        return proc

    def end(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill ``proc`` (if still running), reap it and forget it."""
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        self.procs.clear()


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    fd = proc.stdout.fileno()
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"child {proc.args!r} said nothing within {timeout} s")
        byte = os.read(fd, 1)
        if not byte:
            raise RuntimeError(f"child {proc.args!r} exited (code {proc.poll()})")
        line += byte
    return line.decode().strip()


def wait_ready(proc: subprocess.Popen[bytes]) -> None:
    line = read_line(proc, START_TIMEOUT)
    if line != "ready":
        raise RuntimeError(f"child {proc.args!r} said {line!r} instead of 'ready'")


# --------------------------------------------------------------------------- echo servers


def _serve_stream(read: Callable[[int], bytes], write: Callable[[bytes], object]) -> None:
    """One connection: echo everything, or (first byte ``B``) count a bulk upload and
    answer ``k`` once it has all arrived."""
    first = read(65536)
    if first[:1] == BULK_HEADER:
        while len(first) < 9:
            more = read(65536)
            if not more:
                return
            first += more
        size = int.from_bytes(first[1:9], "big")
        got = len(first) - 9
        while got < size:
            data = read(65536)
            if not data:
                return
            got += len(data)
        write(b"k")
        read(1)
        return
    data = first
    while data:
        write(data)
        data = read(65536)


def serve_dockpoint(app: str) -> None:
    dockpoint = _import_dockpoint()
    point = dockpoint.claim(app)
    if point is None:
        raise SystemExit(f"{app} is already claimed")
    print("ready", flush=True)
    while True:
        conn = point.accept()
        try:
            _serve_stream(conn.read, conn.write)
        except OSError:
            pass
        finally:
            conn.close()


def peer_creds(sock: socket.socket) -> bytes:
    """The peer's credentials, asked as dockpoint asks them (Linux, macOS/BSD)."""
    if sys.platform.startswith("linux"):
        return sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17), 12)
    return sock.getsockopt(0, 1, 128)  # SOL_LOCAL, LOCAL_PEERCRED


def serve_raw(path: str, *, check: bool = False) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(BACKLOG)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if check:
            peer_creds(conn)
        try:
            _serve_stream(conn.recv, conn.sendall)
        except OSError:
            pass
        finally:
            conn.close()


class Wrapped:
    """A bare Python wrapper of a connected socket: ``read`` and ``write`` only forward to
    ``recv`` and ``sendall``. Row 14's floor: what any Python method on the path costs."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int = 65536) -> bytes:
        return self._sock.recv(max_bytes)

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)


def serve_wrapped(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(BACKLOG)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        wrapped = Wrapped(conn)
        try:
            _serve_stream(wrapped.read, wrapped.write)
        except OSError:
            pass
        finally:
            conn.close()


def serve_mp(path: str) -> None:
    from multiprocessing.connection import Listener

    with Listener(path, family="AF_UNIX", backlog=BACKLOG) as listener:
        print("ready", flush=True)
        while True:
            conn = listener.accept()
            try:
                while True:
                    conn.send_bytes(conn.recv_bytes())
            except (EOFError, OSError):
                pass
            finally:
                conn.close()


def serve_burst(app: str) -> None:
    """The burst daemon: one thread, serves clients one after the other."""
    dockpoint = _import_dockpoint()
    point = dockpoint.claim(app)
    if point is None:
        raise SystemExit(f"{app} is already claimed")
    print("ready", flush=True)
    while True:
        conn = point.accept()
        try:
            data = conn.read(1, timeout=30)
            if data:
                conn.write(data)
        except OSError:
            pass
        finally:
            conn.close()


# --------------------------------------------------------------------------- clients


def rt_dockpoint(dockpoint: Any, app: str, n: int) -> float:
    conn = dockpoint.connect(app, timeout=10)
    if conn is None:
        raise RuntimeError("the dockpoint echo daemon is not there")
    try:
        write, read, msg = conn.write, conn.read, b"x"
        start = time.perf_counter()
        for _ in range(n):
            write(msg)
            read(1)
        elapsed = time.perf_counter() - start
        write(b"y")
        if read(1, timeout=10) != b"y":
            raise RuntimeError("the dockpoint echo daemon answered wrongly")
        return elapsed
    finally:
        conn.close()


def rt_raw(path: str, n: int, *, wrapped: bool = False) -> float:
    """The round trip on a raw socket, or (``wrapped``) through :class:`Wrapped`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        send: Callable[[bytes], object] = sock.sendall
        recv: Callable[[int], bytes] = sock.recv
        if wrapped:
            wrapper = Wrapped(sock)
            send, recv = wrapper.write, wrapper.read
        msg = b"x"
        start = time.perf_counter()
        for _ in range(n):
            send(msg)
            recv(1)
        return time.perf_counter() - start
    finally:
        sock.close()


def rt_mp(path: str, n: int) -> float:
    from multiprocessing.connection import Client

    conn = Client(path, family="AF_UNIX")
    try:
        send, recv, msg = conn.send_bytes, conn.recv_bytes, b"x"
        start = time.perf_counter()
        for _ in range(n):
            send(msg)
            recv()
        return time.perf_counter() - start
    finally:
        conn.close()


def bulk_dockpoint(dockpoint: Any, app: str, size: int) -> float:
    conn = dockpoint.connect(app, timeout=10)
    if conn is None:
        raise RuntimeError("the dockpoint echo daemon is not there")
    chunk = bytes(BULK_CHUNK)
    try:
        write = conn.write
        start = time.perf_counter()
        write(BULK_HEADER + size.to_bytes(8, "big"))
        for _ in range(size // BULK_CHUNK):
            write(chunk)
        ack = conn.read(1)
        elapsed = time.perf_counter() - start
        if ack != b"k":
            raise RuntimeError(f"bulk upload not acknowledged: {ack!r}")
        return elapsed
    finally:
        conn.close()


def bulk_raw(path: str, size: int) -> float:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chunk = bytes(BULK_CHUNK)
    try:
        sock.connect(path)
        send = sock.sendall
        start = time.perf_counter()
        send(BULK_HEADER + size.to_bytes(8, "big"))
        for _ in range(size // BULK_CHUNK):
            send(chunk)
        ack = sock.recv(1)
        elapsed = time.perf_counter() - start
        if ack != b"k":
            raise RuntimeError(f"bulk upload not acknowledged: {ack!r}")
        return elapsed
    finally:
        sock.close()


def cc_dockpoint(dockpoint: Any, app: str, n: int) -> float:
    if dockpoint.connect(app, timeout=10) is None:  # the daemon is up (it just started)
        raise RuntimeError("the dockpoint echo daemon is not there")
    connect, msg = dockpoint.connect, b"x"
    start = time.perf_counter()
    for _ in range(n):
        conn = connect(app)
        conn.write(msg)
        conn.read(1)
        conn.close()
    return time.perf_counter() - start


def cc_raw(path: str, n: int) -> float:
    new, unix, stream, msg = socket.socket, socket.AF_UNIX, socket.SOCK_STREAM, b"x"
    start = time.perf_counter()
    for _ in range(n):
        sock = new(unix, stream)
        sock.connect(path)
        sock.sendall(msg)
        sock.recv(1)
        sock.close()
    return time.perf_counter() - start


def cc_checks(path: str, n: int) -> float:
    """A raw client that also makes the two checks dockpoint's connect keeps: the lstat of
    the socket's directory and the peer's credentials (its server asks them too)."""
    new, unix, stream, msg = socket.socket, socket.AF_UNIX, socket.SOCK_STREAM, b"x"
    directory, lstat = os.path.dirname(path), os.lstat
    start = time.perf_counter()
    for _ in range(n):
        lstat(directory)
        sock = new(unix, stream)
        sock.connect(path)
        peer_creds(sock)
        sock.sendall(msg)
        sock.recv(1)
        sock.close()
    return time.perf_counter() - start


def cc_mp(path: str, n: int) -> float:
    from multiprocessing.connection import Client

    msg = b"x"
    start = time.perf_counter()
    for _ in range(n):
        conn = Client(path, family="AF_UNIX")
        conn.send_bytes(msg)
        conn.recv_bytes()
        conn.close()
    return time.perf_counter() - start


def client_job(row: str, side: str, where: str, dockpoint: Any) -> Callable[[int], float]:
    """The timed client loop of ``row`` (rt, bulk, cc) for ``side`` against ``where``."""
    jobs: dict[tuple[str, str], Callable[[int], float]] = {
        ("rt", "dockpoint"): lambda n: rt_dockpoint(dockpoint, where, n),
        ("bulk", "dockpoint"): lambda n: bulk_dockpoint(dockpoint, where, n),
        ("cc", "dockpoint"): lambda n: cc_dockpoint(dockpoint, where, n),
        ("rt", "raw"): lambda n: rt_raw(where, n),
        ("rt", "mp"): lambda n: rt_mp(where, n),
        ("rt", "wrapped"): lambda n: rt_raw(where, n, wrapped=True),
        ("bulk", "raw"): lambda n: bulk_raw(where, n),
        ("cc", "raw"): lambda n: cc_raw(where, n),
        ("cc", "checks"): lambda n: cc_checks(where, n),
        ("cc", "mp"): lambda n: cc_mp(where, n),
    }
    return jobs[(row, side)]


# --------------------------------------------------------------------------- claim


def claim_cycle(dockpoint: Any, n: int) -> float:
    claim = dockpoint.claim
    start = time.perf_counter()
    for _ in range(n):
        claim(CLAIM_APP).close()
    return time.perf_counter() - start


def raw_claim_cycle(directory: str, n: int) -> float:
    """The same system calls with no checks: open+flock a lock file, bind a socket at a
    temporary name, listen, rename into place; then unlink, close, unlock."""
    import fcntl

    lock_path = os.path.join(directory, "raw-claim.lock")
    sock_path = os.path.join(directory, "raw-claim.sock")
    temp_path = os.path.join(directory, "raw-claim.new")
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    start = time.perf_counter()
    for _ in range(n):
        fd = os.open(lock_path, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(temp_path)
        sock.listen(BACKLOG)
        os.rename(temp_path, sock_path)
        os.unlink(sock_path)
        sock.close()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return time.perf_counter() - start


def profile_claim(dockpoint: Any, n: int, top: int = 8) -> list[str]:
    """cProfile ``n`` claim cycles; lines of the top entries by own and cumulative time."""
    profiler = cProfile.Profile()
    claim = dockpoint.claim
    profiler.enable()
    for _ in range(n):
        claim(CLAIM_APP).close()
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries: list[tuple[float, float, float, str]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = func if filename == "~" else f"{Path(filename).name}:{line}({func})"
        entries.append((tottime, cumtime, ncalls, where))
    total = sum(e[0] for e in entries)
    lines = [
        f"  profile of {n} claim cycles (cProfile inflates Python-level calls): "
        f"{total / n * 1e6:.1f} us/cycle profiled",
        "  by own time:        own us/cycle  cum us/cycle  calls/cycle  function",
    ]
    for tottime, cumtime, ncalls, where in sorted(entries, reverse=True)[:top]:
        lines.append(
            f"    {tottime / n * 1e6:30.2f} {cumtime / n * 1e6:13.2f} {ncalls / n:12.1f}  {where}"
        )
    lines.append("  by cumulative time (dockpoint functions):")
    ours = [e for e in entries if "dockpoint" in e[3] or e[3].startswith(("_", "api"))]
    for tottime, cumtime, ncalls, where in sorted(ours, key=lambda e: -e[1])[:top]:
        lines.append(
            f"    {tottime / n * 1e6:30.2f} {cumtime / n * 1e6:13.2f} {ncalls / n:12.1f}  {where}"
        )
    syscalls = sum(e[0] for e in entries if e[3].startswith(("<built-in method posix.", "<built")))
    lines.append(
        f"  built-in calls (system calls and C helpers) take {syscalls / total:.0%} "
        "of the profiled time"
    )
    return lines


# --------------------------------------------------------------------------- import


def parse_importtime(stderr: str) -> dict[str, tuple[int, int]]:
    """Top-level modules of a ``-X importtime`` report: name -> (self us, cumulative us)."""
    found: dict[str, tuple[int, int]] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3:
            continue
        try:
            own, cumulative = int(parts[0]), int(parts[1])
        except ValueError:
            continue  # the header
        name = parts[2][1:]
        if not name.startswith(" "):
            found[name] = (own, cumulative)
    return found


def import_run(flags: list[str], package_parent: str, statement: str, module: str) -> int:
    """Cumulative microseconds of top-level ``module`` when ``statement`` runs first thing
    in a fresh interpreter with ``flags``."""
    code = f"import sys; sys.path.insert(0, {package_parent!r}); {statement}"
    result = subprocess.run(
        [sys.executable, *flags, "-X", "importtime", "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{statement!r} failed: {result.stderr[-2000:]}")
    return parse_importtime(result.stderr)[module][1]


def import_modules(flags: list[str], package_parent: str) -> list[str]:
    """Modules ``import dockpoint`` loads once ``socket`` is loaded."""
    code = (
        f"import sys; sys.path.insert(0, {package_parent!r}); import socket; "
        "before = set(sys.modules); import dockpoint; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, *flags, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split()


# --------------------------------------------------------------------------- burst


def burst_worker(app: str, threads: int) -> None:
    """A burst client process: ``threads`` clients wait for the start time, then each
    connects once, writes a byte and reads the echo. Prints JSON results."""
    dockpoint = _import_dockpoint()
    threading.stack_size(256 << 10)
    started = threading.Barrier(threads + 1)
    go = threading.Event()
    start_at = [0.0]
    results: list[list[Any]] = [["not run", None, None] for _ in range(threads)]

    def client(i: int) -> None:
        try:
            started.wait(timeout=60)
            go.wait(timeout=60)
            delay = start_at[0] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic()
            conn = dockpoint.connect(app)
            t1 = time.monotonic()
            if conn is None:
                results[i] = ["none", t1 - t0, None]
                return
            try:
                conn.write(b"x")
                reply = conn.read(1, timeout=60)
            finally:
                conn.close()
            t2 = time.monotonic()
            results[i] = ["served" if reply == b"x" else "bad", t1 - t0, t2 - start_at[0]]
        except Exception as exc:
            results[i] = [f"error: {exc!r}", None, None]

    pool = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    started.wait(timeout=60)
    print("ready", flush=True)
    start_at[0] = float(sys.stdin.readline())
    go.set()
    for thread in pool:
        thread.join(timeout=120)
    print(json.dumps(results), flush=True)


def run_burst(children: Children, clients: int, processes: int) -> dict[str, Any]:
    daemon = children.spawn("--serve", "burst", BURST_APP)
    wait_ready(daemon)
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    workers = [
        children.spawn("--burst-worker", BURST_APP, str(n), stdin=subprocess.PIPE) for n in per
    ]
    for worker in workers:
        wait_ready(worker)
    start_at = time.monotonic() + 0.2
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(f"{start_at!r}\n".encode())
        worker.stdin.flush()
    results: list[list[Any]] = []
    for worker in workers:
        out, _ = worker.communicate(timeout=180)
        results.extend(json.loads(out.decode().strip().splitlines()[-1]))
    daemon.kill()
    daemon.wait(timeout=10)
    served = [r for r in results if r[0] == "served"]
    connect_lat = [r[1] for r in results if r[1] is not None]
    done_lat = [r[2] for r in served]
    return {
        "served": len(served),
        "none": sum(1 for r in results if r[0] == "none"),
        "other": [r[0] for r in results if r[0] not in ("served", "none")][:3],
        "other_count": sum(1 for r in results if r[0] not in ("served", "none")),
        "connect_p50": percentile(connect_lat, 50) if connect_lat else float("nan"),
        "connect_p99": percentile(connect_lat, 99) if connect_lat else float("nan"),
        "served_p50": percentile(done_lat, 50) if done_lat else float("nan"),
        "served_p99": percentile(done_lat, 99) if done_lat else float("nan"),
        "last_served": max(done_lat) if done_lat else float("nan"),
    }


# --------------------------------------------------------------------------- the table


class Table:
    """The result rows and the verdicts behind the summary line."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.verdicts: list[tuple[str, bool]] = []

    def add(
        self,
        row: str,
        ours: str,
        baseline: str,
        *,
        ratio: str = "-",
        target: str = "-",
        met: bool | None = None,
        label: str = "",
    ) -> None:
        verdict = "info" if met is None else ("yes" if met else "NO")
        self.rows.append((row, ours, baseline, ratio, target, verdict))
        if met is not None:
            self.verdicts.append((label or row, met))

    def render(self) -> str:
        head = ("row", "dockpoint", "baseline", "ratio", "target", "met?")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(6)]
        lines = []
        for r in [head, tuple("-" * w for w in widths), *self.rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        return "\n".join(lines)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _detail(row: str, got: dict[str, list[float]], *, scale: float, unit: str) -> None:
    print(f"{row}: per repetition ({unit}), interleaved")
    for name, values in got.items():
        print(f"  {name:10} " + " ".join(f"{v * scale:.2f}" for v in values))


@dataclass
class Bench:
    """What every row needs: the package, the table, the baselines' addresses."""

    dockpoint: Any
    table: Table
    runtime: str
    reps: int
    children: Children
    layout: str = "unpinned"
    servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = field(default_factory=dict)

    def start_echo_servers(self) -> None:
        """One echo server per side, for all of rows 1-3 and 14 (a separate process each)."""
        raw_path = os.path.join(self.runtime, "raw.sock")
        mp_path = os.path.join(self.runtime, "mp.sock")
        checks_path = os.path.join(self.runtime, "checks.sock")
        wrapped_path = os.path.join(self.runtime, "wrapped.sock")
        self.servers = {
            "dockpoint": (ECHO_APP, self.children.spawn("--serve", "dockpoint", ECHO_APP)),
            "raw": (raw_path, self.children.spawn("--serve", "raw", raw_path)),
            "mp": (mp_path, self.children.spawn("--serve", "mp", mp_path)),
            "checks": (checks_path, self.children.spawn("--serve", "checks", checks_path)),
            "wrapped": (wrapped_path, self.children.spawn("--serve", "wrapped", wrapped_path)),
        }
        for _, server in self.servers.values():
            wait_ready(server)

    def place(self, layout: str) -> None:
        """Put this process (the client side) and the echo servers on CPUs: ``split`` is
        client on one CPU and servers on another, ``same`` is all on one CPU,
        ``unpinned`` leaves it to the scheduler (which, on a small VM, flips between the
        two from run to run and makes the round trip bimodal)."""
        self.layout = layout
        if not hasattr(os, "sched_setaffinity"):
            return
        if layout == "unpinned":
            client, server = ALL_CPUS, ALL_CPUS
        else:
            first, second = sorted(ALL_CPUS)[:2]
            client, server = {first}, ({second} if layout == "split" else {first})
        os.sched_setaffinity(0, client)
        for _, proc in self.servers.values():
            os.sched_setaffinity(proc.pid, server)

    def row(self, number: int, what: str) -> str:
        return f"{number} {what} [{self.layout}]"

    def compare(self, row: str, sides: list[str], amount: int) -> dict[str, list[float]]:
        jobs: dict[str, Callable[[], float]] = {}
        for side in sides:
            where, _ = self.servers[side]
            jobs[side] = partial(client_job(row, side, where, self.dockpoint), amount)
        return interleave(jobs, self.reps)

    def round_trip(self, ops: int = RT_OPS) -> None:
        self.against_raw_and_mp(
            "rt",
            number=1,
            name="round trip",
            size=f"({ops:,} x 1 B)",
            amount=ops,
            unit="op",
            raw_target=1.05,
            mp_target=0.70,
        )

    def rtt(self, ops: int = RTT_OPS) -> None:
        """Row 14 (issue 19): the 1-byte round trip on one connection, dockpoint vs a raw
        ``AF_UNIX`` socket, with the per-round ratios' median and range; below it, the
        floor of any Python API: a bare wrapper whose ``read``/``write`` only forward to
        ``recv``/``sendall``, on both ends, vs raw."""
        got = self.compare("rt", ["dockpoint", "raw", "wrapped"], ops)
        row = self.row(14, f"1-byte round trip ({ops:,} x, one connection)")
        self.table.add(
            row,
            us(median(got["dockpoint"]) / ops) + "/op",
            "raw AF_UNIX " + us(median(got["raw"]) / ops),
            ratio=spread(round_ratios(got["dockpoint"], got["raw"])),
        )
        self.table.add(
            "",
            "",
            f"a bare Python wrapper {us(median(got['wrapped']) / ops)}, vs raw",
            ratio=spread(round_ratios(got["wrapped"], got["raw"])),
        )
        _detail(row, got, scale=1e6 / ops, unit="us/op")

    def bulk(self, size: int = BULK_BYTES) -> None:
        got = self.compare("bulk", ["dockpoint", "raw"], size)
        ratio = paired_ratio(got["raw"], got["dockpoint"])  # throughput: raw time / ours
        mib = size / (1 << 20)
        row = self.row(2, f"bulk ({mib:.0f} MiB, 64 KiB writes)")
        self.table.add(
            row,
            f"{mib / median(got['dockpoint']):.0f} MiB/s",
            f"raw AF_UNIX {mib / median(got['raw']):.0f} MiB/s",
            ratio=f"{ratio:.3f}",
            target=">= 0.95",
            met=ratio >= 0.95,
            label=f"bulk vs raw [{self.layout}]",
        )
        _detail(row, got, scale=1e3, unit="ms")

    def connect_cycle(self, cycles: int = CONNECT_CYCLES) -> None:
        self.against_raw_and_mp(
            "cc",
            number=3,
            name="connect cycle",
            size=f"({cycles:,}x)",
            amount=cycles,
            unit="cycle",
            raw_target=1.25,
            mp_target=None,
        )

    def against_raw_and_mp(
        self,
        kind: str,
        *,
        number: int,
        name: str,
        size: str,
        amount: int,
        unit: str,
        raw_target: float,
        mp_target: float | None,
    ) -> None:
        """Rows 1 and 3: dockpoint, raw AF_UNIX and multiprocessing.connection, interleaved."""
        checks = kind == "cc"  # row 3 also runs raw with the checks a connect keeps
        got = self.compare(kind, ["dockpoint", "raw", "mp"] + ["checks"] * checks, amount)
        r_raw = paired_ratio(got["dockpoint"], got["raw"])
        r_mp = paired_ratio(got["dockpoint"], got["mp"])
        row = self.row(number, f"{name} {size}")
        self.table.add(
            row,
            us(median(got["dockpoint"]) / amount) + "/" + unit,
            "raw AF_UNIX " + us(median(got["raw"]) / amount),
            ratio=f"{r_raw:.3f}",
            target=f"<= {raw_target:.2f}",
            met=r_raw <= raw_target,
            label=f"{name} vs raw [{self.layout}]",
        )
        if checks:
            # The floor of issue 19: dockpoint / (raw + the kept checks), per round.
            floor = round_ratios(got["dockpoint"], got["checks"])
            self.table.add(
                "",
                "",
                f"raw + the kept checks (lstat, peer creds) {us(median(got['checks']) / amount)}"
                f" (itself {paired_ratio(got['checks'], got['raw']):.2f} x raw)",
                ratio=spread(floor),
                target="<= 1.10",
                met=median(floor) <= 1.10,
                label=f"{name} vs raw + checks [{self.layout}]",
            )
        mp = us(median(got["mp"]) / amount)
        if mp_target is None:
            self.table.add("", "", "multiprocessing Client " + mp, ratio=f"{r_mp:.3f}")
        else:
            self.table.add(
                "",
                "",
                f"multiprocessing.connection {mp} "
                f"(raw itself: {paired_ratio(got['raw'], got['mp']):.2f})",
                ratio=f"{r_mp:.3f}",
                target=f"<= {mp_target:.2f}",
                met=r_mp <= mp_target,
                label=f"{name} vs multiprocessing [{self.layout}]",
            )
        _detail(row, got, scale=1e6 / amount, unit="us/" + unit)

    def claim_cycle(self, cycles: int = CLAIM_CYCLES, *, profile: bool = True) -> None:
        dp, runtime = self.dockpoint, self.runtime
        got = interleave(
            {
                "dockpoint": lambda: claim_cycle(dp, cycles),
                "raw": lambda: raw_claim_cycle(runtime, cycles),
            },
            self.reps,
        )
        ratio = paired_ratio(got["dockpoint"], got["raw"])
        row = f"4 claim cycle ({cycles:,}x)"
        self.table.add(
            row,
            us(median(got["dockpoint"]) / cycles) + "/cycle",
            "raw flock+bind+rename " + us(median(got["raw"]) / cycles),
            ratio=f"{ratio:.2f}",
            target="absolute",
        )
        _detail(row, got, scale=1e6 / cycles, unit="us/cycle")
        if profile:
            for line in profile_claim(dp, cycles):
                print(line)

    def import_cost(self, runs: int = IMPORT_RUNS) -> None:
        parent = str(Path(self.dockpoint.__file__).resolve().parent.parent)
        isolated = ["-I", "-S"]
        import_run(isolated, parent, "import dockpoint", "dockpoint")  # bytecode is cached
        measures: dict[str, tuple[list[str], str, str]] = {
            "after socket": (isolated, "import socket; import dockpoint", "dockpoint"),
            "socket alone": (isolated, "import socket", "socket"),
            "dockpoint alone": (isolated, "import dockpoint", "dockpoint"),
            "site, after socket": (["-I"], "import socket; import dockpoint", "dockpoint"),
        }
        got: dict[str, list[float]] = {name: [] for name in measures}
        for _ in range(runs):
            for name, (flags, statement, module) in measures.items():
                got[name].append(import_run(flags, parent, statement, module) / 1000)
        extra = median(got["after socket"])
        sock = median(got["socket alone"])
        whole = median(got["dockpoint alone"])
        row = f"5 import (-X importtime, median of {runs})"
        self.table.add(
            row,
            f"+{extra:.2f} ms",
            f"import socket {sock:.2f} ms",
            target="<= +1 ms",
            met=extra <= 1.0,
            label="import",
        )
        self.table.add(
            "",
            f"+{median(got['site, after socket']):.2f} ms",
            "with site-packages (-I, no -S), after socket",
        )
        added = " ".join(import_modules(isolated, parent))
        print(f"{row}: python -I -S -X importtime; modules dockpoint adds to socket: {added}")
        print(
            f"  cross-check, separate interpreters: median(import dockpoint) {whole:.2f} ms - "
            f"median(import socket) {sock:.2f} ms = {whole - sock:+.2f} ms (noisy: the two "
            "medians are of different processes)"
        )
        for name, values in got.items():
            print(f"  {name:20} ms: " + " ".join(f"{v:.2f}" for v in values))

    def burst(self, rounds: int = BURST_ROUNDS) -> None:
        runs = [run_burst(self.children, BURST_CLIENTS, BURST_PROCESSES) for _ in range(rounds)]
        worst = min(runs, key=lambda r: int(r["served"]))
        none = max(r["none"] for r in runs)
        other = max(r["other_count"] for r in runs)
        p50 = median([r["connect_p50"] for r in runs])
        p99 = median([r["connect_p99"] for r in runs])
        row = f"6 burst ({BURST_CLIENTS:,} clients, {BURST_PROCESSES} procs)"
        self.table.add(
            row,
            f"{worst['served']}/{BURST_CLIENTS} served, {none} None, {other} errors",
            f"connect p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms",
            target=f"{BURST_CLIENTS}/{BURST_CLIENTS} served",
            met=worst["served"] == BURST_CLIENTS and none == 0 and other == 0,
            label="burst",
        )
        print(f"{row}: {rounds} bursts (worst counts, median latencies in the table)")
        for i, r in enumerate(runs):
            print(
                f"  burst {i + 1}: served {r['served']}, None {r['none']}, "
                f"other {r['other_count']} {r['other']}; connect p50 "
                f"{r['connect_p50'] * 1e3:.2f} ms p99 {r['connect_p99'] * 1e3:.2f} ms; "
                f"reply after start p50 {r['served_p50'] * 1e3:.1f} ms "
                f"p99 {r['served_p99'] * 1e3:.1f} ms, last {r['last_served'] * 1e3:.1f} ms"
            )


# --------------------------------------------------------------------------- row 7: Wine


def _win_api() -> Any:
    """ctypes bindings for the raw named-pipe baseline (Windows only)."""
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle, dword, bool_ = wintypes.HANDLE, wintypes.DWORD, wintypes.BOOL
    pdword, lpvoid = ctypes.POINTER(dword), ctypes.c_void_p
    k32.CreateNamedPipeW.argtypes = [
        wintypes.LPCWSTR, dword, dword, dword, dword, dword, dword, lpvoid,
    ]  # fmt: skip
    k32.CreateNamedPipeW.restype = handle
    k32.ConnectNamedPipe.argtypes = [handle, lpvoid]
    k32.ConnectNamedPipe.restype = bool_
    k32.CreateFileW.argtypes = [wintypes.LPCWSTR, dword, dword, lpvoid, dword, dword, handle]
    k32.CreateFileW.restype = handle
    k32.ReadFile.argtypes = [handle, lpvoid, dword, pdword, lpvoid]
    k32.ReadFile.restype = bool_
    k32.WriteFile.argtypes = [handle, lpvoid, dword, pdword, lpvoid]
    k32.WriteFile.restype = bool_
    k32.CloseHandle.argtypes = [handle]
    k32.CloseHandle.restype = bool_
    k32.DisconnectNamedPipe.argtypes = [handle]
    k32.DisconnectNamedPipe.restype = bool_
    k32.WaitNamedPipeW.argtypes = [wintypes.LPCWSTR, dword]
    k32.WaitNamedPipeW.restype = bool_
    return k32


_WIN_INVALID = -1 & 0xFFFFFFFFFFFFFFFF


def _win_pipe_name() -> str:
    return rf"\\.\pipe\dockpoint-bench-raw-{os.getpid()}"


class _RawPipe:
    """A connected raw pipe handle with the same read/write shape as a connection."""

    def __init__(self, k32: Any, handle: int) -> None:
        import ctypes
        from ctypes import wintypes

        self.k32, self.handle = k32, handle
        self.buf = ctypes.create_string_buffer(65536)
        self.count = wintypes.DWORD()
        self.ref = ctypes.byref(self.count)

    def read(self, n: int) -> bytes:
        if not self.k32.ReadFile(self.handle, self.buf, n, self.ref, None):
            return b""
        return self.buf.raw[: self.count.value]

    def write(self, data: bytes) -> int:
        if not self.k32.WriteFile(self.handle, data, len(data), self.ref, None):
            raise BrokenPipeError
        return len(data)

    def close(self) -> None:
        self.k32.CloseHandle(self.handle)


def serve_raw_pipe(name: str) -> None:
    """Raw ctypes echo server: always one listening instance ahead, serve serially."""
    import ctypes

    k32 = _win_api()

    def instance() -> int:
        h = k32.CreateNamedPipeW(name, 0x3, 0, 255, 65536, 65536, 0, None)  # duplex, byte
        if h in (None, _WIN_INVALID):
            raise ctypes.WinError(ctypes.get_last_error())  # type: ignore[attr-defined]
        return int(h)

    listening = instance()
    print("ready", flush=True)
    while True:
        if not k32.ConnectNamedPipe(listening, None):
            err = ctypes.get_last_error()  # type: ignore[attr-defined]
            if err != 535:  # ERROR_PIPE_CONNECTED: the client came before the call
                raise ctypes.WinError(err)  # type: ignore[attr-defined]
        conn, listening = listening, instance()
        pipe = _RawPipe(k32, conn)
        data = pipe.read(65536)
        while data:
            pipe.write(data)
            data = pipe.read(65536)
        k32.DisconnectNamedPipe(conn)
        pipe.close()


def _raw_pipe_connect(k32: Any, name: str) -> _RawPipe:
    import ctypes

    for _ in range(1000):
        h = k32.CreateFileW(name, 0xC0000000, 0, None, 3, 0, None)  # read|write, OPEN_EXISTING
        if h not in (None, _WIN_INVALID):
            return _RawPipe(k32, int(h))
        err = ctypes.get_last_error()  # type: ignore[attr-defined]
        if err != 231:  # ERROR_PIPE_BUSY
            raise ctypes.WinError(err)  # type: ignore[attr-defined]
        k32.WaitNamedPipeW(name, 1000)
    raise TimeoutError(name)


def wine_side(reps: int) -> None:
    """Runs under Windows CPython: row 7's measurements, printed as one JSON line."""
    dockpoint = _import_dockpoint()
    k32 = _win_api()
    name = _win_pipe_name()
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        for args in (["--serve", "dockpoint", WINE_APP], ["--serve", "rawpipe", name])
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode().strip()  # bounded by the lane's timeout
            if line != "ready":
                raise RuntimeError(f"server said {line!r}")

        def rt_dp() -> float:
            conn = dockpoint.connect(WINE_APP, timeout=10)
            try:
                start = time.perf_counter()
                for _ in range(WINE_RT_OPS):
                    conn.write(b"x")
                    conn.read(1)
                return time.perf_counter() - start
            finally:
                conn.close()

        def rt_pipe() -> float:
            pipe = _raw_pipe_connect(k32, name)
            try:
                start = time.perf_counter()
                for _ in range(WINE_RT_OPS):
                    pipe.write(b"x")
                    pipe.read(1)
                return time.perf_counter() - start
            finally:
                pipe.close()

        def cc_dp() -> float:
            start = time.perf_counter()
            for _ in range(WINE_CONNECT_CYCLES):
                conn = dockpoint.connect(WINE_APP, timeout=10)
                conn.write(b"x")
                conn.read(1)
                conn.close()
            return time.perf_counter() - start

        def cc_pipe() -> float:
            start = time.perf_counter()
            for _ in range(WINE_CONNECT_CYCLES):
                pipe = _raw_pipe_connect(k32, name)
                pipe.write(b"x")
                pipe.read(1)
                pipe.close()
            return time.perf_counter() - start

        rt = interleave({"dockpoint": rt_dp, "raw": rt_pipe}, reps)
        cc = interleave({"dockpoint": cc_dp, "raw": cc_pipe}, reps)
        print(
            "BENCH-WINE "
            + json.dumps(
                {
                    "rt": rt,
                    "cc": cc,
                    "rt_ops": WINE_RT_OPS,
                    "cc_cycles": WINE_CONNECT_CYCLES,
                    "python": sys.version.split()[0],
                }
            ),
            flush=True,
        )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def bench_wine(table: Table, reps: int, timeout: float) -> str | None:
    """Row 7 (information): run :func:`wine_side` under Wine; ``None`` or why it is pending."""
    lane = REPO_ROOT / ".ci" / "wine_lane.py"
    backend = REPO_ROOT / "dockpoint" / "_windows.py"
    if not lane.exists() or not backend.exists():
        missing = [str(p.relative_to(REPO_ROOT)) for p in (lane, backend) if not p.exists()]
        return "pending: " + ", ".join(missing) + " not there yet"
    command = [
        sys.executable,
        str(lane),
        "python",
        "--cwd",
        str(REPO_ROOT),
        "--timeout",
        str(int(timeout)),
        "--",
        str(Path(__file__).resolve().relative_to(REPO_ROOT)),
        "--wine-side",
        "--reps",
        str(reps),
    ]
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"pending: the Wine lane did not finish within {timeout + 60:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH-WINE ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return f"pending: Wine run failed (exit {done.returncode}): " + " | ".join(tail)
    data = json.loads(lines[-1][len("BENCH-WINE ") :])
    rt, cc = data["rt"], data["cc"]
    table.add(
        f"7 Wine round trip ({data['rt_ops']:,} x 1 B)",
        us(median(rt["dockpoint"]) / data["rt_ops"]) + "/op",
        "raw ctypes pipe " + us(median(rt["raw"]) / data["rt_ops"]),
        ratio=f"{paired_ratio(rt['dockpoint'], rt['raw']):.3f}",
    )
    table.add(
        f"7 Wine connect cycle ({data['cc_cycles']:,}x)",
        us(median(cc["dockpoint"]) / data["cc_cycles"]) + "/cycle",
        "raw ctypes pipe " + us(median(cc["raw"]) / data["cc_cycles"]),
        ratio=f"{paired_ratio(cc['dockpoint'], cc['raw']):.3f}",
    )
    _detail("7 Wine round trip", rt, scale=1e6 / data["rt_ops"], unit="us/op")
    _detail("7 Wine connect cycle", cc, scale=1e6 / data["cc_cycles"], unit="us/cycle")
    return None


# --------------------------------------------------------------------------- rows 8-12: frontends

SPAWN_APP = "dockpoint-bench-spawn"
WARM_APP = "dockpoint-bench-warm"
RECIPE_APP = "dockpoint-bench-recipe"
STORM_APP = "dockpoint-bench-storm"
STORM_SIZES = (30, 100)
M_FLOOR = "dockpoint_bench_m_floor"  # python -m of this: runpy, import dockpoint, os._exit


def frontend_env(env: dict[str, str]) -> dict[str, str]:
    """Children of rows 8-12 run as a user's would: bytecode written and read."""
    out = dict(env)
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    return out


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``pid`` (not our child: a daemon reparented away) has ended."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"daemon {pid} did not exit")
        finally:
            os.close(fd)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.001)
    raise TimeoutError(f"daemon {pid} did not exit")


def stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    wait_gone(pid)


def recipe_dir(runtime: str, app: str = RECIPE_APP, name: str = "recipe") -> Path:
    """The README's two recipe programs, written out with a bench app name."""
    import re

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^<!-- recipe: (\S+) -->\n```python\n(.*?)^```$", readme, re.M | re.S)
    folder = Path(runtime) / name
    folder.mkdir(exist_ok=True)
    for program, code in blocks:
        ours = re.sub(r'^APP = "[^"\n]*"$', f'APP = "{app}"', code, count=1, flags=re.M)
        (folder / program).write_text(ours, encoding="utf-8")
    return folder


class Frontends:
    """Rows 8-12: ``python -m dockpoint send`` and the README recipe against their floors,
    run with ``python`` (a venv's interpreter, bytecode cached). ``tag`` ends every app
    name and folder of this instance, so that two of them (two interpreters) can take
    turns in one run without sharing a daemon."""

    def __init__(
        self,
        table: Table,
        reps: int,
        python: str,
        env: dict[str, str],
        runtime: str,
        *,
        tag: str = "",
    ):
        self.table, self.reps, self.python = table, reps, python
        self.env = frontend_env(env)
        self.spawn_app, self.warm_app = SPAWN_APP + tag, WARM_APP + tag
        self.storm_app = STORM_APP + tag
        self.recipe = recipe_dir(runtime, RECIPE_APP + tag, "recipe" + tag)
        # What any ``python -m`` frontend pays: runpy, then import dockpoint, os._exit.
        self.m_floor = Path(runtime) / ("mfloor" + tag)
        self.m_floor.mkdir(exist_ok=True)
        (self.m_floor / f"{M_FLOOR}.py").write_text(
            "import os\nimport sys\n\nimport dockpoint  # noqa: F401\n\n"
            "sys.stdout.flush()\nos._exit(0)\n",
            encoding="utf-8",
        )

    def run(self, *args: str, cwd: Path | None = None) -> tuple[float, bytes]:
        start = time.perf_counter()
        out = subprocess.run(
            [self.python, *args],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        took = time.perf_counter() - start
        if out.returncode != 0:
            raise RuntimeError(f"{args!r} failed ({out.returncode}): {out.stderr[-2000:]!r}")
        return took, out.stdout

    def floor(self, times: int) -> float:
        return sum(self.run("-c", "import dockpoint")[0] for _ in range(times))

    def python_m(self) -> float:
        return self.run("-m", M_FLOOR, cwd=self.m_floor)[0]

    def cold_send(self) -> float:
        took, out = self.run("-m", "dockpoint", "send", self.spawn_app, "hello")
        stop_daemon(int(out.split()[0]))
        return took

    def warm_send(self) -> float:
        return self.run("-m", "dockpoint", "send", self.warm_app, "hello")[0]

    def cold_recipe(self) -> float:
        took, out = self.run(str(self.recipe / "frontend.py"))
        stop_daemon(int(out.split()[1]))  # "daemon PID got hello"
        return took

    def start_warm_daemon(self) -> int:
        """The daemon ``warm_send`` talks to (its pid; :func:`stop_daemon` ends it)."""
        _, out = self.run("-m", "dockpoint", "send", self.warm_app, "hi")
        return int(out.split()[0])

    def single(self) -> None:
        """Rows 8-10, interleaved: floor, cold send, cold recipe, then warm send against
        one import (a daemon started for it, stopped after)."""
        warm_daemon = self.start_warm_daemon()
        got = interleave(
            {
                "floor2": lambda: self.floor(2),
                "cold send": self.cold_send,
                "cold recipe": self.cold_recipe,
                "floor1": lambda: self.floor(1),
                "warm send": self.warm_send,
                "python -m": self.python_m,
            },
            self.reps,
        )
        stop_daemon(warm_daemon)
        rows = [
            ("8 cold send (no daemon -> reply)", "cold send", "floor2", "2 x import dockpoint"),
            ("9 cold README recipe", "cold recipe", "floor2", "2 x import dockpoint"),
            ("10 warm send (daemon up)", "warm send", "floor1", "1 x import dockpoint"),
        ]
        for row, side, floor, what in rows:
            ratios = round_ratios(got[side], got[floor])
            ratio = median(ratios)
            self.table.add(
                row,
                f"{median(got[side]) * 1e3:.1f} ms",
                f"{what} {median(got[floor]) * 1e3:.1f} ms",
                ratio=spread(ratios),
                target="<= 1.15",
                met=ratio <= 1.15,
                label=row.split(" (")[0],
            )
        # Information: the part of row 10's floor that no ``python -m`` frontend can avoid.
        m_ratios = round_ratios(got["python -m"], got["floor1"])
        w_ratios = round_ratios(got["warm send"], got["python -m"])
        self.table.add(
            "",
            f"python -m of a module that imports dockpoint: {median(got['python -m']) * 1e3:.1f}"
            f" ms ({median(m_ratios):.2f} x 1 import)",
            f"warm send / that {median(got['python -m']) * 1e3:.1f} ms",
            ratio=spread(w_ratios),
        )
        _detail("8-10 frontends", got, scale=1e3, unit="ms")

    def batch(
        self, args: list[list[str]], cwd: Path | None = None
    ) -> tuple[float, float, list[bytes], list[bytes]]:
        """Start every command at once; wall time, children's CPU time, outputs."""
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [self.python, *a],
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for a in args
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        bad = [p.returncode for p in procs if p.returncode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(procs)} failed: {outs[0][1][-500:]!r}")
        return wall, cpu, [o for o, _ in outs], [e for _, e in outs]

    def send_storm(self, size: int) -> tuple[float, float, int, int]:
        """``size`` sends at once against no daemon: wall, the frontends' CPU, daemons
        started, replies; the daemons are stopped after."""
        wall, cpu, outs, errs = self.batch(
            [["-m", "dockpoint", "send", self.storm_app, f"m{i}", "-v"] for i in range(size)]
        )
        pids = {int(o.split()[0]) for o in outs}
        spawned = [line for e in errs for line in e.splitlines() if b"started one" in line]
        for pid in pids:
            stop_daemon(pid)
        return wall, cpu, len(spawned), len(outs)

    def storm(self, size: int) -> None:
        """Rows 11-12: ``size`` sends at once against no daemon vs ``size`` imports at once."""
        started: list[int] = []
        answered: list[int] = []

        def sends() -> float:
            wall, cpu, spawned, replies = self.send_storm(size)
            started.append(spawned)
            answered.append(replies)
            cpus["send"].append(cpu)
            return wall

        def imports() -> float:
            wall, cpu, _, _ = self.batch([["-c", "import dockpoint"]] * size)
            cpus["floor"].append(cpu)
            return wall

        def python_ms() -> float:
            wall, cpu, _, _ = self.batch([["-m", M_FLOOR]] * size, cwd=self.m_floor)
            cpus["python -m"].append(cpu)
            return wall

        cpus: dict[str, list[float]] = {"send": [], "floor": [], "python -m": []}
        got = interleave({"floor": imports, "send": sends, "python -m": python_ms}, self.reps)
        cpus = {k: v[1:] for k, v in cpus.items()}  # drop the warm-up round
        started, answered = started[1:], answered[1:]
        ratios = round_ratios(got["send"], got["floor"])
        cpu_ratios = round_ratios(cpus["send"], cpus["floor"])
        row = f"{11 if size == STORM_SIZES[0] else 12} storm of {size} sends, no daemon"
        self.table.add(
            row,
            f"wall {median(got['send']):.2f} s",
            f"{size} x import dockpoint at once, wall {median(got['floor']):.2f} s",
            ratio=spread(ratios),
            target="<= 1.20",
            met=median(ratios) <= 1.2,
            label=f"storm {size} wall",
        )
        self.table.add(
            "",
            f"CPU {median(cpus['send']):.2f} s",
            f"CPU {median(cpus['floor']):.2f} s (frontends only)",
            ratio=spread(cpu_ratios),
        )
        self.table.add(
            "",
            f"daemons started per storm: {', '.join(map(str, started))}",
            f"replies: {min(answered)}-{max(answered)} of {size}",
            target="exactly 1",
            met=all(n == 1 for n in started) and min(answered) == size,
            label=f"storm {size} one daemon",
        )
        m_ratios = round_ratios(got["python -m"], got["floor"])
        s_ratios = round_ratios(got["send"], got["python -m"])
        self.table.add(
            "",
            f"{size} x python -m of a module that imports dockpoint: wall "
            f"{median(got['python -m']):.2f} s ({median(m_ratios):.2f} x floor)",
            f"send / that {median(got['python -m']):.2f} s",
            ratio=spread(s_ratios),
        )
        _detail(row, got, scale=1, unit="s wall")

    def import_once(self) -> float:
        """Cumulative ``import dockpoint`` (``-X importtime``) of one fresh interpreter, ms."""
        out = subprocess.run(
            [self.python, "-X", "importtime", "-c", "import dockpoint"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return parse_importtime(out.stderr)["dockpoint"][1] / 1000

    def import_cumulative(self, runs: int = IMPORT_RUNS) -> None:
        """Row 13: cumulative ``import dockpoint`` in the frontend interpreter."""
        values = [self.import_once() for _ in range(runs + 1)]
        value = median(values[1:])
        self.table.add(
            f"13 import dockpoint, cumulative (median of {runs})",
            f"{value:.2f} ms",
            f"range {min(values[1:]):.2f}-{max(values[1:]):.2f} ms",
            target="<= 2 ms",
            met=value <= 2.0,
            label="import cumulative",
        )


# --------------------------------------------------------------------------- old vs new tree


WORKER_TIMEOUT = 600.0
COMPARE_ROWS = (1, 2, 3, 14, 8, 9, 10, 11, 12, 13)
GUARD = 1.03  # issue 18: no row more than 3 % worse than the old tree


def task_cpu(pid: int) -> float:
    """CPU seconds of process ``pid``'s main thread, to the nanosecond (Linux
    ``/proc/PID/schedstat``; 0.0 elsewhere). The echo daemons have one thread."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def worker_main() -> None:
    """``--worker``: the dockpoint client side of rows 1-3 and 14, in this interpreter and
    with its own dockpoint (it runs with ``-I``). Says ``ready VERSION PATH``, then answers
    every line ``KIND APP AMOUNT SERVER_PID`` of stdin with ``WALL CPU``: the seconds that
    row's timed loop took, and the CPU seconds of the round (this process's and the echo
    daemon's); ends with stdin."""
    import dockpoint

    print(f"ready {dockpoint.__version__} {Path(dockpoint.__file__).parent}", flush=True)
    for line in sys.stdin:
        kind, app, amount, server = line.split()
        cpu0, server0 = time.process_time(), task_cpu(int(server))
        wall = client_job(kind, "dockpoint", app, dockpoint)(int(amount))
        cpu = time.process_time() - cpu0 + task_cpu(int(server)) - server0
        print(f"{wall!r} {cpu!r}", flush=True)


def children_cpu() -> float:
    """CPU seconds of this process's reaped children so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_cpu(job: Callable[[], float], into: list[float]) -> Callable[[], float]:
    """``job``, also appending the CPU seconds of the children it reaped to ``into``."""

    def run() -> float:
        before = children_cpu()
        value = job()
        into.append(children_cpu() - before)
        return value

    return run


def interleave_turns(
    sides: dict[str, dict[str, Callable[[], float]]], labels: list[str], reps: int
) -> dict[str, dict[str, list[float]]]:
    """One warm-up round, then ``reps`` rounds; in every round each measure of ``sides``
    runs once per label, the labels taking turns (new old, then old new, ...)."""
    got: dict[str, dict[str, list[float]]] = {what: {lb: [] for lb in labels} for what in sides}
    for turn in range(reps + 1):
        order = labels if turn % 2 else labels[::-1]
        for what, jobs in sides.items():
            for label in order:
                value = jobs[label]()
                if turn:
                    got[what][label].append(value)
    return got


class CompareTable:
    """Rows of the old-vs-new comparison: new, old, new/old of the per-round values."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.worse: list[str] = []

    def add(
        self,
        row: str,
        new: list[float],
        old: list[float],
        show: Callable[[float], str],
        *,
        guarded: bool = True,
    ) -> None:
        """``new``/``old``: per-round costs (times; higher is worse)."""
        ratios = round_ratios(new, old)
        verdict = "info"
        if guarded:
            verdict = "ok" if median(ratios) <= GUARD else f"WORSE > {GUARD - 1:.0%}"
            if median(ratios) > GUARD:
                self.worse.append(row.strip())
        self.rows.append((row, show(median(new)), show(median(old)), spread(ratios, 3), verdict))

    def render(self) -> str:
        head = ("row", "new", "old", "new/old median (min-max)", f"<= {GUARD:.2f}?")
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        lines = []
        for r in [head, tuple("-" * w for w in widths), *self.rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def shown(scale: float, unit: str) -> Callable[[float], str]:
    """How a row shows its seconds: times ``scale``, in ``unit``."""
    return lambda value: f"{value * scale:.2f} {unit}"


class Compare:
    """Issue 18's guard: the dockpoint side of each row, run by the new and the old
    interpreter (each a venv with its tree's dockpoint) taking turns round by round."""

    def __init__(
        self,
        pythons: dict[str, str],
        reps: int,
        children: Children,
        runtime: str,
        env: dict[str, str],
    ) -> None:
        self.pythons, self.reps, self.children = pythons, reps, children
        self.runtime, self.env = runtime, env
        self.labels = list(pythons)
        self.table = CompareTable()
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.layout = "unpinned"

    def app(self, label: str) -> str:
        return f"{ECHO_APP}-{label}"

    def start_sockets(self) -> None:
        """Per interpreter: a dockpoint echo daemon and a client worker, both its own."""
        for label, python in self.pythons.items():
            self.servers[label] = self.children.spawn(
                "--serve", "dockpoint", self.app(label), python=python
            )
            self.workers[label] = self.children.spawn(
                "--worker", python=python, stdin=subprocess.PIPE
            )
        for label in self.labels:
            wait_ready(self.servers[label])
            said = read_line(self.workers[label], START_TIMEOUT).split(maxsplit=2)
            if said[:1] != ["ready"]:
                raise RuntimeError(f"the {label} worker said {said!r}")
            print(f"{label}: {self.pythons[label]}: dockpoint {said[1]} from {said[2]}")

    def stop_sockets(self) -> None:
        for proc in [*self.workers.values(), *self.servers.values()]:
            self.children.end(proc)
        self.workers.clear()
        self.servers.clear()

    def place(self, layout: str) -> None:
        """As :meth:`Bench.place`: the workers (and this process, which only waits) are
        the client side, the echo daemons the server side."""
        self.layout = layout
        if not hasattr(os, "sched_setaffinity"):
            return
        if layout == "unpinned":
            client, server = ALL_CPUS, ALL_CPUS
        else:
            first, second = sorted(ALL_CPUS)[:2]
            client, server = {first}, ({second} if layout == "split" else {first})
        os.sched_setaffinity(0, client)
        for proc in self.workers.values():
            os.sched_setaffinity(proc.pid, client)
        for proc in self.servers.values():
            os.sched_setaffinity(proc.pid, server)

    def job(self, label: str, kind: str, amount: int, cpu: list[float]) -> float:
        """One round of the worker of ``label``: its wall seconds (the CPU to ``cpu``)."""
        worker, server = self.workers[label], self.servers[label]
        assert worker.stdin is not None
        worker.stdin.write(f"{kind} {self.app(label)} {amount} {server.pid}\n".encode())
        worker.stdin.flush()
        wall, used = map(float, read_line(worker, WORKER_TIMEOUT).split())
        cpu.append(used)
        return wall

    def sockets(self, rows: set[int], first_layout: bool) -> None:
        """Rows 1-3 and 14 in the current layout (row 2 only in the first)."""
        measures = [
            (1, "rt", RT_OPS, f"round trip ({RT_OPS:,} x 1 B)", 1e6 / RT_OPS, "us/op"),
            (2, "bulk", BULK_BYTES, f"bulk ({BULK_BYTES >> 20} MiB)", 1e3, "ms"),
            (
                3,
                "cc",
                CONNECT_CYCLES,
                f"connect cycle ({CONNECT_CYCLES:,}x)",
                1e6 / CONNECT_CYCLES,
                "us/cycle",
            ),
            (14, "rt", RTT_OPS, f"1-byte round trip ({RTT_OPS:,} x)", 1e6 / RTT_OPS, "us/op"),
        ]
        for number, kind, amount, name, scale, unit in measures:
            if number not in rows or (number == 2 and not first_layout):
                continue
            row = f"{number} {name} [{self.layout}]"
            cpus: dict[str, list[float]] = {label: [] for label in self.labels}
            jobs: dict[str, Callable[[], float]] = {
                label: partial(self.job, label, kind, amount, cpus[label]) for label in self.labels
            }
            got = interleave_turns({row: jobs}, self.labels, self.reps)[row]
            cpus = {label: values[1:] for label, values in cpus.items()}  # the warm-up
            self.table.add(row, got["new"], got["old"], shown(scale, unit))
            if min(cpus["new"] + cpus["old"]) > 0:
                self.table.add(
                    f"{number}   CPU (client + daemon) [{self.layout}]",
                    cpus["new"],
                    cpus["old"],
                    shown(scale, unit),
                )
            _detail(row, got, scale=scale, unit=unit)
            _detail(f"{row} CPU", cpus, scale=scale, unit=unit)

    def frontends(self, rows: set[int]) -> None:
        """Rows 8-13: each interpreter's frontends (apps and folders of its own)."""
        fronts = {
            label: Frontends(Table(), self.reps, python, self.env, self.runtime, tag=f"-{label}")
            for label, python in self.pythons.items()
        }
        single = {
            8: ("8 cold send (no daemon -> reply)", "cold_send"),
            9: ("9 cold README recipe", "cold_recipe"),
            10: ("10 warm send (daemon up)", "warm_send"),
        }
        chosen = [row for number, (row, _) in single.items() if number in rows]
        cpus: dict[str, dict[str, list[float]]] = {
            row: {label: [] for label in self.labels} for row in chosen
        }
        sides = {
            row: {
                label: with_cpu(getattr(front, method), cpus[row][label])
                for label, front in fronts.items()
            }
            for number, (row, method) in single.items()
            if number in rows
        }
        if sides:
            warm = {label: front.start_warm_daemon() for label, front in fronts.items()}
            try:
                got = interleave_turns(sides, self.labels, self.reps)
            finally:
                for pid in warm.values():
                    stop_daemon(pid)
            for row, values in got.items():
                self.table.add(row, values["new"], values["old"], ms)
                cpu = {label: v[1:] for label, v in cpus[row].items()}  # the warm-up
                self.table.add(
                    f"{row.split()[0]}   CPU (the frontend's, not a daemon's)",
                    cpu["new"],
                    cpu["old"],
                    ms,
                )
                _detail(row, values, scale=1e3, unit="ms")
                _detail(f"{row} CPU", cpu, scale=1e3, unit="ms")
        for number, size in zip((11, 12), STORM_SIZES):
            if number in rows:
                self.storm(fronts, number, size)
        if 13 in rows:
            row = "13 import dockpoint, cumulative (-X importtime)"
            jobs = {label: front.import_once for label, front in fronts.items()}
            imports = interleave_turns({row: jobs}, self.labels, max(self.reps, IMPORT_RUNS))
            self.table.add(row, imports[row]["new"], imports[row]["old"], shown(1, "ms"))

    def storm(self, fronts: dict[str, Frontends], number: int, size: int) -> None:
        """Row 11 or 12: ``size`` sends at once against no daemon, per interpreter."""
        cpus: dict[str, list[float]] = {label: [] for label in self.labels}
        started: list[int] = []

        def sends(label: str) -> float:
            wall, cpu, spawned, _ = fronts[label].send_storm(size)
            cpus[label].append(cpu)
            started.append(spawned)
            return wall

        row = f"{number} storm of {size} sends, no daemon: wall"
        jobs: dict[str, Callable[[], float]] = {
            label: partial(sends, label) for label in self.labels
        }
        got = interleave_turns({row: jobs}, self.labels, self.reps)[row]
        cpu = {label: values[1:] for label, values in cpus.items()}  # the warm-up
        self.table.add(row, got["new"], got["old"], lambda v: f"{v:.2f} s")
        self.table.add(
            f"{number}   CPU (the frontends')", cpu["new"], cpu["old"], lambda v: f"{v:.2f} s"
        )
        print(f"{row}: daemons started per storm (both trees, warm-up first): {started}")
        _detail(row, got, scale=1, unit="s")

    def aio(self, reps: int, timeout: float) -> None:
        """bench_aio.py's dockpoint.aio echo row, old vs new (its own --baseline-python)."""
        command = [
            sys.executable,
            str(HERE / "bench_aio.py"),
            "--python",
            self.pythons["new"],
            "--baseline-python",
            self.pythons["old"],
            "--reps",
            str(reps),
            "--json",
        ]
        out = subprocess.run(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"bench_aio.py failed ({out.returncode})")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        row = (
            f"aio echo ({result['clients']:,} clients x {result['trips']} trips) [{result['pin']}]"
        )
        seconds, cpu = result["seconds"], result["cpu_seconds"]
        self.table.add(row + ": wall", seconds["new"], seconds["old"], lambda v: f"{v:.2f} s")
        self.table.add(
            "aio   CPU (clients + daemon)", cpu["new"], cpu["old"], lambda v: f"{v:.2f} s"
        )


def compare_run(args: argparse.Namespace) -> int:
    """``--baseline-python``: the old-vs-new comparison (issue 18); reports, exit 0."""
    started = time.perf_counter()
    pythons = {"new": args.python, "old": args.baseline_python}
    rows = [row for row in COMPARE_ROWS if row in set(args.rows)]
    skipped = sorted(set(args.rows) - set(COMPARE_ROWS))
    print(f"old vs new tree: rows {', '.join(map(str, rows))}" + ("" if args.no_aio else ", aio"))
    if skipped:
        print(f"  (rows {', '.join(map(str, skipped))} have no old-vs-new form: not run)")
    print(f"machine: {machine()}; load {os.getloadavg()}")
    print(
        f"repetitions: {args.reps} per side (row 13: {max(args.reps, IMPORT_RUNS)}), the two "
        "interpreters taking turns (new old, old new, ...) after one warm-up round"
    )
    with private_runtime_dir() as runtime:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # each interpreter imports its own installed dockpoint
        env = frontend_env(env)
        children = Children(env)
        compare = Compare(pythons, args.reps, children, runtime, env)
        try:
            wanted = set(rows)
            if wanted & {1, 2, 3, 14}:
                compare.start_sockets()
                for i, layout in enumerate(layouts(args.pin)):
                    compare.place(layout)
                    compare.sockets(wanted, first_layout=i == 0)
                compare.place("unpinned")
                compare.stop_sockets()
            if wanted & {8, 9, 10, 11, 12, 13}:
                compare.frontends(wanted)
            children.kill_all()
            if not args.no_aio:
                compare.aio(args.aio_reps, timeout=args.aio_timeout)
        finally:
            children.kill_all()
    elapsed = time.perf_counter() - started
    print()
    print(compare.table.render())
    worse = compare.table.worse
    print(
        f"COMPARE: {len(worse)} row(s) worse by more than {GUARD - 1:.0%}"
        + (f": {', '.join(worse)}" if worse else "")
        + f"; {elapsed:.1f} s wall; load {os.getloadavg()}; {machine()}"
    )
    return 0


# --------------------------------------------------------------------------- main


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()})"
    )


@contextlib.contextmanager
def private_runtime_dir() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="dockpoint-bench-")
    os.chmod(directory, 0o700)
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = directory
    try:
        yield directory
    finally:
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
        shutil.rmtree(directory, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    dockpoint = _import_dockpoint()
    rows = set(args.rows)
    print(f"dockpoint {dockpoint.__version__} from {Path(dockpoint.__file__).parent}")
    print(f"machine: {machine()}")
    print(
        f"repetitions: {args.reps} per side, interleaved, after one warm-up round "
        "(row 5: fresh interpreters)"
    )
    print(f"CPU layouts for rows 1-3, 14: {', '.join(layouts(args.pin))} (see --pin)")
    table = Table()
    wine_note: str | None = "not run (pass --wine)" if 7 not in rows else None
    with private_runtime_dir() as runtime:
        env = dict(os.environ)
        parent = str(Path(dockpoint.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [parent, env.get("PYTHONPATH")]))
        children = Children(env)
        bench = Bench(dockpoint, table, runtime, args.reps, children)
        try:
            if rows & {1, 2, 3, 14}:
                bench.start_echo_servers()
                for layout in layouts(args.pin):
                    bench.place(layout)
                    if 1 in rows:
                        bench.round_trip()
                    if 2 in rows and layout == layouts(args.pin)[0]:
                        bench.bulk()
                    if 3 in rows:
                        bench.connect_cycle()
                    if 14 in rows:
                        bench.rtt()
                bench.place("unpinned")
                for _, server in bench.servers.values():
                    children.end(server)
            if 4 in rows:
                bench.claim_cycle(profile=not args.no_profile)
            if 5 in rows:
                bench.import_cost()
            if 6 in rows:
                bench.burst()
            children.kill_all()
            if rows & {8, 9, 10, 11, 12, 13}:
                front = Frontends(table, args.reps, args.python, env, runtime)
                print(f"rows 8-13: frontends run with {args.python}; load {os.getloadavg()}")
                if rows & {8, 9, 10}:
                    front.single()
                for size in STORM_SIZES:
                    if (11 if size == STORM_SIZES[0] else 12) in rows:
                        front.storm(size)
                if 13 in rows:
                    front.import_cumulative()
                print(f"rows 8-13 done; load {os.getloadavg()}")
            if 7 in rows:
                wine_note = bench_wine(table, args.reps, args.wine_timeout)
        finally:
            children.kill_all()
    if wine_note:
        table.add("7 Wine (information)", wine_note, "")
    elapsed = time.perf_counter() - started
    print()
    print(table.render())
    met = [label for label, ok in table.verdicts if ok]
    missed = [label for label, ok in table.verdicts if not ok]
    print(
        f"SUMMARY: {len(met)}/{len(table.verdicts)} targets met"
        + (f"; missed: {', '.join(missed)}" if missed else "")
        + f"; {elapsed:.1f} s wall; {machine()}"
    )
    return 0


ALL_CPUS: set[int] = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
PIN_CHOICES = ("both", "split", "same", "unpinned")


def layouts(pin: str) -> list[str]:
    """The CPU layouts rows 1-3 run in, for ``--pin`` on this machine."""
    if not hasattr(os, "sched_setaffinity") or not ALL_CPUS:
        return ["unpinned"]
    wanted = {"both": ["split", "same"], "split": ["split"], "same": ["same"]}.get(
        pin, ["unpinned"]
    )
    if len(ALL_CPUS) < 2:
        wanted = [layout for layout in wanted if layout != "split"] or ["same"]
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="repetitions per side (>= 5)")
    parser.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14],
        help="comma-separated rows to run (default all but 7; 7 is --wine)",
    )
    parser.add_argument(
        "--pin",
        choices=PIN_CHOICES,
        default="both",
        help="CPU layout of client and echo servers in rows 1-3, 14: split (client and server "
        "on two CPUs), same (one CPU), both (default: split, then same), unpinned",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip row 4's profile")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for rows 8-13 (frontends): use a venv's, not a pyenv shim",
    )
    parser.add_argument(
        "--baseline-python",
        help="compare trees (issue 18): the dockpoint side of rows 1-3, 8-14 and of "
        "bench_aio.py, run by --python (new) and by this interpreter (old: a venv with the "
        "old tree's dockpoint) taking turns; prints new/old per row (median of per-round "
        "ratios, range)",
    )
    parser.add_argument("--no-aio", action="store_true", help="with --baseline-python: no aio row")
    parser.add_argument("--aio-reps", type=int, default=7, help="rounds of the aio row (compare)")
    parser.add_argument("--aio-timeout", type=float, default=900.0)
    parser.add_argument("--wine", action="store_true", help="also run row 7 under Wine")
    parser.add_argument("--wine-timeout", type=float, default=600.0)
    # Internal: the child roles of this script.
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "WHERE"), help=argparse.SUPPRESS)
    parser.add_argument("--burst-worker", nargs=2, metavar=("APP", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--wine-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.serve:
        kind, where = args.serve
        servers: dict[str, Callable[[str], None]] = {
            "dockpoint": serve_dockpoint,
            "raw": serve_raw,
            "checks": partial(serve_raw, check=True),
            "wrapped": serve_wrapped,
            "mp": serve_mp,
            "burst": serve_burst,
            "rawpipe": serve_raw_pipe,
        }
        servers[kind](where)
        return 0
    if args.burst_worker:
        burst_worker(args.burst_worker[0], int(args.burst_worker[1]))
        return 0
    if args.wine_side:
        wine_side(max(5, args.reps))
        return 0
    if args.reps < 5:
        parser.error("--reps must be at least 5 (the issue asks for a median of >= 5)")
    if args.baseline_python:
        return compare_run(args)
    if args.wine:
        args.rows.append(7)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
