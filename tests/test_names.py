"""Name rules and endpoint locations: pure functions, the same on every OS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dockpoint
from dockpoint._names import (
    MAX_NAME_LENGTH,
    NAME_CHARACTERS,
    endpoint_stem,
    lock_record,
    lock_text,
    pipe_name,
    posix_directory,
    socket_filename,
    validate_name,
)

BAD_NAMES = [
    "",
    "a/b",
    "a\\b",
    "..",
    ".",
    ".hidden",
    "-flag",
    "a\0b",
    "x" * 300,
    "a b",
    "café",
    "a:b",
    "a@b",
    "\n",
    "*",
]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_value_errors_and_leave_nothing(runtime: Path, bad: str) -> None:
    before = tree(runtime)
    for call in (
        lambda: dockpoint.claim(bad),
        lambda: dockpoint.claim("good", bad),
        lambda: dockpoint.connect(bad),
        lambda: dockpoint.connect("good", bad, timeout=1),
        lambda: dockpoint.address(bad),
    ):
        with pytest.raises(ValueError, match=r"app_name|instance") as info:
            call()
        msg = str(info.value)
        assert "allowed" in msg or "empty" in msg, msg  # says what is allowed
    assert tree(runtime) == before


@pytest.mark.parametrize("bad", [None, b"app", 1, 1.0, ["app"], object()])
def test_non_str_names_are_type_errors(runtime: Path, bad: object) -> None:
    before = tree(runtime)
    with pytest.raises(TypeError, match="app_name must be a str"):
        dockpoint.claim(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="instance must be a str"):
        dockpoint.connect("good", bad)  # type: ignore[arg-type]
    assert tree(runtime) == before


def test_length_limit_is_named() -> None:
    assert validate_name("a" * MAX_NAME_LENGTH, "app_name") == "a" * MAX_NAME_LENGTH
    with pytest.raises(ValueError, match=f"at most {MAX_NAME_LENGTH}"):
        validate_name("a" * (MAX_NAME_LENGTH + 1), "app_name")


def test_stem_is_lower_case_and_unambiguous() -> None:
    assert endpoint_stem("My.App", "Default") == "my.app@default"
    # '@' cannot occur in a name, so different pairs never share a stem.
    assert endpoint_stem("a.b", "c") != endpoint_stem("a", "b.c")


def _rule(text: str) -> bool:
    return (
        0 < len(text) <= MAX_NAME_LENGTH
        and all(c in NAME_CHARACTERS for c in text)
        and text[0] not in ".-"
    )


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_is_valid_exactly_when_the_rule_says(text: str) -> None:
    if _rule(text):
        assert validate_name(text, "app_name") == text.lower()
    else:
        with pytest.raises(ValueError, match="app_name"):
            validate_name(text, "app_name")


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", fullmatch=True)
    )
)
def test_any_text_either_works_end_to_end_or_leaves_nothing(text: str) -> None:
    # A fresh directory per example: hypothesis runs examples in one test call.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        old = os.environ.get("XDG_RUNTIME_DIR")
        os.environ["XDG_RUNTIME_DIR"] = tmp
        try:
            if not _rule(text):
                with pytest.raises(ValueError):
                    dockpoint.claim("p" + os.urandom(6).hex(), text)
                assert os.listdir(tmp) == []
                return
            app = "p" + os.urandom(6).hex()
            dp = dockpoint.claim(app, text)
            assert dp is not None
            with dp:
                assert dockpoint.claim(app, text.upper()) is None
        finally:
            if old is None:
                del os.environ["XDG_RUNTIME_DIR"]
            else:
                os.environ["XDG_RUNTIME_DIR"] = old


def test_posix_directory_choice() -> None:
    assert posix_directory("/run/user/1000", 1000, None) == "/run/user/1000/dockpoint"
    assert posix_directory("/x/", 5, "/run/user/5") == "/x/dockpoint"
    assert posix_directory(None, 1000, "/run/user/1000") == "/run/user/1000/dockpoint"
    assert posix_directory("relative", 7, None) == "/tmp/dockpoint-7"  # spec: ignore it
    assert posix_directory("", 7, None) == "/tmp/dockpoint-7"


def test_socket_filename_hashes_only_when_too_long() -> None:
    assert socket_filename("/run/user/1000/dockpoint", "app@default", 107) == "app@default.sock"
    long_stem = "a" * 64 + "@" + "b" * 64
    hashed = socket_filename("/run/user/1000/dockpoint", long_stem, 107)
    assert hashed.startswith("~") and hashed.endswith(".sock") and len(hashed) == 30
    assert hashed == socket_filename("/run/user/1000/dockpoint", long_stem, 107)
    assert hashed != socket_filename("/run/user/1000/dockpoint", long_stem[:-1] + "c", 107)
    # "/d" + "/" + 99 characters + ".sock" is exactly 107 bytes: it fits; one more does not.
    assert socket_filename("/d", "x" * 99, 107) == "x" * 99 + ".sock"
    assert socket_filename("/d", "x" * 100, 107).startswith("~")


def test_pipe_name() -> None:
    sid = "S-1-5-21-1004336348-1177238915-682003330-512"
    name = pipe_name(sid, "app@default")
    assert name == r"\\.\pipe\dockpoint-" + sid + "-app@default"
    assert len(pipe_name(sid, "a" * 64 + "@" + "b" * 64)) < 256  # the OS's limit


def test_lock_text_is_the_pid_then_the_optional_info_line() -> None:
    assert lock_text(1234, None) == b"1234\n"
    assert lock_text(1234, "v2 on :8080 \u00e9") == "1234\nv2 on :8080 \u00e9\n".encode()


def test_lock_record_reads_pid_and_info() -> None:
    assert lock_record(b"") == (None, None)  # emptied by a clean release
    assert lock_record(b"123\n") == (123, None)  # only the pid
    assert lock_record("123\nversion 1.2 \u00fc\n".encode()) == (123, "version 1.2 \u00fc")
    assert lock_record(b"123\r\nv2\r\n") == (123, "v2")
    assert lock_record(b"junk\nv2\n") == (None, "v2")
    assert lock_record(b"0\n") == (None, None)  # not a pid
    assert lock_record(lock_text(99, "x y")) == (99, "x y")
