"""POP3S download into the Maildir's INBOX: identity is the UIDL, nothing is ever uploaded.

Byte-exact: RETR is read raw (poplib's own reader refuses lines over 2,048 bytes and folds bare
LF into CRLF), only the dot-stuffing is undone. Delivery is the same crash-safe two-phase one as
for IMAP: stage in tmp/, flush as a group, record the UIDLs, publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import poplib
import re
import threading
import time
from collections.abc import Callable, Iterator

from mailsync import login, ratelimit
from mailsync.config import Account
from mailsync.delivery import Delivery, recover
from mailsync.engine import RunResult
from mailsync.errors import ConnectionLost, ServerError, SessionError
from mailsync.identity import Identity, content_sha256, may_differ
from mailsync.imap import message_id
from mailsync.maildir import MaildirFolder, make_dirs
from mailsync.model import FolderResult, Outcome
from mailsync.plan import batches
from mailsync.runner import Fresh, Stopped, with_session
from mailsync.state import RunLock, State

Progress = Callable[[str, dict], None]
MAX_ANSWER = 64 * 1024 * 1024  # a multi-line answer (TOP) longer than this is refused as hostile
PIPELINE = 64                # RETRs in flight, where the server offers PIPELINING
_END = re.compile(rb"\n\.\r?\n")  # the terminating line "." (dot-stuffing keeps it out of bodies)


def read_dotted(f, limit: int) -> bytes:
    """A multi-line answer's body, up to its terminating line ".", byte-exact but for the
    dot-stuffing (one "." removed from each line that starts with one). Read a buffer at a time
    and never past the terminator, so a pipelined next answer stays unread. Longer than `limit`:
    refused (a server that never ends the answer must not fill the memory)."""
    out = bytearray()
    while True:
        data = f.peek(1 << 16)
        if not data:
            raise EOFError("EOF in the middle of a message")
        tail = bytes(out[-4:]) if len(out) >= 4 else b"\n" + out  # (the body starts at a line start)
        m = _END.search(tail + data)
        if m is not None:
            out += f.read(m.end() - len(tail))
            del out[len(out) - (m.end() - m.start() - 1):]  # the terminator, not the line end before it
            break
        out += f.read(len(data))
        if len(out) > limit:
            raise poplib.error_proto(b"-ERR answer longer than %d bytes" % limit)
    if out.startswith(b"."):
        del out[0]
    return bytes(out).replace(b"\n.", b"\n")


class Pop3Session:
    def __init__(self, acc: Account, secret: str) -> None:
        self.acc = acc
        self.where = f"{acc.host}:{acc.port}"
        # POP3S or STLS, pin, CAPA, authentication (USER/PASS): login.py
        logged = login.log_in(acc, secret, protocol="pop3")
        self.pop = logged.client
        self.caps = logged.caps

    def close(self, commit: bool = False) -> None:
        """QUIT commits DELEs; without commit the connection is just dropped (DELEs roll back)."""
        if commit:
            self._call(self.pop.quit)
            return
        with contextlib.suppress(Exception):
            self.pop.sock.close()

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except poplib.error_proto as exc:
            text = _text(exc)
            if "EOF" in text:
                raise ConnectionLost(f"{self.where} closed the connection",
                                     hint="run again to continue; what was saved is kept") from None
            raise ServerError(f"{self.where} refused a command: {text}") from None
        except (OSError, EOFError) as exc:
            raise ConnectionLost(f"connection to {self.where} lost: {_text(exc)}",
                                 hint="run again to continue; what was saved is kept") from None

    def listing(self) -> dict[int, int]:
        _, lines, _ = self._call(self.pop.list)
        out = {}
        for line in lines:
            num, _, size = line.decode("ascii", "replace").partition(" ")
            out[int(num)] = int(size.split()[0])
        return out

    def uidls(self, sizes: dict[int, int]) -> tuple[dict[int, str], bool]:
        """Message number -> identity. Without UIDL: a hash of the headers (TOP n 0) and size."""
        try:
            _, lines, _ = self.pop.uidl()
        except poplib.error_proto:
            out: dict[int, str] = {}
            seen: dict[str, int] = {}
            for n, size in sorted(sizes.items()):
                head = self.raw("TOP %d 0" % n)
                ident = f"hdr:{hashlib.sha256(head).hexdigest()}:{size}"
                seen[ident] = seen.get(ident, 0) + 1
                out[n] = ident if seen[ident] == 1 else f"{ident}:{seen[ident]}"  # identical twins
            return out, False
        except (OSError, EOFError) as exc:
            raise ConnectionLost(f"connection to {self.where} lost: {_text(exc)}") from None
        out = {}
        for line in lines:
            num, _, uid = line.decode("ascii", "replace").partition(" ")
            out[int(num)] = uid.strip()
        return out, True

    def raw(self, command: str, limit: int = MAX_ANSWER) -> bytes:
        """A multi-line command's body exactly as sent, with only the dot-stuffing undone."""
        def run():
            self.pop._putcmd(command)
            return self._answer(limit)
        return self._call(run)

    def _answer(self, limit: int) -> bytes:
        resp = self.pop._getresp()
        if not resp.startswith(b"+"):
            raise poplib.error_proto(resp)
        return read_dotted(self.pop.file, limit)

    def retr(self, n: int) -> bytes:
        return self.raw("RETR %d" % n, limit=1 << 62)  # (a message is as long as it is)

    def retr_many(self, sizes: dict[int, int]) -> Iterator[tuple[int, bytes]]:
        """(n, message) for each message number in `sizes` (n -> its LIST size), in that order.
        With PIPELINING (RFC 2449) up to PIPELINE RETRs are in flight: no round trip per message.
        A message much longer than its listed size is refused (a misbehaving server). Stopping
        before the end leaves the connection out of step: it is closed, never reused."""
        nums = list(sizes)
        window = PIPELINE if "PIPELINING" in self.caps else 1
        sent = 0
        try:
            for i, n in enumerate(nums):
                if sent == i:
                    more = nums[sent:sent + window]
                    self._call(self.pop.sock.sendall, b"".join(b"RETR %d\r\n" % m for m in more))
                    sent += len(more)
                yield n, self._call(self._answer, 2 * sizes[n] + (1 << 20))
        except BaseException:
            self.close()
            raise

    def dele(self, n: int) -> None:
        self._call(self.pop.dele, n)


