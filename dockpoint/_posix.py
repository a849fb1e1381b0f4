"""POSIX backend: a Unix-domain stream socket guarded by an ``flock``-ed sidecar lock file.

The lock file decides who holds the claim; the socket is only where clients meet the
holder. The operations :mod:`dockpoint._api` asks of a backend, from the modules that do
the work: :mod:`._posix_dir` (where, and the checks), :mod:`._posix_stream` (connect, the
stream), :mod:`._posix_claim` (claim, listen, adopt), :mod:`._posix_probe` (read-only).
"""

from __future__ import annotations

import os
import sys

assert sys.platform != "win32"  # tells type checkers this module is POSIX-only

from ._posix_dir import _directory, _place  # noqa: E402
from ._posix_stream import dial  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from ._posix_claim import _Listener

_SIGTERM = 15  # signal.SIGTERM on every POSIX (signal.py imports enum)


# The claim and probe modules are loaded by their first call: a frontend whose daemon runs
# never loads them (nor fcntl); import dockpoint takes 1.5 x as long with them (3.12,
# -X importtime, median of 25).
class _Backend:
    dial = staticmethod(dial)

    @staticmethod
    def locate(stem: str) -> str:
        uid = os.geteuid()
        return "/".join(_place(_directory(check=False, uid=uid), stem, uid))

    @staticmethod
    def listen(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
        from ._posix_claim import listen

        return listen(stem, info)

    @staticmethod
    def adopt(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
        from ._posix_claim import adopt

        return adopt(stem, info)

    @staticmethod
    def inspect(stem: str, timeout: float | None) -> tuple[str, str, int | None, str | None, str]:
        from ._posix_probe import inspect

        return inspect(stem, timeout)

    @staticmethod
    def holds(stem: str, pid: int) -> bool:
        from ._posix_probe import holds

        return holds(stem, pid)

    @staticmethod
    def ask_to_exit(pid: int) -> None:
        os.kill(pid, _SIGTERM)


backend = _Backend()
