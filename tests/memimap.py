"""An in-memory IMAP server for model-based tests of the engine (tests/test_sync_machine.py).

`MemorySession` offers what mailsync/engine.py and mailsync/folderjob.py use of
`mailsync.imap.ImapSession`, with the same return shapes, so `engine.run(..., connect=...)` runs
the real gather / plan / apply, the real Maildir code and the real state against it. The
semantics follow RFC 3501 (UIDs, UIDVALIDITY, UIDNEXT), RFC 4315 (UIDPLUS: APPENDUID, UID
EXPUNGE) and RFC 7162 (CONDSTORE: every change gives the message and the folder a new, higher
mod-sequence; STORE (UNCHANGEDSINCE n) refuses messages whose mod-sequence is above n;
QRESYNC: SELECT answers with the flags changed and the UIDs expunged since a mod-sequence).

It is a model of a well-behaved server for the engine's logic, nothing more: the wire protocol,
TLS, login, a misbehaving server and a server changing under a run are the business of the
tests against the real Dovecot (tests/conftest.py) and of tests/hostile.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mailsync.errors import ServerError
from mailsync.fetch import ProtocolError
from mailsync.identity import crlf, message_id
from mailsync.imap import FolderInfo
from mailsync.model import normalise_flags

DELIMITER = "/"


@dataclass
class Message:
    data: bytes                  # as the server stores it: CRLF line ends
    flags: frozenset[str]        # system flags (\Seen, \Flagged, ...) as normalise_flags splits them
    keywords: frozenset[str]
    internaldate: datetime       # aware, whole seconds (what INTERNALDATE carries)
    modseq: int


@dataclass
class Folder:
    uidvalidity: int
    uidnext: int = 1
    modseq: int = 1              # HIGHESTMODSEQ: bumped by every change, expunges included
    messages: dict[int, Message] = field(default_factory=dict)
    vanished: dict[int, int] = field(default_factory=dict)  # expunged UID -> modseq of the expunge

    def bump(self) -> int:
        self.modseq += 1
        return self.modseq


class MemoryServer:
    """The mailboxes. The test changes them directly (deliver, set_flags, expunge: another
    client at work between runs); the engine changes them through MemorySession."""

    def __init__(self) -> None:
        self.folders: dict[str, Folder] = {}
        self.lock = threading.RLock()  # sessions of a pool may run in threads
        self._validity = 1000
        self.create("INBOX")

    def create(self, name: str) -> Folder:
        if name in self.folders:
            raise ServerError(f"memory server refused CREATE: [ALREADYEXISTS] {name} exists")
        self._validity += 1
        self.folders[name] = Folder(uidvalidity=self._validity)
        return self.folders[name]

    def folder(self, name: str) -> Folder:
        got = self.folders.get(name)
        if got is None:
            raise ServerError(f"memory server refused a command: [NONEXISTENT] no mailbox {name}")
        return got

    # -- another client's changes ---------------------------------------------------------

    def deliver(self, name: str, data: bytes, flags=(), when: datetime | None = None) -> int:
        """Store a message as APPEND or a delivery agent does; returns its UID."""
        with self.lock:
            f = self.folder(name)
            uid = f.uidnext
            f.uidnext += 1
            fl, kw = normalise_flags(tuple(flags))
            when = (when or datetime.now(UTC)).replace(microsecond=0)
            f.messages[uid] = Message(crlf(data), fl, kw, when, f.bump())
            return uid

    def set_flags(self, name: str, uid: int, flags) -> bool:
        """Replace a message's flags (STORE FLAGS); True if they changed (and the modseq moved)."""
        with self.lock:
            f = self.folder(name)
            m = f.messages[uid]
            fl, kw = normalise_flags(tuple(flags))
            if (fl, kw) == (m.flags, m.keywords):
                return False  # RFC 7162 3.1.3: no change, no new mod-sequence
            m.flags, m.keywords, m.modseq = fl, kw, f.bump()
            return True

    def expunge(self, name: str, uids) -> None:
        with self.lock:
            f = self.folder(name)
            for uid in sorted(uids):
                if f.messages.pop(uid, None) is not None:
                    f.vanished[uid] = f.bump()