def download(acc: Account, password: str, *, progress: Progress = lambda e, d: None,
             stop: threading.Event | None = None) -> RunResult:
    started = time.monotonic()
    stop = stop or threading.Event()
    res = FolderResult(name="INBOX")
    result = RunResult(account=acc.name, folders=[res])
    make_dirs(acc.maildir)
    with RunLock(acc.maildir):
        state = State(acc.maildir)
        try:
            def work(s: Pop3Session) -> None:
                _download(acc, s, state, res, progress, stop)

            def on_retry(err: SessionError, delay: int) -> None:
                res.fail(Outcome.LOST, str(err))
                progress("retry", {"folder": "INBOX", "error": str(err), "delay": delay})

            # each attempt on a new connection; one that ends without QUIT commits no DELE
            with_session(Fresh(lambda: Pop3Session(acc, password)), work, retries=acc.retries, stop=stop,
                         on_retry=on_retry)
            res.succeed()  # (an earlier attempt may have lost its connection)
        except ConnectionLost as exc:
            res.fail(Outcome.LOST, str(exc))
        except SessionError as exc:  # a refused command: retrying will not help
            res.fail(Outcome.REFUSED, str(exc))
        except Stopped:
            raise KeyboardInterrupt from None
        finally:
            state.close()
    res.seconds = result.seconds = time.monotonic() - started
    return result


