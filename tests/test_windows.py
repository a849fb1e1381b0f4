"""Windows-only behaviour of the named-pipe backend; runs on Windows and under Wine.

What Wine cannot judge is skipped only under Wine, each with its reason; the logic behind
those checks is covered by ``test_windows_unit.py`` on every OS.
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import WINE, Child, claimed

import dockpoint
from dockpoint import Dockpoint, DockpointClosedError, DockpointConnection
from dockpoint import _windows as w

if sys.platform != "win32":
    pytest.skip("Windows backend only", allow_module_level=True)

OTHER = "S-1-5-21-1004336348-1177238915-682003330-1002"
ADMINISTRATORS = "S-1-5-32-544"


def not_under_wine(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(WINE is not None, reason=f"Wine {WINE}: {reason}")


@pytest.fixture
def dp(app: str) -> Iterator[Dockpoint]:
    got = dockpoint.claim(app)
    assert got is not None
    with got:
        yield got


def accept_in_thread(dp: Dockpoint, box: list[object], timeout: float = 20) -> threading.Thread:
    def run() -> None:
        try:
            box.append(dp.accept(timeout=timeout))
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pair(dp: Dockpoint, app: str) -> tuple[DockpointConnection, DockpointConnection]:
    box: list[object] = []
    t = accept_in_thread(dp, box)
    client = dockpoint.connect(app, timeout=20)
    t.join(20)
    assert client is not None and box and isinstance(box[0], DockpointConnection), box
    return client, box[0]


def listener(dp: Dockpoint) -> w._Listener:
    got = dp._listener
    assert isinstance(got, w._Listener)
    return got


def free(dp: Dockpoint) -> int:
    """The listening instance in the pool (asserting there is one)."""
    pipe = listener(dp)._free
    assert pipe is not None
    return pipe


def pipe_of(conn: DockpointConnection) -> int:
    ch = conn._ch
    assert isinstance(ch, w._Channel)
    return ch._pipe


def interrupt_after(seconds: float) -> threading.Timer:
    """Simulate Ctrl+C in the main thread (where pytest runs the test) after ``seconds``."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


# --------------------------------------------------------------------------- identity


def test_address_is_a_pipe_of_this_user(app: str) -> None:
    sid = w._user_sid()
    assert sid.startswith("S-1-")
    w._sddl(sid)  # a well-formed string SID
    assert dockpoint.address(app) == f"\\\\.\\pipe\\dockpoint-{sid}-{app}@default"
    assert dockpoint.address(app.upper(), "DEFAULT") == dockpoint.address(app)


def test_pipe_owner_is_the_user(dp: Dockpoint, app: str) -> None:
    client, server = pair(dp, app)
    with client, server:
        assert w._pipe_owner(pipe_of(client)) == w._user_sid()
        assert client.peer_pid == server.peer_pid == __import__("os").getpid()


def _security_descriptor_sddl(handle: int) -> str:
    import ctypes

    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    to_string = advapi32.ConvertSecurityDescriptorToStringSecurityDescriptorW
    to_string.restype = ctypes.c_int
    to_string.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_ulong),
    ]
    descriptor = ctypes.c_void_p()
    owner = ctypes.c_void_p()
    dacl = ctypes.c_void_p()
    info = 0x1 | 0x4  # OWNER_ | DACL_SECURITY_INFORMATION
    err = w.GetSecurityInfo(
        handle, w.SE_KERNEL_OBJECT, info, ctypes.byref(owner), None, ctypes.byref(dacl), None,
        ctypes.byref(descriptor),
    )  # fmt: skip
    assert err == 0, ctypes.WinError(err)
    try:
        text = ctypes.c_void_p()
        assert to_string(descriptor, 1, info, ctypes.byref(text), None), ctypes.WinError()
        try:
            return ctypes.wstring_at(text.value)  # type: ignore[arg-type]
        finally:
            w.LocalFree(text)
    finally:
        w.LocalFree(descriptor)


def test_security_descriptor_admits_only_the_user(dp: Dockpoint) -> None:
    sid = w._user_sid()
    sddl = _security_descriptor_sddl(free(dp))
    assert sddl.startswith(f"O:{sid}"), sddl
    dacl = sddl.partition("D:")[2]
    assert dacl.startswith("P"), sddl  # protected: no inherited entries
    assert dacl.count("(") == 1 and dacl.endswith(f";;;{sid})"), sddl
    assert "(A;;FA;" in dacl or "(A;;GA;" in dacl, sddl


