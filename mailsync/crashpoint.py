"""Test-only crash points: MAILSYNC_CRASH_AT=NAME:N kills the process (as kill -9 would) the
N-th time it reaches the durable step NAME. Unset in normal use: one comparison.

Names (where each is reached: docs/reliability.md): staged, recorded, published, folder (backup,
sync, POP3; recorded and folder also migrate, folder also restore), upload-journaled, appended,
marked-deleted, expunged (sync; deleted-local: mirror; appended also migrate and restore), created (migrate and restore)."""

from __future__ import annotations

import os
import threading

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
