"""A POP3 maildrop as a store, over pop3.Pop3Session: read-only, one folder INBOX, no flags.

Ids are UIDLs (or, on a server without UIDL, Pop3Session's hash of the headers and size).
POP3 shows the maildrop as it was at login: a store sees no mail that arrives after it was made.
Bodies are RETR'd one message at a time, byte-exact (only the dot-stuffing undone).
"""

from __future__ import annotations

import time

from mailsync.config import Account
from mailsync.errors import MailsyncError
from mailsync.pop3 import Pop3Session
from mailsync.stores.base import (
    Caps,
    Entry,
    NoSuchFolder,
    Refused,
    Snapshot,
    chunks_of,
    require,
)

CAPS = Caps(flags=False, keywords=False, write=False, delete=False, modseq=False, uidplus=False, crlf=True)


class Pop3Store:
    def __init__(self, acc: Account, password: str) -> None:
        self.s = Pop3Session(acc, password)
        self.caps = CAPS

    def folders(self) -> list[str]:
        return ["INBOX"]

    def open(self, name: str, writable: bool) -> Pop3Folder:
        if name.upper() != "INBOX":
            raise NoSuchFolder(f"POP3 at {self.s.where} has only INBOX, not {name!r}")
        if writable:
            require(self.caps, f"POP3 at {self.s.where}", "open INBOX for writing", "write")
        return Pop3Folder(self.s)

    def create(self, name: str) -> None:
        if name.upper() != "INBOX":
            raise Refused(f"POP3 at {self.s.where} has only INBOX: cannot create {name!r}")

    def close(self) -> None:
        """QUIT (nothing was DELE'd, so nothing changes); drop the connection if that fails."""
        try:
            self.s.close(commit=True)
        except MailsyncError:
            self.s.close()


class Pop3Folder:
    def __init__(self, session: Pop3Session) -> None:
        self.s, self.caps, self.where = session, CAPS, f"POP3 at {session.where}"
        self.numbers: dict[str, int] | None = None  # UIDL -> message number in this session

    def snapshot(self, since: object = None) -> Snapshot:
        sizes = self.s.listing()
        ids, _has_uidl = self.s.uidls(sizes)
        self.numbers = {uidl: n for n, uidl in ids.items()}
        return Snapshot(None, {uidl: Entry(uidl, sizes[n], frozenset()) for n, uidl in ids.items()}, time.time())

    def fetch(self, ids):
        if self.numbers is None:
            self.snapshot()
        for uidl in ids:
            if uidl in self.numbers:
                yield uidl, chunks_of(self.s.retr(self.numbers[uidl])), frozenset(), None  # no date

    def append(self, data: bytes, flags, when=None):
        require(self.caps, self.where, "append", "write")

    def set_flags(self, changes: dict, unchanged_since: object = None) -> set:
        require(self.caps, self.where, "change flags", "write", "flags")
        return set()

    def delete(self, ids) -> set:
        require(self.caps, self.where, "delete", "delete")
        return set()
