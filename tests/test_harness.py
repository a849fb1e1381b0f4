"""The test run tells the truth: the two guards of ``conftest.py`` fail a run when they
should. A nox session that imports ``dockpoint`` from the checkout instead of the
installed package is refused, and with ``CI`` set a security test skipped for a reason
other than "needs root" or "not this OS" fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHECKOUT, PACKAGE_ROOT

TESTS = Path(__file__).resolve().parent
if sys.platform == "win32":  # the guards are plain Python; pytest children under Wine are slow
    pytest.skip("checked on POSIX (Windows-only cost)", allow_module_level=True)


def pytest_child(args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in a child: bounded, output captured, a shared /tmp."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONSAFE"))}
    env.pop("CI", None)
    env.pop("DOCKPOINT_TEST_INSTALLED", None)
    env["DOCKPOINT_TEST_SHARED_TMP"] = "1"  # no second mount namespace: not needed here
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_run_that_imports_the_checkout_is_refused() -> None:
    """``DOCKPOINT_TEST_INSTALLED=1`` with the checkout first on ``sys.path`` (what
    ``python -m pytest`` from the repository root does): usage error, naming the file."""
    run = pytest_child(
        [str(TESTS / "test_names.py"), "-k", "length_limit"],
        CHECKOUT,
        DOCKPOINT_TEST_INSTALLED="1",
        PYTHONPATH=str(CHECKOUT),
    )
    assert run.returncode == 4, (run.stdout, run.stderr)
    where = CHECKOUT / "dockpoint" / "__init__.py"
    assert f"dockpoint was imported from the checkout ({where})" in run.stderr, run.stderr
    # Without the variable the same command runs the test (the checkout is fine there).
    plain = pytest_child(
        [str(TESTS / "test_names.py"), "-k", "length_limit"], CHECKOUT, PYTHONPATH=str(CHECKOUT)
    )
    assert plain.returncode == 0, (plain.stdout, plain.stderr)
    assert "1 passed" in plain.stdout


FAKE_SECURITY_TESTS = """
import pytest

def test_needs_root():
    pytest.skip("needs root to become another user (uid 65534)")

def test_other_os():
    pytest.skip("Linux-only: reads /proc")

def test_passes():
    pass
"""
BAD_SKIP = """
def test_flaky():
    pytest.skip("{reason}")
"""


def security_run(tmp_path: Path, body: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``body`` as a file named like a security test file (test_posix.py), run with the
    suite's conftest as a plugin."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    target = tmp_path / "test_posix.py"
    target.write_text(body, encoding="utf-8")
    args = ["-p", "conftest", "-c", str(tmp_path / "pytest.ini"), "-rs", str(target)]
    where = os.pathsep.join((str(TESTS), PACKAGE_ROOT))
    return pytest_child(args, tmp_path, PYTHONPATH=where, **env)


def test_security_skips_for_root_or_os_pass(tmp_path: Path) -> None:
    """Skips for "needs root" and "X-only" pass with ``CI`` set; so does any skip without
    ``CI`` (a local run reports it as a skip)."""
    good = security_run(tmp_path, FAKE_SECURITY_TESTS, CI="true")
    assert good.returncode == 0, (good.stdout, good.stderr)
    assert "1 passed, 2 skipped" in good.stdout, good.stdout
    assert "security tests skipped" not in good.stderr, good.stderr
    local = security_run(tmp_path, FAKE_SECURITY_TESTS + BAD_SKIP.format(reason="flaky"))
    assert local.returncode == 0, (local.stdout, local.stderr)
    assert "1 passed, 3 skipped" in local.stdout, local.stdout


@pytest.mark.parametrize(
    "reason", ["flaky here", "/tmp/dockpoint-0 exists already", "not run on Linux today"]
)
def test_a_security_test_skipped_for_another_reason_fails_the_run(
    tmp_path: Path, reason: str
) -> None:
    """With ``CI`` set, one skip for another reason fails the run and is named."""
    bad = security_run(tmp_path, FAKE_SECURITY_TESTS + BAD_SKIP.format(reason=reason), CI="true")
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "1 passed, 3 skipped" in bad.stdout, bad.stdout
    assert "security tests skipped for a reason other than root/OS" in bad.stderr, bad.stderr
    assert f"test_posix.py::test_flaky: Skipped: {reason}" in bad.stderr, bad.stderr
    assert "test_needs_root" not in bad.stderr and "test_other_os" not in bad.stderr


def test_the_installed_version_is_the_one_version_string() -> None:
    """The wheel's version (flit reads ``__version__``) is ``dockpoint.__version__``."""
    if os.environ.get("DOCKPOINT_TEST_INSTALLED") != "1":
        pytest.skip("needs the installed package: the nox sessions set DOCKPOINT_TEST_INSTALLED=1")
    from importlib.metadata import version

    import dockpoint

    assert version("dockpoint") == dockpoint.__version__
