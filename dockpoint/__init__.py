"""dockpoint: claim a well-known per-user endpoint, or connect to the process that has.

The race-free core of the auto-spawning client-daemon pattern (tmux, ssh-agent,
gpg-agent, docker). A daemon calls :func:`claim` and serves connections from
:meth:`Dockpoint.accept`; a frontend calls :func:`connect` and, on ``None``, spawns the
daemon and connects again.
"""

import sys

from ._common import (
    MAX_INFO_LENGTH,
    MAX_NAME_LENGTH,
    NAME_CHARACTERS,
    PROBE_STATES,
    ClaimLostError,
    Dockpoint,
    DockpointClosedError,
    DockpointConnection,
    Probe,
    SpawnError,
)

if sys.platform == "win32":
    from ._windows import api as _api
else:
    from ._posix import api as _api

claim = _api.claim
connect = _api.connect
address = _api.address
connect_or_spawn = _api.connect_or_spawn
probe = _api.probe
stop = _api.stop

#: The one version string (``pyproject.toml`` reads it: ``dynamic = ["version"]``).
__version__ = "0.2.0"
__all__ = [
    "MAX_INFO_LENGTH",
    "MAX_NAME_LENGTH",
    "NAME_CHARACTERS",
    "PROBE_STATES",
    "ClaimLostError",
    "Dockpoint",
    "DockpointClosedError",
    "DockpointConnection",
    "Probe",
    "SpawnError",
    "__version__",
    "address",
    "claim",
    "connect",
    "connect_or_spawn",
    "probe",
    "stop",
]
