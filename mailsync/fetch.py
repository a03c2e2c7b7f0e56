"""A streaming reader for UID FETCH responses.

imaplib collects a whole command's responses in memory and imapclient then lexes every byte of
them in Python. This reader works on the connection's buffered file instead: response lines are
read whole, and a message body (the `BODY[]` literal) is copied in chunks straight into a writer
the caller provides, so a 50 MB message costs one chunk of memory and the body bytes are never
lexed. Everything else in a response (UID, FLAGS, INTERNALDATE, sizes, header fields) is parsed
by a small tokenizer.

Anything that does not parse (a literal cut short, a FETCH without a UID, unbalanced
parentheses, a literal bigger than the server itself announced) raises ProtocolError: that
folder fails with a one-line error, the connection is dropped (it is out of step), and the other
folders carry on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from mailsync.errors import ConnectionLost, ServerError

MAX_UID = 2**32 - 1           # UIDs are 32-bit (RFC 3501 nz-number)
MAX_LINE = 1 << 20            # one response line without its literals
MAX_SMALL_LITERAL = 4 << 20   # a literal that is not a message body (header fields, names)
CHUNK = 1 << 20               # bodies are copied in pieces of this size


class ProtocolError(ServerError):
    """The server sent a response we cannot read; the connection is out of step."""


class BodyWriter:
    """Where a body literal goes: write() pieces, then the reader hands it on or discard()s it."""

    size = 0

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        pass


class MemoryBody(BodyWriter):
    def __init__(self, size: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    def value(self) -> bytes:
        return b"".join(self.parts) if len(self.parts) != 1 else self.parts[0]


@dataclass
class Fetched:
    uid: int
    items: dict[bytes, object] = field(default_factory=dict)

    @property
    def body(self):
        """The BodyWriter of BODY[], None for NIL, or missing (KeyError) if not sent."""
        return self.items[b"BODY[]"]


@dataclass
class _Lit:
    value: object  # bytes, or a BodyWriter for a streamed body


_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})\+?\}\r?\n$")
_BODY_BEFORE = re.compile(rb"(?:BODY\[\]|BINARY\[\]|RFC822)(?:<\d+>)?\s*$", re.I)
_FETCH_START = re.compile(rb"\* (\d+) FETCH ", re.I)
_TOKEN = re.compile(rb'[ \t]*(?:(\()|(\))|"((?:[^"\\\r\n]|\\.)*)"|([^\s()"{\[\]<]+)(?=[\s()]|$)|([^\s()"{]+?(?:\[[^\]\r\n]*\](?:<[\d.]+>)?)?(?=[\s()]|$)))|[ \t]*([\s\S])')  # the last group: whatever is not a token (an error)
_UNQUOTE = re.compile(rb"\\(.)")
# the FETCH items of RFC 3501, CONDSTORE, BINARY, OBJECTID, SAVEDATE, PREVIEW, and X- extensions
_KNOWN_ITEM = re.compile(rb"(?:UID|FLAGS|INTERNALDATE|RFC822(?:\.SIZE|\.HEADER|\.TEXT)?|BODY(?:STRUCTURE)?|"
                         rb"ENVELOPE|MODSEQ|BINARY(?:\.SIZE)?|EMAILID|THREADID|SAVEDATE|PREVIEW|ANNOTATION|"
                         rb"X-[A-Z0-9.-]+)(?:\[[^\]]*\](?:<\d+(?:\.\d+)?>)?)?\Z")


_known: set[bytes] = set()  # item names seen to match _KNOWN_ITEM (a few; bounded)


def _known_item(key: bytes) -> bool:
    if _KNOWN_ITEM.match(key) is None:
        return False
    if len(_known) < 64:
        _known.add(key)
    return True


def read_fetch(imap, tag: bytes, open_body: Callable[[int], BodyWriter], where: str,
               max_body: int | None = None, required: frozenset[bytes] = frozenset()) -> Iterator[Fetched]:
    """Yield each FETCH response to the command `tag` (already sent) that carries a UID, as it
    arrives, until the tagged reply. Bodies go to open_body(size). A body bigger than max_body
    (if given) is refused as a protocol error before a byte of it is stored. A response with a
    body must also carry the items in `required` (what was asked for): a literal whose announced
    size is wrong swallows the start of the next item, and this is how that shows."""
    f = imap.file
    pending: list[BodyWriter] = []  # opened for the response being read, not yet handed on
    try:
        while True:
            line = _readline(f, where)
            if line.startswith(tag + b" "):
                status, _, text = line[len(tag) + 1:].rstrip(b"\r\n").partition(b" ")
                imap.tagged_commands.pop(tag, None)
                if status.upper() == b"OK":
                    return
                raise ServerError(f"{where} refused UID FETCH: {status.decode(errors='replace')} "
                                  f"{text.strip().decode('utf-8', 'replace')[:200]}")
            if not line.startswith(b"* "):
                raise ProtocolError(f"{where} sent an unexpected line during FETCH: {_show(line)}",
                                    hint="the server is misbehaving; the folder is tried again next run")
            is_fetch = _FETCH_START.match(line) is not None
            parts: list[bytes | _Lit] = []
            total = 0
            while True:
                m = _LITERAL_AT_END.search(line)
                if m is None:
                    parts.append(line.rstrip(b"\r\n"))
                    break
                text = line[:m.start()]
                parts.append(text)
                n = int(m.group(1))
                if is_fetch and _BODY_BEFORE.search(text):
                    if max_body is not None and n > max_body:
                        raise ProtocolError(f"{where} announced a {n}-byte message body, more than the "
                                            f"{max_body} bytes it listed for the batch",
                                            hint="the server is misbehaving; nothing of it was stored")
                    w = open_body(n)
                    pending.append(w)
                    _copy(f, n, w, where)
                    parts.append(_Lit(w))
                else:
                    if n > MAX_SMALL_LITERAL:
                        raise ProtocolError(f"{where} announced a {n}-byte literal where a short value "
                                            "belongs", hint="the server is misbehaving")
                    data = f.read(n)
                    if len(data) != n:
                        raise _lost(where)
                    parts.append(_Lit(data))
                total += len(line)
                if total > MAX_LINE:
                    raise ProtocolError(f"{where} sent a response over {MAX_LINE} bytes", hint="")
                line = _readline(f, where)
            if not is_fetch:
                for w in pending:  # literals in other responses are read and dropped
                    w.discard()
                pending.clear()
                continue
            items = _items(parts, where)
            uid = items.get(b"UID")
            if not (isinstance(uid, bytes) and uid.isdigit()):
                if b"BODY[]" in items:
                    raise ProtocolError(f"{where} sent a message without its UID",
                                        hint="the server is misbehaving; nothing of it was stored")
                continue  # an unsolicited flag update (another client), not an answer
            if not 0 < int(uid) <= MAX_UID:
                raise ProtocolError(f"{where} sent UID {uid[:40].decode()}, outside 1..{MAX_UID}",
                                    hint="the server is misbehaving; the folder is tried again next run")
            for key in items:
                if key not in _known and not _known_item(key):
                    raise ProtocolError(f"{where} sent a FETCH response with an unknown item "
                                        f"{_show(key)}", hint="the server is misbehaving; nothing of it was stored")
            if b"BODY[]" in items and items[b"BODY[]"] is not None and not required <= items.keys():
                raise ProtocolError(f"{where} sent a message without "
                                    f"{', '.join(k.decode() for k in sorted(required - items.keys()))}",
                                    hint="the server is misbehaving; nothing of it was stored")
            pending.clear()
            yield Fetched(int(uid), items)
    except BaseException:
        for w in pending:
            w.discard()
        raise


def _readline(f, where: str) -> bytes:
    try:
        line = f.readline(MAX_LINE + 1)
    except (OSError, EOFError) as exc:
        raise _lost(where, exc) from None
    if not line:
        raise _lost(where)
    if len(line) > MAX_LINE:
        raise ProtocolError(f"{where} sent a line over {MAX_LINE} bytes", hint="the server is misbehaving")
    return line


def _copy(f, n: int, w: BodyWriter, where: str) -> None:
    left = n
    while left:
        try:
            data = f.read(min(left, CHUNK))
        except (OSError, EOFError) as exc:
            raise _lost(where, exc) from None
        if not data:
            raise _lost(where)
        w.write(data)
        left -= len(data)


def _lost(where: str, exc: BaseException | None = None) -> ConnectionLost:
    why = f": {exc}" if exc is not None and str(exc) else ""
    return ConnectionLost(f"connection to {where} lost in the middle of a FETCH{why}",
                          hint="run again to continue; what was saved is kept")


def _show(line: bytes) -> str:
    return repr(line[:80])[2:-1]


def _items(parts: list, where: str) -> dict[bytes, object]:
    """The key/value list of one `* n FETCH (...)` response: the common shape (see _simple) at
    the speed of two regular expressions, anything else through the tokenizer."""
    first = parts[0]
    rest = first[_FETCH_START.match(first).end():]
    got = _simple(rest, parts)
    return got if got is not None else _parsed([rest, *parts[1:]], where)


# The common shape of a FETCH response, as servers send it for a listing or a download: items
# with a number, a list of flags or a quoted string without escapes, single spaces, at most one
# literal, which is BODY[]. A subset of what _parsed reads, with the same result (a test compares
# the two on generated responses); everything else goes to _parsed.
_VALUE = rb'(?:\d+|\((?:\\?[^\s()"{}\[\]\\]+(?: \\?[^\s()"{}\[\]\\]+)*)?\)|"[^"\\\r\n]*")'
_NAME = rb"[A-Za-z0-9.]+"
_ITEM = re.compile(rb"(" + _NAME + rb") (" + _VALUE + rb")")
_ITEM_SRC = _NAME + rb" " + _VALUE
_WHOLE = re.compile(rb"\((" + _ITEM_SRC + rb"(?: " + _ITEM_SRC + rb")*)\)[ \t]*")
_BEFORE_BODY = re.compile(rb"\(((?:" + _ITEM_SRC + rb" )*)BODY\[\] ")
_AFTER_BODY = re.compile(rb"((?: " + _ITEM_SRC + rb")*)\)[ \t]*")


def _simple(rest: bytes, parts: list) -> dict[bytes, object] | None:
    if len(parts) == 1:
        m = _WHOLE.fullmatch(rest)
        if m is None:
            return None
        out: dict[bytes, object] = {}
        _add(out, m.group(1))
        return out
    if len(parts) != 3 or not isinstance(parts[1], _Lit):
        return None
    before, after = _BEFORE_BODY.fullmatch(rest), _AFTER_BODY.fullmatch(parts[2])
    if before is None or after is None:
        return None
    out = {}
    _add(out, before.group(1))
    out[b"BODY[]"] = parts[1].value
    _add(out, after.group(1))
    return out


def _add(out: dict[bytes, object], text: bytes) -> None:
    for key, value in _ITEM.findall(text):
        first = value[0]
        if first == 40:  # (
            value = value[1:-1].split(b" ") if len(value) > 2 else []
        elif first == 34:  # "
            value = _Quoted(value[1:-1])
        out[_key(key)] = value


def _key(key: bytes) -> bytes:
    key = key.upper()
    if key.startswith(b"BODY[]") or key.startswith(b"BINARY[]") or key == b"RFC822":
        return b"BODY[]"
    return key


def _parsed(parts: list, where: str) -> dict[bytes, object]:
    """The tokenizer: any response, or a clean ProtocolError."""
    stack: list[list] = [[]]
    for p in parts:
        if isinstance(p, _Lit):
            stack[-1].append(p.value)
            continue
        # one pass: every position matches some alternative, the last one being "not a token"
        for t in _TOKEN.finditer(p):
            kind = t.lastindex
            if kind == 4 or kind == 5:  # an atom: plain, or with a [section]
                stack[-1].append(t.group(kind))
            elif kind == 1:
                stack.append([])
            elif kind == 2:
                if len(stack) == 1:
                    raise ProtocolError(f"{where} sent a FETCH response with unbalanced parentheses",
                                        hint="the server is misbehaving")
                done = stack.pop()
                stack[-1].append(done)
            elif kind == 3:
                stack[-1].append(_Quoted(_UNQUOTE.sub(rb"\1", t.group(3))))
            else:
                rest = p[t.start():]  # (group 6)
                if rest.strip() == b"":
                    break
                raise ProtocolError(f"{where} sent a FETCH response that does not parse near "
                                    f"{_show(rest)}", hint="the server is misbehaving")
    if len(stack) != 1 or len(stack[0]) != 1 or not isinstance(stack[0][0], list):
        raise ProtocolError(f"{where} sent a FETCH response with unbalanced parentheses",
                            hint="the server is misbehaving")
    flat = stack[0][0]
    if len(flat) % 2:
        raise ProtocolError(f"{where} sent a FETCH response with an item but no value",
                            hint="the server is misbehaving")
    out: dict[bytes, object] = {}
    for i in range(0, len(flat), 2):
        key, value = flat[i], flat[i + 1]
        if not isinstance(key, bytes) or isinstance(key, _Quoted):
            raise ProtocolError(f"{where} sent a FETCH response with a garbled item name",
                                hint="the server is misbehaving")
        key = _key(key)
        if value == b"NIL" and not isinstance(value, _Quoted):
            value = None
        out[key] = value
    return out


class _Quoted(bytes):
    """A quoted string (so a quoted "NIL" is not NIL)."""


_MONTHS = {m: i for i, m in enumerate(
    [b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC"], 1)}
_ZONES: dict[tuple, timezone] = {}  # a few offsets recur: each timezone is built once
_DATE = re.compile(rb"\s*(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\s*$")


def internaldate(value) -> datetime | None:
    """ '17-Jul-1996 02:44:25 -0700' -> an aware datetime, or None if it does not parse."""
    if not isinstance(value, bytes):
        return None
    m = _DATE.match(value)
    if m is None:
        return None
    month = _MONTHS.get(m.group(2).upper())
    if month is None:
        return None
    try:
        tz = _ZONES.get(m.group(7, 8, 9))
        if tz is None:
            off = timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
            tz = timezone(-off if m.group(7) == b"-" else off)
            if len(_ZONES) < 256:
                _ZONES[m.group(7, 8, 9)] = tz
        return datetime(int(m.group(3)), month, int(m.group(1)), int(m.group(4)), int(m.group(5)),
                        int(m.group(6)), tzinfo=tz)
    except ValueError:
        return None


def flag_list(value) -> tuple[bytes, ...]:
    return tuple(v for v in value if isinstance(v, bytes)) if isinstance(value, list) else ()


def number(value) -> int:
    return int(value) if isinstance(value, bytes) and value.isdigit() else 0
