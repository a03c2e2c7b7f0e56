"""A small scripted IMAPS server for hostile-server tests (never a stand-in for the real Dovecot).

It serves a fixed set of folders whose names are sent exactly as given (raw bytes: invalid
modified UTF-7, '..', '/', leading dots, control characters, NUL in a literal, ...), answers the
commands mailsync sends (CAPABILITY, LOGIN, AUTHENTICATE PLAIN, ENABLE, ID, NAMESPACE, LIST,
STATUS, SELECT/EXAMINE, UID SEARCH, UID FETCH, NOOP, CLOSE, LOGOUT), and can answer the body
FETCH of one folder with a malformed response (FAULTS). Everything received is logged in
`HostileImap.log`.

Loopback only, implicit TLS with a certificate from a throwaway CA (`make_ca`), every socket
with a timeout, every loop bounded (line length, literal size, commands per connection).
"""

from __future__ import annotations

import base64
import datetime
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults import _Listener, make_cert

MAX_LINE = 64 * 1024          # one command line
MAX_LITERAL = 1024 * 1024     # one literal in a command
MAX_COMMANDS = 5000           # per connection
IDLE_TIMEOUT = 20             # seconds without a command before the server hangs up

CAPS = b"IMAP4rev1 AUTH=PLAIN ENABLE ID NAMESPACE"
DATE = b'"02-Nov-2026 10:00:00 +0000"'

# Malformed answers to the body FETCH (BODY.PEEK[] FLAGS INTERNALDATE) of a folder; what exactly
# goes on the wire is in HostileImap._fetch_response and shown in each comment.
FAULTS = {
    # "BODY[] {len+7}" then len bytes: the literal swallows the next 7 bytes (" INTERN")
    "short_literal": "a literal shorter than announced",
    # "BODY[] {len-7}" then len bytes: the message's last 7 bytes spill into the response line
    "long_literal": "a literal longer than announced",
    # "* 1 FETCH (BODY[] {n} ... FLAGS (...))": no UID item in the answer to UID FETCH
    "no_uid": "a FETCH response without UID",
    # "* 1 FETCH (UID 1 FLAGS (\\Seen BODY[] {n}...": a parenthesis never closed
    "unbalanced": "unbalanced parentheses in a FETCH response",
    # "* 1 FETCH (UID 1 X-JUNK (( ))) ) BODY[] {n} ...": unknown atoms and stray parentheses
    "garbage_items": "unknown atoms and stray parentheses among the FETCH items",
    # "* 1 FETCH (UID 1 BODY[] {99999999999}" + 1,000 bytes, then the server hangs up
    "huge_literal": "an enormous announced literal, then the server hangs up",
    # "* 1 FETCH (UID 1001 BODY[] {n} ...": answers for UIDs that were not asked for
    "unasked_uid": "FETCH responses for UIDs that were not asked for",
    # "* 1 FETCH (UID 1 BODY[] {12x}": a literal size that is not a number
    "bad_literal_size": "a literal size that is not a number",
    # these three hit the listing, before any body is fetched:
    # "* 1 FETCH (UID 1 FLAGS () RFC822.SIZE 12abc)" in the answer to (FLAGS RFC822.SIZE)
    "size_garbage": "a message size that is not a number",
    # "* 1 FETCH (UID 18446744073709551617 FLAGS () RFC822.SIZE n)": a UID beyond 64 bits
    "huge_uid": "a UID beyond 64 bits",
    # STATUS and SELECT/EXAMINE without UIDVALIDITY
    "no_uidvalidity": "no UIDVALIDITY in STATUS or SELECT",
}
BODY_FAULTS = ("short_literal", "long_literal", "no_uid", "unbalanced", "garbage_items", "huge_literal",
               "unasked_uid", "bad_literal_size")
LIST_FAULTS = ("size_garbage", "huge_uid")
HUGE_UID = 2**64 + 1


