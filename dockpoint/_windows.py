"""Windows backend: a named pipe scoped to the user's SID, claimed by its first instance.

Where: ``\\\\.\\pipe\\dockpoint-<user SID>-<app>@<instance>``. Windows compares pipe names
case-insensitively, so names that differ only in case would meet anyway; dockpoint lower-cases
``app_name`` and ``instance`` on every platform (see :func:`dockpoint._common.endpoint_stem`),
so ``"MyApp"`` and ``"myapp"`` are one endpoint on Windows and POSIX alike. A pipe name is at
most 256 characters; a longer one is a ``ValueError``.

Claim: creating the first instance with ``FILE_FLAG_FIRST_PIPE_INSTANCE`` is atomic; losing
that race (``ERROR_ACCESS_DENIED``) means someone holds the claim. (A side-effect-free
``WaitNamedPipeW`` probe first returns ``None`` early when the name exists; it decides no race,
but it lets Wine, which ignores the flag, refuse a claim made while another is held.) The claim
lasts while any server instance of the pipe is open: the listening ones, and also the
connections the holder accepted. So, unlike POSIX, a holder that closes its ``Dockpoint``
still blocks the next claim (and makes clients wait) until it has closed the connections it
accepted too. A crashed holder's instances die with it.

Accept: one listening instance is always free for the next client, also between ``accept``
calls (a client that connects then is served by the next ``accept``); a client that finds
every instance busy waits for one with ``WaitNamedPipeW``. A client that connected, wrote
and closed before ``accept`` (``ERROR_NO_DATA``) is still handed out, as POSIX hands out
such a socket: its data can be read, then end of stream.

Security: the pipe's owner is the user's SID and its protected DACL has one entry, full
access for that SID (the instances after the first need ``FILE_CREATE_PIPE_INSTANCE``).
SYSTEM and Administrators are deliberately not listed: they are other users here, and an
administrator who wants in can take ownership anyway; an elevated process of the *same* user
carries the user's SID and is admitted. Processes below Medium integrity (sandboxes) are
kept out by the implicit Medium label. ``PIPE_REJECT_REMOTE_CLIENTS`` keeps the network out.
Clients open the pipe with ``SECURITY_IDENTIFICATION`` (the daemon cannot impersonate them)
and trust the server only if the pipe's owner is their own SID or, failing that, the server
process's token user is: a pipe squatter of another user gets ``PermissionError``, an
elevated daemon of the same user does not. A server written in another language must set
the owner the same way (or run as the user) to be trusted.

I/O is overlapped and waited on in slices of at most 100 ms together with a wake event, so
``timeout=``, ``close()`` from another thread and Ctrl+C all end a wait; a cancelled
operation is always waited for before its ``OVERLAPPED`` and buffer are released.
"""

from __future__ import annotations

import errno
import sys
from _thread import allocate_lock
from time import monotonic

from ._common import Api, DockpointClosedError, no_fileno, pipe_name

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

    _Bool = Callable[..., int]  # BOOL and DWORD results
    _Handle = Callable[..., "int | None"]  # HANDLE and pointer results

# --------------------------------------------------------------------------- SDK constants

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997

GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
FILE_FLAG_OVERLAPPED = 0x40000000
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 1 << 16  # SecurityIdentification << 16
PIPE_ACCESS_DUPLEX = 0x00000003
PIPE_TYPE_BYTE = 0x00000000
PIPE_READMODE_BYTE = 0x00000000
PIPE_WAIT = 0x00000000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
PIPE_UNLIMITED_INSTANCES = 255
TOKEN_QUERY = 0x0008
TokenUser = 1
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
SDDL_REVISION_1 = 1
SE_KERNEL_OBJECT = 6
OWNER_SECURITY_INFORMATION = 0x00000001
WAIT_OBJECT_0 = 0x00000000
WAIT_TIMEOUT = 0x00000102

