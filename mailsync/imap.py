"""The IMAP side (read-only for backups): folders, counters, flags, message bodies; a session
logs in through login.py (TLS, pin, capabilities, authentication).

Lower-level errors (socket, ssl, imaplib) are translated here into mailsync errors.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

# isort: off
from mailsync import login  # first: it imports imapclient without importlib.metadata
# isort: on
from imapclient import exceptions as imapx
from imapclient.response_parser import parse_fetch_response, parse_response

from mailsync import fetch, utf7
from mailsync.config import Account
from mailsync.errors import ConnectionLost, ServerError
from mailsync.identity import crlf, message_id  # noqa: F401 - re-exported

# moved to login.py; still importable from here
from mailsync.login import (  # noqa: F401
    connect_errors,
    fingerprint_hex,
    peer_fingerprint,
    pretty_fingerprint,
    tls_context,
)
from mailsync.model import normalise_flags

log = logging.getLogger("mailsync.imap")
# imapclient's own warnings (such as "a port (143) often used for unencrypted connections") would
# reach stderr through logging's last resort; mailsync says what matters in its own words. They
# still show with --debug, which logs everything.
logging.getLogger("imapclient").addHandler(logging.NullHandler())

LISTED_STATUS_FRESH = 10.0  # seconds a folder's counters from LIST-STATUS stand in for a STATUS
BODY_ITEMS = [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"]
BODY_ANSWER = frozenset({b"UID", b"BODY[]", b"FLAGS", b"INTERNALDATE"})  # what a body answer must carry


@dataclass
class FolderInfo:
    name: str                 # UTF-8, as users see it
    delimiter: str | None
    flags: tuple[str, ...]
    error: str = ""           # the name cannot be used as listed (reported, never worked on)

    @property
    def parts(self) -> list[str]:
        return self.name.split(self.delimiter) if self.delimiter else [self.name]


class ImapSession:
    """One logged-in connection."""

    def __init__(self, acc: Account, secret: str) -> None:
        self.acc = acc
        self.where = f"{acc.host}:{acc.port}"
        self.valid_until: float | None = None
        self._listed_status: dict[str, tuple[float, dict[str, int]]] = {}  # name -> (when, counters): LIST-STATUS
        self.broken = False  # a reply could not be read: the connection is out of step
        # TLS or STARTTLS, pin, CAPABILITY, authentication, CAPABILITY again: login.py
        logged = login.log_in(acc, secret, protocol="imap")
        self.client = logged.client
        # an OAuth2 login: when its token runs out (runner.Pool opens a new session instead, and
        # providers such as Microsoft end the session about then)
        self.auth = logged.auth
        left = logged.valid_for
        self.valid_until = None if left is None else time.monotonic() + left
        self.client.normalise_times = False
        self.caps = set(logged.caps.names)
        try:
            self.condstore = "CONDSTORE" in self.caps or "QRESYNC" in self.caps
            self.qresync = "QRESYNC" in self.caps and "ENABLE" in self.caps
            if self.qresync:
                self._call(self.client.enable, "QRESYNC")  # implies CONDSTORE
            elif self.condstore and "ENABLE" in self.caps:
                self._call(self.client.enable, "CONDSTORE")
        except (OSError, EOFError, imaplib.IMAP4.abort) as exc:
            self.close()
            raise login.lost_during_login(acc, exc) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.logout()
        with contextlib.suppress(Exception):
            self.client.shutdown()

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (imaplib.IMAP4.abort, imapx.IMAPClientAbortError, OSError, EOFError) as exc:
            if self.valid_until is not None and "expired" in _text(exc).lower():
                # the provider ended the session for its OAuth2 token (Microsoft: BYE ...
                # AccessTokenExpired): the next session logs in with a refreshed one
                self.auth.refused()
            raise ConnectionLost(f"connection to {self.where} lost: {_text(exc)}",
                                 hint="run again to continue; what was saved is kept") from None
        except (imaplib.IMAP4.error, imapx.IMAPClientError) as exc:
            raise ServerError(f"{self.where} refused a command: {_text(exc)}") from None

    # -- folders ----------------------------------------------------------------------

    def list_folders(self) -> list[FolderInfo]:
        """The selectable folders. Names are decoded from modified UTF-7 here, strictly: a name
        that is not valid, or not spelled the one canonical way (so that encoding it again would
        name another folder), is returned with `error` set instead of being guessed at."""
        self.client.folder_encode = False  # raw names: imapclient's decoder is lenient, and raises
        try:
            listed = self._call(self._list_with_status) if "LIST-STATUS" in self.caps else \
                self._call(self.client.list_folders)
        finally:
            self.client.folder_encode = True
        out = []
        for flags, delim, raw in listed:
            fl = tuple(f.decode() if isinstance(f, bytes) else str(f) for f in flags)
            if any(f.lower() in ("\\noselect", "\\nonexistent") for f in fl):
                continue
            if isinstance(delim, bytes):
                delim = delim.decode("ascii", "backslashreplace")
            if raw is None:
                raw = b"NIL"  # a mailbox may be called NIL: the parser reads the atom as nothing
            elif isinstance(raw, int):
                raw = str(raw).encode()
            elif isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            error = ""
            try:
                name = utf7.decode(raw.decode("ascii"))
            except (UnicodeDecodeError, ValueError) as exc:
                name = raw.decode("ascii", "backslashreplace")
                why = str(exc) if isinstance(exc, ValueError) else "bytes outside ASCII"
                error = (f"the server lists a folder name that is not valid modified UTF-7 ({why}); "
                         "skipped: rename it on the server to back it up")
            out.append(FolderInfo(name=name, delimiter=delim or None, flags=fl, error=error))
        return out

    def _list_with_status(self) -> list:
        """LIST with RETURN (STATUS ...) (RFC 5819): every folder and its counters in one round
        trip, instead of a STATUS per folder. The counters are kept for status(), each used once."""
        items = "MESSAGES UIDNEXT UIDVALIDITY" + (" HIGHESTMODSEQ" if self.condstore else "")
        imap = self.client._imap
        imap.untagged_responses.pop("STATUS", None)
        typ, dat = imap._simple_command("LIST", '""', '"*"', "RETURN", f"(STATUS ({items}))")
        self.client._checkok("list", typ, dat)
        typ, dat = imap._untagged_response(typ, dat, "LIST")
        for line in imap.untagged_responses.pop("STATUS", []):
            if not isinstance(line, bytes):
                continue  # (a name sent as a literal: that folder gets its own STATUS)
            try:
                raw_name, values = parse_response([line])
                raw = raw_name if isinstance(raw_name, bytes) else str(raw_name).encode()
                counters = {k.decode().lower(): int(v) for k, v in zip(values[::2], values[1::2], strict=True)}
                self._listed_status[utf7.decode(raw.decode("ascii"))] = (time.monotonic(), counters)
            except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
                continue  # not understood: that folder gets its own STATUS
        return self.client._proc_folder_list(dat)

    def status(self, name: str) -> dict[str, int]:
        at, listed = self._listed_status.pop(name, (0.0, {}))
        if time.monotonic() - at < LISTED_STATUS_FRESH and {"messages", "uidnext", "uidvalidity"} <= listed.keys() \
                and (not self.condstore or "highestmodseq" in listed):
            return listed  # from this run's LIST-STATUS, moments ago
        items = [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY"] + ([b"HIGHESTMODSEQ"] if self.condstore else [])
        raw = self._call(self.client.folder_status, name, items)
        try:
            return {k.decode().lower(): int(v) for k, v in raw.items()}
        except (ValueError, TypeError, AttributeError):
            raise ServerError(f"{self.where} answered STATUS with values that are not numbers",
                              hint="the server is misbehaving") from None

    def examine(self, name: str) -> dict[str, int]:
        """EXAMINE (read-only SELECT): the folder's counters."""
        return self.select(name, readonly=True)

    def select(self, name: str, readonly: bool = False) -> dict[str, int]:
        raw = self._call(self.client.select_folder, name, readonly=readonly)
        out = {}
        try:
            for k, v in raw.items():
                key = k.decode().lower() if isinstance(k, bytes) else str(k).lower()
                if key in ("uidvalidity", "uidnext", "exists", "highestmodseq"):
                    out[key] = int(v[0] if isinstance(v, list) else v)
        except (ValueError, TypeError, IndexError):
            raise ServerError(f"{self.where} answered SELECT with counters that are not numbers",
                              hint="the server is misbehaving") from None
        return out

    # -- messages ---------------------------------------------------------------------

    def _send_fetch(self, seqset: str, items: list[bytes], modifiers: list[str] | None = None) -> bytes:
        imap = self.client._imap
        args = ["UID", "FETCH", seqset, "(" + " ".join(i.decode() for i in items) + ")"]
        if modifiers:
            args.append("(" + " ".join(modifiers) + ")")
        return imap._command(*args)

    def _fetch(self, seqset: str, items: list[bytes], modifiers: list[str] | None = None,
               each=None) -> dict[int, dict]:
        """UID FETCH with a sequence set (ranges like 5:* too): UID -> items, bodies in memory.
        With `each`, every answer is handed to each(uid, items) as it arrives instead, and nothing
        is collected (large listings: no dict per message held)."""
        def run():
            tag = self._send_fetch(seqset, items, modifiers)
            out: dict[int, dict] = {}
            need = BODY_ANSWER if items == BODY_ITEMS else frozenset()
            for got in fetch.read_fetch(self.client._imap, tag, fetch.MemoryBody, self.where, required=need):
                d = {} if each is not None else out.setdefault(got.uid, {})
                for k, v in got.items.items():
                    if k == b"FLAGS":
                        v = fetch.flag_list(v)
                    elif k in (b"RFC822.SIZE", b"MODSEQ"):
                        v = fetch.number(v[0] if isinstance(v, list) and v else v)
                    elif k == b"INTERNALDATE":
                        v = fetch.internaldate(v)
                    elif isinstance(v, fetch.MemoryBody):
                        v = v.value()
                    d[k] = v
                if each is not None:
                    each(got.uid, d)
            return out
        return self._guarded(run)

    def stream_bodies(self, uids: list[int], open_body, max_body: int | None = None):
        """Yield (uid, writer or None, flags, keywords, internaldate) in the server's order, each
        body copied into open_body(size) as it arrives. UIDs the server did not answer are not
        yielded (the caller checks). A writer the caller got is the caller's to keep or discard."""
        tag = self._guarded(lambda: self._send_fetch(seqset(uids), BODY_ITEMS))
        it = fetch.read_fetch(self.client._imap, tag, open_body, self.where, max_body, BODY_ANSWER)
        done = False
        try:
            while True:
                got = self._guarded(next, it, None)
                if got is None:
                    done = True
                    return
                if b"BODY[]" not in got.items:
                    continue  # e.g. a flag update for a message we asked for, sent separately
                fl, kw = normalise_flags(fetch.flag_list(got.items.get(b"FLAGS")))
                yield (got.uid, got.items[b"BODY[]"], fl, kw,
                       fetch.internaldate(got.items.get(b"INTERNALDATE")))
        finally:
            if not done:  # stopped mid-reply (an error here or in the caller): out of step
                self.broken = True
                it.close()

    def _guarded(self, fn, *args):
        """Like _call; a reply we could not read leaves the connection out of step: it is marked
        broken so the pool drops it instead of reusing it."""
        try:
            return self._call(fn, *args)
        except (fetch.ProtocolError, ConnectionLost):  # (a plain NO/BAD leaves it in step)
            self.broken = True
            raise

    # -- writing (two-way sync) ----------------------------------------------------------

    def select_qresync(self, name: str, uidvalidity: int, modseq: int, readonly: bool):
        """SELECT/EXAMINE name (QRESYNC (uidvalidity modseq)): the server answers with the flags
        changed since modseq (FETCH) and the UIDs expunged since (VANISHED (EARLIER)), in one
        round trip. Returns (counters, changed flags by UID, vanished UIDs)."""
        from imapclient.imap_utf7 import encode as utf7_encode

        def run():
            imap = self.client._imap
            imap.untagged_responses.clear()
            cmd = "EXAMINE" if readonly else "SELECT"
            mailbox = '"' + utf7_encode(name).decode("ascii").replace("\\", "\\\\").replace('"', '\\"') + '"'
            typ, data = imap._simple_command(cmd, mailbox, f"(QRESYNC ({uidvalidity} {modseq}))")
            if typ != "OK":
                raise imaplib.IMAP4.error(f"{cmd} failed: {data[-1] if data else typ}")
            imap.state = "SELECTED"
            imap.is_readonly = readonly
            ur = imap.untagged_responses
            counters = {}
            for key in ("UIDVALIDITY", "UIDNEXT", "EXISTS", "HIGHESTMODSEQ"):
                if ur.get(key):
                    counters[key.lower()] = int(ur[key][-1])
            vanished: set[int] = set()
            for v in ur.pop("VANISHED", []):
                text = v.decode() if isinstance(v, bytes) else str(v)
                vanished |= parse_seqset(text.replace("(EARLIER)", "").strip())
            fetched = ur.pop("FETCH", [])
            changed = parse_fetch_response(fetched, False, True) if fetched else {}
            imap.untagged_responses.clear()
            return counters, {u: normalise_flags(d.get(b"FLAGS", ())) for u, d in changed.items()
                              if b"FLAGS" in d}, vanished
        return self._call(run)

    def _tagged(self, *args: str) -> bytes:
        """Run a command and return the tagged OK line's text (response codes live there)."""
        def run():
            imap = self.client._imap
            tag = imap._command(*args)
            typ, data = imap._command_complete(args[0] if args[0] != "UID" else args[1], tag)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"{' '.join(args[:2])} failed: {data[-1] if data else typ}")
            return data[-1] if data and isinstance(data[-1], bytes) else b""
        return self._call(run)

    def store(self, uids: Iterable[int], add: frozenset[str], remove: frozenset[str],
              unchangedsince: int | None) -> set[int]:
        """Change flags; returns the UIDs the server refused because they changed meanwhile."""
        uids = sorted(uids)
        if not uids:
            return set()
        modified: set[int] = set()
        mod = [f"(UNCHANGEDSINCE {unchangedsince})"] if unchangedsince is not None and self.condstore else []
        for op, fl in (("+FLAGS.SILENT", add), ("-FLAGS.SILENT", remove)):
            if not fl:
                continue
            for chunk in _chunks(uids, 500):
                text = self._tagged("UID", "STORE", seqset(chunk), *mod, op, "(" + " ".join(sorted(fl)) + ")")
                m = _MODIFIED.search(text)
                if m:
                    modified |= parse_seqset(m.group(1).decode())
        return modified

    def store_flags(self, uids: Iterable[int], flags: frozenset[str], unchangedsince: int | None) -> set[int]:
        """Set each message's whole flag set (FLAGS.SILENT); returns the UIDs refused because they
        changed on the server since unchangedsince (RFC 7162 MODIFIED)."""
        uids = sorted(uids)
        mod = [f"(UNCHANGEDSINCE {unchangedsince})"] if unchangedsince is not None and self.condstore else []
        modified: set[int] = set()
        for chunk in _chunks(uids, 500):
            text = self._tagged("UID", "STORE", seqset(chunk), *mod, "FLAGS.SILENT",
                                "(" + " ".join(sorted(flags)) + ")")
            m = _MODIFIED.search(text)
            if m:
                modified |= parse_seqset(m.group(1).decode())
        return modified

    def append(self, folder: str, data: bytes, flags: frozenset[str], when: datetime | None) -> int | None:
        """APPEND; returns the new UID when the server says it (UIDPLUS), else None."""
        resp = self._call(self.client.append, folder, data, sorted(flags), when)
        if "UIDPLUS" in self.caps and isinstance(resp, bytes):
            m = _APPENDUID.search(resp)
            if m:
                return int(m.group(2))
        return None

    def multiappend(self, folder: str, items: list[tuple[bytes, frozenset[str], datetime | None]]) -> list[int | None]:
        """APPEND several messages in one command (MULTIAPPEND, RFC 3502: all or none); returns
        their new UIDs in order where the server says them (UIDPLUS), else Nones."""
        msgs = [{"msg": data, "flags": sorted(flags), **({"date": when} if when else {})}
                for data, flags, when in items]
        resp = self._call(self.client.multiappend, folder, msgs)
        if isinstance(resp, tuple):  # (typ, [text])
            resp = b" ".join(x for x in resp[1] if isinstance(x, bytes))
        if "UIDPLUS" in self.caps and isinstance(resp, bytes):
            m = re.search(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", resp)
            if m:
                uids: list[int] = []
                for part in m.group(2).decode().split(","):
                    lo, _, hi = part.partition(":")
                    uids.extend(range(int(lo), int(hi or lo) + 1))
                if len(uids) == len(items):
                    return uids
        return [None] * len(items)

    def search_message_id(self, mid: str) -> list[int]:
        if not mid:
            return []
        return list(self._call(self.client.search, ["HEADER", "Message-ID", mid]))

    def sizes(self, uids: Iterable[int]) -> dict[int, int]:
        uids = sorted(uids)
        if not uids:
            return {}
        raw = self._fetch(seqset(uids), [b"RFC822.SIZE"])
        return {u: int(d.get(b"RFC822.SIZE", 0) or 0) for u, d in raw.items()}

    def expunge(self, uids: Iterable[int]) -> bool:
        """Remove messages already marked \\Deleted. UID EXPUNGE where the server has UIDPLUS;
        otherwise plain EXPUNGE, and only when no other message is \\Deleted (returns False)."""
        uids = sorted(uids)
        if not uids:
            return True
        if "UIDPLUS" in self.caps:
            for chunk in _chunks(uids, 500):
                self._tagged("UID", "EXPUNGE", seqset(chunk))
            return True
        others = set(self._call(self.client.search, ["DELETED"])) - set(uids)
        if others:
            return False
        self._call(self.client.expunge)
        return True

    def create(self, name: str) -> None:
        self._call(self.client.create_folder, name)

    def existing(self, uids: Iterable[int]) -> list[int]:
        """Which of these UIDs the server still lists (UID SEARCH UID set)."""
        uids = sorted(uids)
        if not uids:
            return []
        return sorted(set(self._call(self.client.search, ["UID", seqset(uids)])) & set(uids))

    def all_uids(self) -> set[int]:
        return set(self._call(self.client.search, "ALL"))

    def flags(self, below_uid: int, changedsince: int | None) -> dict[int, tuple[frozenset[str], frozenset[str]]]:
        """Flags of messages with UID < below_uid (only those changed since a modseq, if given)."""
        if below_uid <= 1:
            return {}
        mods = [f"CHANGEDSINCE {changedsince}"] if changedsince is not None else None
        out: dict[int, tuple[frozenset[str], frozenset[str]]] = {}

        def each(uid: int, d: dict) -> None:
            if uid < below_uid:
                out[uid] = normalise_flags(d.get(b"FLAGS", ()))
        self._fetch(f"1:{below_uid - 1}", [b"FLAGS"], mods, each=each)
        return out

    def new_messages(self, from_uid: int) -> dict[int, tuple[int, frozenset[str], frozenset[str]]]:
        """UID -> (size, flags, keywords) for messages with UID >= from_uid."""
        flags: dict[int, tuple[frozenset[str], frozenset[str]]] = {}
        return {uid: (size, *flags[uid]) for uid, size in self.new_sizes(from_uid, flags).items()}

    def new_sizes(self, from_uid: int, flags: dict) -> dict[int, int]:
        """UID -> size for messages with UID >= from_uid; their (flags, keywords) are put into
        `flags`. A folder's listing costs two dict entries per message: the pairs are shared
        (normalise_flags), no tuple is made per message."""
        out: dict[int, int] = {}

        def each(uid: int, d: dict) -> None:
            if uid >= from_uid:
                out[uid] = int(d.get(b"RFC822.SIZE", 0) or 0)
                flags[uid] = normalise_flags(d.get(b"FLAGS", ()))
        self._fetch(f"{max(from_uid, 1)}:*", [b"FLAGS", b"RFC822.SIZE"], each=each)
        return out

    def message_ids(self, uids: Iterable[int]) -> dict[int, tuple[int, str]]:
        uids = sorted(uids)
        if not uids:
            return {}
        raw = self._fetch(seqset(uids), [b"RFC822.SIZE", b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        out = {}
        for uid, d in raw.items():
            hdr = next((v for k, v in d.items() if k.startswith(b"BODY[HEADER")), b"") or b""
            out[uid] = (int(d.get(b"RFC822.SIZE", 0) or 0), message_id(hdr))
        return out

    def bodies(self, uids: list[int]) -> Iterator[tuple[int, bytes | None, frozenset[str], frozenset[str], datetime | None]]:
        """(uid, bytes or None if expunged meanwhile, flags, keywords, internaldate) for a batch."""
        raw = self._fetch(seqset(uids), BODY_ITEMS)
        for uid in uids:
            d = raw.get(uid)
            if d is None:
                yield uid, None, frozenset(), frozenset(), None
                continue
            body = d.get(b"BODY[]")
            fl, kw = normalise_flags(d.get(b"FLAGS", ()))
            when = d.get(b"INTERNALDATE")
            yield uid, body, fl, kw, when if isinstance(when, datetime) else None


_MODIFIED = re.compile(rb"\[MODIFIED ([0-9:,]+)\]")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")


def parse_seqset(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":")
            lo, hi = sorted((int(a), int(b)))
            out.update(range(lo, hi + 1))
        elif part:
            out.add(int(part))
    return out


def seqset(uids: Iterable[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1:3,7,9:10'."""
    out: list[str] = []
    start = prev = None
    for u in sorted(set(uids)):
        if start is None:
            start = prev = u
        elif u == prev + 1:
            prev = u
        else:
            out.append(f"{start}:{prev}" if prev != start else str(start))
            start = prev = u
    if start is not None:
        out.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(out)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _text(exc: BaseException) -> str:
    s = str(exc)
    if s.startswith(("b'", 'b"')):
        s = s[2:-1]
    return s.strip() or type(exc).__name__
