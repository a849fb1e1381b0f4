"""dockpoint.aio benchmark: an asyncio echo daemon on dockpoint vs one on a raw socket.

Run it from the repository root (it reports, it never fails on a missed target)::

    python tests/bench/bench_aio.py              # about a minute on an idle 2-core machine
    python tests/bench/bench_aio.py --json       # the same, one JSON object at the end

Workload (issue 13, row "asyncio"): 1,000 concurrent clients, each connecting and then
doing 100 round trips of a 64-byte message, against

- ``dockpoint``: ``dockpoint.aio.start_server`` in a daemon process, clients through
  ``dockpoint.aio.open_connection``;
- ``raw``: ``asyncio.start_unix_server`` on a plain socket path in a daemon process,
  clients through ``asyncio.open_unix_connection``.

On Windows (and under Wine: ``python3 .ci/wine_lane.py python tests/bench/bench_aio.py``)
there are no Unix sockets for asyncio, so ``raw`` is asyncio's own named-pipe support in
the proactor event loop on a plain pipe: ``loop.start_serving_pipe`` in the daemon (one
listening instance at a time, a new one made as each client connects), clients through
``loop.create_pipe_connection``, which retries a busy pipe itself; both wrapped in
asyncio's ``StreamReader``/``StreamReaderProtocol``/``StreamWriter`` exactly as
``start_unix_server`` wraps its sockets. (``start_serving_pipe`` is a method of
``ProactorEventLoop`` that asyncio's documentation does not list; it is what asyncio
offers.) The dockpoint side is ``dockpoint.aio`` on dockpoint's own pipe instances.

Both daemons echo with the same handler and run for the whole benchmark in their own
processes; the clients of each round run in this process, in one event loop. Method: ONE
run, one warm-up round per side, then ``--reps`` rounds (default 7) interleaved in
alternating order (dockpoint raw, raw dockpoint, ...); throughput is round trips per
second over the whole round (connects included); the ratio is the median of the per-round
ratios dockpoint/raw (target: at least 0.9).

``--pin`` (Linux) chooses the CPU layout: ``same`` (default; clients and daemons share one
CPU, so a busy or small machine's scheduler does not decide the result), ``split``
(clients on one CPU, daemons on another) or ``none``. The CPU cost ratio (clients' plus
daemon's CPU seconds per round, Linux and Windows) is printed too: it is the steadiest number when
other work shares the machine.

Old tree vs new tree (issue 18; POSIX): ``--python NEW --baseline-python OLD`` (each a
venv's interpreter with its tree's dockpoint installed) runs the dockpoint side only, once
per interpreter: a daemon and a client process of each (``-I``: its own installed
dockpoint, bytecode read and written), the two taking turns round by round in alternating
order after a warm-up; it prints new/old of the wall and CPU seconds per round (median and
range of the per-round ratios). ``tests/bench/bench.py --baseline-python`` runs this too.

``XDG_RUNTIME_DIR`` (Windows: ``LOCALAPPDATA``, where the lock files live) points at a
private 0700 temporary directory for the run; the daemons are killed at the end, also on
error. The CPU cost ratio needs the daemon's CPU time: ``/proc`` on Linux,
``GetProcessTimes`` on Windows; elsewhere it is not printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent.parent
MESSAGE = b"m" * 63 + b"\n"
WINDOWS = sys.platform == "win32"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(side: str, where: str) -> None:
    """A daemon: print ``ready`` once serving, stop when stdin closes."""
    if side == "dockpoint":
        import dockpoint.aio

        server = await dockpoint.aio.start_server(echo, where)
        if server is None:
            raise SystemExit(f"{where} is already claimed")
    elif WINDOWS:
        server = await raw_pipe_server(where)  # type: ignore[assignment]
    else:
        server = await asyncio.start_unix_server(echo, where, backlog=4096)  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    if WINDOWS:  # the proactor loop cannot watch stdin: a thread waits for its end

        def wait_for_eof() -> None:
            sys.stdin.buffer.read()
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        import threading

        threading.Thread(target=wait_for_eof, daemon=True).start()
    else:
        loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
    print("ready", flush=True)
    await done
    server.close()


class _PipeServers:
    """What ``loop.start_serving_pipe`` returns (a list of ``PipeServer``), closable."""

    def __init__(self, servers: list[Any]) -> None:
        self._servers = servers

    def close(self) -> None:
        for server in self._servers:
            server.close()


async def raw_pipe_server(address: str) -> _PipeServers:
    """Windows baseline: asyncio's own named-pipe server on a plain pipe, with streams."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), echo)

    return _PipeServers(await loop.start_serving_pipe(factory, address))  # type: ignore[attr-defined]


