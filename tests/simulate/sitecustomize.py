"""Loaded by Python children of the test suite run with ``--simulate-macos-paths``: the
POSIX backend behaves as on macOS, a 103-byte ``sun_path`` and no ``/proc/self/fd``."""

import os

if os.environ.get("DOCKPOINT_TEST_MACOS_PATHS") == "1":
    from dockpoint import _posix

    _posix.SUN_PATH_MAX, _posix._PROC_ALIAS, _posix._ABSTRACT = 103, False, False
