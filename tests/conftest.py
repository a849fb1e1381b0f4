"""Shared fixtures: a private runtime directory and a unique app name per test, and
helpers to run Python children that import the same dockpoint as the tests.

Session set-up (see ``pytest_configure``):

- ``--simulate-macos-paths`` (or ``DOCKPOINT_TEST_MACOS_PATHS=1``): the POSIX backend
  gets macOS's 103-byte ``sun_path`` and no ``/proc/self/fd`` alias, in this process and
  in every Python child started through :func:`child_env` (a ``sitecustomize`` does it).
- As root on Linux the session runs in a private mount namespace with fresh ``tmpfs``
  mounts on ``/tmp`` and ``/run/user``, so the fallback-directory tests never meet what
  other runs left there (``DOCKPOINT_TEST_SHARED_TMP=1`` turns this off).
- ``DOCKPOINT_TEST_INSTALLED=1`` (set by the nox sessions): fail unless ``dockpoint``
  comes from the installed package (this interpreter's site-packages), not from the
  checkout or any other directory on ``sys.path``.
- With ``CI`` set, a skipped security test (``test_posix.py``, ``test_probe.py``) fails
  the run unless it was skipped for not being root or for being on another OS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
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
CHECKOUT = Path(__file__).resolve().parent.parent
#: A directory holding the ``sitecustomize`` that simulates macOS paths in children.
SIMULATE_DIR = str(Path(__file__).resolve().parent / "simulate")
MACOS_PATHS = "DOCKPOINT_TEST_MACOS_PATHS"
#: Set once the session runs in its own mount namespace with a fresh /tmp.
PRIVATE_TMP = False
#: Skip reasons a security test may have: not root, or not this OS (say "needs root",
#: "POSIX backend only" or "Linux-only"/"macOS-only"/"Windows-only" in the reason).
ALLOWED_SKIP = re.compile(
    r"^(Skipped: )?(needs root|POSIX backend only|(Linux|macOS|Windows)-only)"
)
SECURITY_FILES = ("test_posix.py", "test_probe.py")
_SKIPPED: list[tuple[str, str]] = []
#: The short basetemp this session made (removed when the session passes).
_SHORT_BASE: str | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--simulate-macos-paths",
        action="store_true",
        help="POSIX backend: use macOS's 103-byte sun_path and no /proc/self/fd alias",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global PRIVATE_TMP, _SHORT_BASE
    if os.environ.get("DOCKPOINT_TEST_INSTALLED") == "1":
        where = Path(dockpoint.__file__).resolve()
        site = {Path(sysconfig.get_path(key)).resolve() for key in ("purelib", "platlib")}
        if where.parent.parent not in site:
            what = "the checkout" if where.parent == CHECKOUT / "dockpoint" else "elsewhere"
            raise pytest.UsageError(
                f"dockpoint was imported from {what} ({where}), not from the package installed "
                f"in {' or '.join(sorted(map(str, site)))}: run pytest from outside the "
                "repository, without PYTHONPATH (see noxfile.py)"
            )
    if config.getoption("--simulate-macos-paths"):
        os.environ[MACOS_PATHS] = "1"
    if os.environ.get(MACOS_PATHS) == "1" and not WINDOWS:
        from dockpoint import _posix_dir

        _posix_dir.SUN_PATH_MAX, _posix_dir.PROC_ALIAS, _posix_dir.ABSTRACT = 103, False, False
    if LINUX and os.geteuid() == 0 and os.environ.get("DOCKPOINT_TEST_SHARED_TMP") != "1":
        PRIVATE_TMP = _private_tmp()
    if not WINDOWS and not config.option.basetemp:
        # Short paths: macOS's default temporary directory alone is ~50 bytes, and a
        # socket path may have only 103.
        _SHORT_BASE = tempfile.mkdtemp(prefix="dp", dir="/tmp")
        config.option.basetemp = _SHORT_BASE + "/t"


def _private_tmp() -> bool:
    """Move this process into its own mount namespace with fresh /tmp and /run/user.

    What this process itself runs from under the old /tmp (the checkout, the virtual
    environment, the working directory) is bind-mounted into the fresh /tmp at the same
    path; everything else there, such as an old ``/tmp/dockpoint-<uid>``, is out of sight.
    """
    import ctypes

    needed = {os.getcwd(), sys.prefix, sys.base_prefix, sys.executable, str(CHECKOUT)}
    needed.update(p for p in sys.path if p)
    needed.update(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    keep = sorted({p.split("/")[2] for p in needed if p.startswith("/tmp/") and len(p) > 5})
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str, target: str, kind: str | None, flags: int, data: str | None) -> None:
        raw = [None if x is None else os.fsencode(x) for x in (source, target, kind, data)]
        if libc.mount(raw[0], raw[1], raw[2], ctypes.c_ulong(flags), raw[3]) != 0:
            err = ctypes.get_errno()
            raise pytest.UsageError(f"mount {source} on {target}: {os.strerror(err)}")

    ms_bind, ms_rec, ms_private = 0x1000, 0x4000, 0x40000
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        return False
    mount("none", "/", None, ms_rec | ms_private, None)
    old_tmp = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)  # this namespace's old /tmp
    try:
        mount("dockpoint-test", "/tmp", "tmpfs", 0, "mode=1777")
        for name in keep:
            source = f"/proc/self/fd/{old_tmp}/{name}"  # not a path: no canonicalizing
            if os.path.isdir(source):
                os.mkdir("/tmp/" + name)
            else:
                open("/tmp/" + name, "x").close()
            mount(source, "/tmp/" + name, None, ms_bind | ms_rec, None)
        if os.path.isdir("/run/user"):
            mount("dockpoint-test", "/run/user", "tmpfs", 0, "mode=0755")
    finally:
        os.close(old_tmp)
    os.chdir(os.getcwd())  # the same path, now resolved in this namespace
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/run/user/") or xdg.startswith("/tmp/"):
        os.makedirs(xdg, mode=0o700, exist_ok=True)  # hidden by the fresh mount
    return True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and report.nodeid.split("::")[0].endswith(SECURITY_FILES):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SHORT_BASE is not None and exitstatus == 0:
        shutil.rmtree(_SHORT_BASE, ignore_errors=True)
    bad = [(node, why) for node, why in _SKIPPED if not ALLOWED_SKIP.search(why)]
    if bad and os.environ.get("CI"):
        lines = "\n".join(f"  {node}: {why}" for node, why in bad)
        sys.stderr.write(f"\nsecurity tests skipped for a reason other than root/OS:\n{lines}\n")
        session.exitstatus = 1


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


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private (0700) ``XDG_RUNTIME_DIR`` for this test and its children, with a short
    path (under ``/tmp`` on POSIX), so socket paths fit ``sun_path`` on every OS."""
    if WINDOWS:
        rt = tmp_path / "rt"
        rt.mkdir()
    else:
        rt = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        if os.environ.get(MACOS_PATHS) == "1":
            # Too long for macOS's sun_path even with a hashed socket name: every endpoint
            # of the test takes the short fallback location.
            rt = rt / ("long-runtime-dir-" + "x" * 90)
            rt.mkdir()
    os.chmod(rt, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(rt))
    if WINDOWS:  # the lock files of the Windows claim live in %LOCALAPPDATA%\dockpoint
        monkeypatch.setenv("LOCALAPPDATA", str(rt))
    yield rt
    if not WINDOWS:
        shutil.rmtree(rt if rt.parent == Path("/tmp") else rt.parent, ignore_errors=True)


