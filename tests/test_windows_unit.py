"""The Windows backend's pure logic, on any OS: no Windows needed.

What the Wine lane cannot judge (the DACL, the owner comparison, claim exclusivity) is
decided by the small functions tested here; ``test_windows.py`` runs the rest for real.
"""

from __future__ import annotations

import ast
import errno
import sys
from pathlib import Path

import pytest

from dockpoint import DockpointClosedError
from dockpoint import _windows as w
from dockpoint._common import endpoint_stem, pipe_name

SID = "S-1-5-21-1004336348-1177238915-682003330-1001"
OTHER = "S-1-5-21-1004336348-1177238915-682003330-1002"
SYSTEM = "S-1-5-18"
ADMINISTRATORS = "S-1-5-32-544"


# --------------------------------------------------------------------------- names


def test_pipe_name_is_scoped_to_the_user() -> None:
    stem = endpoint_stem("MyApp", "Default")
    assert w._pipe_path(SID, stem) == f"\\\\.\\pipe\\dockpoint-{SID}-myapp@default"
    assert w._pipe_path(SID, stem) == pipe_name(SID, stem)
    assert w._pipe_path(SID, stem) != w._pipe_path(OTHER, stem)


def test_names_differing_in_case_are_one_pipe() -> None:
    # Windows compares pipe names case-insensitively; dockpoint lower-cases everywhere.
    a = w._pipe_path(SID, endpoint_stem("Editor", "Main"))
    b = w._pipe_path(SID, endpoint_stem("EDITOR", "main"))
    assert a == b == a.lower().replace(SID.lower(), SID)


def test_longest_valid_names_fit_a_typical_sid() -> None:
    longest = endpoint_stem("a" * 64, "b" * 64)
    assert len(w._pipe_path(SID, longest)) <= w.PIPE_NAME_MAX


def test_too_long_pipe_name_is_a_value_error_that_names_the_limit() -> None:
    huge_sid = "S-1-5-21-" + "-".join(["4294967295"] * 12)
    stem = endpoint_stem("a" * 64, "b" * 64)
    with pytest.raises(ValueError, match="at most 256"):
        w._pipe_path(huge_sid, stem)
    prefix = len(pipe_name(SID, ""))
    exact = "x" * (w.PIPE_NAME_MAX - prefix)
    assert len(w._pipe_path(SID, exact)) == w.PIPE_NAME_MAX


# --------------------------------------------------------------------------- security


def test_sddl_owner_is_the_user_and_the_protected_dacl_admits_only_the_user() -> None:
    sddl = w._sddl(SID)
    assert sddl == f"O:{SID}D:P(A;;GA;;;{SID})"
    owner, _, dacl = sddl.partition("D:")
    assert owner == f"O:{SID}"
    assert dacl.startswith("P(")  # protected: nothing inherited
    assert dacl.count("(") == 1  # a single entry
    for outsider in ("SY", "BA", "WD", "AU", "IU", "NU", SYSTEM, ADMINISTRATORS):
        assert f";;;{outsider})" not in sddl


@pytest.mark.parametrize(
    "bad",
    ["", "S-1", "s-1-5-18", "S-1-5-21-1)(A;;GA;;;WD", "S-1-5-x", "S-1-5-18 ", "S-1-5-\uff11", "WD"],
)
def test_sddl_refuses_anything_but_a_string_sid(bad: str) -> None:
    # The SID is spliced into SDDL: nothing may smuggle in another entry.
    with pytest.raises(ValueError, match="not a string SID"):
        w._sddl(bad)


@pytest.mark.parametrize(
    ("owner", "server_user", "trusted"),
    [
        (SID, SID, True),  # our own daemon
        (SID, None, True),  # ours, but its process could not be opened (elevated)
        (ADMINISTRATORS, SID, True),  # elevated same-user server that left the default owner
        (None, SID, True),  # owner unreadable, process is the user's
        (OTHER, OTHER, False),  # a squatter of another user
        (OTHER, None, False),
        (ADMINISTRATORS, None, False),
        (SYSTEM, SYSTEM, False),
        (None, None, False),
    ],
)
def test_server_trust(owner: str | None, server_user: str | None, trusted: bool) -> None:
    assert w._trusted(SID, owner, server_user) is trusted


# --------------------------------------------------------------------------- codes


