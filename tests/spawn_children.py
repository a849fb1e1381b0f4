"""Child programs of the ``connect_or_spawn`` tests: ``python spawn_children.py ROLE ...``.

- ``daemon APP PIDFILE COUNT``: claims APP (adopting a hand-over), appends its pid to
  PIDFILE and answers each request line with a JSON report of what it sees, until it has
  served COUNT clients or nobody came for 30 s. ``stderr`` as the request writes far more
  to standard error than a pipe holds first.
- ``frontend APP PIDFILE COUNT``: waits for end of file on stdin (the gate), then
  ``connect_or_spawn`` with the daemon role and prints ``{"spawned": [...], "reply": pid}``.
- ``inject APP PROGRAM``: runs ``connect_or_spawn(APP, [PROGRAM])`` (a program that exits
  without adopting) with ``KeyboardInterrupt`` raised at its Nth call or return, for every
  N until a run ends before its Nth; after each, checks that no descriptor leaked and the
  claim is free; prints ``{"tried": N, "hits": H, "failures":
  [...]}`` (Linux).
- ``claimer APP HANDLE...``: claims APP with whatever hand-over the environment names and
  prints what it saw, and which of the given descriptors (POSIX) or handles (Windows) are
  still open.
"""

from __future__ import annotations

import json
import os
import sys

import dockpoint


def lock_path(app: str) -> str:
    if sys.platform == "win32":
        return os.path.join(os.environ["LOCALAPPDATA"], "dockpoint", f"{app}@default.lock")
    return os.path.join(os.environ["XDG_RUNTIME_DIR"], "dockpoint", f"{app}@default.lock")


def is_open(handle: int) -> bool:
    if sys.platform == "win32":
        import ctypes

        flags = ctypes.c_ulong()
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        return bool(kernel32.GetHandleInformation(ctypes.c_void_p(handle), ctypes.byref(flags)))
    try:
        os.fstat(handle)
    except OSError:
        return False
    return True


def read_line(conn: dockpoint.DockpointConnection) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.read(timeout=60)
        if not chunk:
            break
        data += chunk
    return data


def daemon(app: str, pidfile: str, count: int) -> None:
    before = os.environ.get("DOCKPOINT_HANDOVER")
    dp = dockpoint.claim(app)
    if dp is None:
        sys.exit(0)
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    with dp:
        for _ in range(count):
            try:
                conn = dp.accept(timeout=30)
            except TimeoutError:
                break
            with conn:
                if read_line(conn) == b"stderr\n":
                    sys.stderr.write("x" * 200000 + "\n")  # far more than a pipe holds
                    sys.stderr.flush()
                conn.write(json.dumps(report(dp, before)).encode() + b"\n")


def report(dp: dockpoint.Dockpoint, before: str | None) -> dict[str, object]:
    proc_fd = "/proc/self/fd"
    linux = sys.platform.startswith("linux")  # (Wine maps /proc to the Linux one: not ours)
    fds = sorted(map(int, os.listdir(proc_fd))) if linux else []
    return {
        "pid": os.getpid(),
        "before": before,
        "after": os.environ.get("DOCKPOINT_HANDOVER"),
        "sid": os.getsid(0) if hasattr(os, "getsid") else None,
        "inheritable": [fd for fd in fds if fd > 2 and is_open(fd) and os.get_inheritable(fd)],
        "stdin": os.path.realpath("/proc/self/fd/0") if fds else None,
        "stderr": os.path.realpath("/proc/self/fd/2") if fds else None,
        "address": dp.address,
    }


def frontend(app: str, pidfile: str, count: str) -> None:
    sys.stdin.buffer.read()  # the gate: end of file releases every frontend at once
    argv = [sys.executable, os.path.abspath(__file__), "daemon", app, pidfile, count]
    events: list[int] = []
    conn = dockpoint.connect_or_spawn(app, argv, timeout=60, on_spawn=events.append)
    with conn:
        conn.write(b"hi\n")
        reply = json.loads(read_line(conn))
    print(json.dumps({"spawned": events, "reply": reply["pid"]}))


def claimer(app: str, handles: list[int]) -> None:
    dp = dockpoint.claim(app)
    out: dict[str, object] = {"after": os.environ.get("DOCKPOINT_HANDOVER")}
    if dp is not None:
        out["address"] = dp.address
        with open(lock_path(app)) as f:
            out["lock"] = f.read().split()[0]
        dp.close()
    out["claimed"] = dp is not None
    out["still_open"] = [h for h in handles if is_open(h)]
    print(json.dumps(out))


def inject(app: str, program: str) -> None:
    import gc
    import signal
    import warnings

    warnings.simplefilter("ignore", ResourceWarning)  # an interrupted call's objects dropped
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = {"n": 0, "at": 0}

    def prof(frame: object, event: str, arg: object) -> None:
        if arg is sys.setprofile:
            return
        state["n"] += 1
        if state["n"] == state["at"]:
            signal.raise_signal(signal.SIGINT)

    def attempt(at: int) -> bool:
        state["n"], state["at"] = 0, at
        sys.setprofile(prof)
        try:
            dockpoint.connect_or_spawn(app, [program], timeout=10)
        except dockpoint.SpawnError:
            return False
        except KeyboardInterrupt:
            return True
        finally:
            sys.setprofile(None)
        raise AssertionError("the program adopted nothing, yet a connection came back")

    def free() -> bool:
        dp = dockpoint.claim(app)
        if dp is None:
            return False
        dp.close()
        return True

    for _ in range(2):  # warm up: lazy imports done, the directory exists
        attempt(0)
    base = sorted(os.listdir("/proc/self/fd"))
    failures: list[object] = []
    at = hits = 0
    while at < 20000:  # a whole run makes about 1,300 calls and returns
        at += 1
        try:
            hit = attempt(at)
        except BaseException as e:  # a KeyboardInterrupt inside the harness itself
            failures.append([at, "harness: " + repr(e)])
            continue
        gc.collect()
        hits += hit
        while True:  # an interrupt after the spawn leaves the endpoint to the program: reap it
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        if not free():
            failures.append([at, "the claim is held after connect_or_spawn ended"])
        now = sorted(os.listdir("/proc/self/fd"))
        if now != base:
            failures.append([at, f"descriptors {sorted(set(now) - set(base))} leaked"])
            base = now
        if not hit and state["n"] < at:
            break  # it ran to the end before the Nth event: every point has been tried
        if len(failures) >= 5:
            break  # enough to show what is wrong; leaks would make every later run longer
    print(json.dumps({"tried": at, "hits": hits, "failures": failures}))


def main(argv: list[str]) -> None:
    role, args = argv[0], argv[1:]
    if role == "daemon":
        daemon(args[0], args[1], int(args[2]))
    elif role == "frontend":
        frontend(args[0], args[1], args[2])
    elif role == "inject":
        inject(args[0], args[1])
    elif role == "claimer":
        claimer(args[0], [int(a) for a in args[1:]])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
