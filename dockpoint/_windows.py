"""Windows backend: a named pipe scoped to the user's SID, claimed through a lock file.

The pipe is ``\\\\.\\pipe\\dockpoint-<user SID>-<app>@<instance>`` (at most 256 characters);
the claim is an exclusive ``LockFileEx`` lock on a byte range of
``%LOCALAPPDATA%\\dockpoint\\<app>@<instance>.lock``, which the kernel drops with its process.
The holder creates the pipe's first instance with ``FILE_FLAG_FIRST_PIPE_INSTANCE`` and keeps
one listening instance free at all times; I/O is overlapped and waited on in slices with a
wake event, so ``timeout=``, ``close()`` and Ctrl+C end every wait. docs/windows.md has the
design (the lock file's three ranges, the instance pool, the waits), docs/security.md the
checks, docs/protocol.md the probe and the hand-over.
"""

from __future__ import annotations

import errno
import os
import sys
from _thread import RLock, allocate_lock  # not threading: see _classes
from time import monotonic, sleep

from ._classes import BUSY_GRACE, closed_error, no_fileno
from ._names import lock_record, lock_text, pipe_name, take_handover
from ._win32 import (
    DACL_SECURITY_INFORMATION,
    ERROR_ACCESS_DENIED,
    ERROR_ALREADY_EXISTS,
    ERROR_BROKEN_PIPE,
    ERROR_FILE_NOT_FOUND,
    ERROR_IO_PENDING,
    ERROR_LOCK_VIOLATION,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    ERROR_PATH_NOT_FOUND,
    ERROR_PIPE_BUSY,
    ERROR_PIPE_CONNECTED,
    ERROR_PIPE_NOT_CONNECTED,
    ERROR_SEM_TIMEOUT,
    FILE_ATTRIBUTE_DIRECTORY,
    FILE_ATTRIBUTE_REPARSE_POINT,
    FILE_FLAG_FIRST_PIPE_INSTANCE,
    FILE_FLAG_OPEN_REPARSE_POINT,
    FILE_FLAG_OVERLAPPED,
    FILE_SHARE_DELETE,
    FILE_SHARE_READ,
    FILE_SHARE_WRITE,
    FILE_TYPE_DISK,
    FILE_TYPE_PIPE,
    GENERIC_READ,
    GENERIC_WRITE,
    INVALID_FILE_ATTRIBUTES,
    LABEL_SECURITY_INFORMATION,
    LOCKFILE_EXCLUSIVE_LOCK,
    LOCKFILE_FAIL_IMMEDIATELY,
    OPEN_ALWAYS,
    OPEN_EXISTING,
    OWNER_SECURITY_INFORMATION,
    PIPE_ACCESS_DUPLEX,
    PIPE_READMODE_BYTE,
    PIPE_REJECT_REMOTE_CLIENTS,
    PIPE_SERVER_END,
    PIPE_TYPE_BYTE,
    PIPE_UNLIMITED_INSTANCES,
    PIPE_WAIT,
    PROCESS_QUERY_LIMITED_INFORMATION,
    SDDL_REVISION_1,
    SE_FILE_OBJECT,
    SE_KERNEL_OBJECT,
    SECURITY_IDENTIFICATION,
    SECURITY_SQOS_PRESENT,
    TOKEN_QUERY,
    WAIT_OBJECT_0,
    WAIT_TIMEOUT,
    FileNameInfo,
    TokenUser,
)

TYPE_CHECKING = False

#: Longest pipe name Windows accepts, ``\\.\pipe\`` included.
PIPE_NAME_MAX = 256
#: Well-known SIDs.
ADMINISTRATORS = "S-1-5-32-544"
SYSTEM = "S-1-5-18"
CREATOR_OWNER = "S-1-3-0"
OWNER_RIGHTS = "S-1-3-4"
#: Integrity levels (the RID of ``S-1-16-<rid>``); SDDL writes them as these aliases.
MEDIUM_INTEGRITY = 0x2000
_INTEGRITY_ALIASES = {"LW": 0x1000, "ME": 0x2000, "MP": 0x2100, "HI": 0x3000, "SI": 0x4000}
_SID_ALIASES = {"SY": SYSTEM, "BA": ADMINISTRATORS, "CO": CREATOR_OWNER, "OW": OWNER_RIGHTS}
#: Who may appear in an allow entry of the lock directory's or the pipe's DACL besides the
#: user: SYSTEM and Administrators can take anything anyway; CREATOR OWNER and OWNER RIGHTS
#: stand for the owner, which must be the user.
_TOLERATED = frozenset({SYSTEM, ADMINISTRATORS, CREATOR_OWNER, OWNER_RIGHTS})
_OPEN_MODE = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED
_PIPE_MODE = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS
_DIAL_FLAGS = FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION
_SHARE_ALL = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
_SHARE_KEEP = FILE_SHARE_READ | FILE_SHARE_WRITE  # the lock file's holder
_BUFFER = 65536  # pipe buffer quota each way; advisory, the kernel grows it as needed
_WRITE_CHUNK = 1 << 20  # one WriteFile at most; also bounds the copy of a read-only view
_SLICE_MS = 100  # longest uninterrupted wait, so Ctrl+C is noticed promptly
#: The lock file's byte ranges (offset low, offset high; one byte each), far beyond its text
#: so that locking them never blocks reading the pid and info.
_CLAIM_RANGE = (0, 0x40000000)
_ALIVE_RANGE = (1, 0x40000000)
#: Held by a daemon taking the claim over from the frontend that spawned it, from before
#: the frontend lets go of the claim range until the daemon holds both others.
_HANDOVER_RANGE = (2, 0x40000000)
_ALIVE_WAIT = 5.0  # others' shared locks on the alive range: a test, or a probe's dial
#: How long an adopting daemon waits for its frontend to let go of the claim range.
_HANDOVER_WAIT = 5.0
#: Errors that mean the peer has closed its end: ``read`` returns ``b""``.
_END_OF_STREAM = frozenset({ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, ERROR_NO_DATA})
#: ``CreateNamedPipeW`` errors that mean "the name exists and this instance may not be made".
_CLAIMED = frozenset({ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY})
#: ``ConnectNamedPipe`` results that mean a client is on the instance.
_CONNECTED = frozenset({0, ERROR_PIPE_CONNECTED, ERROR_NO_DATA})


# --------------------------------------------------------------------------- pure logic


def _pipe_path(user_sid: str, stem: str) -> str:
    """The pipe for ``stem``; ``ValueError`` if Windows would refuse it as too long."""
    name = pipe_name(user_sid, stem)
    if len(name) > PIPE_NAME_MAX:
        raise ValueError(
            f"pipe name {name!r} is {len(name)} characters; Windows allows at most "
            f"{PIPE_NAME_MAX}: use a shorter app_name or instance"
        )
    return name


def _check_sid(user_sid: str) -> str:
    parts = user_sid.split("-")
    if len(parts) < 3 or parts[0] != "S" or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        raise ValueError(f"not a string SID: {user_sid!r}")
    return user_sid


