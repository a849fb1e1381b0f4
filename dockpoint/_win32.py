"""Win32 declarations for the Windows backend: SDK constants, structures, and one
``argtypes``/``restype`` line per function, under their SDK names.

The constants import on every OS (the pure logic and its tests use them); the bindings exist
only on Windows. Every DLL is loaded with ``use_last_error=True`` and used only through
:func:`_declare`; :func:`_error` turns a Windows error code into the matching ``OSError``.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable
    from typing import Any

    _Bool = Callable[..., int]  # BOOL and DWORD results
    _Handle = Callable[..., "int | None"]  # HANDLE and pointer results

# --------------------------------------------------------------------------- error codes

ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_SHARING_VIOLATION = 32
ERROR_LOCK_VIOLATION = 33
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_ALREADY_EXISTS = 183
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997

# --------------------------------------------------------------------------- flags

GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
READ_CONTROL = 0x00020000
FILE_APPEND_DATA = 0x00000004
FILE_SHARE_READ = 0x00000001
FILE_SHARE_WRITE = 0x00000002
FILE_SHARE_DELETE = 0x00000004
OPEN_EXISTING = 3
OPEN_ALWAYS = 4
FILE_ATTRIBUTE_DIRECTORY = 0x00000010
FILE_ATTRIBUTE_REPARSE_POINT = 0x00000400
INVALID_FILE_ATTRIBUTES = 0xFFFFFFFF
FILE_FLAG_OVERLAPPED = 0x40000000
FILE_FLAG_OPEN_REPARSE_POINT = 0x00200000
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 1 << 16  # SecurityIdentification << 16
PIPE_ACCESS_DUPLEX = 0x00000003
PIPE_TYPE_BYTE = 0x00000000
PIPE_READMODE_BYTE = 0x00000000
PIPE_WAIT = 0x00000000
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
PIPE_UNLIMITED_INSTANCES = 255
LOCKFILE_FAIL_IMMEDIATELY = 0x00000001
LOCKFILE_EXCLUSIVE_LOCK = 0x00000002
TOKEN_QUERY = 0x0008
TokenUser = 1
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
SDDL_REVISION_1 = 1
SE_FILE_OBJECT = 1
SE_KERNEL_OBJECT = 6
OWNER_SECURITY_INFORMATION = 0x00000001
DACL_SECURITY_INFORMATION = 0x00000004
LABEL_SECURITY_INFORMATION = 0x00000010
FILE_TYPE_DISK = 0x0001
FILE_TYPE_PIPE = 0x0003
PIPE_SERVER_END = 0x00000001
FileNameInfo = 2  # FILE_INFO_BY_HANDLE_CLASS
WAIT_OBJECT_0 = 0x00000000
WAIT_TIMEOUT = 0x00000102

# --------------------------------------------------------------------------- bindings

if sys.platform == "win32":
    import ctypes
    from ctypes import POINTER, c_size_t, c_void_p
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
    CreateFileW: _Handle = _declare(
        _k, "CreateFileW", HANDLE,
        LPCWSTR, DWORD, DWORD, LPSECURITY_ATTRIBUTES, DWORD, DWORD, HANDLE)
    CreateDirectoryW: _Bool = _declare(
        _k, "CreateDirectoryW", BOOL, LPCWSTR, LPSECURITY_ATTRIBUTES)
    GetFileAttributesW: _Bool = _declare(_k, "GetFileAttributesW", DWORD, LPCWSTR)
    LockFileEx: _Bool = _declare(
        _k, "LockFileEx", BOOL, HANDLE, DWORD, DWORD, DWORD, DWORD, LPOVERLAPPED)
    UnlockFileEx: _Bool = _declare(
        _k, "UnlockFileEx", BOOL, HANDLE, DWORD, DWORD, DWORD, LPOVERLAPPED)
    SetEndOfFile: _Bool = _declare(_k, "SetEndOfFile", BOOL, HANDLE)
    SetFilePointerEx: _Bool = _declare(
        _k, "SetFilePointerEx", BOOL, HANDLE, ctypes.c_longlong, c_void_p, DWORD)
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
    GetFileType: _Bool = _declare(_k, "GetFileType", DWORD, HANDLE)
    GetNamedPipeInfo: _Bool = _declare(
        _k, "GetNamedPipeInfo", BOOL, HANDLE, LPDWORD, LPDWORD, LPDWORD, LPDWORD)
    GetFileInformationByHandleEx: _Bool = _declare(  # the class is a C enum
        _k, "GetFileInformationByHandleEx", BOOL, HANDLE, ctypes.c_int, LPVOID, DWORD)
    GetFinalPathNameByHandleW: _Bool = _declare(
        _k, "GetFinalPathNameByHandleW", DWORD, HANDLE, LPVOID, DWORD, DWORD)
    PeekNamedPipe: _Bool = _declare(
        _k, "PeekNamedPipe", BOOL, HANDLE, LPVOID, DWORD, LPDWORD, LPDWORD, LPDWORD)
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
    ConvertSecurityDescriptorToStringSecurityDescriptorW: _Bool = _declare(
        _a, "ConvertSecurityDescriptorToStringSecurityDescriptorW", BOOL,
        PSECURITY_DESCRIPTOR, DWORD, DWORD, POINTER(LPWSTR_OUT), POINTER(ULONG))
    GetSecurityInfo: _Bool = _declare(  # returns the error code, sets no last error
        _a, "GetSecurityInfo", DWORD,
        HANDLE, ctypes.c_int, DWORD, POINTER(PSID), POINTER(PSID), POINTER(PACL),
        POINTER(PACL), POINTER(PSECURITY_DESCRIPTOR))
    GetNamedSecurityInfoW: _Bool = _declare(  # returns the error code, sets no last error
        _a, "GetNamedSecurityInfoW", DWORD,
        LPCWSTR, ctypes.c_int, DWORD, POINTER(PSID), POINTER(PSID), POINTER(PACL),
        POINTER(PACL), POINTER(PSECURITY_DESCRIPTOR))
    # fmt: on

    def _error(code: int | None = None, filename: str | None = None) -> OSError:
        """The ``OSError`` (subclass chosen from the Windows error code) for ``code``,
        default the calling thread's last error; ``filename`` names the object."""
        if code is None:
            code = ctypes.get_last_error()
        error = ctypes.WinError(code)
        if filename is not None:  # same subclass: errno is derived from winerror
            error = OSError(None, error.strerror, filename, code)
        return error
