"""The Windows backend's pure logic, on any OS: no Windows needed.

What the Wine lane cannot judge (the DACL, the owner comparison, claim exclusivity) is
decided by the small functions tested here; ``test_windows.py`` runs the rest for real.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from dockpoint import _win32 as k
from dockpoint import _windows as w
from dockpoint._names import endpoint_stem, pipe_name

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
        # The server process is asked only when the owner is Administrators, which a normal
        # user cannot set: its pid may have been reused by a process of the user.
        (None, SID, False),  # owner unreadable
        (OTHER, SID, False),  # a squatter of another user whose pid now names ours
        (SYSTEM, SID, False),
        (OTHER, OTHER, False),  # a squatter of another user
        (OTHER, None, False),
        (ADMINISTRATORS, None, False),
        (ADMINISTRATORS, OTHER, False),
        (SYSTEM, SYSTEM, False),
        (None, None, False),
    ],
)
def test_server_trust(owner: str | None, server_user: str | None, trusted: bool) -> None:
    assert w._trusted(SID, owner, server_user) is trusted


# --------------------------------------------------------------------------- codes


def test_sdk_constants() -> None:
    assert (k.ERROR_FILE_NOT_FOUND, k.ERROR_ACCESS_DENIED, k.ERROR_BROKEN_PIPE) == (2, 5, 109)
    assert (k.ERROR_PIPE_BUSY, k.ERROR_NO_DATA, k.ERROR_PIPE_NOT_CONNECTED) == (231, 232, 233)
    assert (k.ERROR_PIPE_CONNECTED, k.ERROR_OPERATION_ABORTED, k.ERROR_IO_PENDING) == (
        535,
        995,
        997,
    )
    assert (k.ERROR_PATH_NOT_FOUND, k.ERROR_SHARING_VIOLATION, k.ERROR_LOCK_VIOLATION) == (
        3,
        32,
        33,
    )
    assert (k.ERROR_SEM_TIMEOUT, k.ERROR_ALREADY_EXISTS) == (121, 183)
    assert k.FILE_FLAG_FIRST_PIPE_INSTANCE == 0x00080000
    assert k.FILE_FLAG_OVERLAPPED == 0x40000000
    assert k.FILE_FLAG_OPEN_REPARSE_POINT == 0x00200000
    assert (k.FILE_ATTRIBUTE_DIRECTORY, k.FILE_ATTRIBUTE_REPARSE_POINT) == (0x10, 0x400)
    assert (k.FILE_SHARE_READ, k.FILE_SHARE_WRITE, k.FILE_SHARE_DELETE) == (1, 2, 4)
    assert (k.OPEN_EXISTING, k.OPEN_ALWAYS) == (3, 4)
    assert (k.LOCKFILE_FAIL_IMMEDIATELY, k.LOCKFILE_EXCLUSIVE_LOCK) == (1, 2)
    assert k.PIPE_REJECT_REMOTE_CLIENTS == 0x8
    assert k.PIPE_UNLIMITED_INSTANCES == 255
    assert k.SECURITY_SQOS_PRESENT == 0x00100000
    assert k.SECURITY_IDENTIFICATION == 0x00010000
    assert k.PROCESS_QUERY_LIMITED_INFORMATION == 0x1000
    assert (k.SE_FILE_OBJECT, k.SE_KERNEL_OBJECT) == (1, 6)
    assert (
        k.OWNER_SECURITY_INFORMATION,
        k.DACL_SECURITY_INFORMATION,
        k.LABEL_SECURITY_INFORMATION,
    ) == (1, 4, 0x10)


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
    assert hasattr(w, "backend") == (sys.platform == "win32")


def _source(module: object = k) -> ast.Module:
    return ast.parse(Path(module.__file__).read_text(encoding="utf-8"))  # type: ignore[attr-defined]


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
    for module in (k, w):
        for node in ast.walk(_source(module)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert node.value.id not in ("_kernel32", "_advapi32", "_k", "_a"), node.attr
                windll = ("windll", "cdll", "oledll")
                assert not (node.value.id == "ctypes" and node.attr in windll)
    # The backend declares nothing itself: every binding lives in _win32.
    assert not [
        node
        for node in ast.walk(_source(w))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("_declare", "WinDLL", "CDLL")
    ]


def test_every_called_win32_function_is_declared() -> None:
    declared = {
        node.target.id
        for node in ast.walk(_source(k))
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    trees = [_source(k), _source(w)]
    classes = {node.name for t in trees for node in ast.walk(t) if isinstance(node, ast.ClassDef)}
    not_api = {"BOOL", "DWORD", "HANDLE", "ULONG", "OSError", "POINTER", "Api", "RLock"}
    called = {
        node.func.id
        for t in trees
        for node in ast.walk(t)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id[:1].isupper()
        and not node.func.id.endswith("Error")
    }
    assert "LockFileEx" in called and "CreateNamedPipeW" in called
    assert called - declared - classes - not_api == set()


def test_no_pipe_instance_is_disconnected_for_reuse() -> None:
    # After DisconnectNamedPipe an instance is not listening until the next
    # ConnectNamedPipe, so a pool holding one leaves clients at ERROR_PIPE_BUSY. The
    # backend never reuses an instance: a served one is closed, and the pool only ever
    # holds a fresh instance made listening by CreateNamedPipeW.
    package = Path(w.__file__).parent
    for path in sorted(package.glob("*.py")):
        assert "DisconnectNamedPipe" not in path.read_text(encoding="utf-8"), path.name


# --------------------------------------------------------------------------- lock file


def test_lock_file_lives_in_a_dockpoint_directory_under_localappdata() -> None:
    stem = endpoint_stem("MyApp", "Default")
    base = "C:\\Users\\me\\AppData\\Local"
    assert w._lock_path(base, stem) == (
        f"{base}\\dockpoint",
        f"{base}\\dockpoint\\myapp@default.lock",
    )
    assert w._lock_path(base + "\\", stem) == w._lock_path(base, stem)
    assert w._lock_path("\\\\server\\share\\me", stem)[0] == "\\\\server\\share\\me\\dockpoint"


@pytest.mark.parametrize("bad", [None, "", "relative\\dir", "\\no-drive", "C"])
def test_lock_file_needs_an_absolute_localappdata(bad: str | None) -> None:
    with pytest.raises(FileNotFoundError, match="LOCALAPPDATA"):
        w._lock_path(bad, "a@b")


def test_lock_ranges_are_distinct_single_bytes_beyond_any_text() -> None:
    # Clients test the alive range; only claimers race for the claim range.
    assert w._CLAIM_RANGE != w._ALIVE_RANGE
    for low, high in (w._CLAIM_RANGE, w._ALIVE_RANGE):
        assert high << 32 | low >= 1 << 30  # reading the pid and info never touches them


def test_directory_sddl_is_user_only_and_inherited_by_the_lock_files() -> None:
    assert w._directory_sddl(SID) == f"O:{SID}D:P(A;OICI;FA;;;{SID})"
    assert w._unsafe(w._directory_sddl(SID), SID) is None
    assert w._unsafe(w._sddl(SID), SID) is None
    with pytest.raises(ValueError, match="not a string SID"):
        w._directory_sddl("S-1-5-21-1)(A;;FA;;;WD")


@pytest.mark.parametrize(
    ("sddl", "reason"),
    [
        (f"O:{SID}D:P(A;OICI;FA;;;{SID})", None),
        # The default inherited DACL of a profile folder: SYSTEM, Administrators, the user.
        (f"O:{SID}D:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)(A;OICIID;FA;;;{SID})", None),
        (f"O:{SID}G:{SID}D:P(A;;FA;;;{SID})(D;;FA;;;WD)", None),  # deny entries are fine
        (f"O:{SID}D:P(A;OICIIO;FA;;;CO)(A;;FA;;;{SID})", None),  # CREATOR OWNER is the user
        (f"O:{OTHER}D:P(A;OICI;FA;;;{SID})", f"owned by {OTHER}"),
        (f"O:BAD:P(A;OICI;FA;;;{SID})", "owned by BA"),
        (f"O:{SID}", "no DACL"),
        (f"O:{SID}D:NO_ACCESS_CONTROL", "no DACL"),
        (f"O:{SID}D:P(A;OICI;FA;;;{SID})(A;;FR;;;WD)", "grants access to WD"),
        (f"O:{SID}D:(A;OICIIO;FA;;;AU)(A;;FA;;;{SID})", "grants access to AU"),  # inherit-only
        (f"O:{SID}D:P(A;;FA;;;{OTHER})", f"grants access to {OTHER}"),
        (f"O:{SID}D:P(XA;;FA;;;{OTHER};(x))", f"grants access to {OTHER}"),  # callback entry
        (f"O:{SID}D:P(A;;FA)", "cannot read"),
        (f"O:{SID}D:P(A;;FA;;;{SID})S:(ML;;NW;;;LW)", None),  # the label is judged apart
    ],
)
def test_unsafe_judges_owner_and_dacl(sddl: str, reason: str | None) -> None:
    got = w._unsafe(sddl, SID)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


@pytest.mark.parametrize(
    ("sddl", "level", "trusted"),
    [
        (f"O:{SID}D:P(A;;GA;;;{SID})", None, True),  # no label: implicit Medium
        ("S:(ML;;NW;;;LW)", 0x1000, False),  # a Low-integrity (sandboxed) squatter
        ("S:(ML;;NW;;;S-1-16-0)", 0, False),  # Untrusted
        ("S:(ML;;NW;;;ME)", 0x2000, True),
        ("S:(ML;;NW;;;MP)", 0x2100, True),
        ("S:(ML;;NWNR;;;HI)", 0x3000, True),
        ("S:(ML;;NW;;;S-1-16-12288)", 0x3000, True),
        ("S:(ML;;NW;;;SI)", 0x4000, True),
        ("S:(ML;;NW;;;XX)", 0, False),  # unreadable: the lowest
        ("S:(AU;SA;FA;;;WD)", None, True),  # an audit entry is no label
    ],
)
def test_integrity_label(sddl: str, level: int | None, trusted: bool) -> None:
    assert w._integrity(sddl) == level
    assert w._integrity_trusted(level) is trusted


def test_sddl_parts_ignore_colons_inside_entries() -> None:
    sddl = f'O:{SID}G:BAD:P(A;;FA;;;{SID})(XA;;FA;;;WD;(@User.x == "D:S:"))S:(ML;;NW;;;LW)'
    assert w._sddl_part(sddl, "O") == SID
    assert w._sddl_part(sddl, "G") == "BA"
    assert w._sddl_part(sddl, "D") == f'P(A;;FA;;;{SID})(XA;;FA;;;WD;(@User.x == "D:S:"))'
    assert w._sddl_part(sddl, "S") == "(ML;;NW;;;LW)"
    assert w._sddl_part(f"D:P(A;;FA;;;{SID})", "O") is None
