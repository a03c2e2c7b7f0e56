"""Runs a backup: gather per folder, plan (mailsync.plan), apply in byte-bounded batches.

Folders are worked on by a small pool of IMAP connections. The state is committed per batch,
after the batch's files are durable, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mailsync import crashpoint
from mailsync.config import Account
from mailsync.errors import ConnectionLost, MailsyncError, ServerError, StorageError
from mailsync.folders import map_paths, selected
from mailsync.imap import FolderInfo, ImapSession, message_id
from mailsync.maildir import MaildirFolder, make_dirs
from mailsync.model import FolderResult, Record, ServerView, flags_from_letters, split_name
from mailsync.plan import batches, plan_backup, rematch
from mailsync.state import RunLock, State

log = logging.getLogger("mailsync.engine")

Progress = Callable[[str, dict], None]


def _quiet(event: str, data: dict) -> None:
    pass


@dataclass
class RunResult:
    account: str
    folders: list[FolderResult] = field(default_factory=list)
    seconds: float = 0.0
    error: MailsyncError | None = None

    @property
    def failed(self) -> list[FolderResult]:
        return [f for f in self.folders if f.error]


class _Pool:
    """Logged-in sessions shared by the folder workers; at most `size` are opened."""

    def __init__(self, acc: Account, password: str, size: int, first: ImapSession) -> None:
        self.acc, self._password, self.size = acc, password, size
        self._free: queue.SimpleQueue[ImapSession] = queue.SimpleQueue()
        self._free.put(first)
        self._opened = 1
        self._all = [first]
        self._lock = threading.Lock()

    def take(self) -> ImapSession:
        while True:
            with self._lock:
                try:
                    return self._free.get_nowait()
                except queue.Empty:
                    pass
                open_new = self._opened < self.size
                if open_new:
                    self._opened += 1
            if not open_new:
                try:
                    return self._free.get(timeout=0.5)
                except queue.Empty:
                    continue  # a session may have been dropped meanwhile: maybe open one
            try:
                s = ImapSession(self.acc, self._password)
            except MailsyncError:
                with self._lock:
                    self._opened -= 1
                    if self._opened == 0:
                        raise
                    # e.g. a provider's connection limit: share the sessions we have
                    self.size = self._opened
                log.info("could not open another connection; continuing with %d", self.size)
                continue
            except BaseException:
                with self._lock:
                    self._opened -= 1
                raise
            with self._lock:
                self._all.append(s)
            return s

    def give(self, s: ImapSession) -> None:
        self._free.put(s)

    def drop(self, s: ImapSession) -> None:
        s.close()
        with self._lock:
            self._opened -= 1
            if s in self._all:
                self._all.remove(s)

    def close(self) -> None:
        for s in list(self._all):
            s.close()


def backup(acc: Account, password: str, *, progress: Progress = _quiet) -> RunResult:
    """Back up every selected folder of acc into its Maildir. Raises for whole-run failures."""
    started = time.monotonic()
    result = RunResult(account=acc.name)
    root = acc.maildir
    make_dirs(root)
    with RunLock(root):
        state = State(root)
        try:
            session = ImapSession(acc, password)
            pool = _Pool(acc, password, acc.connections, session)
            try:
                _run(acc, state, pool, session, result, progress)
            finally:
                pool.close()
        finally:
            state.close()
    result.seconds = time.monotonic() - started
    return result


def _run(acc: Account, state: State, pool: _Pool, session: ImapSession, result: RunResult,
         progress: Progress) -> None:
    infos = [f for f in session.list_folders() if selected(f.name, acc.folders)]
    paths, collisions = map_paths(infos, acc.maildir, acc.layout, acc.utf8_names)
    for name, why in collisions.items():
        result.folders.append(FolderResult(name=name, error=why))
    work = [f for f in infos if f.name in paths]
    # the root Maildir (INBOX) first, so the tree is a valid Maildir even if interrupted
    work.sort(key=lambda f: (paths[f.name] != acc.maildir, f.name))
    progress("folders", {"count": len(work)})
    runner = _FolderRunner(acc, state, pool, progress)
    if len(work) <= 1 or acc.connections == 1:
        results = [runner(f, paths[f.name]) for f in work]
    else:
        ex = ThreadPoolExecutor(max_workers=min(acc.connections, len(work)))
        try:
            results = list(ex.map(lambda f: runner(f, paths[f.name]), work))
        except BaseException:
            runner.stop.set()  # Ctrl-C: workers stop at their next batch
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        ex.shutdown()
    result.folders.extend(results)
    fatal = next((r for r in results if isinstance(getattr(r, "_fatal", None), StorageError)), None)
    if fatal is not None:
        raise fatal._fatal  # type: ignore[attr-defined]


class _FolderRunner:
    def __init__(self, acc: Account, state: State, pool: _Pool, progress: Progress) -> None:
        self.acc, self.state, self.pool, self.progress = acc, state, pool, progress
        self.stop = threading.Event()  # set on a storage error: no point going on

    def __call__(self, info: FolderInfo, path: Path) -> FolderResult:
        res = FolderResult(name=info.name)
        t0 = time.monotonic()
        attempt = 0
        while True:
            if self.stop.is_set():
                res.error = "skipped after a local storage error"
                break
            try:
                session = self.pool.take()
            except ConnectionLost as exc:
                session = None
                err: MailsyncError = exc
            except MailsyncError as exc:
                res.error = str(exc)
                break
            else:
                try:
                    _sync_folder(self.acc, self.state, session, info, path, res, self.progress, self.stop)
                    self.pool.give(session)
                    break
                except Stopped:
                    self.pool.give(session)
                    res.error = "interrupted"
                    break
                except ServerError as exc:
                    self.pool.give(session)
                    res.error = str(exc)
                    break
                except ConnectionLost as exc:
                    self.pool.drop(session)
                    err = exc
                except StorageError as exc:
                    self.pool.give(session)
                    self.stop.set()
                    res.error = str(exc)
                    res._fatal = exc  # type: ignore[attr-defined]
                    break
            attempt += 1
            if attempt > self.acc.retries:
                res.error = str(err)
                res._lost = True  # type: ignore[attr-defined]
                break
            delay = min(2 ** (attempt - 1), 30)
            log.info("%s: %s; retrying in %ss", info.name, err, delay)
            self.progress("retry", {"folder": info.name, "error": str(err), "delay": delay})
            time.sleep(delay)
        res.seconds = time.monotonic() - t0
        self.progress("folder_done", {"result": res})
        return res


class Stopped(Exception):
    """The run was interrupted (Ctrl-C): stop between batches; what is saved stays saved."""


def _sync_folder(acc: Account, state: State, s: ImapSession, info: FolderInfo, path: Path,
                 res: FolderResult, progress: Progress, stop: threading.Event) -> None:
    rel = "." if path == acc.maildir else str(path.relative_to(acc.maildir))
    fstate = state.folder(info.name, rel)
    fid = fstate["id"]
    mf = MaildirFolder(path, maildirfolder=(path != acc.maildir and acc.layout == "maildir++"))
    mf.ensure()
    on_disk = mf.scan()

    # finish deliveries a crash interrupted: state names the key, the file is still in tmp/
    known_keys = state.keys(fid)
    stranded = (mf.tmp_keys() & known_keys) - on_disk.keys()
    if stranded:
        flags_by_key = state.flags_by_key(fid)
        for key in stranded:
            name = mf.publish(key, flags_by_key.get(key, frozenset()))
            on_disk[key] = ("cur" if "\\Seen" in flags_by_key.get(key, ()) else "new", name)
        mf.sync_dirs()
    mf.clean_tmp(keep=known_keys - on_disk.keys())  # also a tmp link left by a kill inside publish()

    st = s.status(info.name)
    unchanged = (
        s.condstore
        and fstate["uidvalidity"] == st.get("uidvalidity")
        and fstate["uidnext"] == st.get("uidnext")
        and fstate["messages"] == st.get("messages")
        and fstate["highestmodseq"] is not None
        and fstate["highestmodseq"] == st.get("highestmodseq")
    )
    if unchanged and not (state.keys(fid, uidvalidity=fstate["uidvalidity"], on_server=True) - on_disk.keys()):
        res.skipped = True
        return

    sel = s.examine(info.name)
    validity = sel.get("uidvalidity") or st["uidvalidity"]
    same_validity = fstate["uidvalidity"] == validity
    if fstate["uidvalidity"] is not None and not same_validity:
        res.notices.append(f"UIDVALIDITY changed ({fstate['uidvalidity']} -> {validity}): "
                           "messages are re-matched by Message-ID, size and content; no local file is deleted")
    known = state.records(fid, validity)
    old_next = (fstate["uidnext"] or 1) if same_validity else 1
    modseq = fstate["highestmodseq"] if (same_validity and s.condstore) else None

    flags = s.flags(old_next, modseq) if known else {}
    new_full = s.new_messages(old_next)
    for uid, (_size, fl, kw) in new_full.items():
        flags[uid] = (fl, kw)
    exists = sel.get("exists", st.get("messages", 0))
    known_below = sum(1 for uid, r in known.items() if r.on_server and uid < old_next)
    if exists - len(new_full) == known_below:
        present = None  # counts prove nothing below old_next was expunged
    else:
        present = frozenset(s.all_uids())
    view = ServerView(flags=flags, new={u: v[0] for u, v in new_full.items()}, present=present)
    plan = plan_backup(view, known, on_disk.keys())

    # 1. flags and presence: rename files, then record
    if plan.set_flags or plan.gone or plan.back:
        with state.transaction() as tx:
            for uid, fl, kw in plan.set_flags:
                rec = known[uid]
                if fl != rec.flags:
                    name = mf.retag(rec.key, on_disk[rec.key], fl)
                    on_disk[rec.key] = ("cur" if "\\Seen" in fl else "new", name)
                tx.set_flags(fid, validity, uid, fl, kw)
            tx.set_on_server(fid, validity, plan.gone, False)
            tx.set_on_server(fid, validity, plan.back, True)
            if plan.set_flags:
                mf.sync_dirs()  # renames durable before the state records them
        res.flags_changed += len(plan.set_flags)
        res.gone += len(plan.gone)

    fetch = list(plan.fetch)
    # 2. mail we already hold under an old UID (UIDVALIDITY changed, or the server renumbered
    #    messages): re-bind instead of storing a second copy. Never deletes anything.
    spare = [(rid, r) for rid, r in state.off_server_records(fid, validity) if r.key in on_disk] if fetch else []
    if spare and not same_validity:
        ids = s.message_ids(fetch)
        by_rec = {id(r): rid for rid, r in spare}
        matched = rematch([r for _, r in spare], ids)
        if matched:
            with state.transaction() as tx:
                for uid, rec in matched.items():
                    fl, kw = flags.get(uid, (frozenset(), frozenset()))
                    if fl != rec.flags:
                        name = mf.retag(rec.key, on_disk[rec.key], fl)
                        on_disk[rec.key] = ("cur" if "\\Seen" in fl else "new", name)
                    tx.rebind(by_rec[id(rec)], validity, uid, fl, kw)
            res.rebound += len(matched)
            fetch = [u for u in fetch if u not in matched]
            spare = [(rid, r) for rid, r in spare if r not in matched.values()]
    old_by_hash: dict[str, list[tuple[int | None, Record]]] = {}
    for rid, r in spare:
        old_by_hash.setdefault(r.sha256, []).append((rid, r))
    # files the state does not know (a lost or moved-aside state, a Maildir made by another
    # tool): adopted when a downloaded message has the same bytes, instead of stored twice
    if fetch:
        for key in on_disk.keys() - known_keys:
            try:
                data = mf.read(on_disk[key])
            except OSError:
                continue
            rec = Record(uid=0, key=key, flags=flags_from_letters(split_name(on_disk[key][1])[1] or ""),
                         size=len(data), sha256=hashlib.sha256(data).hexdigest())
            old_by_hash.setdefault(rec.sha256, []).append((None, rec))

    # 3. download: new messages and files gone from disk, in batches bounded by bytes
    sizes = {u: v[0] for u, v in new_full.items()}
    for uid in plan.refetch:
        sizes.setdefault(uid, known[uid].size)
    todo = fetch + list(plan.refetch)
    refetch = set(plan.refetch)
    progress("folder_start", {"folder": info.name, "messages": len(todo),
                              "bytes": sum(sizes.get(u, 0) for u in todo)})
    for batch in batches(sizes, todo, acc.batch_bytes):
        if stop.is_set():
            raise Stopped()
        staged: list[tuple[str, Record, float | None]] = []
        rebinds: list[tuple[int | None, int, frozenset[str], frozenset[str], Record]] = []
        got_bytes = 0
        try:
            for uid, body, fl, kw, when in s.bodies(batch):
                if body is None:
                    continue  # expunged by another client meanwhile: never write an empty file
                if uid in flags and not fl and not kw:
                    fl, kw = flags[uid]
                sha = hashlib.sha256(body).hexdigest()
                hits = old_by_hash.get(sha)
                hit = hits.pop() if hits and uid not in refetch else None
                if hit is not None:
                    rid, rec = hit
                    if rid is None:  # adopt an unknown local file with these exact bytes
                        rec = Record(uid=uid, key=rec.key, flags=rec.flags, keywords=kw, size=len(body),
                                     sha256=sha, message_id=message_id(body))
                    rebinds.append((rid, uid, fl, kw, rec))
                    continue
                mtime = when.timestamp() if when is not None else None
                key = mf.stage(body, mtime)
                rec = Record(uid=uid, key=key, flags=fl, keywords=kw, size=len(body), sha256=sha,
                             message_id=message_id(body))
                staged.append((key, rec, mtime))
                got_bytes += len(body)
                progress("message", {"folder": info.name, "bytes": len(body)})
        except BaseException:
            for key, _, _ in staged:
                mf.discard(key)
            raise
        mf.sync([k for k, _, _ in staged])
        crashpoint.hit("staged")
        with state.transaction() as tx:
            for key, rec, mtime in staged:
                tx.add(fid, validity, rec, mtime)
            for rid, uid, fl, kw, rec in rebinds:
                if rid is None:
                    tx.add(fid, validity, Record(uid=uid, key=rec.key, flags=fl, keywords=kw, size=rec.size,
                                                 sha256=rec.sha256, message_id=rec.message_id), None)
                else:
                    tx.rebind(rid, validity, uid, fl, kw)
        crashpoint.hit("recorded")
        for key, rec, _ in staged:
            mf.publish(key, rec.flags)
            crashpoint.hit("published")
        for rid, uid, fl, kw, rec in rebinds:
            if fl != rec.flags and rec.key in on_disk:
                name = mf.retag(rec.key, on_disk[rec.key], fl)
                on_disk[rec.key] = ("cur" if "\\Seen" in fl else "new", name)
        mf.sync_dirs()
        res.new += sum(1 for _, r, _ in staged if r.uid not in refetch)
        res.refetched += sum(1 for _, r, _ in staged if r.uid in refetch)
        res.rebound += len(rebinds)
        res.bytes += got_bytes

    # 4. counters last: only after everything they cover is durable
    with state.transaction() as tx:
        if not same_validity:
            tx.mark_old_gone(fid, validity)
        tx.save_folder(fid, uidvalidity=validity, uidnext=sel.get("uidnext") or st["uidnext"],
                       highestmodseq=sel.get("highestmodseq") if s.condstore else None, messages=exists)
    crashpoint.hit("folder")
