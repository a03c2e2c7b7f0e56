"""An IMAP account as a store, over imap.ImapSession (one connection, one folder selected).

Ids are UIDs, validity is UIDVALIDITY. caps.modseq is CONDSTORE: snapshots since a cursor read
only the flags changed since its HIGHESTMODSEQ and the messages past its UIDNEXT (plus the UID
list, for expunges), and set_flags can be conditional (UNCHANGEDSINCE). caps.uidplus is UIDPLUS:
append returns the new UID. Bodies are streamed (UID FETCH BODY.PEEK[] read by fetch.read_fetch)
into a spooled temporary file each, so a large message is never held in memory whole; the date a
fetch gives is the INTERNALDATE. A fetch left before its end leaves the connection out of step
(ImapSession.broken): close the store.

Beside the '/'-path names of the store interface, listing() and open_listed() name folders as the
server does (imap.FolderInfo: its separator, its special-use attributes, names that do not decode
or hold a '/' inside one component), for a caller whose records and settings use those names.
"""

from __future__ import annotations

import tempfile

from mailsync.config import Account
from mailsync.fetch import BodyWriter
from mailsync.imap import FolderInfo, ImapSession, crlf
from mailsync.stores.base import (
    CHUNK,
    Caps,
    Entry,
    NoSuchFolder,
    Snapshot,
    file_chunks,
    inbox_first,
    require,
)


class _Spool(BodyWriter):
    """A body written to memory up to CHUNK bytes, to a temporary file beyond."""

    def __init__(self, size: int) -> None:
        self.f = tempfile.SpooledTemporaryFile(max_size=CHUNK)  # noqa: SIM115 - closed by discard() or its chunks
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.size += len(data)

    def discard(self) -> None:
        self.f.close()

    def chunks(self):
        self.f.seek(0)
        return file_chunks(self.f)


class ImapStore:
    def __init__(self, acc: Account, password: str) -> None:
        self.s = ImapSession(acc, password)
        self.caps = Caps(flags=True, keywords=True, write=True, delete=True, modseq=self.s.condstore,
                         uidplus="UIDPLUS" in self.s.caps, crlf=True)
        self.selected: tuple[str, bool] | None = None
        self.delimiter: str | None = None

    def listing(self) -> list[FolderInfo]:
        """The selectable folders as the server lists them (ImapSession.list_folders)."""
        return self.s.list_folders()

    def _listing(self) -> dict[str, str]:
        """'/'-path -> server name, for the selectable folders whose names decode. A name with
        '/' inside one of its parts (under another separator) has no '/'-path and is left out."""
        out = {}
        for f in self.listing():
            self.delimiter = self.delimiter or f.delimiter
            if not f.error and (f.delimiter == "/" or not any("/" in p for p in f.parts)):
                out["INBOX" if f.name.upper() == "INBOX" else "/".join(f.parts)] = f.name
        return out

    def folders(self) -> list[str]:
        return inbox_first(self._listing())

    def open(self, name: str, writable: bool) -> ImapFolder:
        server = self._listing().get(name)
        if server is None:
            raise NoSuchFolder(f"{self.s.where} has no folder {name!r}")
        return self.open_listed(server, writable)

    def open_listed(self, server_name: str, writable: bool) -> ImapFolder:
        """The folder named as listing() names it (FolderInfo.name), without listing again. The
        server refusing the SELECT (no such folder) is a ServerError."""
        folder = ImapFolder(self, server_name, self.caps if writable else self.caps.read_only())
        folder.select(fresh=True)
        return folder

    def create(self, name: str) -> None:
        if name not in self._listing():
            self.s.create(name.replace("/", self.delimiter or "/"))

    def close(self) -> None:
        self.s.close()


class ImapFolder:
    def __init__(self, store: ImapStore, name: str, caps: Caps) -> None:
        self.store, self.s, self.name, self.caps = store, store.s, name, caps
        self.where = f"{self.s.where} {name}"

    def select(self, fresh: bool = False) -> dict[str, int]:
        """SELECT (EXAMINE when read-only) unless selected already; fresh: again, for counters."""
        want = (self.name, self.caps.write)
        if fresh or self.store.selected != want:
            self.store.selected = None
            counters = self.s.select(self.name, readonly=not self.caps.write)
            self.store.selected = want
            return counters
        return {}

    def snapshot(self, since: object = None) -> Snapshot:
        c = self.select(fresh=True)
        validity, modseq, uidnext = cursor = (c.get("uidvalidity"), c.get("highestmodseq"), c.get("uidnext"))
        if not c.get("exists"):
            return Snapshot(validity, {}, cursor)
        if self.caps.modseq and since and since[0] == validity and since[1] and since[2] and modseq and uidnext:
            changed = self.s.flags(since[2], since[1])
            sizes = self.s.sizes(changed)
            entries = {u: Entry(u, sizes[u], fl | kw) for u, (fl, kw) in changed.items() if u in sizes}
            entries.update((u, Entry(u, size, fl | kw)) for u, (size, fl, kw) in self.s.new_messages(since[2]).items())
            return Snapshot(validity, entries, cursor, frozenset(self.s.all_uids()))
        entries = {u: Entry(u, size, fl | kw) for u, (size, fl, kw) in self.s.new_messages(1).items()}
        return Snapshot(validity, entries, cursor)

    def fetch(self, ids):
        uids = sorted(ids)
        if not uids:
            return
        self.select()
        for uid, body, fl, kw, when in self.s.stream_bodies(uids, _Spool):
            if body is not None:
                yield uid, body.chunks(), fl | kw, when

    def append(self, data: bytes, flags, when=None) -> int | None:
        require(self.caps, self.where, "append", "write")
        return self.s.append(self.name, crlf(data), frozenset(flags), when)

    def set_flags(self, changes: dict, unchanged_since: object = None) -> set[int]:
        require(self.caps, self.where, "change flags", "write", "flags")
        if unchanged_since is not None:
            require(self.caps, self.where, "change flags conditionally", "modseq")
        self.select()
        groups: dict[frozenset[str], list[int]] = {}
        for uid, flags in changes.items():
            groups.setdefault(frozenset(flags), []).append(uid)
        modseq = unchanged_since[1] if unchanged_since is not None else None
        refused = set()
        for flags, uids in groups.items():
            refused |= self.s.store_flags(uids, flags, modseq)
        return refused | (set(changes) - set(self.s.existing(changes)))

    def delete(self, ids) -> set[int]:
        """\\Deleted, then UID EXPUNGE. Without UIDPLUS a plain EXPUNGE, only when no other
        message is \\Deleted; else nothing is deleted and the \\Deleted added here is taken back."""
        require(self.caps, self.where, "delete", "delete")
        self.select()
        present = set(self.s.existing(ids))
        if not present:
            return set()
        had = set() if self.caps.uidplus else {
            u for u, (fl, _) in self.s.flags(max(present) + 1, None).items() if u in present and "\\Deleted" in fl}
        self.s.store(present, frozenset({"\\Deleted"}), frozenset(), None)
        if not self.s.expunge(present):
            self.s.store(present - had, frozenset(), frozenset({"\\Deleted"}), None)
        return present - set(self.s.existing(present))