class MemorySession:
    """One "logged-in connection" to a MemoryServer, with the capabilities asked for. Commands on
    messages work on the selected folder, as IMAP's do; a command the real server would refuse
    (no folder selected, STORE after EXAMINE, QRESYNC without the capability) raises
    ServerError as ImapSession does for a NO or BAD."""

    def __init__(self, server: MemoryServer, *, condstore: bool = True, qresync: bool = True,
                 uidplus: bool = True) -> None:
        self.server = server
        self.where = "memory:993"
        self.broken = False
        self.closed = False
        self.caps = {"IMAP4REV1", "ENABLE"} | ({"CONDSTORE"} if condstore else set()) \
            | ({"QRESYNC"} if qresync else set()) | ({"UIDPLUS"} if uidplus else set())
        self.condstore = condstore or qresync  # as ImapSession: QRESYNC implies CONDSTORE
        self.qresync = qresync
        self.uidplus = uidplus
        self.selected: str | None = None
        self.readonly = True

    def close(self) -> None:
        self.closed = True
        self.selected = None

    # -- helpers ------------------------------------------------------------------------

    def _cmd(self, name: str) -> None:
        if self.closed:
            raise ServerError(f"{self.where}: {name} on a closed session")

    def _sel(self, writing: bool = False) -> Folder:
        if self.selected is None:
            raise ServerError(f"{self.where} refused a command: BAD no mailbox selected")
        if writing and self.readonly:
            raise ServerError(f"{self.where} refused a command: NO mailbox is read-only (EXAMINE)")
        return self.server.folder(self.selected)

    def _counters(self, f: Folder) -> dict[str, int]:
        out = {"uidvalidity": f.uidvalidity, "uidnext": f.uidnext, "exists": len(f.messages)}
        if self.condstore:  # sent with SELECT once CONDSTORE is enabled (RFC 7162 3.1.2.1)
            out["highestmodseq"] = f.modseq
        return out

    # -- folders ------------------------------------------------------------------------

    def list_folders(self) -> list[FolderInfo]:
        self._cmd("LIST")
        with self.server.lock:
            return [FolderInfo(name=n, delimiter=DELIMITER, flags=("\\HasNoChildren",))
                    for n in sorted(self.server.folders, key=lambda n: (n != "INBOX", n))]

    def create(self, name: str) -> None:
        self._cmd("CREATE")
        with self.server.lock:
            self.server.create(name)

    def status(self, name: str) -> dict[str, int]:
        self._cmd("STATUS")
        with self.server.lock:
            f = self.server.folder(name)
            out = {"messages": len(f.messages), "uidnext": f.uidnext, "uidvalidity": f.uidvalidity}
            if self.condstore:
                out["highestmodseq"] = f.modseq
            return out

    def select(self, name: str, readonly: bool = False) -> dict[str, int]:
        self._cmd("EXAMINE" if readonly else "SELECT")
        self.selected = None  # a failed SELECT leaves no folder selected (RFC 3501 6.3.1)
        with self.server.lock:
            f = self.server.folder(name)
            self.selected, self.readonly = name, readonly
            return self._counters(f)

    def examine(self, name: str) -> dict[str, int]:
        return self.select(name, readonly=True)

    def select_qresync(self, name: str, uidvalidity: int, modseq: int, readonly: bool):
        """(counters, {uid: (flags, keywords)} changed since modseq, UIDs expunged since). A
        UIDVALIDITY that is not the folder's makes the server ignore the QRESYNC parameter."""
        self._cmd("SELECT QRESYNC")
        if not self.qresync:
            raise ServerError(f"{self.where} refused a command: BAD QRESYNC not enabled")
        self.selected = None
        with self.server.lock:
            f = self.server.folder(name)
            self.selected, self.readonly = name, readonly
            if uidvalidity != f.uidvalidity:
                return self._counters(f), {}, set()
            changed = {u: (m.flags, m.keywords) for u, m in f.messages.items() if m.modseq > modseq}
            vanished = {u for u, ms in f.vanished.items() if ms > modseq}
            return self._counters(f), changed, vanished

    # -- reading messages -----------------------------------------------------------------

    def all_uids(self) -> set[int]:
        self._cmd("UID SEARCH ALL")
        with self.server.lock:
            return set(self._sel().messages)

    def existing(self, uids) -> list[int]:
        self._cmd("UID SEARCH UID")
        with self.server.lock:
            return sorted(set(uids) & set(self._sel().messages))

    def flags(self, below_uid: int, changedsince: int | None) -> dict[int, tuple[frozenset[str], frozenset[str]]]:
        """UID FETCH 1:below_uid-1 (FLAGS) (CHANGEDSINCE changedsince)."""
        if below_uid <= 1:
            return {}
        self._cmd("UID FETCH FLAGS")
        with self.server.lock:
            f = self._sel()
            if changedsince is not None and not self.condstore:
                raise ServerError(f"{self.where} refused a command: BAD CHANGEDSINCE without CONDSTORE")
            return {u: (m.flags, m.keywords) for u, m in sorted(f.messages.items())
                    if u < below_uid and (changedsince is None or m.modseq > changedsince)}

    def new_messages(self, from_uid: int) -> dict[int, tuple[int, frozenset[str], frozenset[str]]]:
        """UID -> (RFC822.SIZE, flags, keywords) for UIDs >= from_uid (UID FETCH n:*, whose
        "the last message even below n" answer ImapSession filters out)."""
        self._cmd("UID FETCH n:*")
        with self.server.lock:
            return {u: (len(m.data), m.flags, m.keywords) for u, m in sorted(self._sel().messages.items())
                    if u >= from_uid}

    def new_sizes(self, from_uid: int, flags: dict) -> dict[int, int]:
        """As ImapSession.new_sizes: UID -> size, and (flags, keywords) put into `flags`."""
        out = {}
        for u, (size, fl, kw) in self.new_messages(from_uid).items():
            out[u], flags[u] = size, (fl, kw)
        return out

    def sizes(self, uids) -> dict[int, int]:
        self._cmd("UID FETCH RFC822.SIZE")
        with self.server.lock:
            msgs = self._sel().messages
            return {u: len(msgs[u].data) for u in sorted(set(uids)) if u in msgs}

    def message_ids(self, uids) -> dict[int, tuple[int, str]]:
        """UID -> (RFC822.SIZE, Message-ID) from BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]."""
        self._cmd("UID FETCH MESSAGE-ID")
        with self.server.lock:
            msgs = self._sel().messages
            return {u: (len(msgs[u].data), message_id(_header(msgs[u].data))) for u in sorted(set(uids)) if u in msgs}

    def search_message_id(self, mid: str) -> list[int]:
        """UID SEARCH HEADER Message-ID mid: a case-insensitive substring match (RFC 3501)."""
        if not mid:
            return []
        self._cmd("UID SEARCH HEADER")
        with self.server.lock:
            return [u for u, m in sorted(self._sel().messages.items())
                    if mid.lower() in message_id(_header(m.data)).lower()]

    def bodies(self, uids: list[int]):
        """(uid, bytes or None if not there, flags, keywords, internaldate), in the order asked."""
        self._cmd("UID FETCH BODY.PEEK[]")
        with self.server.lock:
            msgs = dict(self._sel().messages)
        for uid in uids:
            m = msgs.get(uid)
            if m is None:
                yield uid, None, frozenset(), frozenset(), None
            else:
                yield uid, m.data, m.flags, m.keywords, m.internaldate

    def stream_bodies(self, uids: list[int], open_body, max_body: int | None = None):
        """(uid, writer, flags, keywords, internaldate) in UID order (the server's), each body
        written into open_body(size); UIDs not there are left out (the caller asks `existing`).
        A generator left before its end leaves the session out of step (broken), as the real
        one. BODY.PEEK: \\Seen is not set."""
        self._cmd("UID FETCH BODY.PEEK[]")
        with self.server.lock:
            msgs = self._sel().messages
            answer = [(u, msgs[u]) for u in sorted(set(uids)) if u in msgs]
        done = False
        try:
            for uid, m in answer:
                if max_body is not None and len(m.data) > max_body:
                    raise ProtocolError(f"{self.where} announced a {len(m.data)}-byte message body, more "
                                        f"than the {max_body} bytes it listed for the batch")
                body = open_body(len(m.data))
                for i in range(0, len(m.data), 4096):  # in pieces, as the FETCH reader copies them
                    body.write(m.data[i:i + 4096])
                yield uid, body, m.flags, m.keywords, m.internaldate
            done = True
        finally:
            if not done:
                self.broken = True

    # -- writing ------------------------------------------------------------------------

    def _store(self, uids, change, unchangedsince: int | None) -> set[int]:
        """UID STORE: change(message) -> its new (flags, keywords). Returns the UIDs refused by
        UNCHANGEDSINCE (their mod-sequence is above it: changed since; RFC 7162 3.1.3)."""
        with self.server.lock:
            f = self._sel(writing=True)
            check = unchangedsince is not None and self.condstore  # ImapSession drops it otherwise
            refused: set[int] = set()
            for uid in sorted(set(uids)):
                m = f.messages.get(uid)
                if m is None:
                    continue  # UID STORE ignores UIDs that are not there
                if check and m.modseq > unchangedsince:
                    refused.add(uid)
                    continue
                fl, kw = change(m)
                if (fl, kw) != (m.flags, m.keywords):
                    m.flags, m.keywords, m.modseq = fl, kw, f.bump()
            return refused

    def store(self, uids, add: frozenset[str], remove: frozenset[str], unchangedsince: int | None) -> set[int]:
        """+FLAGS.SILENT add, then -FLAGS.SILENT remove: two commands, each with UNCHANGEDSINCE."""
        self._cmd("UID STORE +-FLAGS")
        refused: set[int] = set()
        if add:
            refused |= self._store(uids, lambda m: normalise_flags(tuple(m.flags | m.keywords | add)), unchangedsince)
        if remove:
            refused |= self._store(uids, lambda m: normalise_flags(tuple((m.flags | m.keywords) - remove)),
                                   unchangedsince)
        return refused

    def store_flags(self, uids, flags: frozenset[str], unchangedsince: int | None) -> set[int]:
        """FLAGS.SILENT: each message's whole set replaced; returns the UIDs refused."""
        self._cmd("UID STORE FLAGS")
        new = normalise_flags(tuple(flags))
        return self._store(uids, lambda m: new, unchangedsince)

    def append(self, folder: str, data: bytes, flags: frozenset[str], when: datetime | None) -> int | None:
        """APPEND: the new UID where the server has UIDPLUS (APPENDUID), else None."""
        self._cmd("APPEND")
        uid = self.server.deliver(folder, data, flags, when)
        return uid if self.uidplus else None

    def expunge(self, uids) -> bool:
        """UID EXPUNGE uids (UIDPLUS): those of them marked \\Deleted go. Without UIDPLUS, plain
        EXPUNGE, done only when no other message is marked \\Deleted (else False, nothing done)."""
        uids = set(uids)
        if not uids:
            return True
        self._cmd("EXPUNGE")
        with self.server.lock:
            f = self._sel(writing=True)
            deleted = {u for u, m in f.messages.items() if "\\Deleted" in m.flags}
            if not self.uidplus and deleted - uids:
                return False
            self.server.expunge(self.selected, deleted & uids if self.uidplus else deleted)
            return True


def _header(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 4]