def _sddl(user_sid: str) -> str:
    """The pipe's security descriptor: owned by ``user_sid``, a protected DACL that grants
    only ``user_sid`` full access (no inherited entries, no SYSTEM, no Administrators)."""
    sid = _check_sid(user_sid)
    return f"O:{sid}D:P(A;;GA;;;{sid})"


def _directory_sddl(user_sid: str) -> str:
    """The lock directory's security descriptor: owned by ``user_sid``, a protected DACL
    whose one entry grants ``user_sid`` full access, inherited by the files made in it."""
    sid = _check_sid(user_sid)
    return f"O:{sid}D:P(A;OICI;FA;;;{sid})"


def _lock_path(local_app_data: str | None, stem: str) -> tuple[str, str]:
    """``(directory, lock file)`` for ``stem`` under ``%LOCALAPPDATA%``.

    :raises FileNotFoundError: ``LOCALAPPDATA`` is unset or not an absolute path.
    """
    base = (local_app_data or "").rstrip("\\/")
    absolute = len(base) >= 2 and (base[1] == ":" or base.startswith("\\\\"))
    if not absolute:
        raise FileNotFoundError(
            errno.ENOENT,
            "LOCALAPPDATA must be set to an absolute path: dockpoint keeps its lock files in "
            f"%LOCALAPPDATA%\\dockpoint (it is {local_app_data!r})",
        )
    directory = base + "\\dockpoint"
    return directory, f"{directory}\\{stem}.lock"


def _same_file(final: str, expected: str) -> bool:
    """Whether ``GetFinalPathNameByHandleW``'s ``final`` names the path ``expected``
    (Windows paths compare case-insensitively; the final name has a long-path prefix)."""
    for prefix, replacement in (("\\\\?\\UNC\\", "\\\\"), ("\\\\?\\", "")):
        if final.startswith(prefix):
            final = replacement + final[len(prefix) :]
            break
    return final.rstrip("\\").casefold() == expected.rstrip("\\").casefold()


def _pipe_file_name(name: str) -> str:
    """The name a pipe handle reports (``FileNameInfo``) for the pipe path ``name``."""
    prefix = "\\\\.\\pipe"
    return name[len(prefix) :] if name.lower().startswith(prefix) else name


