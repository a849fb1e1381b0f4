"""Signals held back around steps that must not be split: claiming, releasing, and the
hand-over's set-up run with every signal blocked, so a signal (Ctrl+C, an alarm) that
arrives meanwhile is handled just after, never between two steps."""

from __future__ import annotations

# The C module, not signal.py (which imports enum): with signal.py, bench row 13 (import
# dockpoint) is 3.29 x, row 10 (warm send) 1.26 x (3.12, median of 21 rounds).
import _signal  # type: ignore[import-not-found]

_sigmask = getattr(_signal, "pthread_sigmask", None)  # None on Windows
_ALL_SIGNALS = _signal.valid_signals() if _sigmask is not None else set()


def block_signals() -> object:
    """Block every signal for this thread; return what :func:`restore_signals` needs."""
    if _sigmask is None:
        return None
    return _sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)


def restore_signals(old: object) -> None:
    """Undo :func:`block_signals`; a signal that arrived meanwhile is handled here."""
    if old is not None:
        _sigmask(_signal.SIG_SETMASK, old)  # type: ignore[misc]
