"""Shared fixtures: a private runtime directory and a unique app name per test, and
helpers to run Python children that import the same dockpoint as the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import dockpoint

WINDOWS = sys.platform == "win32"
LINUX = sys.platform.startswith("linux")
PACKAGE_ROOT = str(Path(dockpoint.__file__).resolve().parent.parent)


def wine_version() -> str | None:
    """Wine's version when running under Wine, else ``None``."""
    if not WINDOWS:
        return None
    import ctypes

    try:
        fn = ctypes.WinDLL("ntdll").wine_get_version  # type: ignore[attr-defined]
    except AttributeError:
        return None
    fn.restype = ctypes.c_char_p
    return str(fn().decode())


WINE = wine_version()
needs_real_windows_or_posix = pytest.mark.skipif(
    WINE is not None,
    reason="Wine ignores FILE_FLAG_FIRST_PIPE_INSTANCE, so it cannot judge claim exclusivity",
)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private (0700) ``XDG_RUNTIME_DIR`` for this test and its children."""
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chmod(rt, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(rt))
    if WINDOWS:  # the lock files of the Windows claim live in %LOCALAPPDATA%\dockpoint
        monkeypatch.setenv("LOCALAPPDATA", str(rt))
    return rt


@pytest.fixture
def app(runtime: Path) -> str:
    """An app name no other test (or test run) uses: pipe names are machine-wide."""
    return "t" + uuid.uuid4().hex[:16]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python child with the tests' environment; bounded."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


class Child:
    """A Python child speaking a line protocol on stdin/stdout; every wait is bounded."""

    def __init__(self, code: str, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(**env),
            text=True,
            bufsize=1,
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._lines.append("<EOF>")
            self._cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"child {self.pid} said nothing in {timeout} s")
                self._cond.wait(left)
            got = self._lines.pop(0)
        if got == "<EOF>":
            self.proc.wait(10)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"child {self.pid} ended ({self.proc.returncode}): {err}")
        return got

    def expect(self, want: str, timeout: float = 20.0) -> str:
        got = self.line(timeout)
        assert got.startswith(want), f"expected {want!r} from child, got {got!r}"
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._reader.join(10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Children started by the test; all killed at the end, however the test ends."""
    started: list[Child] = []
    yield started
    for c in started:
        c.stop()


def wait_blocked(thread: threading.Thread, timeout: float = 5.0) -> None:
    """Wait until ``thread`` sleeps in a kernel wait other than a lock or the GIL."""
    if not LINUX or thread.native_id is None:
        time.sleep(0.3)  # no portable way to see where a thread waits
        return
    _wait_task_blocked(f"/proc/self/task/{thread.native_id}", timeout)


def wait_pid_blocked(pid: int, timeout: float = 5.0) -> None:
    """Wait until the main thread of process ``pid`` sleeps in such a kernel wait."""
    if not LINUX:
        time.sleep(0.3)
        return
    _wait_task_blocked(f"/proc/{pid}/task/{pid}", timeout)


def _wait_task_blocked(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(base + "/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            with open(base + "/wchan") as f:
                wchan = f.read()
        except FileNotFoundError:
            return  # already gone
        if state == "S" and wchan not in ("", "0") and "futex" not in wchan:
            return
        time.sleep(0.001)
    raise AssertionError(f"{base} never blocked")
