"""Developer tasks: ``nox`` runs tests, tests_macos_paths (the suite with macOS's socket
paths simulated), lint and typecheck; ``nox -s wine`` runs the test suite against the
Windows backend under Wine; ``nox -s bench`` is the benchmark.

The test sessions test the installed package: pytest runs from a temporary
directory, so the checkout's ``dockpoint/`` is not on ``sys.path`` (``tests/`` is, for
``from conftest import ...``), and the test suite refuses to run if ``dockpoint`` is
imported from the checkout anyway (``DOCKPOINT_TEST_INSTALLED=1``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
ROOT = Path(__file__).resolve().parent
nox.options.sessions = ["tests", "tests_macos_paths", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


def _found(version: str) -> bool:
    if sys.platform == "win32":
        return shutil.which("py") is not None or shutil.which(f"python{version}") is not None
    return shutil.which(f"python{version}") is not None


MISSING = [v for v in PYTHONS if not _found(v)]
if MISSING:
    what = "fail (CI is set)" if os.environ.get("CI") else "are skipped (set CI=1 to fail)"
    sys.stderr.write(
        f"nox: Python {', '.join(MISSING)} not found on PATH: "
        f"{', '.join('tests-' + v for v in MISSING)} {what} when run; install them, "
        "or name an interpreter with --force-python\n"
    )


def _pytest(session: nox.Session, *options: str) -> None:
    """pytest against the installed package, with ``options`` and the session's
    arguments (paths given after ``--`` are the checkout's; pytest runs elsewhere)."""
    session.install(".[test]")
    args = [str(ROOT / a) if a.startswith("tests") else a for a in session.posargs]
    if not any(a.startswith(str(ROOT)) for a in args):
        args.append(str(ROOT / "tests"))
    outside = session.create_tmp()  # not the checkout: keeps ./dockpoint off sys.path
    session.chdir(outside)
    session.run(
        "python",
        "-m",
        "pytest",
        "-c",
        str(ROOT / "pyproject.toml"),
        "--rootdir",
        str(ROOT),
        "-p",
        "no:cacheprovider",
        *options,
        *args,
        env={"DOCKPOINT_TEST_INSTALLED": "1"},
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, against the installed package, on every supported Python."""
    _pytest(session)


@nox.session(python="3.11")
def tests_macos_paths(session: nox.Session) -> None:
    """The whole test suite with macOS's socket paths simulated on Linux: a 103-byte
    ``sun_path`` and no ``/proc/self/fd`` alias, so every socket of a test takes the short
    fallback ``/tmp/dockpoint-<uid>`` while its lock file stays in the runtime directory."""
    _pytest(session, "--simulate-macos-paths")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict as Linux, macOS and Windows see the package."""
    session.install("mypy")
    for platform in ("linux", "darwin", "win32"):
        session.run("mypy", "--platform", platform, "dockpoint")


@nox.session(python=False)
def wine(session: nox.Session) -> None:
    """The same test suite against the Windows backend: official Windows CPython 3.12 and
    3.13 under Wine (installed and cached by ``.ci/wine_lane.py setup`` on first use)."""
    lane = (".ci/wine_lane.py", "--python", "all")
    session.run("python3", lane[0], "setup", *lane[1:], external=True)
    session.run("python3", lane[0], "pytest", *lane[1:], "-q", *session.posargs, external=True)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The benchmark (tests/bench/bench.py) against the installed package: prints a table
    and one summary line. It reports and never gates: a missed target still exits 0.
    ``nox -s bench -- --wine`` adds row 7 (the Windows backend under Wine). Then the
    asyncio echo row (tests/bench/bench_aio.py: dockpoint.aio vs asyncio.start_unix_server)."""
    session.install(".")
    session.run("python", "tests/bench/bench.py", *session.posargs)
    session.run("python", "tests/bench/bench_aio.py")
