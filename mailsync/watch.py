"""`mailsync watch`: stay running and sync when something changes, instead of on a timer.

How it listens, per account:
- IMAP: one connection in IDLE (RFC 2177) for each of `watch_folders` (default INBOX). Any
  EXISTS, EXPUNGE, FETCH or VANISHED wakes the account. IDLE is ended and begun again every
  `idle_renew` seconds (default 1500, under the 30 minutes after which a server may drop it, and
  often enough for NAT boxes that forget quiet connections). A lost connection is opened again
  with backoff (1, 2, 4 ... 60 s) and the account is synced on reconnecting: whatever arrived
  meanwhile is fetched, once, by the same engine as `mailsync sync`.
- Every account, IMAP or POP3: a full sync every `poll_interval` seconds (default 300). That
  covers the folders not in IDLE and POP3, which has no push.
- Mode sync: local changes (a mail reader flagging, deleting or filing mail) are pushed. Every
  second each folder's cur/ and new/ are compared with the stamp the last sync recorded in the
  state (folderjob.local_stamp); a difference wakes the account.

A wake-up runs the account's normal sync (engine.run, pop3.download): every guarantee of a sync
holds (crash safety, the run lock, the deletion guard). Wake-ups that arrive during a sync are
merged into one sync after it. One line per sync (`--json`: one JSON object per line).

It ends cleanly on SIGTERM or Ctrl-C: a sync in progress stops between batches, what it saved
stays saved, the IDLE connections log out; exit 0. It ends at start only for what waiting cannot
fix (a config error, a refused login, a certificate that does not verify): one line, its exit code.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import logging
import queue
import select
import signal
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from mailsync.config import Account
from mailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    LockedError,
    MailsyncError,
    ServerError,
    TLSError,
)

log = logging.getLogger("mailsync.watch")

DEBOUNCE = 0.1        # seconds to gather wake-ups that come together (a burst of deliveries)
LOCAL_CHECK = 1.0     # seconds between looks at the Maildir's stamps (mode sync)
ALL = "all folders"  # the label of a NOTIFY listener
IDLE_TICK = 1.0       # seconds an IDLE listener waits for the server before it looks at `stop`
MAX_BACKOFF = 60.0    # seconds, the longest wait before reconnecting or retrying a failed sync
LOCKED_RETRY = 5.0    # seconds: another mailsync holds the account's lock
CHANGES = {b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED"}
# errors that waiting does not fix: at start they end the watch (systemd shows it failed)
FATAL = (ConfigError, AuthError, TLSError)


class _Relogin(Exception):
    """The session's OAuth2 token is about to end: log in again now, without waiting."""


@dataclass
class _Account:
    acc: Account
    secret: str
    next_poll: float = 0.0
    reasons: set[str] = field(default_factory=set)   # why it is due (empty: not due)
    failures: int = 0
    stamps: dict[str, str | None] = field(default_factory=dict)  # folder path -> stamp in the state
    woke_on: dict[str, str | None] = field(default_factory=dict)  # folder path -> stamp a sync was started for