def test_sdk_constants() -> None:
    assert (w.ERROR_FILE_NOT_FOUND, w.ERROR_ACCESS_DENIED, w.ERROR_BROKEN_PIPE) == (2, 5, 109)
    assert (w.ERROR_PIPE_BUSY, w.ERROR_NO_DATA, w.ERROR_PIPE_NOT_CONNECTED) == (231, 232, 233)
    assert (w.ERROR_PIPE_CONNECTED, w.ERROR_OPERATION_ABORTED, w.ERROR_IO_PENDING) == (
        535,
        995,
        997,
    )
    assert w.ERROR_SEM_TIMEOUT == 121
    assert w.FILE_FLAG_FIRST_PIPE_INSTANCE == 0x00080000
    assert w.FILE_FLAG_OVERLAPPED == 0x40000000
    assert w.PIPE_REJECT_REMOTE_CLIENTS == 0x8
    assert w.PIPE_UNLIMITED_INSTANCES == 255
    assert w.SECURITY_SQOS_PRESENT == 0x00100000
    assert w.SECURITY_IDENTIFICATION == 0x00010000
    assert w.PROCESS_QUERY_LIMITED_INFORMATION == 0x1000


def test_pipe_modes() -> None:
    assert w._OPEN_MODE & w.PIPE_ACCESS_DUPLEX == w.PIPE_ACCESS_DUPLEX
    assert w._OPEN_MODE & w.FILE_FLAG_OVERLAPPED
    assert not w._OPEN_MODE & w.FILE_FLAG_FIRST_PIPE_INSTANCE  # added for the first only
    assert w._PIPE_MODE == w.PIPE_REJECT_REMOTE_CLIENTS  # byte type, byte read, blocking
    assert w._DIAL_FLAGS == (
        w.FILE_FLAG_OVERLAPPED | w.SECURITY_SQOS_PRESENT | w.SECURITY_IDENTIFICATION
    )
    # The impersonation level (bits 16-17) is Identification: the daemon may learn who
    # the client is but not act as it (not SECURITY_IMPERSONATION, not DELEGATION).
    assert w._DIAL_FLAGS & 0x00030000 == w.SECURITY_IDENTIFICATION


def test_end_of_stream_and_claimed_codes() -> None:
    assert {109, 232, 233} == w._END_OF_STREAM
    assert w.ERROR_ACCESS_DENIED in w._CLAIMED  # FILE_FLAG_FIRST_PIPE_INSTANCE lost
    assert w.ERROR_PIPE_BUSY in w._CLAIMED  # a squatter's pipe with no instance left
    assert w.ERROR_FILE_NOT_FOUND not in w._CLAIMED
    assert not w._END_OF_STREAM & {w.ERROR_OPERATION_ABORTED, w.ERROR_IO_PENDING}


def test_closed_error_is_the_shared_kind() -> None:
    err = w._closed_error()
    assert isinstance(err, DockpointClosedError)
    assert err.errno == errno.EBADF


# --------------------------------------------------------------------------- waits


@pytest.mark.parametrize(
    ("deadline", "now", "ms"),
    [
        (None, 5.0, 100),  # no deadline: slices, so Ctrl+C is noticed
        (10.0, 5.0, 100),
        (5.05, 5.0, 50),
        (5.0004, 5.0, 1),  # rounded up: a short wait is not a busy loop
        (5.0, 5.0, 0),
        (4.0, 5.0, 0),
    ],
)
def test_slice_ms(deadline: float | None, now: float, ms: int) -> None:
    assert w._slice_ms(deadline, now) == ms


# --------------------------------------------------------------------------- module


def test_imports_everywhere_and_binds_only_on_windows() -> None:
    assert hasattr(w, "api") == (sys.platform == "win32")
    if sys.platform != "win32":
        assert w._wine_version() is None


def _source() -> ast.Module:
    return ast.parse(Path(w.__file__).read_text(encoding="utf-8"))


def test_every_win32_function_is_declared_with_its_sdk_name_and_types() -> None:
    declared: dict[str, ast.Call] = {}
    for node in ast.walk(_source()):
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call):
            call = node.value
            if isinstance(call.func, ast.Name) and call.func.id == "_declare":
                assert isinstance(node.target, ast.Name)
                declared[node.target.id] = call
    assert len(declared) >= 20
    for name, call in declared.items():
        dll, sdk_name, *_types = call.args
        assert isinstance(dll, ast.Name) and dll.id in ("_k", "_a")
        assert isinstance(sdk_name, ast.Constant) and sdk_name.value == name
        assert len(call.args) >= 3, f"{name}: no restype"
    # The DLLs are used only through _declare (explicit argtypes and restype for all).
    for node in ast.walk(_source()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert node.value.id not in ("_kernel32", "_advapi32", "_k", "_a"), node.attr
            assert not (node.value.id == "ctypes" and node.attr in ("windll", "cdll", "oledll"))


def test_every_called_win32_function_is_declared() -> None:
    tree = _source()
    declared = {
        node.target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    not_api = {"BOOL", "DWORD", "HANDLE", "ULONG", "OSError", "POINTER", "Api"}
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id[:1].isupper()
        and not node.func.id.endswith("Error")
    }
    assert called - declared - classes - not_api == set()
