"""``python -m dockpoint``: an echo daemon, a frontend that starts it on demand, a
status report that shows the state of any app's endpoint, and a way to stop its holder.

``serve`` and ``send`` are the whole auto-spawning client-daemon pattern built only on
the public API; ``status`` (a printer of :func:`dockpoint.probe`) and ``stop`` (of
:func:`dockpoint.stop`) are what a user runs when their own daemon misbehaves. The code is
in :mod:`dockpoint._cli`.
"""

import os
import sys

from dockpoint._cli import EXIT_ERROR, main

__all__ = ["main"]

if __name__ == "__main__":
    _code = main()
    if sys.flags.dev_mode:  # let -X dev see what a normal exit reports
        sys.exit(_code)
    # Nothing is left to clean up (the daemon, if one was started, is detached): skip the
    # interpreter's teardown once the output is out.
    for _stream in (sys.stdout, sys.stderr):
        try:
            if _stream is not None:
                _stream.flush()
        except (OSError, ValueError):
            _code = _code or EXIT_ERROR
    os._exit(_code)