class Watcher:
    def __init__(self, accs: list[Account], secrets: list[str], out: Callable[[str], None], *,
                 quiet: bool, as_json: bool) -> None:
        self.accounts = [_Account(a, s) for a, s in zip(accs, secrets)]
        self._out, self.quiet, self.as_json = out, quiet, as_json
        self.stop = threading.Event()
        self.wake: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._print_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.syncing = False

    # -- output -----------------------------------------------------------------------------

    def say(self, event: str, account: str, text: str, *, error: bool = False, **data) -> None:
        """One line: `TIME ACCOUNT: TEXT` (errors always; others unless --quiet), or JSON."""
        if self.quiet and not error:
            return
        now = datetime.now(UTC).astimezone()
        if self.as_json:
            line = json.dumps({"time": now.isoformat(timespec="seconds"), "event": event, "account": account,
                               **data}, ensure_ascii=False)
        else:
            line = f"{now:%Y-%m-%d %H:%M:%S} {'error: ' if error else ''}{account}: {text}"
        with self._print_lock:
            self._out(line)

    # -- the main loop ----------------------------------------------------------------------

    def run(self) -> int:
        now = time.monotonic()
        for a in self.accounts:
            a.reasons.add("start")
            a.next_poll = now + a.acc.poll_interval
        first = True
        while not self.stop.is_set():
            self._gather()
            for a in self.accounts:
                if self.stop.is_set():
                    break
                if a.reasons:
                    self._sync(a, first)
            if first:
                first = False
                for a in self.accounts:
                    if a.acc.protocol == "imap":
                        self._listen(a, None)
        return 0

    def _gather(self) -> None:
        """Wait until an account is due: woken by a listener (and DEBOUNCE more, so a burst of
        deliveries is one sync), its poll time, or (mode sync) a local change. Returns at once
        while one is due already (woken during the last sync)."""
        while not self.stop.is_set():
            now = time.monotonic()
            for a in self.accounts:
                if now >= a.next_poll:
                    a.reasons.add("poll")
            if any(a.reasons for a in self.accounts):
                return
            wait = min(a.next_poll for a in self.accounts) - now
            if any(a.acc.mode == "sync" for a in self.accounts):
                wait = min(wait, LOCAL_CHECK)
            self._drain(time.monotonic() + max(0.0, min(wait, IDLE_TICK)))
            self._local_changes()

    def _drain(self, until: float) -> None:
        """Take wake-ups until `until`, or until the first one if nothing is due yet."""
        by_name = {a.acc.name: a for a in self.accounts}
        while not self.stop.is_set():
            left = until - time.monotonic()
            try:
                name, why = self.wake.get(timeout=left) if left > 0 else self.wake.get_nowait()
            except queue.Empty:
                return
            by_name[name].reasons.add(why)
            if left > DEBOUNCE:  # (a wait for the first wake-up, not the debounce after one)
                until = time.monotonic() + DEBOUNCE

    def _local_changes(self) -> None:
        """Mode sync: wake an account whose cur/ or new/ differ from what its last sync recorded
        in the state, once for each look they take (a folder the sync leaves unrecorded, such as
        one that `folders` excludes, wakes it once per change, not every second)."""
        from mailsync.folderjob import local_stamp
        for a in self.accounts:
            if a.acc.mode != "sync" or a.reasons or not a.stamps:
                continue
            for rel, recorded in a.stamps.items():
                now = local_stamp(a.acc.maildir if rel == "." else a.acc.maildir / rel)
                if now != recorded and (rel not in a.woke_on or a.woke_on[rel] != now):
                    a.woke_on[rel] = now
                    a.reasons.add("local change")

    def _sync(self, a: _Account, first: bool) -> None:
        """One sync of the account, and its line. At start, an error that waiting does not fix
        (FATAL) is raised: it ends the watch with its line and exit code."""
        acc = a.acc
        reasons, a.reasons = sorted(a.reasons), set()
        why = ", ".join(reasons)
        log.debug("sync %s (%s)", acc.name, why)
        try:
            self.syncing = True
            try:
                if acc.protocol == "pop3":
                    from mailsync import pop3
                    result = pop3.download(acc, a.secret, stop=self.stop)
                else:
                    from mailsync import engine
                    result = engine.run(acc, a.secret, mode=acc.mode)
            finally:
                self.syncing = False
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C during the sync: it stopped between batches
            self.stop.set()
            self.say("interrupted", acc.name, f"{why}: sync interrupted; what was saved is kept", reason=why)
            return
        except LockedError as exc:  # a cron run or a sync by hand: after it
            a.reasons.update(reasons)
            a.next_poll = time.monotonic() + LOCKED_RETRY
            self.say("busy", acc.name, f"{exc}; trying again in {LOCKED_RETRY:.0f} s", reason=why)
            return
        except MailsyncError as exc:
            if first and isinstance(exc, FATAL):
                raise
            a.failures += 1
            wait = min(2.0 ** (a.failures - 1), MAX_BACKOFF)
            a.next_poll = time.monotonic() + wait
            self.say("error", acc.name, f"{exc} (trying again in {wait:.0f} s)", error=True,
                     reason=why, exit_code=exc.exit_code, error_text=str(exc), retry_in=wait)
            return
        a.failures = 0
        a.next_poll = time.monotonic() + acc.poll_interval
        if acc.mode == "sync" and acc.protocol == "imap":
            a.stamps = _recorded_stamps(acc.maildir)
        from mailsync.command import _line
        failed = result.failed
        self.say("sync", acc.name, f"{why}: {_line(result).split(': ', 1)[1]}", error=bool(failed),
                 reason=why, **{k: v for k, v in result.to_json().items() if k != "account"})
        for f in failed:
            self.say("error", acc.name, f"{f.name}: {f.error}", error=True, folder=f.name, error_text=f.error)

    # -- IDLE listeners ---------------------------------------------------------------------

    def _listen(self, a: _Account, folder: str | None) -> None:
        t = threading.Thread(target=self._idle, args=(a, folder), name=f"idle {a.acc.name} {folder or ALL}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _idle(self, a: _Account, folder: str | None) -> None:
        """Listen for changes on one connection, reconnecting with backoff; wake the account on any.

        folder None: the account's first listener. Where the server has NOTIFY (RFC 5465), it
        covers every folder on this one connection; else it keeps the first of watch_folders in
        IDLE and starts a listener of its own for each of the others."""
        acc, attempt, spread, before = a.acc, 0, False, False
        while not self.stop.is_set():
            session = None
            try:
                from mailsync.imap import ImapSession
                session = ImapSession(acc, a.secret)
                label = folder
                if "IDLE" not in session.caps:
                    self.say("no_idle", acc.name, f"the server has no IDLE; every folder is synced every "
                             f"{acc.poll_interval:.0f} s", folder=label)
                    return
                if folder is None and "NOTIFY" in session.caps:
                    _notify(session)
                    label = ALL
                elif folder is None:
                    label = acc.watch_folders[0]
                    if not spread:
                        spread = True
                        for other in acc.watch_folders[1:]:
                            self._listen(a, other)
                if label != ALL:
                    try:
                        _select(session, label)
                    except ServerError as exc:  # no such folder, say: asking again gets the same answer
                        self.say("no_idle", acc.name, f"cannot watch {label}: {exc}; it is synced every "
                                 f"{acc.poll_interval:.0f} s", error=True, folder=label, error_text=str(exc))
                        return
                how = "NOTIFY" if label == ALL else "IDLE"
                self.say("listening", acc.name, f"{label}: waiting for changes ({how})", folder=label,
                         notify=label == ALL, reconnected=before)
                attempt, before = 0, True
                # what arrived before IDLE began (while the connection was down, or between the
                # first sync and now) is fetched by a sync
                self.wake.put((acc.name, f"{label}: listening"))
                self._idle_loop(a, session, label)
            except _Relogin:
                log.debug("%s: the login token is about to end; logging in again", label)
            except (MailsyncError, OSError) as exc:
                session = _drop(session)  # (no LOGOUT in the middle of an IDLE: it may never be answered)
                if self.stop.is_set():
                    break
                attempt += 1
                wait = min(2.0 ** (attempt - 1), MAX_BACKOFF)
                self.say("disconnected", acc.name, f"{folder or ALL}: {exc}; reconnecting in {wait:.0f} s",
                         folder=folder or ALL, error_text=str(exc), retry_in=wait)
                self.stop.wait(wait)
            except Exception as exc:  # a listener must not end the watch silently
                session = _drop(session)
                log.exception("listener for %s", folder or ALL)
                attempt += 1
                self.say("disconnected", acc.name, f"{folder or ALL}: {type(exc).__name__}: {exc}", error=True,
                         folder=folder or ALL, error_text=str(exc))
                self.stop.wait(min(2.0 ** (attempt - 1), MAX_BACKOFF))
            finally:
                if session is not None:
                    session.close()

    def _idle_loop(self, a: _Account, session, label: str) -> None:
        client, renewals = session.client, 0
        if session.valid_until is not None:  # 60 s before the token ends, or a quarter of its life
            margin = min(60.0, max(0.0, session.valid_until - time.monotonic()) / 4)
        while not self.stop.is_set():
            _call(session, client.idle)
            began = time.monotonic()
            while not self.stop.is_set():
                left = a.acc.idle_renew - (time.monotonic() - began)
                if left <= 0:
                    break
                if session.valid_until is not None and session.valid_until - time.monotonic() < margin:
                    # an OAuth2 token about to end (providers end the session then): a new
                    # session, with a fresh token
                    with contextlib.suppress(Exception):
                        _call(session, client.idle_done)
                    raise _Relogin
                answers = _call(session, _idle_check, client, min(IDLE_TICK, left), a.acc.timeout)
                if answers:
                    log.debug("%s: %s", label, answers)
                for why in _changes(answers, label, a.acc.folders):
                    self.wake.put((a.acc.name, why))
            _call(session, client.idle_done)
            if not self.stop.is_set():
                renewals += 1
                log.debug("IDLE on %s renewed (%d)", label, renewals)
                if self.as_json:
                    self.say("idle_renewed", a.acc.name, f"{label}: IDLE renewed", folder=label)

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _drop(session) -> None:
    """Close a listener's connection at once, without a word to the server."""
    if session is not None:
        with contextlib.suppress(Exception):
            session.client.shutdown()


def _select(session, folder: str) -> None:
    from mailsync import utf7
    session.client.folder_encode = False
    _call(session, session.client.select_folder, utf7.encode(folder), readonly=True)


def _call(session, fn, *args, **kw):
    """session._call: imaplib's and imapclient's errors as mailsync's (a lost connection, a refusal)."""
    return session._call(fn, *args, **kw)


def _idle_check(client, timeout: float, line_timeout: float = 60.0) -> list:
    """The server's answers during IDLE, waiting up to `timeout` for the first. Unlike
    imapclient's idle_check, the end of the connection is an error (theirs returns no answers,
    as if the server had been quiet: a watch would then wait on a dead connection), and so is a
    BYE (the server is going away).

    Lines are read whole, on the blocking socket (up to line_timeout for the rest of a line that
    began): a readline on a non-blocking socket drops what it had read of a line when the next
    piece has not come yet (Python's buffered reader discards it with the exception), and the
    rest of that line then reads as garbage. Whether more has come is asked with a peek, which
    consumes nothing."""
    from imapclient.imapclient import _parse_untagged_response
    sock = client.socket()
    answers: list = []
    try:
        if not _more(client, sock) and not select.select([sock], [], [], timeout)[0]:
            return answers
        while True:
            sock.settimeout(line_timeout)
            try:
                line = client._imap._get_line()
            except (imaplib.IMAP4.abort, EOFError) as exc:
                raise ConnectionLost(f"the server closed the connection ({exc})") from None
            answers.append(_parse_untagged_response(line))
            if answers[-1] and answers[-1][0] == b"BYE":
                raise ConnectionLost(f"the server ended the session: {line.decode('utf-8', 'replace')}")
            if not _more(client, sock):
                break
        return answers
    finally:
        client._set_read_timeout()


def _more(client, sock) -> bool:
    """Bytes of the server's are waiting, read or not (a non-blocking peek: consumes nothing)."""
    sock.setblocking(False)
    try:
        return bool(client._imap.file.peek(1))
    except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
        return False
    finally:
        sock.setblocking(True)


def _notify(session) -> None:
    """NOTIFY SET for every folder of the personal namespace: a STATUS answer for each folder where
    mail arrives, is expunged or changes flags, and a LIST answer when folders are made or renamed."""
    imaplib.Commands.setdefault("NOTIFY", ("AUTH", "SELECTED"))  # (imaplib knows only its own commands)
    session._tagged("NOTIFY", "SET", "(personal (MessageNew MessageExpunge FlagChange MailboxName))")


def _changes(answers: list, label: str, patterns: tuple[str, ...]) -> set[str]:
    """Why the account is due, from what the server said during IDLE (empty: nothing changed)."""
    from mailsync import utf7
    from mailsync.folders import selected
    out = set()
    for a in answers:
        if not isinstance(a, tuple) or not a:
            continue
        if a[0] == b"STATUS" and len(a) > 1:  # NOTIFY: a folder changed
            raw = a[1].decode("ascii", "replace") if isinstance(a[1], bytes) else str(a[1])
            try:
                name = utf7.decode(raw)
            except ValueError:
                name = raw
            if selected(name, patterns):
                out.add(f"{name}: changed on server")
        elif a[0] == b"LIST":
            out.add("folders changed on server")
        elif any(isinstance(x, bytes) and x.upper() in CHANGES for x in a):
            out.add(f"{label}: changed on server")
    return out


def _recorded_stamps(root: Path) -> dict[str, str | None]:
    """folder path -> the local stamp the state recorded when the folder was last in step."""
    db = root / ".mailsync.db"
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return {row[0]: row[1] for row in con.execute("SELECT path, local_stamp FROM folders")}
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def run(accs: list[Account], *, out: Callable[[str], None], quiet: bool = False, as_json: bool = False,
        debug: bool = False) -> int:
    """Watch accs until SIGTERM or Ctrl-C. Returns the exit code (0: stopped cleanly)."""
    from mailsync import secrets
    w = Watcher(accs, [secrets.password(a) for a in accs], out, quiet=quiet, as_json=as_json)

    def on_term(signum, frame) -> None:
        w.stop.set()
        if w.syncing:  # the sync stops between batches, as on Ctrl-C
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            code = w.run()
        except KeyboardInterrupt:
            w.stop.set()
            code = 0
        w.stop.set()
        w.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    names = ", ".join(a.name for a in accs)
    if code == 0:
        w.say("stopped", names, "stopped; what was saved is kept")
    return code