def test_handles_are_not_inheritable(dp: Dockpoint, app: str) -> None:
    import ctypes
    from ctypes import wintypes

    get = ctypes.WinDLL("kernel32", use_last_error=True).GetHandleInformation
    get.restype = wintypes.BOOL
    get.argtypes = [wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD)]
    client, server = pair(dp, app)
    with client, server:
        handles = [free(dp), listener(dp)._wake, listener(dp)._lock]
        handles += [pipe_of(client), pipe_of(server)]
        for conn in (client, server):
            assert isinstance(conn._ch, w._Channel)
            handles.append(conn._ch._wake)
        for handle in handles:
            flags = wintypes.DWORD()
            assert get(handle, ctypes.byref(flags)), ctypes.WinError(ctypes.get_last_error())
            assert not flags.value & 1  # HANDLE_FLAG_INHERIT


@not_under_wine("it ignores FILE_FLAG_FIRST_PIPE_INSTANCE (a second first instance succeeds)")
def test_first_instance_flag_is_the_claim(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the non-atomic existence probe the flag alone must refuse.
    sid = w._user_sid()
    attributes, descriptor = w._security(sid)
    try:
        with pytest.raises(PermissionError) as info:
            w._instance(dp.address, attributes, first=True)
        assert info.value.winerror == w.ERROR_ACCESS_DENIED
    finally:
        w.LocalFree(descriptor)


def test_the_lock_decides_the_claim_and_holds_pid_and_info(app: str, children: list[Child]) -> None:
    import os

    dp = w._Backend.listen(f"{app}@default", info="serving v2")
    assert dp is not None
    listener_, _ = dp
    try:
        _, path = w._lock_path(os.environ.get("LOCALAPPDATA"), f"{app}@default")
        with open(path, encoding="utf-8") as f:  # readable while held
            assert f.read() == f"{os.getpid()}\nserving v2\n"
        assert w._held(f"{app}@default") is True
        assert dockpoint.claim(app) is None  # this process again: the lock refuses
        other = Child("import dockpoint, sys; print(dockpoint.claim(sys.argv[1]) is None)", app)
        children.append(other)
        other.expect("True")
    finally:
        listener_.close()
    assert w._held(f"{app}@default") is False
    again = dockpoint.claim(app)
    assert again is not None
    with again, open(path, encoding="utf-8") as f:
        assert f.read() == f"{os.getpid()}\n"  # rewritten, no stale info line


def test_a_claimer_gives_the_claim_back_during_a_hand_over(app: str) -> None:
    """While a spawned daemon holds the lock file's hand-over range (waiting for its
    frontend to let go of the claim), a claimer that wins the claim range gives it back,
    and clients count the endpoint as held."""
    import os

    stem = f"{app}@default"
    _, path = w._lock_path(os.environ.get("LOCALAPPDATA"), stem)
    claimed(app).close()  # makes the directory and the lock file
    handle = w.CreateFileW(
        path, w.GENERIC_READ | w.GENERIC_WRITE, w._SHARE_KEEP, None, w.OPEN_EXISTING, 0, None
    )
    assert handle not in (None, w.INVALID_HANDLE_VALUE)
    try:
        assert w._held(stem) is False
        assert w._try_lock(handle, w._HANDOVER_RANGE, w.LOCKFILE_EXCLUSIVE_LOCK) == 0
        assert dockpoint.claim(app) is None
        assert w._held(stem) is True
        w._unlock(handle, w._HANDOVER_RANGE)
    finally:
        w.CloseHandle(handle)
    again = dockpoint.claim(app)
    assert again is not None
    again.close()


def test_a_held_lock_file_cannot_be_deleted_or_renamed(app: str) -> None:
    import os

    # The POSIX holder notices a deleted lock file (ClaimLostError); on Windows the holder
    # keeps it from being deleted at all, so no second claim can start on a new file.
    _, path = w._lock_path(os.environ.get("LOCALAPPDATA"), f"{app}@default")
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        with pytest.raises(PermissionError):
            os.remove(path)
        with pytest.raises(PermissionError):
            os.rename(path, path + ".moved")
        assert dockpoint.claim(app) is None
    os.remove(path)  # released: nothing keeps it any more


def test_a_killed_holder_frees_the_lock(app: str, children: list[Child]) -> None:
    holder = Child(
        "import dockpoint, sys; dp = dockpoint.claim(sys.argv[1]); print(dp is not None); "
        "sys.stdin.readline()",
        app,
    )
    children.append(holder)
    holder.expect("True")
    assert dockpoint.claim(app) is None
    holder.proc.kill()
    holder.proc.wait(20)
    deadline = time.monotonic() + 20  # the kernel drops a dead process's locks soon after
    while (dp := dockpoint.claim(app)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dp is not None
    dp.close()


def _refuse(code: int) -> object:
    import ctypes

    real = w._instance

    def instance(name: str, attributes: object, first: bool = False) -> int:
        if first:  # the name exists although we hold the lock
            raise ctypes.WinError(code)
        return real(name, attributes)  # type: ignore[arg-type]

    return instance


@pytest.mark.parametrize("code", sorted(w._CLAIMED))
def test_lock_holder_joins_a_pipe_of_its_own_left_by_dead_instances(
    app: str, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(w, "_instance", _refuse(code))
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        client, server = pair(dp, app)
        with client, server:
            client.write(b"joined")
            assert server.read(timeout=10) == b"joined"


def test_lock_holder_refuses_a_pipe_that_is_not_its_own(
    app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(w, "_instance", _refuse(w.ERROR_ACCESS_DENIED))
    monkeypatch.setattr(w, "_pipe_owner", lambda pipe: OTHER)
    with pytest.raises(PermissionError) as info:
        dockpoint.claim(app)
    assert info.value.filename == dockpoint.address(app)
    assert OTHER in str(info.value)
    monkeypatch.undo()
    again = dockpoint.claim(app)  # the lock was released, no instance was left
    assert again is not None
    again.close()


def test_another_users_squatter_is_a_permission_error_from_claim(
    app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    def denied(name: str, attributes: object, first: bool = False) -> int:
        raise ctypes.WinError(w.ERROR_ACCESS_DENIED)  # what another user's DACL answers

    monkeypatch.setattr(w, "_instance", denied)
    with pytest.raises(PermissionError) as info:
        dockpoint.claim(app)
    assert info.value.filename == dockpoint.address(app)
    assert "another user" in str(info.value)
    monkeypatch.undo()
    again = dockpoint.claim(app)
    assert again is not None
    again.close()


def test_an_unsafe_lock_directory_is_refused(
    app: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    (tmp_path / "dockpoint").write_text("not a directory")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    with pytest.raises(PermissionError) as info:
        dockpoint.claim(app)
    assert info.value.filename == str(tmp_path / "dockpoint")
    assert "not a directory" in str(info.value)


def test_lock_directory_is_made_user_only(
    app: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    dp = dockpoint.claim(app)
    assert dp is not None
    with dp:
        sddl = w._owned_sddl(str(tmp_path / "dockpoint"))
        assert sddl is not None
        assert w._unsafe(sddl, w._user_sid()) is None, sddl


@not_under_wine("it does not enforce the DACLs of named pipes")
def test_a_pipe_that_denies_us_is_a_permission_error(app: str) -> None:
    # A squatter's pipe whose DACL keeps us out: not "nobody is there" for connect, and
    # not a silent None for claim (the lock is free, the name is not ours to serve).
    import ctypes

    name = dockpoint.address(app)
    descriptor = ctypes.c_void_p()
    ok = w.ConvertStringSecurityDescriptorToSecurityDescriptorW(
        "D:P", w.SDDL_REVISION_1, ctypes.byref(descriptor), None
    )
    assert ok, ctypes.WinError(ctypes.get_last_error())
    attributes = w.SECURITY_ATTRIBUTES(ctypes.sizeof(w.SECURITY_ATTRIBUTES), descriptor, False)
    pipe = w._instance(name, attributes, first=True)
    try:
        with pytest.raises(PermissionError) as info:
            dockpoint.connect(app)
        assert info.value.filename == name
        with pytest.raises(PermissionError) as info:
            dockpoint.claim(app)
        assert info.value.filename == name
    finally:
        w.CloseHandle(pipe)
        w.LocalFree(descriptor)
    again = dockpoint.claim(app)  # the failed claim released the lock
    assert again is not None
    again.close()


def test_refuses_a_server_of_another_user(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wine reports our own SID for both, so the squatter is simulated at the two lookups.
    monkeypatch.setattr(w, "_pipe_owner", lambda pipe: OTHER)
    monkeypatch.setattr(w, "_process_user", lambda pid: OTHER)
    with pytest.raises(PermissionError) as info:
        dockpoint.connect(app)
    assert info.value.filename == dp.address
    assert OTHER in str(info.value) and w._user_sid() in str(info.value)
    monkeypatch.undo()
    # The daemon is unharmed: the refused client shows up as one that came and went.
    box: list[object] = []
    t = accept_in_thread(dp, box, timeout=5)
    t.join(10)
    assert box and isinstance(box[0], DockpointConnection), box
    with box[0] as gone:
        assert gone.read(timeout=5) == b""
    client, server = pair(dp, app)
    client.close()
    server.close()


def test_trusts_a_same_user_server_whose_owner_is_a_group(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An elevated server that left the owner at Administrators still runs as the user.
    monkeypatch.setattr(w, "_pipe_owner", lambda pipe: ADMINISTRATORS)
    client, server = pair(dp, app)
    with client, server:
        client.write(b"trusted")
        assert server.read(timeout=10) == b"trusted"


def test_refuses_a_server_labelled_below_medium_integrity(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process of this user at Low integrity (a sandbox) squats the name: the pipe's owner
    # is the user, its label is Low. Wine labels nothing, so the label read is simulated.
    monkeypatch.setattr(w, "_pipe_integrity", lambda pipe: 0x1000)
    with pytest.raises(PermissionError) as info:
        dockpoint.connect(app)
    assert info.value.filename == dp.address
    assert "below Medium integrity" in str(info.value)
    monkeypatch.undo()
    with dp.accept(timeout=5) as gone:  # the refused client came and went
        assert gone.read(timeout=5) == b""
    client, server = pair(dp, app)  # unlabelled (implicit Medium): trusted
    with client, server:
        client.write(b"medium")
        assert server.read(timeout=10) == b"medium"


def test_lock_holder_refuses_a_pipe_labelled_below_medium_integrity(
    app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name exists although we hold the lock, and the pipe is the user's but was made
    # at Low integrity: a sandbox's squatter, not instances of an earlier holder.
    monkeypatch.setattr(w, "_instance", _refuse(w.ERROR_ACCESS_DENIED))
    monkeypatch.setattr(w, "_pipe_integrity", lambda pipe: 0x1000)
    with pytest.raises(PermissionError) as info:
        dockpoint.claim(app)
    assert info.value.filename == dockpoint.address(app)
    assert "below Medium integrity" in str(info.value)
    monkeypatch.undo()
    again = dockpoint.claim(app)  # the lock was released, no instance was left
    assert again is not None
    again.close()


# --------------------------------------------------------------------------- instances


def test_a_client_finds_an_instance_between_accepts(dp: Dockpoint, app: str) -> None:
    for _ in range(3):
        start = time.monotonic()
        client = dockpoint.connect(app)  # nobody is in accept(): the free instance serves
        assert client is not None
        assert time.monotonic() - start < 5
        server = dp.accept(timeout=5)  # ERROR_PIPE_CONNECTED: it came before ConnectNamedPipe
        with client, server:
            client.write(b"early")
            assert server.read(timeout=10) == b"early"
        free(dp)


def test_connect_waits_while_every_instance_is_busy(dp: Dockpoint, app: str) -> None:
    first = dockpoint.connect(app)  # takes the only free instance; nobody accepts yet
    assert first is not None
    box: list[DockpointConnection | None] = []
    t = threading.Thread(target=lambda: box.append(dockpoint.connect(app)), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), f"connect() gave up on a busy daemon: {box}"  # never None while up
    servers = [dp.accept(timeout=5), dp.accept(timeout=10)]  # the 2nd frees an instance
    t.join(10)
    assert box and box[0] is not None
    for conn in (first, box[0], *servers):
        conn.close()


def test_busy_connect_with_timeout_gives_up_only_at_the_timeout(dp: Dockpoint, app: str) -> None:
    first = dockpoint.connect(app)
    assert first is not None
    with first:
        start = time.monotonic()
        assert dockpoint.connect(app, timeout=0.5) is None
        assert time.monotonic() - start >= 0.45
        with dp.accept(timeout=5):
            pass


def test_concurrent_accepts_each_serve_a_client(dp: Dockpoint, app: str) -> None:
    boxes: list[list[object]] = [[] for _ in range(4)]
    threads = [accept_in_thread(dp, box) for box in boxes]
    time.sleep(0.3)
    clients = []
    for _ in boxes:
        client = dockpoint.connect(app, timeout=10)
        assert client is not None
        clients.append(client)
    for t in threads:
        t.join(20)
    servers = [box[0] for box in boxes if isinstance(box[0], DockpointConnection)]
    assert len(servers) == 4, boxes
    for i, client in enumerate(clients):
        client.write(b"%d" % i)
    got = sorted(s.read(timeout=10) for s in servers)
    assert got == [b"0", b"1", b"2", b"3"]
    assert free(dp) and not listener(dp)._turn.locked()
    for conn in (*clients, *servers):
        conn.close()


def test_timeouts_keep_exactly_one_listening_instance(dp: Dockpoint, app: str) -> None:
    for _ in range(3):
        with pytest.raises(TimeoutError):
            dp.accept(timeout=0.05)
        free(dp)
    client, server = pair(dp, app)
    client.close()
    server.close()


def test_client_that_wrote_and_left_before_accept_is_served(dp: Dockpoint, app: str) -> None:
    client = dockpoint.connect(app)
    assert client is not None
    client.write(b"fire and forget")
    client.close()
    with dp.accept(timeout=5) as server:  # ERROR_NO_DATA: it may have written first
        assert server.read(timeout=5) == b"fire and forget"
        assert server.read(timeout=5) == b""


def test_connections_of_a_closed_holder_do_not_keep_the_claim(app: str) -> None:
    # They keep the pipe name alive; the next lock holder joins that pipe (as on POSIX,
    # the next claim succeeds while the old holder still serves what it accepted).
    first = dockpoint.claim(app)
    assert first is not None
    client, server = pair(first, app)
    first.close()
    again = dockpoint.claim(app)
    assert again is not None
    with again, client, server:
        new_client, new_server = pair(again, app)
        with new_client, new_server:
            new_client.write(b"new")
            client.write(b"old")
            assert new_server.read(timeout=10) == b"new"
            assert server.read(timeout=10) == b"old"


@not_under_wine(
    "it ignores FILE_FLAG_FIRST_PIPE_INSTANCE, so a name kept by dead instances cannot be "
    "shown (a claim without the lock would succeed there too)"
)
def test_a_holder_killed_while_its_client_stays_connected_does_not_wedge_the_name(
    app: str, children: list
) -> None:
    holder = Child(
        "import dockpoint, sys; dp = dockpoint.claim(sys.argv[1]); print(dp is not None); "
        "sys.stdin.readline()",
        app,
    )
    children.append(holder)
    holder.expect("True")
    client = dockpoint.connect(app)  # takes the free instance; the holder never accepts it
    assert client is not None
    with client:
        holder.proc.kill()
        holder.proc.wait(20)
        # The client's end keeps the name: without the lock, claim() returned None here.
        deadline = time.monotonic() + 20
        while (dp := dockpoint.claim(app)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dp is not None
        with dp:
            new_client, server = pair(dp, app)
            with new_client, server:
                new_client.write(b"served")
                assert server.read(timeout=10) == b"served"


# --------------------------------------------------------------------------- interrupts


def test_ctrl_c_interrupts_accept_and_the_endpoint_keeps_working(dp: Dockpoint, app: str) -> None:
    timer = interrupt_after(0.3)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        dp.accept(timeout=30)
    timer.join()
    assert time.monotonic() - start < 5
    assert not dp.closed and free(dp)
    client, server = pair(dp, app)
    with client, server:
        client.write(b"still here")
        assert server.read(timeout=10) == b"still here"


def test_ctrl_c_while_accept_makes_the_next_instance_keeps_the_client(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client is on the instance; accept() is interrupted while it makes the next
    # client's instance. The connected instance goes back to the pool, and the next
    # accept() serves that client rather than leaving it on an instance nobody waits on.
    client = dockpoint.connect(app)
    assert client is not None
    with client:
        client.write(b"kept")

        def interrupted(name: str, attributes: object, first: bool = False) -> int:
            raise KeyboardInterrupt

        monkeypatch.setattr(w, "_instance", interrupted)
        with pytest.raises(KeyboardInterrupt):
            dp.accept(timeout=5)
        monkeypatch.undo()
        with dp.accept(timeout=5) as server:
            assert server.read(timeout=10) == b"kept"
            server.write(b"served")
        assert client.read(timeout=10) == b"served"
        free(dp)


def test_ctrl_c_interrupts_read(dp: Dockpoint, app: str) -> None:
    client, server = pair(dp, app)
    with client, server:
        timer = interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            client.read(timeout=30)
        timer.join()
        assert not w._LIMBO  # the cancelled read was waited for, nothing leaked
        server.write(b"after")  # the cancelled read took nothing with it
        assert client.read(timeout=10) == b"after"


def test_ctrl_c_interrupts_connect_waiting_for_a_busy_daemon(dp: Dockpoint, app: str) -> None:
    first = dockpoint.connect(app)
    assert first is not None
    with first:
        timer = interrupt_after(0.3)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            dockpoint.connect(app)
        timer.join()
        assert time.monotonic() - start < 5
        with dp.accept(timeout=5):
            pass


def test_close_from_another_thread_wakes_read_and_write(dp: Dockpoint, app: str) -> None:
    client, server = pair(dp, app)
    errors: list[BaseException] = []

    def blocked(call: object) -> threading.Thread:
        def run() -> None:
            try:
                call()  # type: ignore[operator]
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    reader = blocked(client.read)
    writer = blocked(lambda: client.write(b"x" * (32 << 20)))  # nobody reads: it blocks
    time.sleep(0.5)
    assert reader.is_alive() and writer.is_alive()
    client.close()
    reader.join(5)
    writer.join(5)
    assert not reader.is_alive() and not writer.is_alive()
    assert len(errors) == 2 and all(isinstance(e, DockpointClosedError) for e in errors), errors
    while server.read(timeout=10):  # then the server sees the end of the stream
        pass
    server.close()


# --------------------------------------------------------------------------- data


def test_write_views_without_and_with_copies(dp: Dockpoint, app: str) -> None:
    payload = bytes(range(256)) * 10_000  # 2.5 MiB: more than one WriteFile chunk
    cases: list[object] = [
        payload,  # bytes: the kernel reads the object itself
        bytearray(payload),  # writable view: from_buffer, no copy
        memoryview(payload),  # read-only view: copied chunk by chunk
        memoryview(payload)[::3],  # strided view
    ]
    client, server = pair(dp, app)
    with client, server:
        for data in cases:
            want = bytes(data)  # type: ignore[call-overload]
            t = threading.Thread(target=client.write, args=(data,), daemon=True)
            t.start()
            got = bytearray()
            while len(got) < len(want):
                got += server.read(1 << 20, timeout=20)
            t.join(20)
            assert bytes(got) == want


def test_zero_byte_write_by_the_peer_is_not_end_of_stream(dp: Dockpoint, app: str) -> None:
    client, server = pair(dp, app)
    with client, server:
        ch = client._ch
        assert isinstance(ch, w._Channel)
        op = w._Op()
        try:  # a raw zero-byte WriteFile, as a non-Python client might do
            code, count = w._run(op, ch._pipe, None, ch._wake, w.WriteFile, None, 0, None)
        finally:
            op.close()
        assert (code, count) == (0, 0)
        with pytest.raises(TimeoutError):
            server.read(timeout=0.3)
        client.write(b"data")
        assert server.read(timeout=10) == b"data"


def test_a_dropped_server_connection_does_not_keep_the_name(app: str) -> None:
    import gc

    holder = dockpoint.claim(app)
    assert holder is not None
    box: list[object] = []
    t = accept_in_thread(holder, box)
    client = dockpoint.connect(app, timeout=10)
    t.join(10)
    assert client is not None and len(box) == 1
    client.close()
    box.clear()  # the daemon drops its end without close()
    gc.collect()
    holder.close()
    again = dockpoint.claim(app)
    assert again is not None, "a garbage-collected connection kept the pipe name alive"
    again.close()


def test_single_connect_to_a_hung_daemon_gives_up_after_the_grace(dp: Dockpoint, app: str) -> None:
    from dockpoint._classes import BUSY_GRACE

    first = dockpoint.connect(app)  # takes the free instance; the holder never accepts
    assert first is not None
    with first:
        got: list[object] = []
        start = time.monotonic()
        t = threading.Thread(target=lambda: got.append(dockpoint.connect(app)), daemon=True)
        t.start()
        t.join(BUSY_GRACE + 20)  # a hang fails here, not the run
        elapsed = time.monotonic() - start
        assert got == [None], f"{got} after {elapsed:.1f} s"  # nothing came free in the grace
        assert BUSY_GRACE - 0.5 <= elapsed < BUSY_GRACE + 3, elapsed
        with dp.accept(timeout=5):
            pass


def test_a_failed_connect_never_pools_an_instance_of_unknown_state(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[int] = []
    real_close = w.CloseHandle

    def close(handle: int) -> int:
        closed.append(handle)
        return real_close(handle)

    old = free(dp)
    monkeypatch.setattr(w, "CloseHandle", close)
    monkeypatch.setattr(w._Listener, "_connect", lambda self, pipe, deadline: 109)
    with pytest.raises(OSError) as info:
        dp.accept(timeout=5)
    assert info.value.winerror == 109 and info.value.filename == dp.address
    assert old in closed  # the instance of unknown state was closed, not pooled
    monkeypatch.undo()
    assert free(dp)  # a fresh listening instance took its place: a client finds it at once
    client = dockpoint.connect(app)
    assert client is not None
    with client, dp.accept(timeout=5) as server:
        client.write(b"fresh")
        assert server.read(timeout=10) == b"fresh"


def test_an_interrupted_cancel_leaks_the_operation_rather_than_freeing_it(
    dp: Dockpoint, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    client, server = pair(dp, app)
    with client, server:
        ch = client._ch
        assert isinstance(ch, w._Channel)
        op = w._Op()
        buffer = ctypes.create_string_buffer(16)
        op.keep = buffer

        def interrupted(pipe: int, op_: w._Op) -> None:
            w.CancelIoEx(pipe, ctypes.byref(op_.ov))
            raise KeyboardInterrupt  # a second Ctrl+C before the completion was collected

        monkeypatch.setattr(w, "_cancel", interrupted)
        timer = interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            w._run(op, ch._pipe, None, ch._wake, w.ReadFile, buffer, 16, None)
        timer.join()
        monkeypatch.undo()
        assert op in w._LIMBO and op.keep is buffer  # kept, with its buffer, not freed
        # Collect the cancelled read's completion, as the kernel still owns it, then free.
        count = ctypes.c_ulong()
        w.GetOverlappedResult(ch._pipe, ctypes.byref(op.ov), ctypes.byref(count), True)
        w._LIMBO.discard(op)
        op.close()
        server.write(b"after")
        assert client.read(timeout=10) == b"after"


# --------------------------------------------------------------------------- probe

#: Claims (through the backend, with ``info`` from argv[2] when given), says so, then
#: accepts and closes connections in a thread until stdin ends.
HOLDER = """
import os, sys, threading
from dockpoint import _windows as w
got = w._Backend.listen(sys.argv[1] + "@default", sys.argv[2] if len(sys.argv) > 2 else None)
def serve():
    while True:
        got[0].accept(None).close()
if got is not None:
    threading.Thread(target=serve, daemon=True).start()
print("claimed" if got is not None else "lost", os.getpid(), flush=True)
sys.stdin.readline()
"""


def hold(children: list[Child], app: str, *info: str) -> int:
    child = Child(HOLDER, app, *info)
    children.append(child)
    return int(child.expect("claimed").split()[1])


def lock_dir() -> str:
    import os

    return os.environ["LOCALAPPDATA"] + "\\dockpoint"


def lock_text(app: str) -> bytes:
    with open(f"{lock_dir()}\\{app}@default.lock", "rb") as f:
        return f.read()


def status(app: str) -> dict[str, str]:
    """``python -m dockpoint status APP``'s "key  value" lines (bounded)."""
    import subprocess

    from conftest import child_env

    done = subprocess.run(
        [sys.executable, "-m", "dockpoint", "status", app, "--timeout", "0.5"],
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        env=child_env(PYTHONIOENCODING="utf-8"),
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    fields = {"exit": str(done.returncode)}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    return fields


def test_probe_absent_creates_nothing(app: str) -> None:
    import os

    found = dockpoint.probe(app, timeout=0.5)
    assert (found.state, found.pid, found.info) == ("absent", None, None), found.reason
    assert found.address == dockpoint.address(app)
    assert not os.path.exists(lock_dir())  # read-only: not even the lock directory


def test_probe_listening_with_pid_and_info_is_read_only(app: str, children: list[Child]) -> None:
    pid = hold(children, app, "version 1.2 ü")
    before = lock_text(app)
    assert before == f"{pid}\nversion 1.2 ü\n".encode()
    found = dockpoint.probe(app, timeout=5)
    assert (found.state, found.pid, found.info) == ("listening", pid, "version 1.2 ü")
    assert found.reason and "\n" not in found.reason
    assert lock_text(app) == before
    fields = status(app)
    assert (fields["exit"], fields["state"], fields["pid"]) == ("0", "listening", str(pid))
    assert fields["info"] == "version 1.2 ü"
    assert w._holds(f"{app}@default", pid) is True
    assert w._holds(f"{app}@default", pid + 4) is False


def test_probe_stale_after_the_holder_is_killed(app: str, children: list[Child]) -> None:
    pid = hold(children, app)
    children[-1].proc.kill()
    children[-1].proc.wait(20)
    deadline = time.monotonic() + 20  # the kernel drops a dead process's locks soon after
    while w._held(f"{app}@default") and time.monotonic() < deadline:
        time.sleep(0.05)
    found = dockpoint.probe(app, timeout=0.5)
    assert (found.state, found.pid) == ("stale", pid), found.reason
    assert w._holds(f"{app}@default", pid) is False
    assert dockpoint.connect(app) is None
    with claimed(app):  # the next claim replaces it
        pass


def test_probe_busy_when_every_instance_stays_busy(dp: Dockpoint, app: str) -> None:
    import os

    first = dockpoint.connect(app)  # takes the only free instance; nobody accepts
    assert first is not None
    with first:
        start = time.monotonic()
        found = dockpoint.probe(app, timeout=0.5)
        assert time.monotonic() - start >= 0.45  # it waited the timeout for an instance
        assert (found.state, found.pid) == ("busy", os.getpid()), found.reason
        assert "0.5 s" in found.reason
        with dp.accept(timeout=5):
            pass


def test_probe_absent_after_a_clean_close(app: str) -> None:
    import os

    with claimed(app):
        assert dockpoint.probe(app, timeout=5).pid == os.getpid()
    assert lock_text(app) == b""  # no holder pid left behind
    found = dockpoint.probe(app, timeout=0.5)
    assert (found.state, found.pid) == ("absent", None), found.reason
    assert w._holds(f"{app}@default", os.getpid()) is False


def test_probe_unsafe_lock_directory(app: str) -> None:
    import os

    os.makedirs(lock_dir())  # inherits the test directory's DACL: not the user's alone
    if w._directory_problem(w._user_sid(), lock_dir()) is None:
        pytest.skip("this system's default DACL admits only the user")
    found = dockpoint.probe(app, timeout=0.5)
    assert found.state == "unsafe" and lock_dir() in found.reason, found.reason


#: Claims and releases in a loop; prints how many claims failed.
CLAIMER = """
import dockpoint, sys, time
lost = 0
for _ in range(int(sys.argv[2])):
    dp = dockpoint.claim(sys.argv[1])
    if dp is None:
        lost += 1
    else:
        dp.close()
    time.sleep(0.0005)  # not synchronisation: leaves the endpoint free most of the time
print("lost", lost, flush=True)
"""


def test_probe_never_takes_the_claim(app: str, children: list[Child]) -> None:
    """A probe running all the time never makes a claim fail."""
    stop = threading.Event()
    states: set[str] = set()

    def probe_forever() -> None:
        while not stop.is_set():
            states.add(dockpoint.probe(app, timeout=0.05).state)

    prober = threading.Thread(target=probe_forever)
    prober.start()
    try:
        claimer = Child(CLAIMER, app, "200")
        children.append(claimer)
        assert claimer.line(120) == "lost 0"
    finally:
        stop.set()
        prober.join(30)
    assert states <= {"absent", "listening", "missing-socket", "stale", "busy"}


def test_stop_terminates_the_holder(app: str, children: list[Child]) -> None:
    assert dockpoint.stop(app) is None  # nobody there
    pid = hold(children, app)
    assert dockpoint.stop(app, timeout=20) == pid
    assert children[-1].proc.wait(20) == 15  # TerminateProcess with os.kill's exit code
    assert dockpoint.probe(app, timeout=0.5).state in ("stale", "absent")
