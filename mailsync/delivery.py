"""Crash-safe delivery into a Maildir folder, the one sequence every download uses (IMAP backup,
mirror and sync, POP3):

1. each message is written to tmp/ (MaildirFolder.stage / open_staged);
2. the batch's files are flushed to disk as a group (fsync each, then tmp/ once);   "staged"
3. the state records them, in one transaction;                                       "recorded"
4. each file is linked into new/ or cur/ under its flags (publish);                  "published"
5. new/ and cur/ are flushed.

A kill before 3 leaves files in tmp/ that no record names: `recover` deletes them (the next run
downloads again). A kill after 3 leaves recorded files in tmp/: `recover` publishes them. So
every message ends up exactly once. The names at the right are the crash points the kill tests
stop at (crashpoint.hit).
"""

from __future__ import annotations

from collections.abc import Callable

from mailsync import crashpoint
from mailsync.maildir import MaildirFolder
from mailsync.state import State

Flags = tuple[frozenset[str], frozenset[str]]  # system flags, keywords


def place(flags) -> str:
    """The subdirectory a message with these system flags lives in."""
    return "cur" if "\\Seen" in flags else "new"


class Delivery:
    """One batch: files staged in tmp/ (`add`), then `commit` (steps 2 to 5), or `discard`."""

    def __init__(self, mf: MaildirFolder) -> None:
        self.mf = mf
        self.staged: list[tuple[str, frozenset[str], frozenset[str]]] = []

    def add(self, key: str, flags: frozenset[str] = frozenset(), keywords: frozenset[str] = frozenset()) -> None:
        self.staged.append((key, flags, keywords))

    def discard(self) -> None:
        """Remove the staged files (the batch failed before it was recorded)."""
        for key, _fl, _kw in self.staged:
            self.mf.discard(key)
        self.staged = []

    def commit(self, state: State, record: Callable, on_disk: dict[str, tuple[str, str]]) -> None:
        """Flush, record(tx) in one state transaction, publish, flush the directories. on_disk
        (key -> (subdir, name)) learns where each file now is."""
        mf = self.mf
        mf.sync([key for key, _fl, _kw in self.staged])
        crashpoint.hit("staged")
        with state.transaction() as tx:
            record(tx)
        crashpoint.hit("recorded")
        for key, fl, kw in self.staged:
            on_disk[key] = (place(fl), mf.publish(key, fl, kw))
            crashpoint.hit("published")
        mf.sync_dirs()
        self.staged = []


def recover(mf: MaildirFolder, known: set[str], on_disk: dict[str, tuple[str, str]],
            flags_of: Callable[[str], Flags]) -> None:
    """Finish what a killed run left in tmp/: recorded files (known keys not in cur/ or new/) are
    published under their recorded flags (flags_of(key)); every other file in tmp/ is removed,
    as is a tmp/ link a kill inside publish left behind."""
    stranded = (mf.tmp_keys() & known) - on_disk.keys()
    for key in stranded:
        fl, kw = flags_of(key)
        on_disk[key] = (place(fl), mf.publish(key, fl, kw))
    if stranded:
        mf.sync_dirs()
    mf.clean_tmp(keep=known - on_disk.keys())