async def raw_pipe_connection(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Windows baseline client: ``loop.create_pipe_connection`` with asyncio's streams."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.create_pipe_connection(  # type: ignore[attr-defined]
        lambda: protocol, address
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def clients(side: str, where: str, count: int, trips: int) -> float:
    """Seconds for ``count`` concurrent clients to connect and do ``trips`` round trips."""
    if side == "dockpoint":
        import dockpoint.aio

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            got = await dockpoint.aio.open_connection(where, timeout=30)
            assert got is not None, "no dockpoint daemon"
            return got
    elif WINDOWS:

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await raw_pipe_connection(where)
    else:

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(where)

    size = len(MESSAGE)

    async def client() -> None:
        reader, writer = await connect()
        try:
            for _ in range(trips):
                writer.write(MESSAGE)
                await writer.drain()
                got = await reader.readexactly(size)
                assert got == MESSAGE
        finally:
            writer.close()
            await writer.wait_closed()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(count))), 600)
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (Linux, Windows; 0.0 elsewhere)."""
    if WINDOWS:
        return _windows_cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _windows_cpu_seconds(pid: int) -> float:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return 0.0
    try:
        times = [wintypes.FILETIME() for _ in range(4)]  # creation, exit, kernel, user
        if not kernel32.GetProcessTimes(wintypes.HANDLE(handle), *(ctypes.byref(t) for t in times)):
            return 0.0
        ticks = sum((t.dwHighDateTime << 32) | t.dwLowDateTime for t in times[2:])
        return ticks / 1e7  # 100 ns units
    finally:
        kernel32.CloseHandle(wintypes.HANDLE(handle))


def wine_version() -> str | None:
    """Wine's version when this Windows Python runs under Wine, else ``None``."""
    if not WINDOWS:
        return None
    import ctypes

    try:
        wine = ctypes.WinDLL("ntdll").wine_get_version  # type: ignore[attr-defined]
    except AttributeError:
        return None
    wine.restype = ctypes.c_char_p
    return str(wine().decode())


#: Under Wine much of the pipe work is done by wineserver, whose CPU time no side counts.
UNDER_WINE = "; under Wine: wineserver's CPU time not included" if wine_version() else ""


def platform_line() -> str:
    """The interpreter, the OS, and Wine's version when under Wine."""
    import platform

    where = f"{platform.system()} {platform.release()}"
    wine = wine_version()
    if wine is not None:
        where += f" under Wine {wine} (not real Windows)"
    impl = platform.python_implementation()
    return f"Python {platform.python_version()} ({impl}), {where}, {os.cpu_count()} CPUs"


def round_of(side: str, where: str, daemon: int, count: int, trips: int) -> tuple[float, float]:
    """Wall seconds of one round, and the CPU seconds it took (clients plus daemon)."""
    cpu0, daemon0 = time.process_time(), cpu_seconds(daemon)
    took = asyncio.run(clients(side, where, count, trips))
    return took, time.process_time() - cpu0 + cpu_seconds(daemon) - daemon0