#: Longest pipe name Windows accepts, ``\\.\pipe\`` included.
PIPE_NAME_MAX = 256
_OPEN_MODE = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED
_PIPE_MODE = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS
_DIAL_FLAGS = FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION
_BUFFER = 65536  # pipe buffer quota each way; advisory, the kernel grows it as needed
_WRITE_CHUNK = 1 << 20  # one WriteFile at most; also bounds the copy of a read-only view
_SLICE_MS = 100  # longest uninterrupted wait, so Ctrl+C is noticed promptly
#: Errors that mean the peer has closed its end: ``read`` returns ``b""``.
_END_OF_STREAM = frozenset({ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, ERROR_NO_DATA})
#: ``CreateNamedPipeW`` errors for a first instance that mean "someone holds the claim".
_CLAIMED = frozenset({ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY})


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


def _sddl(user_sid: str) -> str:
    """The pipe's security descriptor: owned by ``user_sid``, a protected DACL that grants
    only ``user_sid`` full access (no inherited entries, no SYSTEM, no Administrators)."""
    parts = user_sid.split("-")
    if len(parts) < 3 or parts[0] != "S" or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        raise ValueError(f"not a string SID: {user_sid!r}")
    return f"O:{user_sid}D:P(A;;GA;;;{user_sid})"


def _trusted(user_sid: str, owner_sid: str | None, server_user_sid: str | None) -> bool:
    """Whether a client trusts the pipe server.

    The owner is the strong signal: only the user (or someone with SeRestorePrivilege) can
    make the user's SID the owner. The server process's token user is the fallback for
    servers that leave the owner at a group (an elevated process's default owner is
    Administrators) yet run as the user; an elevated dockpoint daemon sets the owner to
    the user, so it passes either way.
    """
    return user_sid in (owner_sid, server_user_sid)


