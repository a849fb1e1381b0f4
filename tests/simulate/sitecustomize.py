"""Loaded by Python children of the test suite run with ``--simulate-macos-paths``: the
POSIX backend behaves as on macOS, a 103-byte ``sun_path`` and no ``/proc/self/fd``."""

import os

if os.environ.get("DOCKPOINT_TEST_MACOS_PATHS") == "1":
    from dockpoint import _posix_dir

    _posix_dir.SUN_PATH_MAX, _posix_dir.PROC_ALIAS, _posix_dir.ABSTRACT = 103, False, False
