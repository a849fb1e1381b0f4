"""dockpoint: claim a well-known per-user endpoint, or connect to the process that has.

The race-free core of the auto-spawning client-daemon pattern (tmux, ssh-agent,
gpg-agent, docker). A daemon calls :func:`claim` and serves connections from
:meth:`Dockpoint.accept`; a frontend calls :func:`connect` and, on ``None``, spawns the
daemon and connects again (or calls :func:`connect_or_spawn`, which does both).
"""

from ._api import address, claim, connect, connect_or_spawn, probe, stop
from ._classes import (
    PROBE_STATES,
    ClaimLostError,
    Dockpoint,
    DockpointClosedError,
    DockpointConnection,
    Probe,
    SpawnError,
)
from ._names import MAX_INFO_LENGTH, MAX_NAME_LENGTH, NAME_CHARACTERS

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