def _download(acc: Account, s: Pop3Session, state: State, res: FolderResult, progress: Progress,
              stop: threading.Event) -> None:
    t0 = time.monotonic()
    mf = MaildirFolder(acc.maildir)
    mf.ensure()
    on_disk = mf.scan()
    known = state.pop3_records()                    # uidl -> row
    known_keys = {r["key"] for r in known.values()}
    recover(mf, known_keys, on_disk, lambda key: (frozenset(), frozenset()))  # (delivery.py)

    sizes = s.listing()
    ids, has_uidl = s.uidls(sizes)
    if not has_uidl:
        res.notices.append("the server has no UIDL; messages are identified by a hash of their "
                           "headers and size")
    present = set(ids.values())
    todo: list[int] = []
    refetch: set[int] = set()
    too_big = 0
    for n in sorted(ids):
        uidl = ids[n]
        row = known.get(uidl)
        if row is not None and row["key"] in on_disk:
            continue
        if acc.max_message_size and sizes.get(n, 0) > acc.max_message_size:
            too_big += 1
            continue
        todo.append(n)
        if row is not None:
            refetch.add(n)
    if too_big:
        res.notices.append(f"{too_big} messages larger than max_message_size ({acc.max_message_size} bytes) "
                           "were not downloaded; raise max_message_size to get them")
        res.skipped_too_big = too_big
    # identities that vanished (a UIDL format change, as Dovecot's when UIDVALIDITY changes):
    # their files are re-bound by content instead of stored twice
    orphans: dict[str, list[str]] = {}
    for uidl, row in known.items():
        if uidl not in present and row["key"] in on_disk:
            orphans.setdefault(row["sha256"], []).append(uidl)
    # files no state row names (a lost state file, a Maildir filled by another tool): adopted
    # when a download has the same bytes, instead of stored twice
    # (by exact bytes, or by content: the same message with LF line ends or headers another
    # tool added, see identity.py)
    strays: dict[str, list[tuple[str, Identity]]] = {}
    taken: set[str] = set()
    if todo:
        for key in on_disk.keys() - known_keys:
            try:
                ident = Identity.of(mf.read(on_disk[key]))
            except OSError:
                continue
            strays.setdefault(ident.sha256, []).append((key, ident))
            if ident.content != ident.sha256:
                strays.setdefault(ident.content, []).append((key, ident))
    rebound: set[str] = set()
    progress("folder_start", {"folder": "INBOX", "messages": len(todo),
                              "bytes": sum(sizes.get(n, 0) for n in todo)})
    limiter = ratelimit.current(acc)  # max_bytes_per_second, or the fleet's per-host rate
    for batch in batches(sizes, todo, acc.batch_bytes):
        if stop.is_set():
            raise KeyboardInterrupt
        staged, rebinds, adopted, got = [], [], [], 0
        delivery = Delivery(mf)
        try:
            for n, body in s.retr_many({n: sizes.get(n, 0) for n in batch}):
                limiter.take(len(body))
                sha = hashlib.sha256(body).hexdigest()
                if orphans.get(sha) and n not in refetch:
                    rebinds.append((orphans[sha].pop(), ids[n]))
                    continue
                stray = _take(strays, sha, taken)
                if stray is None and strays and may_differ(body[:65536]):
                    stray = _take(strays, content_sha256(body), taken)
                if stray is not None:
                    key, ident = stray  # the state describes the file as it is
                    adopted.append((key, ids[n], ident.size, ident.sha256, ident.message_id))
                    continue
                key = mf.stage(body, None)
                delivery.add(key)
                staged.append((key, ids[n], body, sha))
                got += len(body)
                progress("message", {"folder": "INBOX", "bytes": len(body)})
        except BaseException:
            delivery.discard()
            raise
        now = time.time()

        def record(tx) -> None:
            for key, uidl, body, sha in staged:
                tx.pop3_add(uidl, key, len(body), sha, message_id(body), now)
            for old, new in rebinds:
                tx.pop3_rebind(old, new)
                rebound.add(old)
            for key, uidl, size, sha, mid in adopted:
                tx.pop3_add(uidl, key, size, sha, mid, now)

        delivery.commit(state, record, on_disk)
        res.new += sum(1 for _k, uidl, _b, _s in staged if known.get(uidl) is None)
        res.refetched += sum(1 for _k, uidl, _b, _s in staged if known.get(uidl) is not None)
        res.rebound += len(rebinds) + len(adopted)
        res.bytes += got
    gone = [u for u, row in known.items() if u not in present and row["on_server"] and u not in rebound]
    if gone:
        with state.transaction() as tx:
            tx.pop3_gone(gone)
        res.gone += len(gone)
    # leave on server, unless delete_after_days: only what is safely on disk, and old enough
    if acc.delete_after_days is not None:
        limit = time.time() - acc.delete_after_days * 86400
        rows = state.pop3_records()
        doomed = [(n, uidl) for n, uidl in sorted(ids.items())
                  if uidl in rows and rows[uidl]["key"] in on_disk and rows[uidl]["first_seen"] <= limit]
        for n, _uidl in doomed:
            s.dele(n)
        s.close(commit=True)  # QUIT: the server deletes now
        if doomed:
            with state.transaction() as tx:
                tx.pop3_gone([u for _, u in doomed])
            res.deleted_remote += len(doomed)
    else:
        s.close(commit=True)
    res.seconds = time.monotonic() - t0


def _take(strays: dict, digest: str, taken: set[str]):
    """A stray file with this digest not bound yet (each file is bound once), or None."""
    for key, ident in strays.get(digest, ()):
        if key not in taken:
            taken.add(key)
            return key, ident
    return None


def _text(exc: BaseException) -> str:
    s = exc.args[0] if exc.args else str(exc)
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    return str(s).strip() or type(exc).__name__
