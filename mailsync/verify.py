"""`mailsync verify`: prove that the Maildir backup of an IMAP or POP3 account is complete and intact.

Read-only on both sides: folders are opened with EXAMINE, bodies fetched with BODY.PEEK, the
state is opened read-only (SQLite mode=ro, no migration) and never written, and nothing in the
Maildir is created, renamed or removed. The run lock is taken, so a sync cannot change the backup
while it is being checked.

For every selected folder (the same selection and directory mapping as a sync) the server, the
state and the files are compared:

  missing          a message on the server with no state record, or whose file is not on disk
  hash mismatch    a file whose SHA-256 differs from the one the state recorded (always re-hashed)
  size mismatch    the server's RFC822.SIZE differs from the state's size for that UID
  UIDVALIDITY      the server's differs from the state's: the folder must be synced first
  deep mismatch    (deep=True) the server's bytes differ from the local file
  lost             gone from the server and its file is gone from the backup too (an error in
                   backup mode, where that file was the only copy; a warning in sync mode, where
                   removing a local file is the user's own decision)
  flag difference  the server's flags/keywords differ from the file name's  -- a warning
  extra file       a file in the folder that no state record names           -- a warning
  kept             gone from the server, kept in the backup                  -- counted, fine

Flag differences are warnings, not failures: flags change whenever mail is read, and they are
metadata the next sync brings over; what verify proves is that every message is there, intact.
Extra files are warnings too: they are not part of the backup, and lose nothing.

A POP3 account (one folder, INBOX, the Maildir root) is checked the same way against the server's
UIDLs and LIST sizes and the state's pop3 records: missing, hash mismatch, size mismatch, lost,
extra and kept as above (no flags, no UIDVALIDITY), and with deep=True every message is read with
RETR. No DELE is ever sent, and the session ends by dropping the connection, never with QUIT (the
command that makes a POP3 server commit deletions and flag changes).

`VerifyReport.exit_code` is 0 when the backup is proven, EXIT_DAMAGED (11, "backup incomplete or
damaged") otherwise.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailsync.config import Account
from mailsync.errors import AuthError, ConfigError, MailsyncError, SessionError, StorageError
from mailsync.folders import map_paths, selected
from mailsync.identity import Identity, same
from mailsync.imap import FolderInfo, ImapSession, crlf
from mailsync.maildir import MaildirFolder
from mailsync.model import Record
from mailsync.plan import batches
from mailsync.runner import Fresh, Pool, Stopped, fan_out, with_session
from mailsync.state import DB_NAME, SCHEMA_VERSION, RunLock, State, _row_record

Progress = Callable[[str, dict], None]

EXIT_OK = 0
EXIT_DAMAGED = 11  # backup incomplete or damaged


class BackupIncomplete(MailsyncError):
    """There is no backup to verify (exit code 11: backup incomplete or damaged)."""

    exit_code = EXIT_DAMAGED


def _quiet(event: str, data: dict) -> None:
    pass


# ----------------------------------------------------------------------------- the report

@dataclass
class Problem:
    """One message (or file) verify has something to say about."""

    uid: int | str | None  # the server UID, a POP3 UIDL (str), None for a file no record names
    file: str | None    # path relative to the account's Maildir (for a missing file: dir/key)
    detail: str

    def to_json(self) -> dict:
        return {"uid": self.uid, "file": self.file, "detail": self.detail}

    def line(self, label: str) -> str:
        who = [] if self.uid is None else [f"UIDL {self.uid}" if isinstance(self.uid, str) else f"UID {self.uid}"]
        if self.file:
            who.append(self.file)
        return f"{label}: {', '.join(who) or '?'}: {self.detail}"


# (attribute, label in text(), error?)  -- "lost" depends on the mode, see FolderReport.ok
_ERRORS = (("missing", "missing"), ("hash_mismatches", "hash mismatch"), ("size_mismatches", "size mismatch"),
           ("deep_mismatches", "content mismatch"))
_WARNINGS = (("flag_differences", "warning: flags differ"), ("extra", "warning: extra file"))


@dataclass
class FolderReport:
    name: str
    path: str = ""                  # relative to the Maildir ("." for INBOX)
    on_server: bool = True          # False: a folder the state knows that the server no longer lists
    server_messages: int = 0
    local_files: int = 0
    state_records: int = 0          # records of the current UIDVALIDITY
    uidvalidity_server: int | None = None
    uidvalidity_state: int | None = None
    deep_checked: int = 0           # bodies fetched and compared (deep mode)
    unhashed: int = 0               # files whose record has no SHA-256 (only --deep can check them)
    error: str = ""                 # the folder could not be verified, or its UIDVALIDITY changed
    lost_is_error: bool = True      # backup mode: a lost message is damage; sync mode: a warning
    missing: list[Problem] = field(default_factory=list)
    hash_mismatches: list[Problem] = field(default_factory=list)
    size_mismatches: list[Problem] = field(default_factory=list)
    deep_mismatches: list[Problem] = field(default_factory=list)
    lost: list[Problem] = field(default_factory=list)
    flag_differences: list[Problem] = field(default_factory=list)
    extra: list[Problem] = field(default_factory=list)
    kept: list[Problem] = field(default_factory=list)
    other_form: list[Problem] = field(default_factory=list)  # deep: same message, other bytes (adopted)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        n = sum(len(getattr(self, a)) for a, _ in _ERRORS) + (1 if self.error else 0)
        return n + (len(self.lost) if self.lost_is_error else 0)

    @property
    def warnings(self) -> int:
        return sum(len(getattr(self, a)) for a, _ in _WARNINGS) + (0 if self.lost_is_error else len(self.lost))

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def to_json(self) -> dict:
        out = {
            "name": self.name, "path": self.path, "on_server": self.on_server, "ok": self.ok,
            "error": self.error or None,
            "counts": {"server_messages": self.server_messages, "local_files": self.local_files,
                       "state_records": self.state_records, "kept": len(self.kept),
                       "deep_checked": self.deep_checked, "unhashed": self.unhashed},
            "uidvalidity": {"server": self.uidvalidity_server, "state": self.uidvalidity_state},
            "lost_is_error": self.lost_is_error,
            "notes": list(self.notes),
        }
        for attr in ("missing", "hash_mismatches", "size_mismatches", "deep_mismatches", "lost",
                     "flag_differences", "extra", "kept", "other_form"):
            out[attr] = [p.to_json() for p in getattr(self, attr)]
        return out

    def text_lines(self) -> list[str]:
        counts = [f"{self.server_messages} on server" if self.on_server else "gone from the server",
                  f"{self.local_files} files", f"{self.state_records} in state"]
        if self.kept:
            counts.append(f"{len(self.kept)} kept after removal from the server")
        if self.deep_checked:
            counts.append(f"{self.deep_checked} compared with the server")
        if self.other_form:
            counts.append(f"{len(self.other_form)} in another form than the server's")
        head = "ok" if self.ok else f"{self.problems} problem{'s' if self.problems != 1 else ''}"
        if self.warnings:
            head += f", {self.warnings} warning{'s' if self.warnings != 1 else ''}"
        lines = [f"{self.name}: {head} ({', '.join(counts)})"]
        if self.error:
            lines.append(f"  error: {self.error}")
        for attr, label in _ERRORS:
            lines += [f"  {p.line(label)}" for p in getattr(self, attr)]
        label = "lost" if self.lost_is_error else "warning: lost"
        lines += [f"  {p.line(label)}" for p in self.lost]
        for attr, label in _WARNINGS:
            lines += [f"  {p.line(label)}" for p in getattr(self, attr)]
        lines += [f"  {p.line('other form')}" for p in self.other_form]
        lines += [f"  note: {n}" for n in self.notes]
        return lines


@dataclass
class VerifyReport:
    account: str
    maildir: str
    deep: bool = False
    folders: list[FolderReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no folder has missing messages, hash, size or content mismatches, a
        UIDVALIDITY problem or an error (flag differences and extra files are warnings)."""
        return all(f.ok for f in self.folders)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_DAMAGED

    def to_json(self) -> dict:
        fs = self.folders
        return {
            "account": self.account,
            "maildir": self.maildir,
            "deep": self.deep,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "folders": [f.to_json() for f in fs],
            "totals": {
                "folders": len(fs),
                "failed_folders": sum(1 for f in fs if not f.ok),
                "problems": sum(f.problems for f in fs),
                "warnings": sum(f.warnings for f in fs),
                "server_messages": sum(f.server_messages for f in fs),
                "local_files": sum(f.local_files for f in fs),
                "state_records": sum(f.state_records for f in fs),
                "kept": sum(len(f.kept) for f in fs),
                "deep_checked": sum(f.deep_checked for f in fs),
                **{a: sum(len(getattr(f, a)) for f in fs)
                   for a in ("missing", "hash_mismatches", "size_mismatches", "deep_mismatches", "lost",
                             "flag_differences", "extra")},
            },
        }

    def text(self) -> str:
        lines: list[str] = []
        for f in self.folders:
            lines += f.text_lines()
        fs = self.folders
        what = f"{len(fs)} folder{'s' if len(fs) != 1 else ''}"
        if self.deep:
            what += f", {sum(f.deep_checked for f in fs)} messages compared with the server"
        if self.ok:
            warn = sum(f.warnings for f in fs)
            lines.append(f"{self.account}: backup verified: {what}"
                         + (f" ({warn} warning{'s' if warn != 1 else ''})" if warn else ""))
        else:
            bad = [f for f in fs if not f.ok]
            n = sum(f.problems for f in bad)
            lines.append(f"{self.account}: backup incomplete or damaged: {n} problem{'s' if n != 1 else ''} "
                         f"in {len(bad)} of {what}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the state, read-only

class _ReadOnlyState(State):
    """The state opened read-only: no file created, no migration, no WAL switch. The read
    methods are State's own."""

    def __init__(self, root: Path) -> None:  # not super().__init__: it creates and migrates
        self.path = root / DB_NAME
        self._lock = threading.RLock()
        if not self.path.is_file():
            raise BackupIncomplete(f"no backup state in {root} ({DB_NAME} not found)",
                                   hint="run `mailsync sync` for this account first")
        try:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                      check_same_thread=False, isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"state file {self.path} is unreadable: {exc}") from None
        if version > SCHEMA_VERSION:
            self.db.close()
            raise StorageError(f"state file {self.path} is from a newer mailsync (schema {version})",
                               hint="upgrade mailsync")
        if version < 1:
            self.db.close()
            raise BackupIncomplete(f"state file {self.path} holds no backup yet",
                                   hint="run `mailsync sync` for this account first")

    def all_records(self, fid: int) -> list[tuple[int, Record]]:
        """(uidvalidity, record) of every message of a folder, whatever its UIDVALIDITY."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM messages WHERE folder_id=?", (fid,)).fetchall()
        return [(r["uidvalidity"], _row_record(r)) for r in rows]


# ----------------------------------------------------------------------------- checking one folder

def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def rehash(rep: FolderReport, id_, shown: str, path: Path, recorded: str, old: str = "") -> str | None:
    """The file's SHA-256, checked against the one its record holds (a mismatch or an unreadable
    file goes into rep.hash_mismatches, a record without a checksum counts as unhashed); None if
    the file cannot be read. old: what to add to each problem (a record of an old UIDVALIDITY)."""
    try:
        got = _digest(path)
    except OSError as exc:
        rep.hash_mismatches.append(Problem(id_, shown, f"cannot read the file: {exc.strerror or exc}{old}"))
        return None
    if not recorded:
        rep.unhashed += 1
    elif got != recorded:
        rep.hash_mismatches.append(Problem(id_, shown, f"the file's SHA-256 {got[:16]}... differs from the "
                                           f"state's {recorded[:16]}... (corrupted or changed){old}"))
    return got


def deep_compare(rep: FolderReport, id_, shown: str, body: bytes, path: Path, file_sha: str) -> None:
    """--deep, both protocols: the server's bytes against the file's. The same bytes: nothing to
    say; the same message in another form (identity.py): `other_form`; else a content mismatch."""
    got = hashlib.sha256(body).hexdigest()
    if got == file_sha:
        return
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    if data is not None and crlf(data) == body:
        rep.other_form.append(Problem(id_, shown, "the server's message with LF line ends (CRLF on the server): "
                                      "kept as it is"))
    elif data is not None and same(Identity.of(body), Identity.of(data)) is not None:
        rep.other_form.append(Problem(id_, shown, "the server's message in another form (line ends, or headers "
                                      "another tool added): kept as it is"))
    else:
        rep.deep_mismatches.append(Problem(id_, shown, f"the server's copy (SHA-256 {got[:16]}..., {len(body)} "
                                           f"bytes) differs from the file (SHA-256 {file_sha[:16]}...)"))


def _flagtext(flags) -> str:
    return " ".join(sorted(flags)) or "(none)"


@dataclass
class _Folder:
    """What is needed to verify one folder."""

    name: str
    path: Path
    row: object            # the state's folder row, or None
    info: FolderInfo | None  # None: the server no longer lists the folder


class _Checker:
    def __init__(self, acc: Account, state: _ReadOnlyState, deep: bool, progress: Progress,
                 stop: threading.Event) -> None:
        self.acc, self.state, self.deep, self.progress, self.stop = acc, state, deep, progress, stop

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.acc.maildir))
        except ValueError:
            return str(path)

    def folder(self, job: _Folder, s: ImapSession | None) -> FolderReport:
        acc = self.acc
        rep = FolderReport(name=job.name, path=self.rel(job.path) if job.path != acc.maildir else ".",
                           on_server=job.info is not None, lost_is_error=acc.mode != "sync")
        row = job.row
        fid = row["id"] if row is not None else None
        rep.uidvalidity_state = state_v = row["uidvalidity"] if row is not None else None

        # the server side first (a folder gone from the server is checked locally only)
        server: dict[int, tuple[int, frozenset[str], frozenset[str]]] = {}
        server_ok = job.info is not None
        if job.info is not None:
            sel = s.examine(job.name)
            rep.uidvalidity_server = server_v = sel.get("uidvalidity")
            server = s.new_messages(1)
            rep.server_messages = len(server)
            if state_v is not None and server_v != state_v:
                rep.error = (f"UIDVALIDITY is {server_v} on the server but {state_v} in the state: the server "
                             "renumbered this folder; run a sync first (it re-matches the messages without "
                             "downloading them again), then verify")
                server_ok = False
            elif state_v is None:
                rep.notes.append("the folder's first sync has not finished" if fid is not None
                                 else "the folder has never been backed up")
        else:
            rep.notes.append("the folder is gone from the server; its backup is kept "
                             "(folder deletions never propagate)")
        validity = state_v if state_v is not None else rep.uidvalidity_server

        # the local side: files, and the state's records of every UIDVALIDITY
        mf = MaildirFolder(job.path)
        on_disk = mf.scan()
        in_tmp = mf.tmp_keys()
        rep.local_files = len(on_disk)
        allrecs = self.state.all_records(fid) if fid is not None else []
        current = {rec.uid: rec for v, rec in allrecs if v == validity}
        rep.state_records = len(current)
        named = {rec.key for _, rec in allrecs}

        def where(key: str) -> str:
            if key in on_disk:
                sub, name = on_disk[key]
                return self.rel(job.path / sub / name)
            return self.rel(job.path / key)

        # re-hash every file a record names
        local_sha: dict[str, str] = {}
        unreadable: set[str] = set()
        for v, rec in sorted(allrecs, key=lambda t: (t[0] != validity, t[1].uid)):
            if rec.key not in on_disk or rec.key in local_sha or rec.key in unreadable:
                continue
            if self.stop.is_set():
                raise Stopped()
            sub, name = on_disk[rec.key]
            uid = rec.uid if v == validity else None
            old = "" if v == validity else f" (UID {rec.uid} of the old UIDVALIDITY {v})"
            got = rehash(rep, uid, where(rec.key), job.path / sub / name, rec.sha256, old)
            if got is None:
                unreadable.add(rec.key)
            else:
                local_sha[rec.key] = got
        if rep.unhashed:
            rep.notes.append(f"{rep.unhashed} files have no checksum in the state (paired by Message-ID "
                             "in sync mode); only --deep checks their content")

        def lost_or_kept(uid: int | None, rec: Record, why: str) -> None:
            if rec.key in on_disk:
                rep.kept.append(Problem(uid, where(rec.key), why + "; kept in the backup"))
            else:
                rep.lost.append(Problem(uid, where(rec.key), why + ", and its file is missing from the backup"))

        def missing_file(uid: int, rec: Record) -> None:
            detail = "its file is missing from the backup"
            if rec.key in in_tmp:
                detail += " (it is still in tmp/ after an interrupted run; the next sync delivers it)"
            rep.missing.append(Problem(uid, where(rec.key), detail))

        # server <-> state <-> files
        if server_ok:
            uidnext = row["uidnext"] if row is not None and state_v is not None else None
            kw_map = mf.kw
            for uid, (size, fl, kw) in sorted(server.items()):
                rec = current.get(uid)
                if rec is None:
                    why = ("new on the server since the last sync" if uidnext and uid >= uidnext
                           else "not in the backup (no state record)")
                    rep.missing.append(Problem(uid, None, why))
                    continue
                if rec.key not in on_disk:
                    missing_file(uid, rec)
                    continue
                sub, name = on_disk[rec.key]
                if size != rec.size and not self._same_on_the_wire(job.path / sub / name, rec, size,
                                                                    local_sha.get(rec.key)):
                    rep.size_mismatches.append(Problem(
                        uid, where(rec.key), f"the server has {size} bytes, the state {rec.size}"))
                f_fl, f_kw = mf.flags_of(name)
                hidden = rec.keywords - kw_map.representable(rec.keywords)  # >26 keywords: state only
                local = f_fl | f_kw | hidden
                remote = fl | kw
                if local != remote:
                    base = rec.flags | rec.keywords
                    side = (" (changed on the server since the last sync)" if local == base
                            else " (changed locally since the last sync)" if remote == base else "")
                    rep.flag_differences.append(Problem(
                        uid, where(rec.key), f"server {_flagtext(remote)}, file {_flagtext(local)}{side}"))
            for uid, rec in sorted(current.items()):
                if uid not in server:
                    lost_or_kept(uid, rec, "gone from the server" if not rec.on_server
                                 else "expunged on the server since the last sync")
        else:
            for uid, rec in sorted(current.items()):
                if not rec.on_server or job.info is None:
                    lost_or_kept(uid, rec, "gone from the server")
                elif rec.key not in on_disk:
                    missing_file(uid, rec)
        for v, rec in sorted(allrecs, key=lambda t: (t[0], t[1].uid)):
            if v != validity:
                lost_or_kept(None, rec, f"UID {rec.uid} of the old UIDVALIDITY {v}, gone from the server")

        for key, (sub, name) in sorted(on_disk.items()):
            if key not in named:
                rep.extra.append(Problem(None, self.rel(job.path / sub / name),
                                         "no state record names this file (put there by hand or another "
                                         "program, or not yet uploaded by a sync); not part of the backup"))

        if self.deep and server_ok:
            self._deep(job, s, rep, server, current, on_disk, local_sha, where)
        return rep

    @staticmethod
    def _same_on_the_wire(path: Path, rec: Record, server_size: int, sha: str | None) -> bool:
        """A file in another form than the server's copy (uploaded with LF line ends, or adopted
        from another tool with its headers): the state has the file's size, the server the size
        of one of its forms (identity.Identity.sizes)."""
        if sha is None or not rec.sha256 or sha != rec.sha256:
            return False
        try:
            data = path.read_bytes()
        except OSError:
            return False
        return rec.size == len(data) and server_size in Identity.of(data).sizes

    def _deep(self, job: _Folder, s: ImapSession, rep: FolderReport, server, current, on_disk,
              local_sha: dict[str, str], where) -> None:
        """Every server message whose file could be read: its bytes against the file's."""
        todo = [uid for uid in sorted(server)
                if uid in current and current[uid].key in local_sha]
        if not todo:
            return
        sizes = {uid: server[uid][0] for uid in todo}
        self.progress("folder_start", {"folder": job.name, "messages": len(todo),
                                       "bytes": sum(sizes.values())})
        vanished = 0
        for batch in batches(sizes, todo, self.acc.batch_bytes):
            if self.stop.is_set():
                raise Stopped()
            for uid, body, *_ in s.bodies(batch):
                if body is None:
                    vanished += 1  # expunged by another client meanwhile
                    continue
                self.progress("message", {"folder": job.name, "bytes": len(body)})
                rep.deep_checked += 1
                key = current[uid].key
                deep_compare(rep, uid, where(key), body, job.path.joinpath(*on_disk[key]), local_sha[key])
        if vanished:
            rep.notes.append(f"{vanished} messages were expunged on the server during the check")


