"""A store held in dicts, for tests: every capability, CRLF line ends, ids counting from 1.

Each change takes the next number of one store-wide modification sequence; the cursor of a
snapshot is the last number given out, as IMAP's HIGHESTMODSEQ. A message's date is the one it
was appended with (None if none).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime

from mailsync.imap import crlf
from mailsync.stores.base import (
    Caps,
    Entry,
    NoSuchFolder,
    Snapshot,
    chunks_of,
    inbox_first,
    require,
)

ALL = Caps(flags=True, keywords=True, write=True, delete=True, modseq=True, uidplus=True, crlf=True)
_validities = itertools.count(1)


@dataclass
class _Box:
    validity: int = field(default_factory=lambda: next(_validities))
    next_id: int = 1
    # id -> data, flags, modseq, date
    messages: dict[int, tuple[bytes, frozenset[str], int, datetime | None]] = field(default_factory=dict)


class MemoryStore:
    def __init__(self) -> None:
        self.caps = ALL
        self.boxes: dict[str, _Box] = {"INBOX": _Box()}
        self.modseq = 0

    def folders(self) -> list[str]:
        return inbox_first(self.boxes)

    def open(self, name: str, writable: bool) -> MemoryFolder:
        if name not in self.boxes:
            raise NoSuchFolder(f"memory store has no folder {name!r}")
        return MemoryFolder(self, name, writable)

    def create(self, name: str) -> None:
        self.boxes.setdefault(name, _Box())

    def close(self) -> None:
        pass

    def tick(self) -> int:
        self.modseq += 1
        return self.modseq


class MemoryFolder:
    def __init__(self, store: MemoryStore, name: str, writable: bool) -> None:
        self.store, self.box, self.where = store, store.boxes[name], f"memory folder {name}"
        self.caps = store.caps if writable else store.caps.read_only()

    def snapshot(self, since: object = None) -> Snapshot:
        msgs = self.box.messages
        entries = {i: Entry(i, len(d), fl) for i, (d, fl, ms, _) in msgs.items() if since is None or ms > since}
        return Snapshot(self.box.validity, entries, self.store.modseq, frozenset(msgs))

    def fetch(self, ids):
        for i in ids:
            if i in self.box.messages:
                data, flags, _, when = self.box.messages[i]
                yield i, chunks_of(data), flags, when

    def append(self, data: bytes, flags, when=None) -> int:
        require(self.caps, self.where, "append", "write")
        i, self.box.next_id = self.box.next_id, self.box.next_id + 1
        self.box.messages[i] = (crlf(data), frozenset(flags), self.store.tick(), when)
        return i

    def set_flags(self, changes: dict, unchanged_since: object = None) -> set:
        require(self.caps, self.where, "change flags", "write", "flags")
        refused = set()
        for i, flags in changes.items():
            had = self.box.messages.get(i)
            if had is None or (unchanged_since is not None and had[2] > unchanged_since):
                refused.add(i)
            elif had[1] != frozenset(flags):
                self.box.messages[i] = (had[0], frozenset(flags), self.store.tick(), had[3])
        return refused

    def delete(self, ids) -> set:
        require(self.caps, self.where, "delete", "delete")
        gone = {i for i in ids if self.box.messages.pop(i, None) is not None}
        if gone:
            self.store.tick()
        return gone