@pytest.fixture
def app(runtime: Path) -> str:
    """An app name no other test (or test run) uses: pipe names are machine-wide."""
    return "t" + uuid.uuid4().hex[:16]


def claimed(app: str, instance: str = "default") -> dockpoint.Dockpoint:
    """``claim`` that must succeed: a ``None`` fails the test here, with a clear message
    (``with dockpoint.claim(app) as dp`` would fail on ``None.__enter__`` instead)."""
    dp = dockpoint.claim(app, instance)
    assert dp is not None, f"claim({app!r}, {instance!r}) returned None"
    return dp


def simulating_macos_paths() -> bool:
    """Whether ``--simulate-macos-paths`` is on: then the :func:`runtime` fixture's
    directory is too long for ``sun_path``, and every socket of the test is in the short
    fallback ``/tmp/dockpoint-<uid>`` under a hashed name (its lock file is not)."""
    return not WINDOWS and os.environ.get(MACOS_PATHS) == "1"


def lock_file(app: str, instance: str = "default") -> Path:
    """The lock file of ``app``'s endpoint: always in the endpoint directory under
    ``$XDG_RUNTIME_DIR``, also when the socket is in the short fallback."""
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "dockpoint" / f"{app}@{instance}.lock"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if env.get(MACOS_PATHS) == "1":
        env["PYTHONPATH"] = SIMULATE_DIR + os.pathsep + env["PYTHONPATH"]
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
        except (FileNotFoundError, ProcessLookupError):  # the thread has exited
            return
        if state == "S" and wchan not in ("", "0") and "futex" not in wchan:
            return
        time.sleep(0.001)
    raise AssertionError(f"{base} never blocked")
