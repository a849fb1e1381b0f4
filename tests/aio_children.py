"""Child programs for ``tests/test_aio.py``, one role per command line::

    python tests/aio_children.py aio-daemon APP STARTS
    python tests/aio_children.py frontend APP STARTS

``aio-daemon``: what ``connect_or_spawn`` starts. It appends its pid to the file STARTS
(every daemon that ever started, won or lost), then serves APP with
``dockpoint.aio.start_server`` and nothing else: in a daemon started by
``connect_or_spawn`` that call must adopt the endpoint the frontend handed over. Each
request line gets one JSON line back: the daemon's pid, the hand-over variable it found
at start and after ``start_server``, and the server's address. ``stop`` closes the
server first (the claim is released when the reply arrives), then answers and exits. A
daemon that loses the claim exits 0 at once, as a real one would; an idle one exits after
``IDLE`` seconds, so none outlives a test that died.

``frontend``: one racing frontend. It waits for end of file on stdin (the gate that
releases every frontend at once), calls ``connect_or_spawn`` with the ``aio-daemon`` role,
asks once and prints one JSON line: its own pid, the ``on_spawn`` events it saw, the
connection's ``peer_pid`` and the daemon's reply.

Standard library and dockpoint only (no pytest): a daemon starts fast.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import dockpoint
import dockpoint.aio

HANDOVER = "DOCKPOINT_HANDOVER"
IDLE = 60.0
TIMEOUT = 60.0


async def serve(app: str, before: str | None) -> int:
    loop = asyncio.get_running_loop()
    server: dockpoint.aio.Server | None = None
    idle: list[asyncio.TimerHandle] = []

    def rearm() -> None:
        for timer in idle:
            timer.cancel()
        idle[:] = [loop.call_later(IDLE, stop)]

    def stop() -> None:
        if server is not None:
            server.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rearm()
        try:
            line = await reader.readline()
            if line == b"stop\n":
                stop()  # released before the reply: the asker may claim at once
            report = {
                "pid": os.getpid(),
                "before": before,
                "after": os.environ.get(HANDOVER),
                "address": None if server is None else server.address,
                "served_by": type(server).__module__,
                "line": line.decode(),
            }
            writer.write(json.dumps(report).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await dockpoint.aio.start_server(handle, app)
    if server is None:
        return 0  # another daemon holds the claim: nothing to do
    rearm()
    async with server:
        await server.serve_forever()
    return 0


def aio_daemon(app: str, starts: str) -> int:
    before = os.environ.get(HANDOVER)
    with open(starts, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return asyncio.run(serve(app, before))


def ask(conn: dockpoint.DockpointConnection, line: bytes) -> dict[str, object]:
    with conn:
        conn.write(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.read(timeout=TIMEOUT)
            if not chunk:
                raise SystemExit(f"the daemon closed without answering (got {data!r})")
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def frontend(app: str, starts: str) -> int:
    sys.stdin.buffer.read()  # the gate: end of file releases every frontend at once
    events: list[int] = []
    argv = [sys.executable, os.path.abspath(__file__), "aio-daemon", app, starts]
    conn = dockpoint.connect_or_spawn(app, argv, timeout=TIMEOUT, on_spawn=events.append)
    peer = conn.peer_pid
    reply = ask(conn, b"hello from %d\n" % os.getpid())
    print(json.dumps({"pid": os.getpid(), "spawned": events, "peer_pid": peer, "reply": reply}))
    return 0


ROLES = {"aio-daemon": aio_daemon, "frontend": frontend}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ROLES:
        raise SystemExit(f"usage: aio_children.py {{{'|'.join(ROLES)}}} APP STARTS")
    sys.exit(ROLES[sys.argv[1]](sys.argv[2], sys.argv[3]))
