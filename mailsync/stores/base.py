"""The store interface: one narrow driver contract with capabilities (after isync's driver.h).

A Store holds folders named as '/'-separated UTF-8 paths ("INBOX", "Archive/2024"); a Folder
holds messages under ids that stay the same for as long as the message exists (UIDs under one
UIDVALIDITY, Maildir unique keys, UIDLs). Flags are IMAP names: system flags such as \\Seen and
\\Flagged, keywords as they are.

What a store cannot do it refuses with Refused, before touching anything: a read-only store or
folder refuses append, set_flags and delete; a store without modification sequences refuses a
conditional set_flags (unchanged_since). Callers check `caps` to know beforehand.

Message bodies are streamed: fetch yields each message's bytes as an iterator of chunks, one
message at a time, never the whole folder in memory, with its flags and its date (what an APPEND
elsewhere needs to keep). While a fetch iterator is being consumed, the same store must not be
used for anything else (an IMAP connection is busy with the FETCH). A message that cannot be read
(a local file without permission) does not end a fetch: its chunks raise StorageError, and the
fetch goes on with the next message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import BinaryIO, Protocol

from mailsync.errors import MailsyncError

CHUNK = 1 << 20  # bodies are handed out in pieces of at most this size
Id = str | int


@dataclass(frozen=True)
class Caps:
    flags: bool      # keeps \\Seen, \\Flagged, ...
    keywords: bool   # keeps keywords besides the system flags
    write: bool      # append and set_flags
    delete: bool
    modseq: bool     # incremental snapshots and conditional set_flags (IMAP CONDSTORE)
    uidplus: bool    # append returns the new message's id
    crlf: bool       # holds CRLF line ends: LF input comes back as CRLF

    def read_only(self) -> Caps:
        return replace(self, write=False, delete=False)


@dataclass(frozen=True)
class Entry:
    id: Id
    size: int
    flags: frozenset[str]


@dataclass(frozen=True)
class Snapshot:
    """What a folder holds. validity: ids are only comparable under an equal one (None: always).
    entries: every message, or for snapshot(since=cursor) at least those new or changed since
    that cursor (a store may return more). ids: every message present, in both cases.
    cursor: never None; pass it to a later snapshot(since=...) or set_flags(unchanged_since=...)
    (a store without caps.modseq ignores since, and refuses unchanged_since)."""

    validity: int | None
    entries: dict[Id, Entry]
    cursor: object
    ids: frozenset | None = None

    def __post_init__(self) -> None:
        if self.ids is None:
            object.__setattr__(self, "ids", frozenset(self.entries))


class Refused(MailsyncError):
    """The store cannot do this (read-only, or it lacks the capability); nothing was changed."""

    exit_code = 2


class NoSuchFolder(MailsyncError):
    exit_code = 2


_WHY = {"write": "is read-only", "delete": "is read-only", "flags": "keeps no flags",
        "modseq": "has no modification sequences (CONDSTORE), so a conditional change is impossible"}


def require(caps: Caps, where: str, what: str, *needed: str) -> None:
    """Raise Refused naming the first capability in needed that caps lacks."""
    for cap in needed:
        if not getattr(caps, cap):
            raise Refused(f"{where} {_WHY.get(cap, f'has no {cap} capability')}: cannot {what}",
                          hint="check the store's caps before asking")


def chunks_of(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


def file_chunks(f: BinaryIO) -> Iterator[bytes]:
    """Read an open binary file out in chunks, closing it at the end."""
    with f:
        while data := f.read(CHUNK):
            yield data


def inbox_first(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=lambda n: (n.upper() != "INBOX", n))


class Folder(Protocol):
    caps: Caps

    def snapshot(self, since: object = None) -> Snapshot: ...

    def fetch(self, ids: Iterable[Id]) -> Iterator[tuple[Id, Iterator[bytes], frozenset[str], datetime | None]]:
        """(id, body chunks, flags, date) for each id still present, in the store's order. The date
        is when the message arrived as the store keeps it (IMAP INTERNALDATE, a Maildir file's
        modification time), timezone-aware; None where the store keeps none (POP3)."""

    def append(self, data: bytes, flags: frozenset[str], when: datetime | None) -> Id | None:
        """The new message's id, or None where the store cannot say (not caps.uidplus)."""

    def set_flags(self, changes: dict[Id, frozenset[str]], unchanged_since: object = None) -> set[Id]:
        """Replace each message's whole flag set; returns the ids refused (changed since the
        cursor unchanged_since, or gone)."""

    def delete(self, ids: Iterable[Id]) -> set[Id]:
        """Remove messages for good; returns the ids deleted."""


class Store(Protocol):
    caps: Caps

    def folders(self) -> list[str]: ...

    def open(self, name: str, writable: bool) -> Folder: ...

    def create(self, name: str) -> None:
        """Make the folder; nothing happens if it exists."""

    def close(self) -> None: ...