# ----------------------------------------------------------------------------- the run

def verify(acc: Account, password: str, *, deep: bool = False, progress: Progress = _quiet) -> VerifyReport:
    """Check the backup of acc against its server (and, with deep, every body byte for byte).

    Raises for whole-run failures (login, TLS, lock, no backup at all); a folder that cannot be
    checked is reported as failed in the report."""
    if acc.protocol not in ("imap", "pop3"):
        raise ConfigError(f"[accounts.{acc.name}] verify checks IMAP and POP3 backups; this account uses "
                          f"{acc.protocol}")
    started = time.monotonic()
    root = acc.maildir
    if not root.is_dir() or not (root / DB_NAME).is_file():
        raise BackupIncomplete(f"no backup in {root}", hint=f"run `mailsync sync {acc.name}` first")
    report = VerifyReport(account=acc.name, maildir=str(root), deep=deep)
    with RunLock(root):
        state = _ReadOnlyState(root)
        try:
            if acc.protocol == "pop3":
                _run_pop3(acc, password, state, report, deep, progress)
                report.seconds = time.monotonic() - started
                return report
            session = ImapSession(acc, password)
            pool = Pool(lambda: ImapSession(acc, password), acc.connections, session)
            try:
                _run(acc, state, pool, session, report, deep, progress)
            finally:
                pool.close()
        finally:
            state.close()
    report.seconds = time.monotonic() - started
    return report