def _sddl_part(sddl: str, key: str) -> str | None:
    """The text after ``key:`` (``"O"``, ``"D"``, ``"S"``) up to the next part, or ``None``."""
    depth, i, found = 0, 0, None
    while i < len(sddl):
        c = sddl[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and sddl[i + 1 : i + 2] == ":" and c in "OGDS":
            if found is not None:
                return sddl[found:i]
            if c == key:
                found = i + 2
            i += 1
        i += 1
    return None if found is None else sddl[found:]


def _aces(acl: str) -> list[list[str]]:
    """The entries of an SDDL ACL, each split at ``;`` (type, flags, rights, ..., trustee)."""
    aces = []
    for chunk in acl.split("(")[1:]:
        body, _, _ = chunk.partition(")")
        aces.append(body.split(";"))
    return aces


def _trustee(text: str) -> str:
    """An SDDL trustee as a string SID where dockpoint knows the alias."""
    return _SID_ALIASES.get(text, text)


def _unsafe(sddl: str, user_sid: str) -> str | None:
    """Why an object with security descriptor ``sddl`` (owner and DACL, as SDDL with
    trustees as string SIDs or the aliases of ``_SID_ALIASES``) is not the user's alone,
    or ``None`` if it is: owned by the user, with a DACL (none means everyone may do
    anything) whose allow entries name only the user and ``_TOLERATED``."""
    owner = _sddl_part(sddl, "O")
    if owner is None or _trustee(owner) != user_sid:
        return f"it is owned by {owner}, not by this user ({user_sid})"
    dacl = _sddl_part(sddl, "D")
    if dacl is None or dacl.startswith("NO_ACCESS_CONTROL"):
        return "it has no DACL, so everyone has full access"
    for ace in _aces(dacl):
        if len(ace) < 6:
            return f"its DACL has an entry dockpoint cannot read: {';'.join(ace)!r}"
        kind, trustee = ace[0], _trustee(ace[5])
        if kind in ("D", "OD", "XD"):  # deny entries only take away
            continue
        if trustee != user_sid and trustee not in _TOLERATED:
            return f"its DACL grants access to {ace[5]}"
    return None


def _integrity(sddl: str) -> int | None:
    """The integrity level in the mandatory label of ``sddl`` (its ``S:`` part), or
    ``None`` when it has no label (then Windows treats the object as Medium)."""
    sacl = _sddl_part(sddl, "S")
    for ace in _aces(sacl or ""):
        if ace[0] == "ML" and len(ace) >= 6:
            level = ace[5]
            if level in _INTEGRITY_ALIASES:
                return _INTEGRITY_ALIASES[level]
            if level.startswith("S-1-16-") and level[7:].isdigit():
                return int(level[7:])
            return 0  # a label dockpoint cannot read: treat it as the lowest
    return None


def _trusted(user_sid: str, owner_sid: str | None, server_user_sid: str | None) -> bool:
    """Whether a client trusts the pipe server by its owner.

    The owner is the strong signal: only the user (or someone with SeRestorePrivilege) can
    make the user's SID the owner. The only fallback is an owner of Administrators, the
    default owner of an elevated process, which a normal user cannot set: then the server
    process's token user must be the user (its pid could be reused only by a process that
    an unprivileged attacker could not have made the owner of such a pipe anyway).
    """
    if owner_sid == user_sid:
        return True
    return owner_sid == ADMINISTRATORS and server_user_sid == user_sid


def _integrity_trusted(level: int | None) -> bool:
    """Whether a pipe's integrity label lets a client trust it: no label (implicit
    Medium) or at least Medium; below means a sandboxed process made the pipe."""
    return level is None or level >= MEDIUM_INTEGRITY


def _slice_ms(deadline: float | None, now: float) -> int:
    """Milliseconds for the next wait: at most ``_SLICE_MS``, rounded up, never negative."""
    if deadline is None:
        return _SLICE_MS
    left = deadline - now
    if left <= 0:
        return 0
    if left * 1000 >= _SLICE_MS:  # also inf, which int() cannot take
        return _SLICE_MS
    return int(-(-left * 1000 // 1))


# --------------------------------------------------------------------------- Win32

if sys.platform == "win32":
    import ctypes
    from ctypes import byref, c_void_p
    from ctypes.wintypes import DWORD, HANDLE, ULONG

    from ._win32 import (
        INVALID_HANDLE_VALUE,
        OVERLAPPED,
        SECURITY_ATTRIBUTES,
        CancelIoEx,
        CloseHandle,
        ConnectNamedPipe,
        ConvertSecurityDescriptorToStringSecurityDescriptorW,
        ConvertSidToStringSidW,
        ConvertStringSecurityDescriptorToSecurityDescriptorW,
        CreateDirectoryW,
        CreateEventW,
        CreateFileW,
        CreateNamedPipeW,
        GetCurrentProcess,
        GetFileAttributesW,
        GetFileInformationByHandleEx,
        GetFileType,
        GetFinalPathNameByHandleW,
        GetNamedPipeClientProcessId,
        GetNamedPipeInfo,
        GetNamedPipeServerProcessId,
        GetNamedSecurityInfoW,
        GetOverlappedResult,
        GetSecurityInfo,
        GetTokenInformation,
        LocalFree,
        LockFileEx,
        OpenProcess,
        OpenProcessToken,
        ReadFile,
        SetEndOfFile,
        SetEvent,
        SetFilePointerEx,
        UnlockFileEx,
        WaitForMultipleObjects,
        WaitNamedPipeW,
        WriteFile,
        _error,
    )

    if TYPE_CHECKING:  # pragma: no cover
        from ._win32 import _Bool

    # ----------------------------------------------------------------------- helpers

    def _check(ok: int, filename: str | None = None) -> None:
        if not ok:
            raise _error(None, filename)

    def _event() -> int:
        """A new manual-reset event, not signalled, not inheritable."""
        event = CreateEventW(None, True, False, None)
        if not event:
            raise _error()
        return event

    def _sid_string(psid: int | None) -> str:
        text = c_void_p()
        _check(ConvertSidToStringSidW(psid, byref(text)))
        try:
            return ctypes.wstring_at(text.value)  # type: ignore[arg-type]
        finally:
            LocalFree(text)

    def _token_user(process: int) -> str:
        """The string SID of the user of ``process``'s token."""
        token = HANDLE()
        _check(OpenProcessToken(process, TOKEN_QUERY, byref(token)))
        try:
            size = DWORD()
            GetTokenInformation(token, TokenUser, None, 0, byref(size))
            buffer = ctypes.create_string_buffer(size.value or 64)
            ok = GetTokenInformation(token, TokenUser, buffer, len(buffer), byref(size))
            _check(ok)
            # TOKEN_USER starts with SID_AND_ATTRIBUTES.Sid, a pointer into the buffer.
            return _sid_string(c_void_p.from_buffer(buffer).value)
        finally:
            CloseHandle(token)

    _user_sid_cache: list[str] = []

    def _user_sid() -> str:
        """This process's user SID, looked up once."""
        if not _user_sid_cache:
            _user_sid_cache.append(_token_user(GetCurrentProcess()))
        return _user_sid_cache[0]

    def _process_user(pid: int) -> str | None:
        """The user SID of process ``pid``, or ``None`` if we may not look."""
        process = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        if not process:
            return None
        try:
            return _token_user(process)
        except OSError:
            return None
        finally:
            CloseHandle(process)

    def _pipe_owner(pipe: int) -> str | None:
        owner = c_void_p()
        descriptor = c_void_p()
        err = GetSecurityInfo(
            pipe, SE_KERNEL_OBJECT, OWNER_SECURITY_INFORMATION,
            byref(owner), None, None, None, byref(descriptor),
        )  # fmt: skip
        if err:  # returns the error code; the last error is not set
            return None
        try:
            return _sid_string(owner.value) if owner.value else None
        finally:
            LocalFree(descriptor)

    def _descriptor_sddl(descriptor: int | None, what: int) -> str:
        text, size = c_void_p(), ULONG()
        ok = ConvertSecurityDescriptorToStringSecurityDescriptorW(
            descriptor, SDDL_REVISION_1, what, byref(text), byref(size)
        )
        _check(ok)
        try:
            return ctypes.wstring_at(text.value)  # type: ignore[arg-type]
        finally:
            LocalFree(text)

    def _security_sddl(target: int | str, what: int) -> str | None:
        """The parts ``what`` of the security descriptor of a handle (``int``) or a file
        path (``str``) as SDDL, or ``None`` if it cannot be read."""
        descriptor = c_void_p()
        args = (None, None, None, None, byref(descriptor))
        if isinstance(target, str):
            err = GetNamedSecurityInfoW(target, SE_FILE_OBJECT, what, *args)
        else:
            err = GetSecurityInfo(target, SE_KERNEL_OBJECT, what, *args)
        if err:  # returns the error code; the last error is not set
            return None
        try:
            return _descriptor_sddl(descriptor.value, what)
        finally:
            LocalFree(descriptor)

    def _owned_sddl(target: int | str) -> str | None:
        """Owner and DACL of ``target`` as SDDL, the owner spelt as a string SID (SDDL
        may write the user as an alias such as ``LA``)."""
        sddl = _security_sddl(target, OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION)
        if sddl is None:
            return None
        owner = _pipe_owner(target) if isinstance(target, int) else None
        if owner is None and isinstance(target, str):
            return sddl
        dacl = _sddl_part(sddl, "D")
        return f"O:{owner}" + ("" if dacl is None else f"D:{dacl}")

    def _pipe_integrity(pipe: int) -> int | None:
        sddl = _security_sddl(pipe, LABEL_SECURITY_INFORMATION)
        return None if sddl is None else _integrity(sddl)

    def _pipe_pid(query: _Bool, pipe: int) -> int | None:
        pid = ULONG()
        return pid.value if query(pipe, byref(pid)) else None

    def _attributes(sddl: str) -> tuple[SECURITY_ATTRIBUTES, int]:
        """Security attributes (not inheritable) for ``sddl`` and the descriptor to
        ``LocalFree`` when done."""
        descriptor = c_void_p()
        ok = ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl, SDDL_REVISION_1, byref(descriptor), None
        )
        _check(ok)
        attributes = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), descriptor, False)
        return attributes, descriptor.value  # type: ignore[return-value]

    def _security(user_sid: str) -> tuple[SECURITY_ATTRIBUTES, int]:
        """Security attributes for the pipe and the descriptor to ``LocalFree``."""
        return _attributes(_sddl(user_sid))

    def _instance(name: str, attributes: SECURITY_ATTRIBUTES, first: bool = False) -> int:
        """A new listening instance of the pipe ``name``."""
        mode = _OPEN_MODE | (FILE_FLAG_FIRST_PIPE_INSTANCE if first else 0)
        pipe = CreateNamedPipeW(
            name, mode, _PIPE_MODE, PIPE_UNLIMITED_INSTANCES, _BUFFER, _BUFFER, 0,
            byref(attributes),
        )  # fmt: skip
        if pipe == INVALID_HANDLE_VALUE or not pipe:
            raise _error(None, name)
        return pipe

    def _first_instance(name: str, attributes: SECURITY_ATTRIBUTES, user: str) -> int:
        """The lock holder's first instance of ``name``: a new pipe, or (when instances of
        an earlier holder keep the name) a further instance of that pipe if it is ours."""
        try:
            return _instance(name, attributes, first=True)
        except OSError as error:
            if error.winerror not in _CLAIMED:
                raise
        try:
            pipe = _instance(name, attributes)
        except OSError as error:
            if error.winerror not in _CLAIMED:
                raise
            raise PermissionError(
                errno.EACCES,
                "the pipe name is taken by a pipe this user may not serve on (another "
                "user's, or a process's of higher integrity level)",
                name,
            ) from None
        try:
            sddl = _owned_sddl(pipe)
            reason = "its security cannot be read" if sddl is None else _unsafe(sddl, user)
            if reason is None and not _integrity_trusted(_pipe_integrity(pipe)):
                reason = "it was made by a process below Medium integrity (a sandbox)"
            if reason is not None:
                raise PermissionError(
                    errno.EACCES,
                    f"the pipe name is taken by a pipe that is not ours: {reason}",
                    name,
                )
        except BaseException:
            CloseHandle(pipe)
            raise
        return pipe

    # ----------------------------------------------------------------------- lock file

    def _lock_directory(user: str, directory: str) -> None:
        """Create the lock directory user-only, or check an existing one."""
        attributes, descriptor = _attributes(_directory_sddl(user))
        try:
            if not CreateDirectoryW(directory, byref(attributes)):
                code = ctypes.get_last_error()
                if code != ERROR_ALREADY_EXISTS:
                    raise _error(code, directory)
        finally:
            LocalFree(descriptor)
        reason = _directory_problem(user, directory)
        if reason is not None:
            raise PermissionError(
                errno.EACCES, f"unsafe lock directory: {reason}; remove it or fix it", directory
            )

    def _directory_problem(user: str, directory: str) -> str | None:
        """Why the existing lock directory fails the checks, or ``None``; read-only.

        :raises FileNotFoundError: there is no lock directory.
        """
        found = GetFileAttributesW(directory)
        if found == INVALID_FILE_ATTRIBUTES:
            raise _error(None, directory)
        reason = None
        if found & FILE_ATTRIBUTE_REPARSE_POINT:
            reason = "it is a junction or symbolic link"
        elif not found & FILE_ATTRIBUTE_DIRECTORY:
            reason = "it is not a directory"
        else:
            sddl = _owned_sddl(directory)
            reason = "its security cannot be read" if sddl is None else _unsafe(sddl, user)
        return reason

    def _range(lock_range: tuple[int, int]) -> OVERLAPPED:
        ov = OVERLAPPED()
        ov.Offset, ov.OffsetHigh = lock_range
        return ov

    def _try_lock(handle: int, lock_range: tuple[int, int], flags: int) -> int:
        """Lock one byte of ``handle`` without waiting: 0, or the Windows error code."""
        if LockFileEx(
            handle, flags | LOCKFILE_FAIL_IMMEDIATELY, 0, 1, 0, byref(_range(lock_range))
        ):
            return 0
        return ctypes.get_last_error()

    def _unlock(handle: int, lock_range: tuple[int, int]) -> None:
        UnlockFileEx(handle, 0, 1, 0, byref(_range(lock_range)))

    def _take_lock(path: str) -> int | None:
        """The open lock file with both ranges locked, or ``None`` if someone holds it."""
        # No FILE_SHARE_DELETE: while a claimer or the holder has it open, the lock file
        # cannot be deleted or renamed, so nobody can start a second claim on a new file.
        handle = CreateFileW(
            path, GENERIC_READ | GENERIC_WRITE, _SHARE_KEEP, None, OPEN_ALWAYS,
            FILE_FLAG_OPEN_REPARSE_POINT, None,
        )  # fmt: skip
        if handle == INVALID_HANDLE_VALUE or not handle:
            raise _error(None, path)
        try:
            code = _try_lock(handle, _CLAIM_RANGE, LOCKFILE_EXCLUSIVE_LOCK)
            if code == ERROR_LOCK_VIOLATION:
                CloseHandle(handle)
                return None
            if code:
                raise _error(code, path)
            # A daemon taking over from its frontend holds the hand-over range while it
            # waits for the claim range: the claim is its, give it back. (A shared test:
            # clients' shared tests of the range must not make a claimer lose.)
            code = _try_lock(handle, _HANDOVER_RANGE, 0)
            if code == ERROR_LOCK_VIOLATION:
                CloseHandle(handle)
                return None
            if code:
                raise _error(code, path)
            _unlock(handle, _HANDOVER_RANGE)
            _lock_alive(handle, path)
            return handle
        except BaseException:
            CloseHandle(handle)  # releases whatever it had locked
            raise

    def _wait_lock(
        handle: int, lock_range: tuple[int, int], deadline: float, path: str | None = None
    ) -> bool:
        """Take ``lock_range`` exclusively once its holder lets go; ``False`` at the deadline."""
        while True:
            code = _try_lock(handle, lock_range, LOCKFILE_EXCLUSIVE_LOCK)
            if not code:
                return True
            if code != ERROR_LOCK_VIOLATION:
                raise _error(code, path)
            if monotonic() > deadline:
                return False
            sleep(0.0005)  # the holder lets go within a moment

    def _lock_alive(handle: int, path: str) -> None:
        """Take the alive range, which only clients' momentary shared test locks hold."""
        if not _wait_lock(handle, _ALIVE_RANGE, monotonic() + _ALIVE_WAIT, path):
            raise _error(ERROR_LOCK_VIOLATION, path)

    def _write_lock(handle: int, text: bytes, path: str) -> None:
        # From the start: an adopted handle shares its file position with the frontend's.
        _check(SetFilePointerEx(handle, 0, None, 0), path)  # FILE_BEGIN
        count = DWORD()
        _check(WriteFile(handle, text, len(text), byref(count), None), path)
        if count.value != len(text):
            raise OSError(errno.EIO, "short write to the lock file", path)
        _check(SetEndOfFile(handle), path)

    def _empty_lock(handle: int) -> None:
        """Empty the lock file (no holder pid for probe) while the claim is still held."""
        if SetFilePointerEx(handle, 0, None, 0):  # FILE_BEGIN
            SetEndOfFile(handle)  # best effort: a failure leaves a pid probe calls stale

    def _release_lock(handle: int) -> None:
        _unlock(handle, _ALIVE_RANGE)
        _unlock(handle, _CLAIM_RANGE)
        CloseHandle(handle)

    def _open_lock_file(path: str) -> int:
        """A read-only handle of the lock file (any sharing, no reparse point followed),
        0 if there is none.

        :raises OSError: it cannot be opened.
        """
        handle = CreateFileW(
            path, GENERIC_READ, _SHARE_ALL, None, OPEN_EXISTING, FILE_FLAG_OPEN_REPARSE_POINT,
            None,
        )  # fmt: skip
        if handle != INVALID_HANDLE_VALUE and handle:
            return handle
        code = ctypes.get_last_error()
        if code in (ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND):
            return 0
        raise _error(code, path)

    def _alive_test(handle: int) -> bool | None:
        """Whether a holder is alive (the lock's alive or hand-over range is taken;
        ``None`` if that cannot be told). When none is, ``handle`` keeps a shared lock on
        the alive range until :func:`_resume_claims`: a claimer waits for it in
        :func:`_lock_alive`, so no daemon starts serving meanwhile."""
        # Shared tests: claimers never race for these ranges. The hand-over range
        # covers the moment a spawned daemon takes the claim over from its frontend.
        code = _try_lock(handle, _ALIVE_RANGE, 0)
        if not code:
            code = _try_lock(handle, _HANDOVER_RANGE, 0)
            if not code:
                _unlock(handle, _HANDOVER_RANGE)
                return False
            _unlock(handle, _ALIVE_RANGE)
        return True if code == ERROR_LOCK_VIOLATION else None

    def _resume_claims(handle: int | None) -> None:
        if handle is not None:
            _unlock(handle, _ALIVE_RANGE)
            CloseHandle(handle)

    def _held(stem: str) -> bool | None:
        """Whether a holder is alive for ``stem``; ``None`` if that cannot be told."""
        try:
            held, _, _, guard = _holder(stem)
        except OSError:
            return None
        _resume_claims(guard)
        return held

    def _holder(stem: str) -> tuple[bool | None, int | None, str | None, int | None]:
        """Whether a holder is alive for ``stem``, the pid and info its lock file records
        (its first 4 KiB), and, when no holder is alive, the handle of
        :func:`_alive_test` to pass to :func:`_resume_claims`."""
        _, path = _lock_path(os.environ.get("LOCALAPPDATA"), stem)
        handle = _open_lock_file(path)
        if not handle:
            return False, None, None, None
        try:
            buffer = ctypes.create_string_buffer(4096)
            count = DWORD()
            _check(ReadFile(handle, buffer, len(buffer), byref(count), None), path)
            pid, info = lock_record(buffer.raw[: count.value])
            held = _alive_test(handle)
        except BaseException:
            CloseHandle(handle)
            raise
        if held is not False:
            CloseHandle(handle)
            return held, pid, info, None
        return held, pid, info, handle

    def _free_instance(name: str, timeout: float | None) -> int:
        """Wait up to ``timeout`` for a free instance of the pipe ``name`` without opening
        one (an open is a connection the daemon's accept() would return): 0 when one is
        free, else the error (``ERROR_FILE_NOT_FOUND``: no pipe; ``ERROR_SEM_TIMEOUT``)."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            wait = max(1, _slice_ms(deadline, monotonic()))  # 0 would mean "the default"
            if WaitNamedPipeW(name, wait):
                return 0
            code = ctypes.get_last_error()
            if code != ERROR_SEM_TIMEOUT or (deadline is not None and monotonic() >= deadline):
                return code

    def _inspect(stem: str, timeout: float | None) -> tuple[str, str, int | None, str | None, str]:  # noqa: PLR0911 - one return per state
        user = _user_sid()
        name = _pipe_path(user, stem)
        try:
            directory, _ = _lock_path(os.environ.get("LOCALAPPDATA"), stem)
            try:
                reason = _directory_problem(user, directory)
            except FileNotFoundError:
                reason = None  # no lock directory: nobody has claimed as this user here
            if reason is not None:
                reason = f"the lock directory {directory} is unsafe: {reason}; remove it or fix it"
                return "unsafe", name, None, None, reason
            held, pid, info, guard = _holder(stem)
        except OSError as exc:
            what = exc.filename or "the lock file"
            return "unsafe", name, None, None, f"{what} cannot be checked: {exc.strerror}"
        who = f"pid {pid}" if pid is not None else "a process"
        if held:  # the pipe is the holder's: ask for a free instance, never open one
            code = _free_instance(name, timeout)
            if not code:
                state = "listening"
                reason = (
                    f"a daemon of this user ({who}) holds the claim and a pipe instance is "
                    f"free for a client at {name}"
                )
            elif code == ERROR_FILE_NOT_FOUND:
                state = "missing-socket"
                reason = (
                    f"{who} holds the claim but has no pipe instance at {name} (it is still "
                    "starting, or failed to create one): wait, or stop it and start it again"
                )
            else:
                state = "busy"
                waited = f"within {timeout:g} s" if timeout is not None else "in time"
                reason = (
                    f"the holder ({who}) is alive but every pipe instance stayed busy "
                    f"{waited}: it is busy or stuck; wait, or stop it and start it again"
                )
            return state, name, pid, info, reason
        # Nobody holds the claim, and nobody can finish claiming while the guard holds
        # its shared lock: a pipe found now is no daemon's listening endpoint.
        try:
            channel = _Backend.dial(stem, 0.0)
        except PermissionError as exc:
            reason = f"{exc.strerror}: do not send it anything; find out who runs it"
            return "foreign", name, None, None, reason
        finally:
            _resume_claims(guard)
        if channel is not None:
            server = channel.peer_pid
            channel.close()  # not a byte sent
            reason = (
                f"a process of this user (pid {server}) serves {name} without holding its claim"
            )
            return "listening", name, server, info, reason
        if pid is not None:
            reason = (
                f"the lock file names pid {pid}, which no longer holds the claim; the next "
                "claim replaces it: start the daemon"
            )
            return "stale", name, pid, info, reason
        reason = "nobody holds the claim and no daemon is serving: start the daemon"
        return "absent", name, None, None, reason

    def _holds(stem: str, pid: int) -> bool:
        try:
            held, recorded, _, guard = _holder(stem)
        except OSError:
            return False
        _resume_claims(guard)
        return bool(held) and recorded == pid

    # ----------------------------------------------------------------------- overlapped I/O

    class _Op:
        """An ``OVERLAPPED`` with its own event, for one operation at a time, and the
        buffer the operation uses (``keep``)."""

        __slots__ = ("count", "keep", "ov")

        def __init__(self) -> None:
            self.ov = OVERLAPPED()
            self.ov.hEvent = _event()
            self.count = DWORD()
            self.keep: object = None

        def close(self) -> None:
            if self not in _LIMBO:  # the kernel may still signal the event
                CloseHandle(self.ov.hEvent)

    #: Operations the kernel may still write to (their wait was interrupted): kept alive,
    #: with their buffers, for the life of the process rather than freed.
    _LIMBO: set[_Op] = set()

    def _cancel(pipe: int, op: _Op) -> None:
        """Cancel ``op``'s I/O if pending and wait until the kernel is done with it."""
        CancelIoEx(pipe, byref(op.ov))  # ERROR_NOT_FOUND: nothing pending, fine
        GetOverlappedResult(pipe, byref(op.ov), byref(op.count), True)

    def _run(
        op: _Op, pipe: int, deadline: float | None, wake: int, start: _Bool, *args: object
    ) -> tuple[int, int]:
        """Start overlapped I/O on ``pipe`` with ``start(pipe, *args, &op.ov)`` and see it
        end: ``(0, bytes)`` on success, ``(winerror, bytes)`` otherwise. At the deadline or
        when ``wake`` is signalled the I/O is cancelled (``ERROR_OPERATION_ABORTED``, unless
        it completed meanwhile). ``op`` stays in ``_LIMBO`` while the kernel may use it, so
        an interruption that leaves it in use leaks it instead of freeing it."""
        handles = (HANDLE * 2)(op.ov.hEvent, wake)
        _LIMBO.add(op)
        try:
            if not start(pipe, *args, byref(op.ov)):
                code = ctypes.get_last_error()
                if code != ERROR_IO_PENDING:
                    _LIMBO.discard(op)  # failed at once: nothing was queued
                    return code, 0
                while True:
                    wait = _slice_ms(deadline, monotonic())
                    got = WaitForMultipleObjects(2, handles, False, wait)
                    if got == WAIT_OBJECT_0:
                        break
                    if got == WAIT_OBJECT_0 + 1 or (
                        got == WAIT_TIMEOUT and deadline is not None and monotonic() >= deadline
                    ):
                        CancelIoEx(pipe, byref(op.ov))  # its completion is collected below
                        break
                    if got != WAIT_TIMEOUT:
                        raise _error()
            ok = GetOverlappedResult(pipe, byref(op.ov), byref(op.count), True)
            code = 0 if ok else ctypes.get_last_error()
        except BaseException:  # Ctrl+C or a failure: the kernel must let go of op first
            _cancel(pipe, op)  # interrupted again, op stays in _LIMBO: leaked, never freed
            _LIMBO.discard(op)
            raise
        _LIMBO.discard(op)
        return code, op.count.value

    # ----------------------------------------------------------------------- streams

    class _Channel:
        """One connected pipe end. DockpointConnection guards the calls against a
        ``close()`` from another thread: :meth:`wake` signals ``_wake``, which ends a
        blocked read or write, and :meth:`close` comes once no call is in flight."""

        __slots__ = ("_mutex", "_open", "_ops", "_pipe", "_wake", "_woken", "peer_pid")

        def __init__(self, pipe: int, peer_pid: int | None) -> None:
            self._pipe = pipe
            self._wake = _event()
            self.peer_pid = peer_pid
            self._ops: list[_Op] = []  # idle operations, for the next calls
            self._woken = False
            # wake() and detach() take it: an event already freed (its handle value maybe
            # reused) is never signalled, and the handles are freed once. Re-entrant: a
            # signal handler's close() may wake() while this thread holds it.
            self._mutex = RLock()
            self._open = True

        def _op(self) -> _Op:
            try:
                return self._ops.pop()
            except IndexError:
                return _Op()

        def _done(self, op: _Op) -> None:
            if op not in _LIMBO:
                op.keep = None
                self._ops.append(op)

        def __del__(self) -> None:
            # A dropped server end would keep the pipe name alive after the Dockpoint closes.
            if getattr(self, "_open", False):  # __init__ may have failed early
                self.close()

        def recv(self, max_bytes: int) -> bytes:
            return self._read(max_bytes, None, None)

        def recv_within(self, max_bytes: int, timeout: float) -> bytes:
            return self._read(max_bytes, monotonic() + timeout, timeout)

        def _read(self, max_bytes: int, deadline: float | None, timeout: float | None) -> bytes:
            op = self._op()
            try:
                op.keep = buffer = ctypes.create_string_buffer(max_bytes)
                while True:
                    code, count = _run(
                        op, self._pipe, deadline, self._wake, ReadFile, buffer, max_bytes, None
                    )
                    if code == 0:
                        if count:
                            return ctypes.string_at(buffer, count)
                        continue  # a zero-byte write by the peer is not end of stream
                    if code in _END_OF_STREAM:
                        return b""
                    if code == ERROR_OPERATION_ABORTED:
                        if self._woken:
                            raise closed_error("DockpointConnection")
                        raise TimeoutError(f"nothing to read within {timeout} s")
                    raise _error(code)
            finally:
                self._done(op)

        def send(self, data: bytes | memoryview) -> None:
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            if not size:
                return
            op = self._op()
            try:
                self._send(op, data, size)
            finally:
                self._done(op)

        def _send(self, op: _Op, data: bytes | memoryview, size: int) -> None:
            # The kernel reads straight from ``data`` where ctypes can point at it: bytes
            # (c_char_p points into the object) and writable contiguous views.
            view = None
            keep: object
            if isinstance(data, bytes):
                keep = ctypes.c_char_p(data)
                base = ctypes.cast(keep, c_void_p).value or 0
            elif not data.readonly and data.c_contiguous:
                keep = array = (ctypes.c_char * size).from_buffer(data)
                base = ctypes.addressof(array)
            else:  # read-only or strided: copied one chunk at a time
                view, base = data, 0
            offset = 0
            while offset < size:
                length = min(size - offset, _WRITE_CHUNK)
                address = base + offset
                if view is not None:
                    keep = ctypes.c_char_p(view[offset : offset + length].tobytes())
                    address = ctypes.cast(keep, c_void_p).value or 0
                op.keep = keep  # the buffer lives as long as op if the kernel keeps it
                code, count = _run(
                    op, self._pipe, None, self._wake, WriteFile, address, length, None
                )
                if code == 0 and count:
                    offset += count
                elif code in _END_OF_STREAM:
                    raise BrokenPipeError(errno.EPIPE, "the peer closed the connection")
                elif code == ERROR_OPERATION_ABORTED and self._woken:
                    raise closed_error("DockpointConnection")
                else:
                    raise _error(code)

        def wake(self) -> None:
            with self._mutex:
                if self._open:
                    self._woken = True
                    SetEvent(self._wake)

        def close(self) -> None:
            pipe = self.detach()
            if pipe:
                CloseHandle(pipe)

        fileno = no_fileno  # a named pipe cannot be selected

        def detach(self) -> int:
            """Hand the pipe handle over (to an event loop's transport), freeing the rest;
            0 if that was done already."""
            with self._mutex:
                if not self._open:
                    return 0
                self._open = False
            for op in self._ops:
                op.close()
            self._ops.clear()
            CloseHandle(self._wake)
            return self._pipe

    class _Listener:
        """The claimed pipe and its lock file.

        ``_free`` is the listening instance (``None`` only while its waiter holds it or
        after a failure, when the next ``accept`` makes one). ``_turn`` is held by the one
        thread that waits in ``ConnectNamedPipe``; the others wait for the turn. A wait
        that ends puts the instance back still listening, so a client that connected
        meanwhile is served by the next ``accept``, never closed.
        """

        __slots__ = (
            "_attributes", "_descriptor", "_free", "_lock", "_mutex", "_name", "_turn",
            "_wake", "_woken",
        )  # fmt: skip

        def __init__(
            self,
            name: str,
            attributes: SECURITY_ATTRIBUTES,
            descriptor: int,
            first: int,
            lock: int,
        ) -> None:
            self._name = name
            self._attributes = attributes
            self._descriptor = descriptor
            self._lock = lock
            self._wake = _event()
            self._free: int | None = first
            self._woken = False
            self._mutex = RLock()  # re-entrant: a signal handler's close() may wake()
            self._turn = allocate_lock()

        def accept(self, timeout: float | None) -> _Channel | None:
            deadline = None if timeout is None else monotonic() + timeout
            turn = False
            try:
                turn = self._take_turn(deadline)
                pipe = self._wait_for_client(deadline) if turn else None
            finally:
                if turn:
                    self._turn.release()
            if pipe is not None:
                try:
                    return _Channel(pipe, _pipe_pid(GetNamedPipeClientProcessId, pipe))
                except BaseException:
                    CloseHandle(pipe)
                    raise
            if self._woken:
                return None
            raise TimeoutError(f"no client arrived within {timeout} s")

        def _take_turn(self, deadline: float | None) -> bool:
            """Wait (in slices, for Ctrl+C and ``close()``) to be the one waiting thread."""
            while not self._woken:
                wait = _slice_ms(deadline, monotonic())
                if self._turn.acquire(True, wait / 1000):
                    return True
                if not wait:
                    break
            return False

        def _wait_for_client(self, deadline: float | None) -> int | None:
            """With the turn: the instance a client connected to, or ``None`` (timeout or
            wake); the pool again holds a listening instance either way."""
            with self._mutex:
                pipe, self._free = self._free, None
            try:
                if pipe is None:
                    pipe = _instance(self._name, self._attributes)
                code = self._connect(pipe, deadline)
                if code in _CONNECTED:
                    # ERROR_PIPE_CONNECTED: the client came before ConnectNamedPipe.
                    # ERROR_NO_DATA: it came and closed already; it may have written first
                    # (CPython bpo-14725), so it is handed out like POSIX hands out a
                    # connected-then-closed socket. The next client's instance is made
                    # first: Ctrl+C meanwhile puts this one, client and all, back in the
                    # pool for the next accept instead of losing it.
                    spare = self._spare()
                    with self._mutex:
                        self._free, got, pipe = spare, pipe, None
                    return got
                if code != ERROR_OPERATION_ABORTED:
                    failed, pipe = pipe, None  # its state is unknown: never back in the pool
                    CloseHandle(failed)
                    spare = self._spare()  # a fresh listening instance takes its place
                    with self._mutex:
                        self._free = spare
                    raise _error(code, self._name)
                return None
            finally:  # also on Ctrl+C: a cancelled instance still listens, keep it
                if pipe is not None:
                    with self._mutex:
                        self._free = pipe

        def _spare(self) -> int | None:
            """A new listening instance for the next client, or ``None`` if none can be
            made now (the next accept makes one; the lock keeps the claim meanwhile)."""
            try:
                return _instance(self._name, self._attributes)
            except OSError:
                return None

        def _connect(self, pipe: int, deadline: float | None) -> int:
            """Wait for a client on ``pipe``; the ``ConnectNamedPipe`` result code."""
            op = _Op()
            try:
                code, _ = _run(op, pipe, deadline, self._wake, ConnectNamedPipe)
            finally:
                op.close()
            return code

        def wake(self) -> None:
            with self._mutex:  # a second close() may wake after the first freed the event
                self._woken = True
                if self._wake:
                    SetEvent(self._wake)

        def close(self) -> None:
            # Only called once no thread is in accept() (the shared Dockpoint ensures it).
            self.forget()
            self.let_go()  # the pipe is gone first: then the claim (no pid: "absent")

        def forget(self) -> None:
            """After the hand-over's spawn: drop this process's copies of the pipe instance
            (the daemon has its own) but keep the lock handle, whose locks the daemon cannot
            inherit, until :meth:`let_go`."""
            with self._mutex:
                pipe, self._free = self._free, None
                wake, self._wake = self._wake, 0
            if pipe is not None:
                CloseHandle(pipe)
            CloseHandle(wake)
            LocalFree(self._descriptor)

        def let_go(self) -> None:
            """Release the claim once the daemon holds the hand-over range (or has died)."""
            lock, self._lock = self._lock, 0
            if lock:
                _empty_lock(lock)
                _release_lock(lock)

        fileno = no_fileno  # a named pipe cannot be selected

        def handles(self) -> tuple[int, int]:
            # A LockFileEx lock belongs to the file object *and the process* that took it:
            # the daemon inherits the handle but not the locks, and takes them itself
            # (see _adopt); the pipe instance it inherits keeps listening meanwhile.
            if self._free is None or not self._lock:
                raise OSError(errno.EBADF, "the claimed endpoint has no free pipe instance")
            return self._free, self._lock

    # ----------------------------------------------------------------------- backend

    # ----------------------------------------------------------------------- hand-over

    def _handle_name(handle: int) -> str | None:
        """The name an open pipe reports, relative to the pipe file system."""
        buffer = ctypes.create_string_buffer(4 + 2 * 1024)  # FILE_NAME_INFO
        if not GetFileInformationByHandleEx(handle, FileNameInfo, buffer, len(buffer)):
            return None
        length = int.from_bytes(buffer.raw[:4], "little")
        return buffer.raw[4 : 4 + length].decode("utf-16-le", "replace")

    def _final_path(handle: int) -> str | None:
        buffer = ctypes.create_unicode_buffer(1024)
        count = GetFinalPathNameByHandleW(handle, buffer, len(buffer), 0)
        return buffer.value if 0 < count < len(buffer) else None

    def _our_pipe(handle: int, name: str, user: str) -> bool:
        """Whether ``handle`` is a server end of the pipe ``name``, owned by ``user``."""
        if GetFileType(handle) != FILE_TYPE_PIPE:
            return False
        flags = DWORD()
        if not GetNamedPipeInfo(handle, byref(flags), None, None, None):
            return False
        reported = _handle_name(handle)
        return (
            bool(flags.value & PIPE_SERVER_END)
            and reported is not None
            and reported.casefold() == _pipe_file_name(name).casefold()
            and _pipe_owner(handle) == user
        )

    def _our_lock(handle: int, path: str) -> bool:
        """Whether ``handle`` is the lock file ``path`` and someone (the frontend that
        spawned us) holds its claim range."""
        if GetFileType(handle) != FILE_TYPE_DISK:
            return False
        final = _final_path(handle)
        if final is None or not _same_file(final, path):
            return False
        code = _try_lock(handle, _CLAIM_RANGE, LOCKFILE_EXCLUSIVE_LOCK)
        if not code:
            _unlock(handle, _CLAIM_RANGE)  # nobody holds it: not a hand-over in progress
        return code == ERROR_LOCK_VIOLATION

    def _tell(handle: int, what: bytes) -> bool:
        """Write ``what`` to the frontend's readiness pipe; ``False`` if it is gone."""
        count = DWORD()
        return bool(WriteFile(handle, what, len(what), byref(count), None))

    def _adopt(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
        """Adopt the pipe instance and lock file handed over in the environment.

        The frontend holds the claim and alive ranges; this process takes the hand-over
        range, tells the frontend (``h`` on the readiness pipe), which then lets go, takes
        the claim and alive ranges through its inherited handle of the same lock file,
        lets go of the hand-over range and writes ``+``. A claimer that wins the claim range
        meanwhile sees the hand-over range held and gives the claim back.
        """
        fields = take_handover(stem)
        if fields is None:
            return None
        pipe, lock, ready, stderr = fields
        user = _user_sid()
        name = _pipe_path(user, stem)
        _, path = _lock_path(os.environ.get("LOCALAPPDATA"), stem)
        if not _our_pipe(pipe, name, user) or not _our_lock(lock, path):
            return None  # not this endpoint, or no claim being handed over: claim anew
        deadline = monotonic() + _HANDOVER_WAIT
        if not _wait_lock(lock, _HANDOVER_RANGE, deadline):
            _give_up((pipe, lock, ready))
            return None
        told = GetFileType(ready) == FILE_TYPE_PIPE and _tell(ready, b"h")
        attributes = descriptor = None
        claimed = False
        try:
            # Once told, the frontend lets go; if it died, the claim range is free already.
            if not _wait_lock(lock, _CLAIM_RANGE, deadline):
                _unlock(lock, _HANDOVER_RANGE)
                _give_up((pipe, lock, ready))
                return None  # another holder: the next claim attempt answers None
            claimed = True
            _lock_alive(lock, path)
            _unlock(lock, _HANDOVER_RANGE)
            _write_lock(lock, lock_text(os.getpid(), info), path)
            attributes, descriptor = _security(user)
            os.set_handle_inheritable(pipe, False)  # our own children inherit nothing
            os.set_handle_inheritable(lock, False)
        except BaseException:
            if descriptor is not None:
                LocalFree(descriptor)
            _unlock(lock, _HANDOVER_RANGE)
            if claimed:  # unlocking a range not held is a harmless failure
                _unlock(lock, _ALIVE_RANGE)
                _unlock(lock, _CLAIM_RANGE)
            raise
        listener = _Listener(name, attributes, descriptor, pipe, lock)
        if told:
            _ready(ready, stderr)
        return listener, name

    def _give_up(handles: tuple[int, int, int]) -> None:
        """Close a verified hand-over's handles that could not be taken over: our children
        must not inherit them, and the frontend reads end of file (not adopted)."""
        for handle in handles:
            CloseHandle(handle)

    def _ready(ready: int, stderr: str) -> None:
        """Tell the frontend the endpoint is adopted; stop its early-stderr capture."""
        if stderr == "pipe":  # standard error is the frontend's capture pipe, closed soon
            if sys.stderr is not None:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)  # the C runtime points STD_ERROR_HANDLE at it too
                os.close(null)
            except OSError:
                pass
        _tell(ready, b"+")
        CloseHandle(ready)

    class _Backend:
        adopt = staticmethod(_adopt)
        inspect = staticmethod(_inspect)
        holds = staticmethod(_holds)

        @staticmethod
        def ask_to_exit(pid: int) -> None:
            # A detached daemon has no console (no Ctrl+Break) and usually no window (no
            # WM_CLOSE): TerminateProcess, 15 (SIGTERM) as its exit code.
            os.kill(pid, 15)

        @staticmethod
        def locate(stem: str) -> str:
            return _pipe_path(_user_sid(), stem)

        @staticmethod
        def listen(stem: str, info: str | None = None) -> tuple[_Listener, str] | None:
            user = _user_sid()
            name = _pipe_path(user, stem)
            text = lock_text(os.getpid(), info)
            directory, path = _lock_path(os.environ.get("LOCALAPPDATA"), stem)
            _lock_directory(user, directory)
            lock = first = descriptor = None
            try:
                lock = _take_lock(path)
                if lock is None:
                    return None  # someone holds the claim
                attributes, descriptor = _security(user)
                first = _first_instance(name, attributes, user)
                _write_lock(lock, text, path)
                return _Listener(name, attributes, descriptor, first, lock), name
            except BaseException:
                if first is not None:
                    CloseHandle(first)
                if descriptor is not None:
                    LocalFree(descriptor)
                if lock is not None:
                    _release_lock(lock)
                raise

        @staticmethod
        def dial(stem: str, timeout: float | None) -> _Channel | None:
            user = _user_sid()
            name = _pipe_path(user, stem)
            deadline = None if timeout is None else monotonic() + timeout
            idle = 0.0  # seconds waited in vain since an instance last came free
            while True:
                pipe = CreateFileW(
                    name, GENERIC_READ | GENERIC_WRITE, 0, None, OPEN_EXISTING, _DIAL_FLAGS, None
                )
                if pipe != INVALID_HANDLE_VALUE and pipe:
                    break
                code = ctypes.get_last_error()
                if code == ERROR_FILE_NOT_FOUND:
                    return None
                if code == ERROR_ACCESS_DENIED:  # the DACL or integrity label keeps us out
                    raise PermissionError(
                        errno.EACCES,
                        "the endpoint exists but this process may not open it: it belongs to "
                        "another user, or to a process of higher integrity level",
                        name,
                    )
                if code != ERROR_PIPE_BUSY:
                    raise _error(code, name)
                # Every instance is serving a client. With a live holder, wait for a free
                # instance (in slices, for Ctrl+C); without one nobody will free them. A
                # single attempt waits while the holder makes progress: it gives up once
                # it has waited BUSY_GRACE seconds in vain (a hung daemon). Only time spent
                # in the wait counts, so a thread kept from running misses no progress.
                if _held(stem) is False:
                    return None
                if deadline is None:
                    wait = _slice_ms(BUSY_GRACE - idle, 0.0)
                else:
                    wait = _slice_ms(deadline, monotonic())
                if not wait:
                    return None  # timed out, or the holder freed nothing: Api.connect says None
                # 0 would mean "the server's default"; a failure other than the timeout
                # (the pipe went or changed) means: open again, that answer decides.
                if WaitNamedPipeW(name, wait):
                    idle = 0.0
                else:
                    idle += wait / 1000
                    if ctypes.get_last_error() != ERROR_SEM_TIMEOUT:
                        sleep(0.001)
            try:
                server = _pipe_pid(GetNamedPipeServerProcessId, pipe)
                owner = _pipe_owner(pipe)
                server_user = None
                if owner != user and server is not None:
                    server_user = _process_user(server)
                if not _trusted(user, owner, server_user):
                    raise PermissionError(
                        errno.EACCES,
                        f"the endpoint is served by another user (pipe owner {owner}, server "
                        f"process {server} of user {server_user}), not by this user ({user})",
                        name,
                    )
                level = _pipe_integrity(pipe)
                if not _integrity_trusted(level):
                    raise PermissionError(
                        errno.EACCES,
                        f"the endpoint was made by a process below Medium integrity (label "
                        f"S-1-16-{level}): a sandboxed process squats the name",
                        name,
                    )
                return _Channel(pipe, server)
            except BaseException:
                CloseHandle(pipe)
                raise

    backend = _Backend()
