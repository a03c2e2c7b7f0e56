"""Is this the same message? One answer, for every path that asks.

Two copies of one message may differ in form without being different mail:
- line ends: a server holds CRLF; a Maildir written by mutt, a delivery agent or mbsync holds LF;
- headers a tool added to its own copy: mbsync's `X-TUID`, OfflineIMAP's `X-OfflineIMAP`, and the
  `Status`, `X-Status`, `X-Keywords` and `X-UID` headers that mutt and mbox tools write.

The answer, strongest first:
1. EXACT: the same bytes (SHA-256);
2. SAME_CONTENT: the same canonical form (`canonical`: CRLF line ends, those headers removed);
3. a hint only, never an identity on its own: the same Message-ID with a size that fits one of
   the forms. A hint lets a run bind mail without downloading it when the pair is unambiguous;
   everything else is confirmed by content.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

# lower-case names of headers that tools add to their own copy of a message
ADDED_HEADERS = frozenset({b"x-tuid", b"x-offlineimap", b"status", b"x-status", b"x-keywords", b"x-uid"})


def crlf(data: bytes) -> bytes:
    """Bare LF -> CRLF, as IMAP APPEND needs; CRLF already present is kept."""
    if b"\n" not in data.replace(b"\r\n", b""):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def message_id(data: bytes) -> str:
    """The Message-ID header's value (first one), or '' - a hint only, never an identity."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    low = head.lower()
    pos = low.find(b"message-id:")
    while pos > 0 and low[pos - 1:pos] not in (b"\n",):
        pos = low.find(b"message-id:", pos + 1)
    if pos < 0:
        return ""
    line_end = head.find(b"\n", pos)
    value = head[pos + 11: line_end if line_end >= 0 else len(head)]
    # folded continuation lines
    while line_end >= 0 and head[line_end + 1:line_end + 2] in (b" ", b"\t"):
        nxt = head.find(b"\n", line_end + 1)
        value += head[line_end + 1: nxt if nxt >= 0 else len(head)]
        line_end = nxt
    return value.strip().decode("utf-8", "replace")[:998]


def canonical(data: bytes) -> bytes:
    """The form all copies of one message share: CRLF line ends, without ADDED_HEADERS (each
    with its continuation lines). A message without a header/body separator is all header."""
    d = crlf(data)
    end = d.find(b"\r\n\r\n")
    head, rest = (d, b"") if end < 0 else (d[:end + 2], d[end + 2:])
    if not any(h in head.lower() for h in ADDED_HEADERS):
        return d
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name, colon, _ = line.partition(b":")
        dropping = bool(colon) and name.strip().lower() in ADDED_HEADERS
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


def may_differ(head: bytes) -> bool:
    """Whether a message starting with head can have a canonical form other than its bytes: it
    has a bare LF, or one of ADDED_HEADERS in its header. (False: its SHA-256 is its content.)"""
    end = head.find(b"\r\n\r\n")
    part = head if end < 0 else head[:end]
    if b"\n" in head.replace(b"\r\n", b""):
        return True
    low = part.lower()
    return any((b"\n" + h + b":") in low or low.startswith(h + b":") for h in ADDED_HEADERS)


def content_sha256(data: bytes) -> str:
    """SHA-256 of the canonical form (equal for all copies of one message)."""
    return hashlib.sha256(canonical(data)).hexdigest()


class Match(Enum):
    EXACT = "exact"
    SAME_CONTENT = "same content"


@dataclass(frozen=True, slots=True)
class Identity:
    sha256: str          # of the exact bytes
    content: str         # of canonical(bytes)
    message_id: str
    size: int            # exact
    sizes: frozenset[int]  # the sizes a server may report for a copy: CRLF form, canonical form

    @classmethod
    def of(cls, data: bytes) -> "Identity":
        exact = hashlib.sha256(data).hexdigest()
        wire = crlf(data)
        canon = canonical(data)
        content = exact if canon == data else hashlib.sha256(canon).hexdigest()
        return cls(sha256=exact, content=content, message_id=message_id(data), size=len(data),
                   sizes=frozenset({len(wire), len(canon)}))


def same(a: Identity, b: Identity) -> Match | None:
    """Whether a and b are one message (by content, never by hint)."""
    if a.sha256 == b.sha256:
        return Match.EXACT
    if a.content == b.content:
        return Match.SAME_CONTENT
    return None


def hinted(a: Identity, message_id_: str, size: int) -> bool:
    """A server message known only by (Message-ID, RFC822.SIZE) may be a: a hint, to be unique."""
    return bool(message_id_) and a.message_id == message_id_ and size in a.sizes


class Matcher:
    """Candidates (local files, say) matched against incoming messages; each candidate is used
    at most once. Content first (exact, then canonical), hints only when unambiguous."""

    def __init__(self) -> None:
        self._exact: dict[str, list[str]] = {}
        self._content: dict[str, list[str]] = {}
        self._hint: dict[str, list[str]] = {}
        self.ident: dict[str, Identity] = {}
        self.used: set[str] = set()

    def add(self, key: str, ident: Identity) -> None:
        self.ident[key] = ident
        self._exact.setdefault(ident.sha256, []).append(key)
        self._content.setdefault(ident.content, []).append(key)
        if ident.message_id:
            self._hint.setdefault(ident.message_id, []).append(key)

    def __len__(self) -> int:
        return len(self.ident) - len(self.used)

    def _take(self, keys: list[str]) -> str | None:
        for k in keys:
            if k not in self.used:
                self.used.add(k)
                return k
        return None

    def by_content(self, ident: Identity) -> tuple[str, Match] | None:
        key = self._take(self._exact.get(ident.sha256, []))
        if key is not None:
            return key, Match.EXACT
        key = self._take(self._content.get(ident.content, []))
        if key is not None:
            return key, Match.SAME_CONTENT
        return None

    def pair_by_hint(self, incoming: dict[object, tuple[int, str]]) -> dict[object, str]:
        """Unambiguous (Message-ID, size) pairs: incoming id -> candidate key, each taken. A pair
        counts only when its Message-ID is on exactly one incoming message and exactly one
        candidate left, and the size fits; anything else is left to be matched by content."""
        by_mid: dict[str, list[tuple[object, int]]] = {}
        for iid, (size, mid) in incoming.items():
            if mid:
                by_mid.setdefault(mid, []).append((iid, size))
        out: dict[object, str] = {}
        for mid, got in by_mid.items():
            cands = [k for k in self._hint.get(mid, []) if k not in self.used]
            if len(got) == 1 and len(cands) == 1 and got[0][1] in self.ident[cands[0]].sizes:
                out[got[0][0]] = cands[0]
                self.used.add(cands[0])
        return out