def _run(acc: Account, state: _ReadOnlyState, pool, session: ImapSession, report: VerifyReport,
         deep: bool, progress: Progress) -> None:
    listed = session.list_folders()
    infos = [f for f in listed if selected(f.name, acc.folders)]
    paths, collisions = map_paths(infos, acc.maildir, acc.layout, acc.utf8_names)
    rows = {row["name"]: row for row in state.folders()}
    jobs = [_Folder(f.name, paths[f.name], rows.get(f.name), f) for f in infos if f.name in paths]
    jobs.sort(key=lambda j: (j.path != acc.maildir, j.name))
    on_server = {f.name for f in listed}
    # folders the state has backed up that the server no longer lists: their backup is checked too
    gone = [_Folder(name, acc.maildir if row["path"] == "." else acc.maildir / row["path"], row, None)
            for name, row in sorted(rows.items())
            if name not in on_server and row["uidvalidity"] is not None and selected(name, acc.folders)]
    progress("folders", {"count": len(jobs) + len(gone) + len(collisions)})
    stop = threading.Event()
    checker = _Checker(acc, state, deep, progress, stop)

    def one(job: _Folder) -> FolderReport:
        rep = _with_retries(acc, pool, checker, job, stop)
        progress("verify_folder_done", {"result": rep})
        return rep

    results = fan_out(jobs, one, acc.connections, stop)
    report.folders.extend(results)
    for name, why in collisions.items():
        report.folders.append(FolderReport(name=name, error=why))
    for job in gone:
        try:
            rep = checker.folder(job, None)
        except StorageError as exc:
            rep = FolderReport(name=job.name, on_server=False, error=str(exc))
        progress("verify_folder_done", {"result": rep})
        report.folders.append(rep)