def spawn(side: str, where: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "serve", side, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the daemon says ready or dies (then b"")
    if line.rstrip() != b"ready":  # Windows' text mode ends it with \r\n
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"the {side} daemon did not start: {line!r}")
    return proc


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout within ``timeout`` seconds (POSIX: select on a pipe)."""
    import select

    assert proc.stdout is not None
    fd, line, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"child {proc.args!r} said nothing within {timeout} s")
        byte = os.read(fd, 1)
        if not byte:
            raise RuntimeError(f"child {proc.args!r} exited (code {proc.poll()})")
        line += byte
    return line.decode().strip()


def worker() -> None:
    """``worker``: the dockpoint clients of a round, in this interpreter with its own
    dockpoint. Says ``ready VERSION PATH``; answers each stdin line ``APP DAEMON_PID COUNT
    TRIPS`` with ``WALL CPU`` (seconds; CPU: this process's plus the daemon's)."""
    import dockpoint.aio

    print(f"ready {dockpoint.__version__} {Path(dockpoint.__file__).parent}", flush=True)
    for line in sys.stdin:
        app, pid, count, trips = line.split()
        took, used = round_of("dockpoint", app, int(pid), int(count), int(trips))
        print(f"{took!r} {used!r}", flush=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def compare(args: argparse.Namespace, cpus: list[int]) -> None:
    """``--baseline-python``: the dockpoint side, new and old interpreter taking turns."""
    if WINDOWS:
        raise SystemExit("--baseline-python: POSIX only")
    pythons = {"new": args.python, "old": args.baseline_python}
    runtime = tempfile.mkdtemp(prefix="dockpoint-bench-aio-")
    os.chmod(runtime, 0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    env.pop("PYTHONPATH", None)
    procs: list[subprocess.Popen[bytes]] = []

    def start(python: str, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [python, "-I", str(HERE), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        procs.append(proc)
        return proc

    try:
        if args.pin != "none":
            os.sched_setaffinity(0, {cpus[0]})  # the children inherit it
        apps = {label: f"bench-aio-{label}-{os.getpid()}" for label in pythons}
        daemons = {
            label: start(py, "serve", "dockpoint", apps[label]) for label, py in pythons.items()
        }
        workers = {label: start(py, "worker") for label, py in pythons.items()}
        for label, python in pythons.items():
            if read_line(daemons[label], 30) != "ready":
                raise SystemExit(f"the {label} daemon did not start")
            said = read_line(workers[label], 30).split(maxsplit=2)
            if said[:1] != ["ready"]:
                raise SystemExit(f"the {label} worker said {said!r}")
            print(f"{label}: {python}: dockpoint {said[1]} from {said[2]}")
        if args.pin == "split":
            for proc in daemons.values():
                os.sched_setaffinity(proc.pid, {cpus[1]})
        times: dict[str, list[float]] = {label: [] for label in pythons}
        cpu: dict[str, list[float]] = {label: [] for label in pythons}
        labels = list(pythons)
        for rep in range(args.reps + 1):
            for label in labels if rep % 2 else labels[::-1]:  # new old, old new, ...
                stdin = workers[label].stdin
                assert stdin is not None
                pid = daemons[label].pid
                stdin.write(f"{apps[label]} {pid} {args.clients} {args.trips}\n".encode())
                stdin.flush()
                took, used = map(float, read_line(workers[label], 600).split())
                if rep:  # round 0 warms up
                    times[label].append(took)
                    cpu[label].append(used)
        wall_ratios = [n / o for n, o in zip(times["new"], times["old"])]
        cpu_ratios = [n / o for n, o in zip(cpu["new"], cpu["old"])]
        print(
            f"asyncio echo, dockpoint side, new vs old tree: {args.clients} concurrent clients "
            f"x {args.trips} round trips (connects included), {args.reps} rounds taking turns "
            f"after a warm-up, CPU layout {args.pin}; {platform_line()}"
        )
        for label in labels:
            print(
                f"  {label}: wall s per round {' '.join(f'{t:.3f}' for t in times[label])}; "
                f"CPU s {' '.join(f'{t:.3f}' for t in cpu[label])}"
            )
        print(f"  new/old wall: {spread(wall_ratios)}; CPU: {spread(cpu_ratios)}")
        if args.json:
            result = {
                "row": "asyncio new vs old",
                "platform": platform_line(),
                "clients": args.clients,
                "trips": args.trips,
                "pin": args.pin,
                "ratios": wall_ratios,
                "cpu_ratios": cpu_ratios,
            }
            print(json.dumps({**result, "seconds": times, "cpu_seconds": cpu}))
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the daemons and workers end with their stdin
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(runtime, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--trips", type=int, default=100)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--pin",
        choices=("same", "split", "none"),
        default="same",
        help="CPU layout (Linux): clients and daemons on one CPU (default), clients on one "
        "and daemons on another, or left to the scheduler",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument(
        "--python", default=sys.executable, help="new tree (with --baseline-python)"
    )
    parser.add_argument(
        "--baseline-python",
        help="old vs new tree: run the dockpoint side with --python (new) and with this "
        "interpreter (old), each a venv with its tree's dockpoint installed",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.pin != "none" and len(cpus) < (2 if args.pin == "split" else 1):
        args.pin = "none"
    if args.baseline_python:
        compare(args, cpus)
        return
    runtime = tempfile.mkdtemp(prefix="dockpoint-bench-aio-")
    os.chmod(runtime, 0o700)
    os.environ["XDG_RUNTIME_DIR"] = runtime
    if WINDOWS:
        os.environ["LOCALAPPDATA"] = runtime  # the claim's lock files: private to this run
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    sys.path.insert(0, str(ROOT))
    app = f"bench-aio-{os.getpid()}"  # pipe names are machine-wide
    if WINDOWS:
        raw_path = rf"\\.\pipe\dockpoint-bench-aio-raw-{os.getpid()}"
    else:
        raw_path = os.path.join(runtime, "raw.sock")
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        if args.pin != "none":
            os.sched_setaffinity(0, {cpus[0]})  # the daemons inherit it
        daemons.append(spawn("dockpoint", app, env))
        daemons.append(spawn("raw", raw_path, env))
        if args.pin == "split":
            for proc in daemons:
                os.sched_setaffinity(proc.pid, {cpus[1]})
        sides = {"dockpoint": app, "raw": raw_path}
        pids = {"dockpoint": daemons[0].pid, "raw": daemons[1].pid}
        times: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(args.reps + 1):
            order = list(sides.items())
            for side, where in order if rep % 2 else order[::-1]:  # A B, B A, A B, ...
                took, used = round_of(side, where, pids[side], args.clients, args.trips)
                if rep:  # round 0 warms up
                    times[side].append(took)
                    cpu[side].append(used)
        trips = args.clients * args.trips
        ratios = [raw / dp for dp, raw in zip(times["dockpoint"], times["raw"])]
        ratio = statistics.median(ratios)
        cpu_ratios = [raw / dp for dp, raw in zip(cpu["dockpoint"], cpu["raw"])]
        # Without the daemons' CPU time (no /proc, no GetProcessTimes) it is clients only.
        daemon_cpu_seen = all(cpu_seconds(pid) > 0 for pid in pids.values())
        baseline = (
            "asyncio's proactor named-pipe server (loop.start_serving_pipe) on a raw pipe"
            if WINDOWS
            else "asyncio.start_unix_server on a raw socket"
        )
        print(
            f"asyncio echo, {args.clients} concurrent clients x {args.trips} round trips "
            f"(connects included), {args.reps} interleaved rounds after a warm-up, "
            f"CPU layout {args.pin}; raw = {baseline}; {platform_line()}"
        )
        for side in sides:
            rates = [trips / t for t in times[side]]
            print(
                f"  {side:9} median {statistics.median(rates):9.0f} round trips/s "
                f"(min {min(rates):.0f}, max {max(rates):.0f})"
            )
        print(
            f"  throughput ratio dockpoint/raw: median {ratio:.3f} "
            f"(per round: {', '.join(f'{r:.3f}' for r in ratios)}); target >= 0.9"
        )
        if all(cpu[side] and min(cpu[side]) > 0 for side in sides) and daemon_cpu_seen:
            print(
                "  CPU cost ratio raw/dockpoint (clients + daemon CPU seconds, steadier on a "
                f"busy machine{UNDER_WINE}): median {statistics.median(cpu_ratios):.3f} "
                f"(per round: {', '.join(f'{r:.3f}' for r in cpu_ratios)})"
            )
        if args.json:
            result = {
                "row": "asyncio",
                "platform": platform_line(),
                "baseline": baseline,
                "clients": args.clients,
                "trips": args.trips,
                "pin": args.pin,
                "ratio": ratio,
                "ratios": ratios,
                "cpu_ratios": cpu_ratios,
            }
            print(json.dumps({**result, "seconds": times, "cpu_seconds": cpu}))
    finally:
        for proc in daemons:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        if not sys.flags.isolated:  # -I (--baseline-python): the interpreter's own dockpoint
            sys.path.insert(0, str(ROOT))
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
    elif sys.argv[1:] == ["worker"]:
        worker()
    else:
        main()
