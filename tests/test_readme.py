"""README.md's auto-spawn recipe is working code: the two programs are taken from the README
itself (the fenced blocks after ``<!-- recipe: NAME -->``) and run, so they cannot drift."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from time import monotonic, sleep
from typing import TYPE_CHECKING

import pytest
from conftest import LINUX, child_env

import dockpoint

if TYPE_CHECKING:
    from collections.abc import Iterator

README = Path(__file__).resolve().parent.parent / "README.md"
RECIPE = re.compile(r"^<!-- recipe: (\S+) -->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: The one line of each program the test changes: the app name (unique per test run).
APP_LINE = re.compile(r'^APP = "[^"\n]*"$', re.MULTILINE)
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)


def recipe_files() -> dict[str, str]:
    assert README.is_file(), f"{README} is missing"
    found: dict[str, str] = {}
    for name, code in RECIPE.findall(README.read_text(encoding="utf-8")):
        assert name not in found, f"README.md has two '<!-- recipe: {name} -->' blocks"
        found[name] = code
    assert sorted(found) == ["daemon.py", "frontend.py"], (
        "README.md must hold the recipe as ```python blocks, each right after a "
        f"'<!-- recipe: daemon.py -->' / '<!-- recipe: frontend.py -->' line; found {sorted(found)}"
    )
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie does not (some containers never reap orphans)."""
    if sys.platform == "win32":
        return _windows_running(pid)  # os.kill(pid, 0) would terminate it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:  # no /proc (macOS, BSD)
        return True


def _windows_running(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
    k32.OpenProcess.restype = wintypes.HANDLE
    k32.WaitForSingleObject.argtypes = [wintypes.HANDLE, wintypes.DWORD]
    k32.WaitForSingleObject.restype = wintypes.DWORD
    k32.CloseHandle.argtypes = [wintypes.HANDLE]
    k32.CloseHandle.restype = wintypes.BOOL
    handle = k32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
    if not handle:
        return False  # no such process
    try:
        return bool(k32.WaitForSingleObject(handle, 0) == 0x102)  # WAIT_TIMEOUT: still runs
    finally:
        k32.CloseHandle(handle)


def gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has ended within ``timeout`` seconds."""
    deadline = monotonic() + timeout
    while running(pid):
        if monotonic() >= deadline:
            return False
        sleep(0.01)
    return True


@pytest.fixture
def daemon_pids() -> Iterator[set[int]]:
    """Pids of daemons the recipe started; killed when the test ends."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        try:
            os.kill(pid, KILL)
        except OSError:
            pass
        assert gone(pid, 10), f"daemon {pid} survived"


def test_recipe_runs(tmp_path: Path, runtime: Path, app: str, daemon_pids: set[int]) -> None:
    """The README's frontend, run twice: the first run starts the README's daemon, the
    second reuses it. Output is captured, so a daemon holding the frontend's pipes would
    hang the run (and fail it at the timeout)."""
    folder = tmp_path / "recipe"
    folder.mkdir()
    for name, code in recipe_files().items():
        ours, count = APP_LINE.subn(f'APP = "{app}"', code)
        assert count == 1, f"{name} in README.md must set its app name in one 'APP = \"...\"' line"
        (folder / name).write_text(ours, encoding="utf-8")
    env = child_env(XDG_RUNTIME_DIR=str(runtime))
    pids = []
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, str(folder / "frontend.py")],
            cwd=folder,
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert (run.returncode, run.stderr) == (0, b""), run
        match = re.fullmatch(rb"daemon (\d+) got hello\r?\n", run.stdout)
        assert match, run.stdout
        pids.append(int(match.group(1)))
        daemon_pids.add(pids[-1])
    assert pids[0] == pids[1], "the second frontend started another daemon"
    if LINUX:
        with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
            assert str(folder / "daemon.py").encode() in f.read().split(b"\0")


EXAMPLE = re.compile(
    r"^<!-- example: simplest_daemon\.py -->\n```python\n(.*?)^```$", re.MULTILINE | re.DOTALL
)


def test_simplest_daemon_survives_status(
    tmp_path: Path,
    runtime: Path,
    app: str,
    daemon_pids: set[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's smallest daemon (a reply written to every connection, no ``try``) keeps
    serving through 100 ``python -m dockpoint status`` calls: a probe never reaches its
    ``accept()``, so it never writes to a client that has left."""
    from dockpoint.__main__ import main

    found = EXAMPLE.findall(README.read_text(encoding="utf-8"))
    assert len(found) == 1, "README.md must hold one '<!-- example: simplest_daemon.py -->' block"
    code, count = APP_LINE.subn(f'APP = "{app}"', found[0])
    assert count == 1, "the simplest daemon must set its app name in one 'APP = \"...\"' line"
    script = tmp_path / "simplest_daemon.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=child_env(XDG_RUNTIME_DIR=str(runtime)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon_pids.add(proc.pid)
    try:

        def ask() -> bytes:
            conn = dockpoint.connect(app, timeout=20)
            assert conn is not None, "the simplest daemon does not answer"
            with conn:
                conn.write(b"hello")
                return conn.read(timeout=20)

        assert ask() == b"ack"  # it is up
        codes = [main(["status", app]) for _ in range(100)]
        assert codes == [0] * 100, capsys.readouterr()
        assert ask() == b"ack", "the daemon stopped serving after the status calls"
        assert proc.poll() is None, "the daemon died"
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert b"Traceback" not in err, err.decode(errors="replace")


DOCUMENTS = [README, *sorted((README.parent / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_python_block_compiles(document: Path) -> None:
    """Every ```python block of the README and docs/ is valid Python, except the blocks
    that list signatures (``-> ...`` return annotations, a bare ``*,``)."""
    for code in PYTHON_BLOCK.findall(document.read_text(encoding="utf-8")):
        if re.search(r"\) -> |[(,]\s*\*,", code):  # a signature listing, not a program
            continue
        compile(code, str(document), "exec", dont_inherit=True)


def test_readme_is_a_five_minute_read() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; reference belongs in docs/"