def _slice_ms(deadline: float | None, now: float) -> int:
    """Milliseconds for the next wait: at most ``_SLICE_MS``, rounded up, never negative."""
    if deadline is None:
        return _SLICE_MS
    left = deadline - now
    if left <= 0:
        return 0
    return min(_SLICE_MS, int(-(-left * 1000 // 1)))


def _wine_version() -> str | None:
    """Wine's version when running under Wine (``ntdll.wine_get_version``), else ``None``."""
    if sys.platform != "win32":
        return None
    import ctypes

    try:
        get = ctypes.WinDLL("ntdll").wine_get_version
    except (OSError, AttributeError):
        return None
    get.argtypes = []
    get.restype = ctypes.c_char_p
    version: bytes | None = get()
    return (version or b"").decode("ascii", "replace")


def _closed_error() -> DockpointClosedError:
    return DockpointClosedError(errno.EBADF, "DockpointConnection is closed")


# --------------------------------------------------------------------------- Win32

if sys.platform == "win32":
    import ctypes
    from ctypes import POINTER, byref, c_size_t, c_void_p
    from ctypes.wintypes import BOOL, DWORD, HANDLE, LPCWSTR, LPDWORD, LPVOID, ULONG

    ULONG_PTR = c_size_t
    # Pointers that the API hands out and LocalFree takes back are kept as plain addresses.
    PSID = PACL = PSECURITY_DESCRIPTOR = HLOCAL = LPWSTR_OUT = c_void_p

    class OVERLAPPED(ctypes.Structure):
        _fields_ = (  # the Offset/Pointer union is left as its Offset half: same size
            ("Internal", ULONG_PTR),
            ("InternalHigh", ULONG_PTR),
            ("Offset", DWORD),
            ("OffsetHigh", DWORD),
            ("hEvent", HANDLE),
        )

    class SECURITY_ATTRIBUTES(ctypes.Structure):
        _fields_ = (
            ("nLength", DWORD),
            ("lpSecurityDescriptor", LPVOID),
            ("bInheritHandle", BOOL),
        )

    LPOVERLAPPED = POINTER(OVERLAPPED)
    LPSECURITY_ATTRIBUTES = POINTER(SECURITY_ATTRIBUTES)
    INVALID_HANDLE_VALUE = c_void_p(-1).value

    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)

    def _declare(dll: ctypes.WinDLL, name: str, restype: object, *argtypes: object) -> Any:
        function = getattr(dll, name)
        function.restype = restype
        function.argtypes = argtypes
        return function

    _k, _a = _kernel32, _advapi32
    # fmt: off
    CloseHandle: _Bool = _declare(_k, "CloseHandle", BOOL, HANDLE)
    CreateEventW: _Handle = _declare(
        _k, "CreateEventW", HANDLE, LPSECURITY_ATTRIBUTES, BOOL, BOOL, LPCWSTR)
    SetEvent: _Bool = _declare(_k, "SetEvent", BOOL, HANDLE)
    WaitForMultipleObjects: _Bool = _declare(
        _k, "WaitForMultipleObjects", DWORD, DWORD, POINTER(HANDLE), BOOL, DWORD)
    CreateNamedPipeW: _Handle = _declare(
        _k, "CreateNamedPipeW", HANDLE,
        LPCWSTR, DWORD, DWORD, DWORD, DWORD, DWORD, DWORD, LPSECURITY_ATTRIBUTES)
    ConnectNamedPipe: _Bool = _declare(_k, "ConnectNamedPipe", BOOL, HANDLE, LPOVERLAPPED)
    DisconnectNamedPipe: _Bool = _declare(_k, "DisconnectNamedPipe", BOOL, HANDLE)
    CreateFileW: _Handle = _declare(
        _k, "CreateFileW", HANDLE,
        LPCWSTR, DWORD, DWORD, LPSECURITY_ATTRIBUTES, DWORD, DWORD, HANDLE)
    WaitNamedPipeW: _Bool = _declare(_k, "WaitNamedPipeW", BOOL, LPCWSTR, DWORD)
    ReadFile: _Bool = _declare(
        _k, "ReadFile", BOOL, HANDLE, LPVOID, DWORD, LPDWORD, LPOVERLAPPED)
    WriteFile: _Bool = _declare(  # lpBuffer is LPCVOID; c_void_p takes an int address
        _k, "WriteFile", BOOL, HANDLE, LPVOID, DWORD, LPDWORD, LPOVERLAPPED)
    GetOverlappedResult: _Bool = _declare(
        _k, "GetOverlappedResult", BOOL, HANDLE, LPOVERLAPPED, LPDWORD, BOOL)
    CancelIoEx: _Bool = _declare(_k, "CancelIoEx", BOOL, HANDLE, LPOVERLAPPED)
    GetNamedPipeClientProcessId: _Bool = _declare(
        _k, "GetNamedPipeClientProcessId", BOOL, HANDLE, POINTER(ULONG))
    GetNamedPipeServerProcessId: _Bool = _declare(
        _k, "GetNamedPipeServerProcessId", BOOL, HANDLE, POINTER(ULONG))
    GetCurrentProcess: _Bool = _declare(_k, "GetCurrentProcess", HANDLE)  # -1, never NULL
    OpenProcess: _Handle = _declare(_k, "OpenProcess", HANDLE, DWORD, BOOL, DWORD)
    LocalFree: _Handle = _declare(_k, "LocalFree", HLOCAL, HLOCAL)
    OpenProcessToken: _Bool = _declare(
        _a, "OpenProcessToken", BOOL, HANDLE, DWORD, POINTER(HANDLE))
    GetTokenInformation: _Bool = _declare(  # TOKEN_INFORMATION_CLASS is a C enum
        _a, "GetTokenInformation", BOOL, HANDLE, ctypes.c_int, LPVOID, DWORD, LPDWORD)
    ConvertSidToStringSidW: _Bool = _declare(
        _a, "ConvertSidToStringSidW", BOOL, PSID, POINTER(LPWSTR_OUT))
    ConvertStringSecurityDescriptorToSecurityDescriptorW: _Bool = _declare(
        _a, "ConvertStringSecurityDescriptorToSecurityDescriptorW", BOOL,
        LPCWSTR, DWORD, POINTER(PSECURITY_DESCRIPTOR), POINTER(ULONG))
    GetSecurityInfo: _Bool = _declare(  # returns the error code, sets no last error
        _a, "GetSecurityInfo", DWORD,
        HANDLE, ctypes.c_int, DWORD, POINTER(PSID), POINTER(PSID), POINTER(PACL),
        POINTER(PACL), POINTER(PSECURITY_DESCRIPTOR))
    # fmt: on

    # ----------------------------------------------------------------------- helpers

    def _error(code: int | None = None, filename: str | None = None) -> OSError:
        """The ``OSError`` (subclass chosen from the Windows error code) for ``code``,
        default the calling thread's last error."""
        if code is None:
            code = ctypes.get_last_error()
        error = ctypes.WinError(code)
        if filename is not None:  # same subclass: errno is derived from winerror
            error = OSError(None, error.strerror, filename, code)
        return error

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

    def _pipe_pid(query: _Bool, pipe: int) -> int | None:
        pid = ULONG()
        return pid.value if query(pipe, byref(pid)) else None

    def _security(user_sid: str) -> tuple[SECURITY_ATTRIBUTES, int]:
        """Security attributes for the pipe (not inheritable) and the descriptor to
        ``LocalFree`` when done."""
        descriptor = c_void_p()
        ok = ConvertStringSecurityDescriptorToSecurityDescriptorW(
            _sddl(user_sid), SDDL_REVISION_1, byref(descriptor), None
        )
        _check(ok)
        attributes = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), descriptor, False)
        return attributes, descriptor.value  # type: ignore[return-value]

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

    def _exists(name: str) -> bool:
        """Whether the pipe ``name`` exists, without connecting to it. Not atomic (the
        first-instance flag decides races); it gives the same answer the flag would, and
        Wine, which ignores that flag, thereby refuses at least a claim made later."""
        if WaitNamedPipeW(name, 1):  # 1 ms: 0 would mean the server's default wait
            return True
        return ctypes.get_last_error() != ERROR_FILE_NOT_FOUND

    class _Op:
        """An ``OVERLAPPED`` with its own event, for one operation at a time."""

        __slots__ = ("count", "ov")

        def __init__(self) -> None:
            self.ov = OVERLAPPED()
            self.ov.hEvent = _event()
            self.count = DWORD()

        def close(self) -> None:
            CloseHandle(self.ov.hEvent)

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
        it completed meanwhile)."""
        handles = (HANDLE * 2)(op.ov.hEvent, wake)
        try:
            if not start(pipe, *args, byref(op.ov)):
                code = ctypes.get_last_error()
                if code != ERROR_IO_PENDING:
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
        except BaseException:  # Ctrl+C or a failure: the kernel must let go of op first
            _cancel(pipe, op)
            raise
        if GetOverlappedResult(pipe, byref(op.ov), byref(op.count), True):
            return 0, op.count.value
        return ctypes.get_last_error(), op.count.value

    # ----------------------------------------------------------------------- streams

    class _Channel:
        """One connected pipe end. The handle and events are freed by whoever leaves last:
        ``close()`` from another thread only signals ``_wake``, so a blocked read or write
        ends and no thread ever uses a closed (maybe reused) handle value."""

        __slots__ = ("_busy", "_closed", "_mutex", "_ops", "_pipe", "_wake", "peer_pid")

        def __init__(self, pipe: int, peer_pid: int | None) -> None:
            self._pipe = pipe
            self._wake = _event()
            self.peer_pid = peer_pid
            self._mutex = allocate_lock()
            self._ops: list[_Op] = []
            self._busy = 0
            self._closed = False

        def _enter(self) -> _Op:
            with self._mutex:
                if self._closed:
                    raise _closed_error()
                self._busy += 1
                op = self._ops.pop() if self._ops else None
            if op is None:
                try:
                    op = _Op()
                except BaseException:
                    self._leave(None)
                    raise
            return op

        def _leave(self, op: _Op | None) -> None:
            with self._mutex:
                self._busy -= 1
                if op is not None:
                    self._ops.append(op)
                if not self._closed or self._busy:
                    return
            self._release()

        def __del__(self) -> None:
            # A dropped server end would keep the pipe name alive after the Dockpoint closes.
            if not getattr(self, "_closed", True):  # __init__ may have failed early
                self.close()

        def _release(self) -> None:
            for op in self._ops:
                op.close()
            self._ops.clear()
            CloseHandle(self._wake)
            CloseHandle(self._pipe)

        def recv(self, max_bytes: int, timeout: float | None) -> bytes:
            deadline = None if timeout is None else monotonic() + timeout
            op = self._enter()
            try:
                buffer = ctypes.create_string_buffer(max_bytes)
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
                        if self._closed:
                            raise _closed_error()
                        raise TimeoutError(f"nothing to read within {timeout} s")
                    raise _error(code)
            finally:
                self._leave(op)

        def send(self, data: bytes | memoryview) -> None:
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            if not size:
                return
            op = self._enter()
            try:
                self._send(op, data, size)
            finally:
                self._leave(op)

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
                code, count = _run(
                    op, self._pipe, None, self._wake, WriteFile, address, length, None
                )
                if code == 0 and count:
                    offset += count
                elif code in _END_OF_STREAM:
                    raise BrokenPipeError(errno.EPIPE, "the peer closed the connection")
                elif code == ERROR_OPERATION_ABORTED and self._closed:
                    raise _closed_error()
                else:
                    raise _error(code)
            del keep  # the buffer may go only now

        def close(self) -> None:
            with self._mutex:
                if self._closed:
                    return
                self._closed = True
                if self._busy:  # the last thread out releases; under the mutex: it may not yet
                    SetEvent(self._wake)
                    return
            self._release()

        fileno = no_fileno  # a named pipe cannot be selected

        def detach(self) -> int:
            """Hand the pipe handle over (to an event loop's transport), closing the rest."""
            with self._mutex:
                if self._closed or self._busy:
                    raise _closed_error()
                self._closed = True
            for op in self._ops:
                op.close()
            self._ops.clear()
            CloseHandle(self._wake)
            return self._pipe

    class _Listener:
        """The claimed pipe. Invariant: while no thread is in ``accept`` the pool ``_free``
        holds a listening instance, and while some are, each waits on its own instance;
        so a client always finds an instance (or waits for one) and the name stays ours."""

        __slots__ = (
            "_attributes", "_descriptor", "_free", "_mutex", "_name", "_waiting", "_wake",
            "_woken",
        )  # fmt: skip

        def __init__(
            self, name: str, attributes: SECURITY_ATTRIBUTES, descriptor: int, first: int
        ) -> None:
            self._name = name
            self._attributes = attributes
            self._descriptor = descriptor
            self._wake = _event()
            self._free = [first]
            self._waiting = 0
            self._woken = False
            self._mutex = allocate_lock()

        def accept(self, timeout: float | None) -> _Channel | None:
            deadline = None if timeout is None else monotonic() + timeout
            with self._mutex:
                pipe = self._free.pop() if self._free else None
                self._waiting += 1
            connected = False
            try:
                if pipe is None:
                    pipe = _instance(self._name, self._attributes)
                connected = self._connect(pipe, deadline)
            finally:  # also on Ctrl+C, which can land between any two calls here
                self._settle(pipe, connected)
            if connected:
                try:
                    return _Channel(pipe, _pipe_pid(GetNamedPipeClientProcessId, pipe))
                except BaseException:
                    CloseHandle(pipe)
                    raise
            if self._woken:
                return None
            raise TimeoutError(f"no client arrived within {timeout} s")

        def _connect(self, pipe: int, deadline: float | None) -> bool:
            """Wait for a client on ``pipe``: ``True`` connected, ``False`` cancelled."""
            op = _Op()
            try:
                code, _ = _run(op, pipe, deadline, self._wake, ConnectNamedPipe)
            finally:
                op.close()
            # ERROR_PIPE_CONNECTED: the client came before ConnectNamedPipe. ERROR_NO_DATA:
            # it came and closed already; it may have written first (CPython bpo-14725),
            # so it is handed out like POSIX hands out a connected-then-closed socket.
            if code in (0, ERROR_PIPE_CONNECTED, ERROR_NO_DATA):
                return True
            if code == ERROR_OPERATION_ABORTED:
                return False
            DisconnectNamedPipe(pipe)  # state unknown: ConnectNamedPipe can start afresh
            raise _error(code, self._name)

        def _settle(self, pipe: int | None, connected: bool) -> None:
            """Leave ``accept``: keep exactly the listening instance(s) the invariant needs."""
            with self._mutex:
                self._waiting -= 1
                needed = not self._waiting and not self._free
                if connected:
                    if needed:  # the next client's instance exists before this one is handed out
                        try:
                            spare = _instance(self._name, self._attributes)
                        except BaseException:
                            DisconnectNamedPipe(pipe)  # drop this client, keep the name served
                            self._free.append(pipe)  # type: ignore[arg-type]
                            raise
                        self._free.append(spare)
                elif pipe is not None:
                    if needed:
                        self._free.append(pipe)
                    else:
                        CloseHandle(pipe)

        def wake(self) -> None:
            self._woken = True
            SetEvent(self._wake)

        def close(self) -> None:
            # Only called once no thread is in accept() (the shared Dockpoint ensures it).
            for pipe in self._free:
                CloseHandle(pipe)
            self._free.clear()
            CloseHandle(self._wake)
            LocalFree(self._descriptor)

        forget = close  # only reached after os.fork(), which Windows does not have
        fileno = no_fileno  # a named pipe cannot be selected

    # ----------------------------------------------------------------------- backend

    class _Backend:
        @staticmethod
        def locate(stem: str) -> str:
            return _pipe_path(_user_sid(), stem)

        @staticmethod
        def listen(stem: str) -> tuple[_Listener, str] | None:
            user = _user_sid()
            name = _pipe_path(user, stem)
            if _exists(name):
                return None
            attributes, descriptor = _security(user)
            first = None
            try:
                first = _instance(name, attributes, first=True)
                return _Listener(name, attributes, descriptor, first), name
            except BaseException as error:
                if first is not None:
                    CloseHandle(first)
                LocalFree(descriptor)
                if first is None and isinstance(error, OSError) and error.winerror in _CLAIMED:
                    return None  # the name exists: someone holds the claim
                raise

        @staticmethod
        def dial(stem: str, timeout: float | None) -> _Channel | None:
            user = _user_sid()
            name = _pipe_path(user, stem)
            deadline = None if timeout is None else monotonic() + timeout
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
                # Every instance is serving a client: the daemon is up, so wait for a free
                # instance (in slices, for Ctrl+C) rather than report nobody.
                wait = _slice_ms(deadline, monotonic())
                if not wait:
                    return None  # timed out; Api.connect reports None
                if not WaitNamedPipeW(name, wait):  # 0 would mean "the server's default"
                    code = ctypes.get_last_error()
                    if code == ERROR_FILE_NOT_FOUND:
                        return None  # the daemon went away meanwhile
                    if code != ERROR_SEM_TIMEOUT:
                        raise _error(code, name)
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
                return _Channel(pipe, server)
            except BaseException:
                CloseHandle(pipe)
                raise

    api = Api(_Backend())