def _with_retries(acc: Account, pool, checker: _Checker, job: _Folder, stop: threading.Event) -> FolderReport:
    """One folder's check, retried on a lost connection (runner.with_session); every failure
    becomes the folder's error."""
    try:
        return with_session(pool, lambda session: checker.folder(job, session), retries=acc.retries, stop=stop)
    except Stopped:
        return FolderReport(name=job.name, error="interrupted")
    except (SessionError, StorageError) as exc:  # refused (e.g. the folder deleted meanwhile), lost,
        return FolderReport(name=job.name, error=str(exc))  # or a folder that cannot be read
    except AuthError:  # a new connection's login failed (OAuth2: the refresh token was revoked):
        stop.set()      # every folder would fail alike; the run ends with its exit code
        raise
    except MailsyncError as exc:  # no further session could be opened
        return FolderReport(name=job.name, error=str(exc))


# ----------------------------------------------------------------------------- POP3

@dataclass
class _Pop3Rec:
    """A pop3 state row in the shape _Checker._same_on_the_wire reads."""

    key: str
    size: int
    sha256: str
    on_server: bool


def _pop3_session(acc: Account, password: str):
    """A Pop3Session that cannot delete: DELE refused here, and close() only drops the connection
    (no QUIT, so the server commits nothing, not even the \\Seen flags a RETR may set)."""
    from mailsync.pop3 import Pop3Session

    s = Pop3Session(acc, password)

    def no_dele(n: int) -> None:
        raise AssertionError("verify never deletes on the server")

    s.dele = no_dele
    return s


