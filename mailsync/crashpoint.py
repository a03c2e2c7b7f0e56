"""Test-only crash points: MAILSYNC_CRASH_AT=NAME:N kills the process (as kill -9 would) the
N-th time it reaches the durable step NAME. Unset in normal use: one comparison.

Names (where each is reached: docs/reliability.md): staged, recorded, published, folder (backup,
sync, POP3; recorded and folder also migrate, folder also restore), upload-journaled, appended,
marked-deleted, expunged (sync; deleted-local: mirror; appended also migrate and restore), created (migrate and restore)."""

from __future__ import annotations

import os
import threading
import time

_spec = os.environ.get("MAILSYNC_CRASH_AT", "")
_name, _, _n = _spec.partition(":")
_left = int(_n or 1) if _spec else 0
_lock = threading.Lock()


def hit(name: str) -> None:
    global _left
    if not _left or name != _name:
        return
    with _lock:
        _left -= 1
        if _left == 0:
            os._exit(137)


_pause_at = os.environ.get("MAILSYNC_PAUSE_AT", "")
_pause_file = os.environ.get("MAILSYNC_PAUSE_FILE", "")


def pause(name: str) -> None:
    """Test-only: at the step NAME (MAILSYNC_PAUSE_AT), create the file MAILSYNC_PAUSE_FILE and
    wait, at most 10 s, until the test removes it, so that a signal the test sends lands exactly
    there. Names: `summary` (the summary printed, the command not yet ended), `decided` (the
    exit code decided, the interpreter about to end). Unset: one comparison."""
    if name != _pause_at or not _pause_file:
        return
    with open(_pause_file, "w"):
        pass
    deadline = time.monotonic() + 10
    while os.path.exists(_pause_file) and time.monotonic() < deadline:
        time.sleep(0.005)
