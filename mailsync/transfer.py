"""Copying mail to an IMAP account: `migrate` (server to server) and `restore` (Maildir to server).

Both are resumable and duplicate-free: before a folder is filled, the destination's messages are
indexed by (Message-ID, size), and a message already there (copied before, by a run that was
killed after its APPEND, or by hand) is skipped; messages without a Message-ID are compared by
content among those of the same size. `migrate` also keeps a small state (source
UIDVALIDITY/UID -> destination UID) so a re-run skips known messages quickly, unless their copy is
gone from the destination, and updates flags (the source wins).

Both read their source through the store interface (`restore` a MaildirStore, `migrate` an
ImapStore) and fill a folder with one loop, copy_messages(). The destination stays `Destination`
over an ImapSession: MULTIAPPEND, the (Message-ID, size) index, throttling and --delete's
expunge (which leaves the copies marked \\Deleted when it cannot expunge them alone) are not in
the store interface.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from mailsync import crashpoint
from mailsync.config import Account
from mailsync.errors import PartialFailure, SafetyAbort, ServerError, StorageError
from mailsync.folders import selected
from mailsync.identity import content_sha256
from mailsync.imap import FolderInfo, ImapSession, crlf, message_id
from mailsync.plan import batches
from mailsync.stores.base import Folder, Id, NoSuchFolder, Snapshot
from mailsync.stores.imap import ImapStore
from mailsync.stores.maildir import MaildirStore

Progress = Callable[[str, dict], None]

SPECIAL = ("\\Sent", "\\Trash", "\\Drafts", "\\Junk", "\\Archive")
# common names, for servers that do not mark their special folders (lower-case)
COMMON_NAMES = {
    "\\Sent": ("sent", "sent items", "sent messages", "sent mail", "gesendet", "gesendete elemente",
               "envoyés", "[gmail]/sent mail"),
    "\\Trash": ("trash", "deleted items", "deleted messages", "papierkorb", "corbeille", "[gmail]/trash"),
    "\\Drafts": ("drafts", "entwürfe", "brouillons", "[gmail]/drafts"),
    "\\Junk": ("junk", "spam", "junk e-mail", "bulk mail", "[gmail]/spam"),
    "\\Archive": ("archive", "archives", "archiv", "[gmail]/all mail"),
}
THROTTLE = re.compile(r"THROTTLED|try again|too many|UNAVAILABLE|rate limit", re.IGNORECASE)


def special_folders(folders: list[FolderInfo]) -> dict[str, str]:
    """special-use attribute -> folder: marked by the server (LIST), else found by a common name."""
    special: dict[str, str] = {}
    for f in folders:
        for flag in f.flags:
            if flag in SPECIAL and flag not in special:
                special[flag] = f.name
    for flag, names in COMMON_NAMES.items():
        if flag not in special:
            hit = next((f.name for f in folders if f.name.lower() in names), None)
            if hit:
                special[flag] = hit
    return special


@dataclass
class CopyResult:
    name: str
    target: str = ""
    copied: int = 0
    present: int = 0
    failed: int = 0
    flags_updated: int = 0
    deleted: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    guarded: bool = False  # the deletion guard stopped --delete here


@dataclass
class TransferReport:
    folders: list[CopyResult] = field(default_factory=list)
    seconds: float = 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(f, attr) for f in self.folders)

    @property
    def exit_code(self) -> int:
        """0 when every folder was copied; 10 when the only trouble was the deletion guard
        (--delete), in one or more folders; else 9 (docs/exit-codes.md)."""
        bad = [f for f in self.folders if f.errors or f.failed]
        if not bad:
            return 0
        if all(f.guarded and not f.failed and len(f.errors) == 1 for f in bad):
            return SafetyAbort.exit_code
        return PartialFailure.exit_code

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 3),
                "totals": {k: self.total(k) for k in ("copied", "present", "failed", "flags_updated", "deleted",
                                                      "bytes")},
                "rate_messages_per_second": round(self.total("copied") / self.seconds, 1) if self.seconds else 0,
                "folders": [f.__dict__ for f in self.folders]}

    def line(self) -> str:
        mb = self.total("bytes") / 1e6
        rate = self.total("copied") / self.seconds if self.seconds else 0
        return (f"{self.total('copied')} copied, {self.total('present')} already present, "
                f"{self.total('failed')} failed, {self.total('flags_updated')} flags updated, "
                f"{self.total('deleted')} deleted, {mb:.1f} MB in {self.seconds:.1f} s ({rate:.0f} msg/s)")


# ----------------------------------------------------------------------------- destination side

class Destination:
    """One IMAP account being filled: folder creation and a per-folder index of what it holds."""

    def __init__(self, acc: Account, s: ImapSession) -> None:
        self.acc, self.s = acc, s
        self.folders = {f.name: f for f in s.list_folders()}
        self.delim = next((f.delimiter for f in self.folders.values() if f.delimiter), None) or "/"
        self.special = special_folders(list(self.folders.values()))

    def ensure(self, name: str) -> None:
        if name not in self.folders and name.upper() != "INBOX":
            self.s.create(name)
            self.folders[name] = FolderInfo(name=name, delimiter=self.delim, flags=())
            crashpoint.hit("created")

    def index(self, name: str) -> tuple[dict[tuple[str, int], list[int]], dict[int, list[int]], dict[int, frozenset]]:
        """(Message-ID, size) -> UIDs; size -> UIDs without Message-ID; UID -> flags|keywords."""
        self.s.select(name)
        by_id: dict[tuple[str, int], list[int]] = {}
        by_size: dict[int, list[int]] = {}
        flags: dict[int, frozenset] = {}
        meta = self.s.new_messages(1)
        for uid, (size, mid) in self.s.message_ids(meta).items():
            (by_id.setdefault((mid, size), []) if mid else by_size.setdefault(size, [])).append(uid)
        for uid, (_size, fl, kw) in meta.items():
            flags[uid] = fl | kw
        return by_id, by_size, flags

    def holds(self, index, data: bytes, mid: str) -> int | None:
        """The destination UID already holding these bytes, if any (consumed from the index)."""
        by_id, by_size, _ = index
        size = len(data)
        if mid:
            uids = by_id.get((mid, size))
            return uids.pop() if uids else None
        cands = by_size.get(size, [])
        if not cands:
            return None
        want = content_sha256(data)  # the same message in any form (identity.py)
        for uid, body, *_ in self.s.bodies(list(cands)):
            if body is not None and content_sha256(body) == want:
                cands.remove(uid)
                return uid
        return None

    def append(self, name: str, data: bytes, flags: frozenset[str], when: datetime | None) -> int | None:
        return self.append_many(name, [(data, flags, when)])[0]

    def append_many(self, name: str, items: list[tuple[bytes, frozenset[str], datetime | None]]) -> list[int | None]:
        """APPEND (one MULTIAPPEND where offered) with throttling: max_bytes_per_second, and
        backoff when the server says [THROTTLED] or "try again"."""
        size = sum(len(d) for d, _, _ in items)
        from mailsync import ratelimit
        ratelimit.current(self.acc).take(size)  # max_bytes_per_second, or the fleet's per-host rate
        for attempt in range(6):
            try:
                if len(items) > 1 and "MULTIAPPEND" in self.s.caps:
                    uids = self.s.multiappend(name, items)
                else:
                    uids = [self.s.append(name, d, f, w) for d, f, w in items]
                crashpoint.hit("appended")
                return uids
            except ServerError as exc:
                if not THROTTLE.search(str(exc)) or attempt == 5:
                    raise
                time.sleep(min(2 ** attempt, 60))
        return [None] * len(items)


# ----------------------------------------------------------------------------- the copy loop

class Ledger:
    """Where copy_messages() notes the destination UID of a source message: nowhere (restore)."""

    def held(self, id: Id, duid: int | None) -> None:
        """The destination held the message already."""

    def copied(self, pairs: list[tuple[Id, int | None]]) -> None:
        """A batch was appended: (source id, destination UID) of each message the server took."""


class StateLedger(Ledger):
    """migrate: CopyState, for one source folder under one UIDVALIDITY."""

    def __init__(self, state: CopyState, folder: str, validity: int | None, target: str) -> None:
        self.state, self.folder, self.validity, self.target = state, folder, validity, target

    def held(self, id: Id, duid: int | None) -> None:
        self.state.add(self.folder, self.validity, id, self.target, duid)

    def copied(self, pairs: list[tuple[Id, int | None]]) -> None:
        with self.state.tx():  # one transaction per batch, after its APPEND
            for uid, duid in pairs:
                self.state.add(self.folder, self.validity, uid, self.target, duid)
        crashpoint.hit("recorded")


def copy_messages(src: Folder, snap: Snapshot, todo: list[Id], dst: Destination, target: str, index,
                  res: CopyResult, progress: Progress, *, batch_bytes: int, max_count: int,
                  label: Callable[[Id], object], ledger: Ledger) -> None:
    """Copy the messages todo of src (a store's folder; snap its snapshot) into the destination
    folder target, except those its index (Destination.index) shows it holds. Each batch
    (plan.batches: batch_bytes, max_count) is one APPEND, MULTIAPPEND where offered; a refused
    batch is sent again message by message, so only a refused message fails. label(id) names a
    message in an error."""
    sizes = {i: snap.entries[i].size for i in todo}
    progress("folder_start", {"folder": res.name, "messages": len(todo), "bytes": sum(sizes.values())})
    for batch in batches(sizes, todo, batch_bytes, max_count=max_count):
        send: list[tuple[Id, bytes, frozenset[str], datetime | None]] = []
        for i, data, flags, when in _read(src, batch, res):
            have = dst.holds(index, data, message_id(data))
            if have is not None:
                ledger.held(i, have)
                res.present += 1
                continue
            send.append((i, data, flags, when))
        if not send:
            continue
        try:
            duids = dst.append_many(target, [(d, fl, w) for _, d, fl, w in send])
        except ServerError as exc:
            if len(send) == 1:
                res.failed += 1
                res.errors.append(f"{label(send[0][0])}: {exc}")
                continue
            # one message the server refuses must not fail the others: one by one
            duids = []
            for i, data, flags, when in send:
                try:
                    duids.append(dst.append(target, data, flags, when))
                except ServerError as exc1:
                    duids.append(False)
                    res.failed += 1
                    res.errors.append(f"{label(i)}: {exc1}")
        done = [(i, data, duid) for (i, data, _fl, _w), duid in zip(send, duids, strict=True) if duid is not False]
        ledger.copied([(i, duid) for i, _data, duid in done])
        for _i, data, _duid in done:
            res.copied += 1
            res.bytes += len(data)
            progress("message", {"folder": res.name, "bytes": len(data)})


def _read(src: Folder, ids: list[Id], res: CopyResult) -> list[tuple[Id, bytes, frozenset[str], datetime | None]]:
    """A batch, each message read whole with CRLF line ends (as APPEND needs), before anything is
    sent: an IMAP source is busy with its FETCH until then. Memory holds one batch, never a folder.
    A message gone meanwhile is left out; one that cannot be read fails alone."""
    out = []
    for i, chunks, flags, when in src.fetch(ids):
        try:
            data = b"".join(chunks)
        except StorageError as exc:
            res.failed += 1
            res.errors.append(str(exc))
            continue
        out.append((i, data if src.caps.crlf else crlf(data), flags, when))
    return out


# ----------------------------------------------------------------------------- restore

def detect_layout(root: Path) -> str:
    """maildir++ when a dot-directory holds a folder; flat when the root holds no mail but an
    INBOX directory does (OfflineIMAP); fs when a plain sub-directory does."""
    fs = False
    if not (root / "cur").is_dir() and ((root / "INBOX" / "cur").is_dir() or (root / "INBOX" / "new").is_dir()):
        return "flat"
    for p in root.iterdir():
        if not p.is_dir() or p.name in ("cur", "new", "tmp"):
            continue
        if p.name.startswith("."):
            if (p / "cur").is_dir() or (p / "new").is_dir():
                return "maildir++"
        else:
            fs = True
    return "fs" if fs else "maildir++"


def restore(acc: Account, password: str, source: Path, *, layout: str | None = None,
            utf8_names: bool | None = None, progress: Progress = lambda e, d: None) -> TransferReport:
    """Upload a Maildir (made by mailsync or any Maildir, either layout) to acc."""
    t0 = time.monotonic()
    if not source.is_dir():
        raise StorageError(f"{source} is not a directory", hint="give the backup's Maildir with --from")
    layout = layout or detect_layout(source)
    store = MaildirStore(source, layout, (layout == "fs") if utf8_names is None else utf8_names)
    # listing(), not folders(): restore reports the directories whose names are no folder name,
    # and uploads a folder with a '/' inside a component, which has no '/'-path in the interface
    found, bad = store.listing()
    report = TransferReport()
    s = ImapSession(acc, password)
    try:
        dst = Destination(acc, s)
        for parts in sorted(found):
            name = "INBOX" if parts == ("INBOX",) else dst.delim.join(parts)
            res = CopyResult(name=name, target=name)
            report.folders.append(res)
            if not selected(name, acc.folders):
                continue
            ft = time.monotonic()
            try:
                folder = store.open_listed(parts, False)
                snap = folder.snapshot()
                dst.ensure(name)
                index = dst.index(name)
            except (ServerError, NoSuchFolder) as exc:  # (NoSuchFolder: removed since it was listed)
                res.errors.append(str(exc))
                continue
            # one file per APPEND (max_count=1), as restore has always uploaded: the `appended`
            # crash point counts messages in restore (docs/reliability.md, test_kill_sweep.py)
            copy_messages(folder, snap, sorted(snap.ids), dst, name, index, res, progress,
                          batch_bytes=acc.batch_bytes, max_count=1, label=folder.path_of,
                          ledger=Ledger())
            res.seconds = time.monotonic() - ft
            crashpoint.hit("folder")
        for p in bad:
            report.folders.append(CopyResult(name=str(p), errors=["directory name is not a valid folder name"]))
    finally:
        s.close()
    report.seconds = time.monotonic() - t0
    return report


# ----------------------------------------------------------------------------- migrate

def _state_path(src: Account, dst: Account) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mailsync" / f"migrate-{src.name}-to-{dst.name}.db"


class CopyState:
    """source (folder, UIDVALIDITY, UID) -> destination (folder, UID), committed per message."""

    def __init__(self, path: Path) -> None:
        try:
            os.makedirs(path.parent, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS copies (src_folder TEXT, src_validity INTEGER,"
                            " src_uid INTEGER, dst_folder TEXT, dst_uid INTEGER,"
                            " PRIMARY KEY (src_folder, src_validity, src_uid))")
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the migration state {path}: {exc}",
                               hint="check that the directory is writable, or set XDG_STATE_HOME") from None

    def known(self, folder: str, validity: int) -> dict[int, tuple[str, int | None]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT src_uid, dst_folder, dst_uid FROM copies WHERE src_folder=? AND src_validity=?", (folder, validity))}

    def tx(self):
        return self.db  # sqlite3 connection as a context manager: one transaction

    def add(self, folder: str, validity: int, uid: int, dst_folder: str, dst_uid: int | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO copies VALUES (?,?,?,?,?)", (folder, validity, uid, dst_folder, dst_uid))

    def drop(self, folder: str, validity: int, uids) -> None:
        self.db.executemany("DELETE FROM copies WHERE src_folder=? AND src_validity=? AND src_uid=?",
                            [(folder, validity, u) for u in uids])


def target_name(src_folder: FolderInfo, dst: Destination, folder_map: dict[str, str], src_special: dict[str, str]) -> str:
    if src_folder.name in folder_map:
        return folder_map[src_folder.name]
    if src_folder.name.upper() == "INBOX":
        return "INBOX"
    for flag, name in src_special.items():
        if name == src_folder.name and flag in dst.special:
            return dst.special[flag]
    return dst.delim.join(src_folder.parts)


def migrate(src_acc: Account, dst_acc: Account, src_pw: str, dst_pw: str, *, delete: bool = False,
            force: bool = False, progress: Progress = lambda e, d: None) -> TransferReport:
    from mailsync.model import SyncPlan
    from mailsync.plan import deletion_guard

    t0 = time.monotonic()
    report = TransferReport()
    state = CopyState(_state_path(src_acc, dst_acc))
    src = ImapStore(src_acc, src_pw)
    try:
        d = ImapSession(dst_acc, dst_pw)
        try:
            dst = Destination(dst_acc, d)
            # listing(), not folders(): migrate names folders as the server does (the CopyState
            # records, folder_map and the folders patterns use those names), needs their special-use
            # attributes, and copies a folder with a '/' inside a component, which has no '/'-path
            src_folders = [f for f in src.listing() if selected(f.name, src_acc.folders)]
            src_special = special_folders(src_folders)
            for f in sorted(src_folders, key=lambda f: (f.name.upper() != "INBOX", f.name)):
                name = target_name(f, dst, src_acc.folder_map or dst_acc.folder_map or {}, src_special)
                res = CopyResult(name=f.name, target=name)
                report.folders.append(res)
                ft = time.monotonic()
                try:
                    _migrate_folder(src, dst, state, f, name, res, src_acc, delete, force, progress,
                                    deletion_guard, SyncPlan)
                except ServerError as exc:
                    res.errors.append(str(exc))
                res.seconds = time.monotonic() - ft
                crashpoint.hit("folder")
        finally:
            d.close()
    finally:
        src.close()
        state.db.close()
    report.seconds = time.monotonic() - t0
    return report


def _migrate_folder(src: ImapStore, dst: Destination, state: CopyState, f: FolderInfo, name: str, res: CopyResult,
                    src_acc: Account, delete: bool, force: bool, progress: Progress, deletion_guard, SyncPlan) -> None:
    folder = src.open_listed(f.name, False)          # EXAMINE
    snap = folder.snapshot()                         # uid -> size, flags|keywords
    validity, meta = snap.validity, snap.entries
    known = state.known(f.name, validity)
    dst.ensure(name)
    index = dst.index(name)
    dst_flags = index[2]
    # the record is a fast path, the destination the truth: a copy deleted there by hand, or a
    # folder_map that changed, makes the message a candidate again
    stale = [u for u, (dfolder, duid) in known.items()
             if u in meta and (dfolder != name or (duid is not None and duid not in dst_flags))]
    for u in stale:
        del known[u]
    # The flag updates and --delete work on the records and the destination only, so they stay
    # here, outside the copy loop (restore has neither).
    # 1. flags of messages copied before: the source wins
    changes: dict[frozenset, list[int]] = {}
    for uid, (dfolder, duid) in known.items():
        if uid in meta and duid is not None and dfolder == name and duid in dst_flags:
            want = meta[uid].flags
            if dst_flags[duid] != want:
                changes.setdefault(want, []).append(duid)
    for want, duids in changes.items():
        dst.s.store_flags(duids, want, None)
        res.flags_updated += len(duids)
    # 2. --delete: what is gone from the source goes from the destination too (guarded)
    gone = [u for u in known if u not in meta]
    if delete and gone:
        doomed = [known[u][1] for u in gone if known[u][1] in dst_flags and known[u][0] == name]
        why = deletion_guard(SyncPlan(delete_remote=tuple(doomed)), len(dst_flags), src_acc.max_delete)
        if why and not force:
            res.errors.append(f"{why} on the destination; nothing deleted (use --force)")
            res.guarded = True
        elif doomed:
            dst.s.store(doomed, frozenset({"\\Deleted"}), frozenset(), None)
            if dst.s.expunge(doomed):
                state.drop(f.name, validity, gone)
                res.deleted += len(doomed)
            else:
                res.errors.append("the destination lacks UIDPLUS and other messages are marked \\Deleted: "
                                  "the copies are marked \\Deleted, not expunged; run again later")
    # 3. copy what the destination does not hold yet
    todo = [u for u in sorted(meta) if u not in known]
    res.present += len(meta) - len(todo)
    if not todo:
        return
    copy_messages(folder, snap, todo, dst, name, index, res, progress, batch_bytes=src_acc.batch_bytes,
                  max_count=200, label=lambda uid: f"UID {uid}", ledger=StateLedger(state, f.name, validity, name))