def _run_pop3(acc: Account, password: str, state: _ReadOnlyState, report: VerifyReport, deep: bool,
              progress: Progress) -> None:
    """One folder, INBOX, the Maildir root: the server's UIDLs and LIST sizes against the state's
    pop3 records and the files. A connection lost during the check is retried like a sync."""
    progress("folders", {"count": 1})
    first = _pop3_session(acc, password)  # login, TLS, connect errors end the run (3, 4, 5)
    # each attempt on a new connection, closed after it without QUIT (what makes a POP3 server delete)
    pool = Fresh(lambda: _pop3_session(acc, password), first)
    try:
        rep = with_session(pool, lambda s: _check_pop3(acc, s, state, deep, progress), retries=acc.retries,
                           stop=threading.Event())
    except (SessionError, StorageError) as exc:  # lost too often, a refused command, an unreadable Maildir
        rep = FolderReport(name="INBOX", path=".", error=str(exc))
    progress("verify_folder_done", {"result": rep})
    report.folders.append(rep)


def _check_pop3(acc: Account, s, state: _ReadOnlyState, deep: bool, progress: Progress) -> FolderReport:
    root = acc.maildir
    rep = FolderReport(name="INBOX", path=".", lost_is_error=True)  # POP3 is backup mode only

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(root))
        except ValueError:
            return str(path)

    sizes = s.listing()
    ids, has_uidl = s.uidls(sizes)
    if not has_uidl:
        rep.notes.append("the server has no UIDL; messages are identified by a hash of their headers and size")
    rep.server_messages = len(ids)
    try:
        rows = state.pop3_records()
    except sqlite3.OperationalError:  # a state from before POP3 support: no pop3 table
        rows = {}
    recs = {u: _Pop3Rec(r["key"], r["size"], r["sha256"], bool(r["on_server"])) for u, r in rows.items()}
    rep.state_records = len(recs)
    if not recs:
        rep.notes.append("the state has no POP3 download yet")

    mf = MaildirFolder(root)
    on_disk = mf.scan()
    in_tmp = mf.tmp_keys()
    rep.local_files = len(on_disk)
    named = {rec.key for rec in recs.values()}

    def where(key: str) -> str:
        if key in on_disk:
            sub, name = on_disk[key]
            return rel(root / sub / name)
        return rel(root / key)

    # re-hash every file a record names
    local_sha: dict[str, str] = {}
    for uidl, rec in sorted(recs.items(), key=lambda t: t[1].key):
        if rec.key not in on_disk or rec.key in local_sha:
            continue
        sub, name = on_disk[rec.key]
        got = rehash(rep, uidl, where(rec.key), root / sub / name, rec.sha256)
        if got is not None:
            local_sha[rec.key] = got

    # server <-> state <-> files
    last_known = max((n for n, u in ids.items() if u in recs), default=0)
    for n, uidl in sorted(ids.items()):
        size = sizes.get(n, 0)
        rec = recs.get(uidl)
        if rec is None:
            if acc.max_message_size and size > acc.max_message_size:
                why = f"not in the backup: larger than max_message_size ({acc.max_message_size} bytes)"
            elif n > last_known:
                why = "new on the server since the last sync"
            else:
                why = "not in the backup (no state record)"
            rep.missing.append(Problem(uidl, None, why))
            continue
        if rec.key not in on_disk:
            detail = "its file is missing from the backup"
            if rec.key in in_tmp:
                detail += " (it is still in tmp/ after an interrupted run; the next sync delivers it)"
            rep.missing.append(Problem(uidl, where(rec.key), detail))
            continue
        sub, name = on_disk[rec.key]
        if size != rec.size and not _Checker._same_on_the_wire(root / sub / name, rec, size,
                                                                local_sha.get(rec.key)):
            rep.size_mismatches.append(Problem(uidl, where(rec.key),
                                               f"the server has {size} bytes, the state {rec.size}"))
    present = set(ids.values())
    for uidl, rec in sorted(recs.items(), key=lambda t: t[1].key):
        if uidl in present:
            continue
        why = "gone from the server" if not rec.on_server else "deleted on the server since the last sync"
        if rec.key in on_disk:
            rep.kept.append(Problem(uidl, where(rec.key), why + "; kept in the backup"))
        else:
            rep.lost.append(Problem(uidl, where(rec.key), why + ", and its file is missing from the backup"))
    for key, (sub, name) in sorted(on_disk.items()):
        if key not in named:
            rep.extra.append(Problem(None, rel(root / sub / name),
                                     "no state record names this file (put there by hand or another program); "
                                     "not part of the backup"))
    if rep.unhashed:
        rep.notes.append(f"{rep.unhashed} files have no checksum in the state; only --deep checks their content")

    if deep:
        todo = [n for n, u in sorted(ids.items()) if u in recs and recs[u].key in local_sha]
        progress("folder_start", {"folder": "INBOX", "messages": len(todo),
                                  "bytes": sum(sizes.get(n, 0) for n in todo)})
        for n in todo:  # RETR only: nothing is marked for deletion, and the session ends without QUIT
            uidl = ids[n]
            key = recs[uidl].key
            body = s.retr(n)
            progress("message", {"folder": "INBOX", "bytes": len(body)})
            rep.deep_checked += 1
            deep_compare(rep, uidl, where(key), body, root.joinpath(*on_disk[key]), local_sha[key])
    return rep
