"""Developer tasks: ``nox`` runs tests, lint and typecheck; ``nox -s wine`` runs the
test suite against the Windows backend under Wine; ``nox -s bench`` is the benchmark."""

from __future__ import annotations

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite, against the installed package, on every supported Python."""
    session.install(".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


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
    ``nox -s bench -- --wine`` adds row 7 (the Windows backend under Wine)."""
    session.install(".")
    session.run("python", "tests/bench/bench.py", *session.posargs)