@dataclass
class Folder:
    """One mailbox: `name` goes on the wire as it is (bytes), `messages` are (bytes, flags)."""

    name: bytes
    messages: list[tuple[bytes, tuple[str, ...]]] = field(default_factory=list)
    delimiter: bytes | None = b"."        # None: NIL in LIST
    wire: str = "auto"                    # how LIST sends the name: auto, quoted, literal, atom
    listed: int = 1                       # how many LIST lines name it (2: listed twice)
    uidvalidity: int = 1000
    first_uid: int = 1
    fault: str | None = None              # a FAULTS key, for the body FETCH

    @property
    def uids(self) -> list[int]:
        return list(range(self.first_uid, self.first_uid + len(self.messages)))

    @property
    def uidnext(self) -> int:
        return self.first_uid + len(self.messages)


def make_ca(d: Path) -> tuple[Path, Path]:
    """A throwaway CA (cert, key) for the hostile server's certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailsync hostile test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cp, kp = d / "hostile-ca.pem", d / "hostile-ca.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


def astring(raw: bytes, wire: str = "auto") -> bytes:
    """raw as an IMAP string: quoted where it can be, else a literal (or as asked)."""
    if wire == "atom":
        return raw
    if wire == "literal" or (wire == "auto" and any(b in (0, 10, 13) or b >= 0x80 for b in raw)):
        return b"{%d}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ----------------------------------------------------------------------------- command parsing

class _Bad(Exception):
    pass


def _tokens(buf: bytes) -> list:
    """A command's arguments: atoms/strings as bytes, parenthesised lists as lists. Atoms keep
    their [...] sections whole (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])."""
    out: list = []
    stack: list[list] = [out]
    i, n = 0, len(buf)
    steps = 0
    while i < n:
        steps += 1
        if steps > 100_000:
            raise _Bad("too complex")
        c = buf[i:i + 1]
        if c == b" ":
            i += 1
        elif c == b"(":
            new: list = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
        elif c == b")":
            if len(stack) == 1:
                raise _Bad("unbalanced )")
            stack.pop()
            i += 1
        elif c == b'"':
            j = i + 1
            val = bytearray()
            while j < n and buf[j:j + 1] != b'"':
                if buf[j:j + 1] == b"\\":
                    j += 1
                val += buf[j:j + 1]
                j += 1
            if j >= n:
                raise _Bad("unterminated quoted string")
            stack[-1].append(bytes(val))
            i = j + 1
        elif c == b"{":
            m = re.match(rb"\{(\d+)\+?\}\r\n", buf[i:i + 32])
            if not m:
                raise _Bad("bad literal")
            size = int(m.group(1))
            start = i + m.end()
            stack[-1].append(buf[start:start + size])
            i = start + size
        else:
            j = i
            depth = 0
            while j < n:
                ch = buf[j:j + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth <= 0 and ch in b" ()":
                    break
                j += 1
            stack[-1].append(buf[i:j])
            i = j
    if len(stack) != 1:
        raise _Bad("unbalanced (")
    return out


def _seqset(text: bytes, largest: int) -> set[int]:
    """A UID set ("1:3,7,9:*") as a set of numbers; '*' is the largest UID in use."""
    out: set[int] = set()
    for part in text.split(b","):
        lo, _, hi = part.partition(b":")
        a = largest if lo == b"*" else int(lo)
        b = a if not hi else (largest if hi == b"*" else int(hi))
        if a > b:
            a, b = b, a
        if b - a > 1_000_000:
            raise _Bad("set too large")
        out.update(range(a, b + 1))
    return out


def _header_fields(data: bytes, names: list[bytes]) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    want = {n.lower() for n in names}
    out, keep = [], False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        keep = line.split(b":", 1)[0].strip().lower() in want
        if keep:
            out.append(line)
    return b"".join(out) + b"\r\n"


# ----------------------------------------------------------------------------- the server

class HostileImap(_Listener):
    def __init__(self, cert: Path, key: Path, folders: list[Folder], *, user: str = "hostile",
                 password: str = "pw-hostile") -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.folders = folders
        self.user, self.password = user.encode(), password.encode()
        self.log: list[bytes] = []          # every command received (literals included)
        self.faults_sent: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__()

    # -- bookkeeping --------------------------------------------------------------------

    def find(self, raw: bytes) -> Folder | None:
        for f in self.folders:
            if f.name == raw:
                return f
        if raw.upper() == b"INBOX":
            for f in self.folders:
                if f.name.upper() == b"INBOX":
                    return f
        return None

    def count_fault(self, fault: str) -> None:
        with self._lock:
            self.faults_sent[fault] = self.faults_sent.get(fault, 0) + 1

    def set_fault(self, name: bytes, fault: str | None) -> None:
        f = self.find(name)
        assert f is not None, name
        f.fault = fault

    def commands(self, verb: bytes) -> list[bytes]:
        """Logged commands whose verb (after the tag, and after UID) is verb."""
        out = []
        with self._lock:
            for line in self.log:
                words = line.split(b" ", 3)
                w = words[1:3] if len(words) > 2 and words[1].upper() == b"UID" else words[1:2]
                if w and w[-1].upper() == verb.upper():
                    out.append(line)
        return out

    # -- one connection -----------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                _Session(self, s).run()
        except (OSError, ssl.SSLError, ValueError):
            pass


class _Session:
    def __init__(self, srv: HostileImap, s: ssl.SSLSocket) -> None:
        self.srv, self.s = srv, s
        self.f = s.makefile("rb")
        self.authed = False
        self.selected: Folder | None = None

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def read_command(self) -> bytes | None:
        """One command as it came on the wire (literals inline, "+" sent for each), no CRLF."""
        buf = bytearray()
        while True:
            line = self.f.readline(MAX_LINE + 1)
            if not line:
                return None
            if len(line) > MAX_LINE or not line.endswith(b"\r\n"):
                raise _Bad("line too long")
            buf += line
            m = re.search(rb"\{(\d+)(\+?)\}\r\n$", line)
            if not m:
                return bytes(buf[:-2])
            size = int(m.group(1))
            if size > MAX_LITERAL or len(buf) > 4 * MAX_LITERAL:
                raise _Bad("literal too large")
            if not m.group(2):
                self.send(b"+ go ahead\r\n")
            data = self.f.read(size)
            if len(data) != size:
                return None
            buf += data

    def run(self) -> None:
        self.send(b"* OK [CAPABILITY " + CAPS + b"] hostile test server ready\r\n")
        for _ in range(MAX_COMMANDS):
            try:
                cmd = self.read_command()
            except _Bad as exc:
                self.send(b"* BAD " + str(exc).encode() + b"\r\n")
                return
            if cmd is None:
                return
            with self.srv._lock:
                self.srv.log.append(cmd)
            tag, _, rest = cmd.partition(b" ")
            verb, _, args = rest.partition(b" ")
            verb = verb.upper()
            try:
                if not self.dispatch(tag, verb, args):
                    return
            except _Bad as exc:
                self.send(tag + b" BAD " + str(exc).encode() + b"\r\n")
            except (ValueError, IndexError) as exc:
                self.send(tag + b" BAD cannot parse: " + type(exc).__name__.encode() + b"\r\n")

    def dispatch(self, tag: bytes, verb: bytes, args: bytes) -> bool:
        ok = tag + b" OK done\r\n"
        if verb == b"CAPABILITY":
            self.send(b"* CAPABILITY " + CAPS + b"\r\n" + ok)
        elif verb == b"NOOP" or verb == b"CHECK":
            self.send(ok)
        elif verb == b"LOGOUT":
            self.send(b"* BYE logging out\r\n" + ok)
            return False
        elif verb == b"LOGIN":
            user, pw = _tokens(args)[:2]
            self._login(tag, user, pw)
        elif verb == b"AUTHENTICATE":
            toks = _tokens(args)
            if toks[0].upper() != b"PLAIN":
                self.send(tag + b" NO only PLAIN\r\n")
            else:
                if len(toks) > 1:
                    resp = toks[1]
                else:
                    self.send(b"+ \r\n")
                    resp = self.f.readline(MAX_LINE).strip()
                parts = base64.b64decode(resp).split(b"\0")
                self._login(tag, parts[1], parts[2])
        elif not self.authed:
            self.send(tag + b" NO log in first\r\n")
        elif verb == b"ENABLE":
            self.send(b"* ENABLED\r\n" + ok)
        elif verb == b"ID":
            self.send(b'* ID ("name" "hostile")\r\n' + ok)
        elif verb == b"NAMESPACE":
            self.send(b'* NAMESPACE (("" ".")) NIL NIL\r\n' + ok)
        elif verb in (b"LIST", b"LSUB"):
            self._list(tag, verb)
        elif verb == b"STATUS":
            self._status(tag, _tokens(args))
        elif verb in (b"SELECT", b"EXAMINE"):
            self._select(tag, verb, _tokens(args))
        elif verb in (b"CLOSE", b"UNSELECT"):
            self.selected = None
            self.send(ok)
        elif verb == b"UID":
            sub, _, rest = args.partition(b" ")
            if self.selected is None:
                self.send(tag + b" BAD no folder selected\r\n")
            elif sub.upper() == b"SEARCH":
                self._search(tag, _tokens(rest))
            elif sub.upper() == b"FETCH":
                return self._fetch(tag, _tokens(rest))
            else:
                self.send(tag + b" BAD UID " + sub + b" not here\r\n")
        else:
            self.send(tag + b" BAD unknown command\r\n")
        return True

    def _login(self, tag: bytes, user: bytes, pw: bytes) -> None:
        if user == self.srv.user and pw == self.srv.password:
            self.authed = True
            self.send(tag + b" OK [CAPABILITY " + CAPS + b"] logged in\r\n")
        else:
            self.send(tag + b" NO [AUTHENTICATIONFAILED] wrong user name or password\r\n")

    def _list(self, tag: bytes, verb: bytes) -> None:
        out = bytearray()
        for f in self.srv.folders:
            delim = b"NIL" if f.delimiter is None else astring(f.delimiter, "quoted")
            for _ in range(f.listed):
                out += b"* " + verb + b" (\\HasNoChildren) " + delim + b" " + astring(f.name, f.wire) + b"\r\n"
        self.send(bytes(out) + tag + b" OK done\r\n")

    def _folder(self, tag: bytes, raw) -> Folder | None:
        f = self.srv.find(raw) if isinstance(raw, bytes) else None
        if f is None:
            self.send(tag + b" NO [NONEXISTENT] no such mailbox\r\n")
        return f

    def _status(self, tag: bytes, toks: list) -> None:
        f = self._folder(tag, toks[0])
        if f is None:
            return
        vals = {b"MESSAGES": len(f.messages), b"UIDNEXT": f.uidnext, b"UIDVALIDITY": f.uidvalidity,
                b"UNSEEN": 0, b"RECENT": 0}
        if f.fault == "no_uidvalidity":
            del vals[b"UIDVALIDITY"]
            self.srv.count_fault(f.fault)
        items = b" ".join(b"%s %d" % (k.upper(), vals[k.upper()]) for k in toks[1] if k.upper() in vals)
        self.send(b"* STATUS " + astring(f.name, "auto" if f.wire == "atom" else f.wire)
                  + b" (" + items + b")\r\n" + tag + b" OK done\r\n")

    def _select(self, tag: bytes, verb: bytes, toks: list) -> None:
        self.selected = None
        f = self._folder(tag, toks[0])
        if f is None:
            return
        self.selected = f
        validity = b"" if f.fault == "no_uidvalidity" else b"* OK [UIDVALIDITY %d] ok\r\n" % f.uidvalidity
        self.send(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
                  b"* OK [PERMANENTFLAGS ()] read-only here\r\n"
                  b"* %d EXISTS\r\n* 0 RECENT\r\n" % len(f.messages) + validity
                  + b"* OK [UIDNEXT %d] ok\r\n" % f.uidnext
                  + tag + b" OK [READ-ONLY] " + verb + b" done\r\n")

    def _search(self, tag: bytes, toks: list) -> None:
        f = self.selected
        assert f is not None
        uids = f.uids
        if toks and toks[0].upper() == b"CHARSET":
            toks = toks[2:]
        if toks == [b"ALL"]:
            found = uids
        elif len(toks) == 2 and toks[0].upper() == b"UID":
            want = _seqset(toks[1], max(uids, default=0))
            found = [u for u in uids if u in want]
        else:
            self.send(tag + b" BAD search criteria not supported here\r\n")
            return
        self.send(b"* SEARCH" + b"".join(b" %d" % u for u in found) + b"\r\n" + tag + b" OK done\r\n")

    def _fetch(self, tag: bytes, toks: list) -> bool:
        f = self.selected
        assert f is not None
        if len(toks) < 2:
            raise _Bad("UID FETCH needs a set and items")
        uids = f.uids
        want = _seqset(toks[0], max(uids, default=0))
        items = toks[1] if isinstance(toks[1], list) else [toks[1]]
        items = [i.upper() for i in items]
        body = any(i in (b"BODY.PEEK[]", b"BODY[]", b"RFC822") for i in items)
        if body:
            fault = f.fault if f.fault in BODY_FAULTS else None
        else:
            fault = f.fault if f.fault in LIST_FAULTS and b"RFC822.SIZE" in items else None
        out = bytearray()
        for seq, (uid, (data, flags)) in enumerate(zip(uids, f.messages), start=1):
            if uid not in want:
                continue
            resp = self._fetch_response(seq, uid, data, flags, items, fault, first=not out)
            if resp is None:  # the fault hangs up
                self.srv.count_fault(fault)
                self.send(bytes(out) + b"* %d FETCH (UID %d BODY[] {99999999999}\r\n" % (seq, uid) + b"x" * 1000)
                return False
            out += resp
        if fault:
            self.srv.count_fault(fault)
        self.send(bytes(out) + tag + b" OK fetch done\r\n")
        return True

    def _fetch_response(self, seq: int, uid: int, data: bytes, flags, items: list[bytes], fault: str | None,
                        first: bool) -> bytes | None:
        fl = b"FLAGS (" + " ".join(flags).encode() + b")"
        shown = uid + 1000 if fault == "unasked_uid" else HUGE_UID + uid if fault == "huge_uid" else uid
        parts: list[bytes] = [] if fault == "no_uid" else [b"UID %d" % shown]
        for it in items:
            if it == b"UID":
                continue
            if it == b"FLAGS":
                parts.append(fl)
            elif it == b"RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d%s" % (len(data), b"abc" if fault == "size_garbage" else b""))
            elif it == b"INTERNALDATE":
                parts.append(b"INTERNALDATE " + DATE)
            elif it in (b"BODY.PEEK[]", b"BODY[]", b"RFC822"):
                key = b"RFC822" if it == b"RFC822" else b"BODY[]"
                if fault == "huge_literal":
                    return None
                if fault == "short_literal" and first:
                    parts.append(key + b" {%d}\r\n" % (len(data) + 7) + data)
                elif fault == "long_literal" and first:
                    parts.append(key + b" {%d}\r\n" % (len(data) - 7) + data)
                elif fault == "bad_literal_size" and first:
                    parts.append(key + b" {%dx}\r\n" % len(data) + data)
                else:
                    parts.append(key + b" {%d}\r\n" % len(data) + data)
            elif it.startswith((b"BODY.PEEK[HEADER.FIELDS", b"BODY[HEADER.FIELDS")):
                names = it[it.index(b"(") + 1:it.index(b")")].split()
                hdr = _header_fields(data, names)
                parts.append(it.replace(b"BODY.PEEK[", b"BODY[") + b" {%d}\r\n" % len(hdr) + hdr)
            else:
                raise _Bad("FETCH item not supported here: " + it.decode("ascii", "replace"))
        if fault == "short_literal" and first:
            # the swallowed 7 bytes must exist: put INTERNALDATE right after the body
            parts = [p for p in parts if not p.startswith(b"INTERNALDATE")]
            i = next(i for i, p in enumerate(parts) if p.startswith((b"BODY[]", b"RFC822 ")))
            parts.insert(i + 1, b"INTERNALDATE " + DATE)
        text = b" ".join(parts)
        if fault == "unbalanced" and first:
            return b"* %d FETCH (" % seq + text.replace(fl, fl[:-1], 1) + b")\r\n"
        if fault == "garbage_items" and first:
            return b"* %d FETCH (UID %d X-JUNK (( ))) ) " % (seq, uid) + b" ".join(parts[1:]) + b")\r\n"
        return b"* %d FETCH (" % seq + text + b")\r\n"


def start(tmp: Path, folders: list[Folder]) -> tuple[HostileImap, Path]:
    """A HostileImap with a fresh CA and certificate under tmp: (server, CA file to trust)."""
    ca_cert, ca_key = make_ca(tmp / "hostile-ca")
    cert, key = make_cert(tmp / "hostile-ca", ca_cert, ca_key, "hostile", hosts=["127.0.0.1", "localhost"])
    return HostileImap(cert, key, folders), ca_cert
