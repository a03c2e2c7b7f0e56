"""One folder's run: the local side made consistent, the server read, a plan made and applied.

`backup()` is one-way (server -> Maildir, never deleting local mail); `sync()` is the two-way
three-way merge. Both share the crash-safe download path and the re-matching of mail we already
hold, so neither can store a message twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
import weakref
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mailsync import crashpoint, ratelimit
from mailsync.config import Account
from mailsync.delivery import Delivery, recover
from mailsync.errors import SafetyAbort, ServerError
from mailsync.identity import Identity, Matcher, content_sha256, may_differ
from mailsync.imap import FolderInfo, ImapSession, crlf, message_id, seqset
from mailsync.maildir import DirWatch, MaildirFolder, storage_error
from mailsync.model import FolderResult, Record, ServerView, SyncPlan, split_flags
from mailsync.plan import batches, deletion_guard, plan_backup, plan_sync, rematch
from mailsync.runner import Stopped
from mailsync.state import State

Progress = Callable[[str, dict], None]


@dataclass
class Options:
    dry_run: bool = False
    force: bool = False


STAMP_SETTLE_NS = 2_000_000_000    # file systems with whole-second (or 2 s) timestamps: FAT, some NFS
STAMP_SETTLE_FINE_NS = 20_000_000   # ns timestamps (ext4, xfs, btrfs, tmpfs) move at least every jiffy (<= 10 ms)


def local_stamp(path: Path, wait: bool = False) -> str | None:
    """inode:mtime of cur/ and new/, or None while either changed too recently to trust: a change
    within the same timestamp tick as the last one would not move the mtime. A tick is a jiffy
    (at most 10 ms) where mtimes have nanoseconds, up to 2 s where they are whole seconds; see
    docs/maildir-and-state.md. wait: sleep out the rest of a short window (at most 20 ms) and
    take the stamp then, rather than give None (used once a folder's changes are done)."""
    for _ in range(2):
        parts = []
        left = 0
        now = time.time_ns()
        for sub in ("cur", "new"):
            try:
                st = os.stat(path / sub)
            except OSError:
                return None
            coarse = st.st_mtime_ns % 1_000_000_000 == 0  # (by chance on a fine one: the safe side)
            left = max(left, (STAMP_SETTLE_NS if coarse else STAMP_SETTLE_FINE_NS) - (now - st.st_mtime_ns))
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}")
        if left <= 0:
            return " ".join(parts)
        if not wait or left > STAMP_SETTLE_FINE_NS:  # coarse, or an mtime in the future
            return None
        time.sleep(left / 1e9)
    return None


# A STATUS answer that showed a folder changed, kept (per session, a few seconds) for the folder's
# own job: the engine asks every folder's STATUS before its pool starts (engine._skip_unchanged,
# quick_skip), and the folder's job asks again in its own quick_skip, which LIST-STATUS had saved
# (the session hands out each listed answer once). Only a "changed" answer is reused: a stale one
# can only cause work, never a skip.
CHANGED_STATUS_SECONDS = 10
_changed_status: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHANGED_LOCK = threading.Lock()


def _content_of(path: Path) -> str:
    """The content hash (identity.py) of a file being staged."""
    try:
        with open(path, "rb") as f:
            return content_sha256(f.read())
    except OSError:
        return ""


class FolderJob:
    def __init__(self, acc: Account, state: State, s: ImapSession, info: FolderInfo, path: Path,
                 res: FolderResult, progress: Progress, stop: threading.Event, opts: Options) -> None:
        self.acc, self.state, self.s, self.info, self.path = acc, state, s, info, path
        self.res, self.progress, self.stop, self.opts = res, progress, stop, opts
        self.rel = "." if path == acc.maildir else str(path.relative_to(acc.maildir))  # as the state names it
        self._unchanged: bool | None = None                      # the STATUS check, once asked
        self.adopted: set[str] = set()                          # local files bound to a server message
        self.push_after: list[tuple[int, frozenset[str]]] = []  # (uid, full flag set) to store
        self.too_big: list[int] = []                            # new, over max_message_size
        self._idents: dict[str, Identity] = {}                   # key -> identity of its file, once read
        self.hint_sizes: dict[int, int] = {}                    # UID -> size, of messages hint_pairs paired
        self.watch: DirWatch | None = None                      # the fast path's (fast_read)
        self.diverged = False  # a file's flags may differ from the state's: record no stamp
        # the run's collector of fast-path folders whose stamp is taken at its end (engine); it
        # says no when it holds enough, and the stamp is then taken here
        self.defer_stamp: Callable[[FolderJob], bool] | None = None

    # -- common steps -------------------------------------------------------------------

    def prepare_local(self) -> None:
        """Folder row, Maildir dirs, scan; finish deliveries a crash interrupted; clean tmp/."""
        acc, state = self.acc, self.state
        self.existed = (self.path / "cur").is_dir() or (self.path / "new").is_dir()
        self.fstate = state.folder(self.info.name, self.rel)
        self.fid = self.fstate["id"]
        self.mf = MaildirFolder(self.path, maildirfolder=(self.path != acc.maildir and acc.layout == "maildir++"))
        if not self.opts.dry_run or self.existed:
            self.mf.ensure()
        self.scan_stamp = local_stamp(self.path)  # before the scan: see stamp_in_step
        self.on_disk = self.mf.scan()
        self.known_keys = state.keys(self.fid)
        if not self.opts.dry_run:
            # finish deliveries a kill interrupted (delivery.py)
            flags_by_key = state.flags_by_key(self.fid)
            recover(self.mf, self.known_keys, self.on_disk,
                    lambda key: flags_by_key.get(key, (frozenset(), frozenset())))

    def status_unchanged(self) -> bool:
        if self._unchanged is not None:
            return self._unchanged
        with _CHANGED_LOCK:
            at, st = _changed_status.get(self.s, {}).pop(self.info.name, (0.0, None))
        if st is None or time.monotonic() - at > CHANGED_STATUS_SECONDS or self._same(st):
            st = self.s.status(self.info.name)  # (a kept answer only ever says "changed")
            if not self._same(st):
                with _CHANGED_LOCK:
                    _changed_status.setdefault(self.s, {})[self.info.name] = (time.monotonic(), st)
        self.st = st
        self._unchanged = self._same(st)
        return self._unchanged

    def _same(self, st: dict) -> bool:
        f = self.fstate
        return bool(self.s.condstore and f["uidvalidity"] == st.get("uidvalidity")
                    and f["uidnext"] == st.get("uidnext") and f["messages"] == st.get("messages")
                    and f["highestmodseq"] is not None and f["highestmodseq"] == st.get("highestmodseq"))

    def quick_skip(self) -> bool:
        """Nothing to do, known without listing the folder or loading its records: the server
        folder is unchanged (one STATUS, CONDSTORE) and so are cur/ and new/ (inode and mtime as
        recorded when they were last found in step with the state; any file added, removed or
        renamed changes them)."""
        f = self.state.folder_row(self.info.name)
        if self.opts.dry_run or f is None or not f["local_stamp"] or f["path"] != self.rel:
            return False
        if f["local_stamp"] != local_stamp(self.path) or self.state.pending_uploads(f["id"]):
            return False
        self.fstate = f
        return self.status_unchanged()

    def remember_in_step(self) -> None:
        """cur/ and new/ match the state now: later runs may skip this folder without listing it."""
        if not self.opts.dry_run:
            self.state.set_local_stamp(self.fid, self.stamp_in_step())

    def stamp_in_step(self) -> str | None:
        """local_stamp of cur/ and new/ if they hold just what this run believes (on_disk), else
        None (the next run then looks instead of skipping): a mail reader may have delivered,
        renamed or deleted a file after the scan, and a stamp taken after that would hide it."""
        if self.diverged:
            return None
        if self.watch is not None:
            return self.watched_stamp()
        stamp = local_stamp(self.path, wait=True)
        if stamp is None or stamp == getattr(self, "scan_stamp", None):
            return stamp  # (unchanged since before the scan)
        if not self.mf.holds_just(self.on_disk) or local_stamp(self.path) != stamp:
            return None
        return stamp

    def read_server(self, writable: bool) -> None:
        s, f = self.s, self.fstate
        quick = None
        if s.qresync and f["uidvalidity"] == self.st.get("uidvalidity") and f["highestmodseq"]:
            counters, changed, vanished = s.select_qresync(self.info.name, f["uidvalidity"], f["highestmodseq"],
                                                           readonly=not writable)
            if counters.get("uidvalidity") == f["uidvalidity"]:
                quick = (changed, vanished)
            self.sel = sel = counters
        else:
            self.sel = sel = s.select(self.info.name) if writable else s.examine(self.info.name)
        self.validity = validity = sel.get("uidvalidity") or self.st.get("uidvalidity")
        if not validity or not 0 < validity < 2**32:
            raise ServerError(f"{s.where} did not report a valid UIDVALIDITY for this folder",
                              hint="the server is misbehaving; nothing in this folder was changed")
        self.same_validity = f["uidvalidity"] == validity
        self.old_validity = f["uidvalidity"] if f["uidvalidity"] is not None and not self.same_validity else None
        self.known = self.state.records(self.fid, validity)
        old_next = (f["uidnext"] or 1) if self.same_validity else 1
        modseq = f["highestmodseq"] if (self.same_validity and s.condstore) else None
        if quick is not None:
            self.flags = dict(quick[0])  # QRESYNC: changed flags came with the SELECT
        else:
            self.flags = s.flags(old_next, modseq) if self.known else {}
        self.new_full = s.new_sizes(old_next, self.flags)  # (their flags go into self.flags)
        self.exists = sel.get("exists", self.st.get("messages", 0))
        known_below = sum(1 for uid, r in self.known.items() if r.on_server and uid < old_next)
        if quick is not None and quick[1]:
            # QRESYNC: VANISHED (EARLIER) named what was expunged since the last sync
            self.present = frozenset(u for u, r in self.known.items() if r.on_server and u not in quick[1]) \
                | frozenset(self.new_full)
        elif self.exists - len(self.new_full) == known_below:
            self.present = None  # counts prove nothing below old_next was expunged
        else:
            self.present = frozenset(s.all_uids())

    # -- the flag-change fast path: the server changed, the Maildir did not ------------------

    def fast_read(self, writable: bool = False, exact: bool = False) -> bool:
        """Read a folder whose cur/ and new/ still carry the stamp recorded when they were last in
        step with the state (so they hold exactly what the state says) in O(what changed on the
        server): its changed flags (QRESYNC's SELECT, or FETCH CHANGEDSINCE), new and expunged
        messages, the records of just those UIDs, and their files found by the names their
        recorded flags give (MaildirFolder.place) instead of listing the folder. False, with
        nothing changed, where that does not hold (the full path then). On True, new/ and cur/ are
        watched (DirWatch) until the stamp is taken again (watched_stamp). writable: SELECT, not
        EXAMINE. exact (mirror, sync): each file found must carry its recorded flags, as the run
        that took the stamp left them; else the full path sees the local change. On True the
        recorded stamp is cleared first, so a run killed before its end leaves none."""
        f, s = self.state.folder_row(self.info.name), self.s
        if (self.opts.dry_run or f is None or not f["local_stamp"] or f["path"] != self.rel or not s.condstore
                or f["uidvalidity"] is None or not f["highestmodseq"] or f["local_stamp"] != local_stamp(self.path)):
            return False
        self.fstate, self.fid, self.existed = f, f["id"], True
        self.status_unchanged()  # (self.st)
        if self.st.get("uidvalidity") != f["uidvalidity"]:
            return False
        self.mf = MaildirFolder(self.path, maildirfolder=(self.path != self.acc.maildir and self.acc.layout == "maildir++"))
        self.mf.ensure()
        # watched from before the stamp is compared: every later change shows in the events
        watch = DirWatch(self.path)
        try:
            if not watch.ok or f["local_stamp"] != local_stamp(self.path) or self.mf.staged_left() \
                    or self.state.pending_uploads(self.fid) or not self._read_changes(writable, exact):
                watch.close()
                return False
        except BaseException:
            watch.close()
            raise
        self.watch = watch  # (closed by watched_stamp; if the run fails first, when it is dropped)
        self.state.set_local_stamp(self.fid, None)  # a run killed from here on leaves no stamp
        return True

    def _read_changes(self, writable: bool, exact: bool) -> bool:
        s, f, fid = self.s, self.fstate, self.fid
        if s.qresync:
            sel, changed, vanished = s.select_qresync(self.info.name, f["uidvalidity"], f["highestmodseq"],
                                                      readonly=not writable)
        else:
            sel, changed, vanished = (s.select if writable else s.examine)(self.info.name), None, set()
        if sel.get("uidvalidity") != f["uidvalidity"]:
            return False
        self.sel = sel
        self.validity, self.same_validity, self.old_validity = f["uidvalidity"], True, None
        old_next = f["uidnext"] or 1
        self.flags = dict(changed) if changed is not None else s.flags(old_next, f["highestmodseq"])
        if not vanished and sel.get("uidnext") == old_next:
            # no UID was given out since the last run (RFC 3501's UIDNEXT), so no listing of new
            # mail: one round trip fewer per changed folder. The count check below still runs.
            self.new_full = {}
        else:
            self.new_full = s.new_sizes(old_next, self.flags)
        self.exists = sel.get("exists", self.st.get("messages", 0))
        self.known = self.state.records_of(fid, self.validity, set(self.flags) | vanished)
        if vanished:
            self.present = frozenset(u for u in self.known if u not in vanished) | frozenset(self.new_full)
        elif self.exists - len(self.new_full) == self.state.count_on_server(fid, self.validity, old_next):
            self.present = None  # counts prove nothing below old_next was expunged
        else:
            return False  # expunged, and which ones takes every UID (CONDSTORE alone): the full path
        self.on_disk = {}
        for rec in self.known.values():
            if rec.on_server:
                # normally where its recorded flags say; else looked for (a mail reader renamed it
                # before the stamp was taken, in backup mode): never a lost change
                where = self.mf.place(rec.key, rec.flags, rec.keywords) or self.mf.locate(rec.key)
                if where is None:
                    return False  # not on disk after all: the full path fetches it again
                if exact and self.mf.flags_of(where[1]) != (rec.flags, self.mf.kw.representable(rec.keywords)):
                    return False  # changed locally after all: the full path merges it
                self.on_disk[rec.key] = where
        self.known_keys = {r.key for r in self.known.values()}
        if self.new_full:
            # new mail may be a file held already (an archived copy, a file the state does not
            # know), matched as the full path does, which takes the folder's listing (not its records)
            for key, where in self.mf.listing().items():
                self.on_disk.setdefault(key, where)
            self.known_keys = self.state.keys(fid)
        self.before = dict(self.on_disk)
        return True

    def finish_stamp(self) -> None:
        """The stamp save_counters deferred, recorded if cur/ and new/ are in step."""
        stamp = self.stamp_in_step()
        if stamp is not None:
            self.state.set_local_stamp(self.fid, stamp)

    def drop_watch(self) -> None:
        if self.watch is not None:
            self.watch.close()

    def watched_stamp(self) -> str | None:
        """The fast path's new stamp: local_stamp once settled, if new/ and cur/ changed meanwhile
        by exactly this run's own renames, deliveries and deletions (before -> on_disk), else None.
        The events are read after the stamp is taken, so a change they miss comes later, and moves
        the mtime past the stamp."""
        stamp = local_stamp(self.path, wait=True)
        seen = self.watch.changes()
        self.watch.close()
        mine: dict[tuple[str, str], int] = {}
        for key in self.before.keys() | self.on_disk.keys():
            was, now = self.before.get(key), self.on_disk.get(key)
            if was != now:
                for where, n in ((was, -1), (now, 1)):
                    if where is not None:
                        mine[where] = mine.get(where, 0) + n
        return stamp if stamp is not None and seen == {k: n for k, n in mine.items() if n} else None

    def rebind_known_mail(self, fetch: list[int]) -> list[int]:
        """Mail we already hold under an old UID (UIDVALIDITY changed, or the server renumbered
        messages) is re-bound instead of stored twice. Returns what is left to download."""
        self.spare = []
        if not fetch:
            return fetch
        self.spare = [(rid, r) for rid, r in self.state.off_server_records(self.fid, self.validity)
                      if r.key in self.on_disk]
        if self.spare and not self.same_validity:
            ids = self.s.message_ids(fetch)
            by_rec = {id(r): rid for rid, r in self.spare}
            matched = rematch([r for _, r in self.spare], ids)
            if matched:
                with self.state.transaction() as tx:
                    for uid, rec in matched.items():
                        fl, kw = self.flags.get(uid, (frozenset(), frozenset()))
                        self._retag(rec.key, fl, kw)
                        tx.rebind(by_rec[id(rec)], self.validity, uid, fl, kw)
                    self.mf.sync_dirs()  # renames durable before the state records them
                self.res.rebound += len(matched)
                self.res.renumbered += len(matched)
                fetch = [u for u in fetch if u not in matched]
                self.spare = [(rid, r) for rid, r in self.spare if r not in matched.values()]
        return fetch

    def _retag(self, key: str, flags: frozenset[str], keywords=frozenset()) -> None:
        """Rename a file to its new flags. A mail reader may have renamed it since the scan: this
        run's change is merged into its letters now (MaildirFolder.retag). Deleted meanwhile, it
        stays deleted: a local deletion for the next run; its on_disk entry is left as found (what
        opens it later, load and remove, finds it gone and skips it: no upload, no rename)."""
        if key in self.on_disk:
            where = self.mf.retag(key, self.on_disk[key], flags, keywords)
            if where is not None:
                self.on_disk[key] = where
                if self.mf.flags_of(where[1]) != (flags, self.mf.kw.representable(keywords)):
                    self.diverged = True  # a mail reader's change merged in: the next run must look

    def download(self, todo: list[int], refetch: set[int], adopt: set[str], union: bool = False) -> None:
        """Fetch messages in batches bounded by bytes: stage in tmp/, flush as a group, record,
        publish. A message whose bytes equal mail we already hold (self.spare, or an unknown local
        file in `adopt`) is bound to that file instead."""
        if not todo:
            return
        state, mf, fid, validity = self.state, self.mf, self.fid, self.validity
        # mail we hold, by its exact bytes and by its content (identity.py: the same message in
        # another form: LF line ends, headers another tool added)
        by_hash: dict[str, list[tuple[int | None, Record]]] = {}
        for rid, r in self.spare:
            by_hash.setdefault(r.sha256, []).append((rid, r))
            # after a UIDVALIDITY change (rare) every file counts; reading each one is not done
            # on other runs, where spare holds every message the server no longer has
            ident = self._identity(r.key) if not self.same_validity else None
            if ident is not None and ident.content != r.sha256:
                by_hash.setdefault(ident.content, []).append((rid, r))
        for key in adopt:
            ident = self._identity(key)
            if ident is None:
                continue
            fl, kw = mf.flags_of(self.on_disk[key][1])
            rec = Record(uid=0, key=key, flags=fl, keywords=kw, size=ident.size, sha256=ident.sha256)
            by_hash.setdefault(ident.sha256, []).append((None, rec))
            if ident.content != ident.sha256:
                by_hash.setdefault(ident.content, []).append((None, rec))
        # (a view, not a copy: a folder's first backup has a size per message)
        again = {uid: self.known[uid].size if uid in self.known else 0 for uid in refetch if uid not in self.new_full}
        sizes = ChainMap(again, self.new_full) if again else self.new_full  # (a ChainMap's lookups are slow)
        self.progress("folder_start", {"folder": self.info.name, "messages": len(todo),
                                       "bytes": sum(sizes.get(u, 0) for u in todo)})
        unanswered: list[int] = []
        limiter = ratelimit.current(self.acc)  # max_bytes_per_second, or the fleet's per-host rate
        for batch in batches(sizes, todo, self.acc.batch_bytes):
            if self.stop.is_set():
                raise Stopped()
            staged: list[tuple[str, Record, float | None]] = []
            delivery = Delivery(mf)
            rebinds: list[tuple[int | None, int, frozenset[str], frozenset[str], Record]] = []
            got = 0
            listed = max((sizes.get(u, 0) for u in batch), default=0)
            asked = set(batch)
            try:
                for uid, body, fl, kw, when in self.s.stream_bodies(batch, mf.open_staged,
                                                                    max_body=2 * listed + (1 << 20)):
                    if body is not None:
                        limiter.take(body.size)  # every body received counts
                    if body is None or uid not in asked:
                        if body is not None:
                            body.discard()  # an answer to something we did not ask for
                        continue  # NIL: expunged meanwhile? never write an empty file
                    asked.discard(uid)
                    sha = body.sha256
                    hits = [h for h in by_hash.get(sha, ()) if h[1].key not in self.adopted]
                    if not hits and by_hash and may_differ(body.head):
                        hits = [h for h in by_hash.get(_content_of(body.path), ()) if h[1].key not in self.adopted]
                    if hits and uid not in refetch:
                        body.discard()
                        rid, rec = hits.pop()
                        self.adopted.add(rec.key)  # each file is bound to one server message
                        if rid is None:  # adopt an unknown local file: this message in some form
                            if union:  # two-way: neither side's flags are lost
                                extra = (rec.flags | rec.keywords) - (fl | kw)
                                if extra:
                                    self.push_after.append((uid, fl | kw | extra))
                                fl, kw = fl | rec.flags, kw | rec.keywords
                            # the size is the server's (as for every record), the hash the file's
                            rec = Record(uid=uid, key=rec.key, flags=rec.flags, keywords=rec.keywords,
                                         size=body.size, sha256=rec.sha256, message_id=message_id(body.head))
                        rebinds.append((rid, uid, fl, kw, rec))
                        continue
                    mtime = when.timestamp() if when is not None else None
                    body.finish(mtime)
                    delivery.add(body.key, fl, kw)
                    staged.append((body.key, Record(uid=uid, key=body.key, flags=fl, keywords=kw, size=body.size,
                                                    sha256=sha, message_id=message_id(body.head)), mtime))
                    got += body.size
                    self.progress("message", {"folder": self.info.name, "bytes": body.size})
            except BaseException:
                delivery.discard()
                raise
            unanswered.extend(u for u in batch if u in asked)
            # files bound to a server message take its flags first: renames durable before the
            # state records them (as everywhere)
            retagged = False
            for _rid, _uid, fl, kw, rec in rebinds:
                if fl != rec.flags or kw != rec.keywords:
                    self._retag(rec.key, fl, kw)
                    retagged = True
            if retagged:
                mf.sync_dirs()

            def record(tx) -> None:
                for _key, rec, mtime in staged:
                    tx.add(fid, validity, rec, mtime)
                for rid, uid, fl, kw, rec in rebinds:
                    if rid is None:
                        tx.add(fid, validity, Record(uid=uid, key=rec.key, flags=fl, keywords=kw, size=rec.size,
                                                     sha256=rec.sha256, message_id=rec.message_id), None)
                    else:
                        tx.rebind(rid, validity, uid, fl, kw)

            delivery.commit(state, record, self.on_disk)
            self.res.new += sum(1 for _, r, _ in staged if r.uid not in refetch)
            self.res.refetched += sum(1 for _, r, _ in staged if r.uid in refetch)
            self.res.rebound += len(rebinds)
            self.res.renumbered += sum(1 for r in rebinds if r[0] is not None)
            self.res.bytes += got
        if unanswered:
            # a message the server did not send must really be gone; if it is still there, the
            # folder fails now and its counters stay where they were, so the next run asks again
            still = self.s.existing(unanswered)
            if still:
                raise ServerError(f"the server did not send {len(still)} messages it still lists (UIDs "
                                  f"{seqset(still)}); they are fetched again on the next run")

    def skip_too_big(self, fetch) -> list[int]:
        """New messages over max_message_size are not downloaded (a notice says how many); the
        saved UIDNEXT stays below them, so each run sees them again and a raised limit gets them."""
        limit = self.acc.max_message_size
        if not limit:
            return list(fetch)
        big = [u for u in fetch if self.new_full.get(u, 0) > limit]
        if big:
            self.too_big = big
            self.res.skipped_too_big = len(big)
            self.res.notices.append(f"{len(big)} messages larger than max_message_size ({limit} bytes) were not "
                                    "downloaded; raise max_message_size to get them")
        skipped = set(big)
        return [u for u in fetch if u not in skipped]

    def save_counters(self) -> None:
        """Counters last: only after everything they cover is durable."""
        res = self.res
        if getattr(self, "old_validity", None) is not None:
            res.notices.append(f"the server renumbered this folder (UIDVALIDITY {self.old_validity} -> "
                               f"{self.validity}): {res.renumbered} messages matched again, {res.new} downloaded; "
                               "no local file was deleted")
        elif res.renumbered:
            res.notices.append(f"the server gave {res.renumbered} messages new UIDs: matched again, not downloaded")
        # (may wait up to 20 ms: not inside the transaction). A folder the fast path changed has its
        # stamp taken at the end of the run instead (finish_stamp), so its wait overlaps the other
        # folders' work; till then it has none, as after a kill
        deferred = (self.watch is not None and not self.diverged and self.defer_stamp is not None
                    and self.defer_stamp(self))
        stamp = None if deferred else self.stamp_in_step()
        with self.state.transaction() as tx:
            if not self.same_validity:
                tx.mark_old_gone(self.fid, self.validity)
            uidnext = self.sel.get("uidnext") or self.st.get("uidnext")
            if self.too_big:  # seen again next run
                uidnext = min(uidnext or min(self.too_big), min(self.too_big))
            tx.save_folder(self.fid, uidvalidity=self.validity,
                           uidnext=uidnext,
                           highestmodseq=self.sel.get("highestmodseq") if self.s.condstore else None,
                           messages=self.exists, local_stamp=stamp)
        crashpoint.hit("folder")

    # -- backup: server -> Maildir ------------------------------------------------------

    def backup(self) -> None:
        if self.quick_skip():
            self.res.skipped = True
            return
        if not self.fast_read():
            self.prepare_local()
            if self.status_unchanged() and not (
                    self.state.keys(self.fid, uidvalidity=self.fstate["uidvalidity"], on_server=True)
                    - self.on_disk.keys()):
                self.res.skipped = True
                self.remember_in_step()
                return
            self.read_server(writable=False)
        view = ServerView(flags=self.flags, new=self.new_full,
                          present=self.present)
        plan = plan_backup(view, self.known, self.on_disk.keys())
        if plan.set_flags or plan.gone or plan.back:
            with self.state.transaction() as tx:
                for uid, fl, kw in plan.set_flags:
                    self._retag(self.known[uid].key, fl, kw)
                    tx.set_flags(self.fid, self.validity, uid, fl, kw)
                tx.set_on_server(self.fid, self.validity, plan.gone, False)
                tx.set_on_server(self.fid, self.validity, plan.back, True)
                if plan.set_flags:
                    self.mf.sync_dirs()  # renames durable before the state records them
            self.res.flags_changed += len(plan.set_flags)
            self.res.gone += len(plan.gone)
        fetch = self.skip_too_big(self.rebind_known_mail(list(plan.fetch)))
        # files the state does not know (a lost state, a Maildir made by another tool) are
        # adopted when a downloaded message has the same bytes, instead of stored twice
        adopt = (self.on_disk.keys() - self.known_keys) if fetch else set()
        if adopt:  # unambiguous (Message-ID, size) pairs are bound without a download
            pairs = self.hint_pairs(fetch, adopt)
            self.bind(pairs, None)
            fetch, adopt = [u for u in fetch if u not in pairs], adopt - set(pairs.values())
        self.download(fetch + list(plan.refetch), set(plan.refetch), adopt)
        self.save_counters()

    # -- mirror: server -> Maildir, the Maildir kept a copy of the server ----------------

    def mirror(self) -> None:
        """As backup, and also: what the server expunged since the last run is deleted locally
        (under the deletion guard, as in two-way sync), and flags changed locally are put back to
        the server's. Files the server never had, and files kept from before as gone from the
        server (by backup mode), are left alone."""
        if self.quick_skip():
            self.res.skipped = True
            return
        fast = self.fast_read(exact=True)  # (unchanged files carry their recorded flags)
        if not fast:
            self.prepare_local()
            self.status_unchanged()  # (STATUS: the counters read_server compares with)
            self.read_server(writable=False)
        view = ServerView(flags=self.flags, new=self.new_full,
                          present=self.present)
        plan = plan_backup(view, self.known, self.on_disk.keys())
        on_server = self.state.count_on_server(self.fid, self.validity, 2**32) if fast \
            else sum(1 for r in self.known.values() if r.on_server)
        why = deletion_guard(SyncPlan(delete_local=plan.gone), on_server, self.acc.max_delete)
        if why and not self.opts.force:
            raise SafetyAbort(f"{why}; nothing was changed in this folder",
                              hint="check what happened on the server, then run with --force if it is right")
        changed = {uid for uid, _fl, _kw in plan.set_flags}
        if plan.set_flags or plan.back:
            with self.state.transaction() as tx:
                for uid, fl, kw in plan.set_flags:
                    self._retag(self.known[uid].key, fl, kw)
                    tx.set_flags(self.fid, self.validity, uid, fl, kw)
                tx.set_on_server(self.fid, self.validity, plan.back, True)
                if plan.set_flags:
                    self.mf.sync_dirs()  # renames durable before the state records them
        # flags changed in the Maildir go back to the server's (the state has them already)
        gone = set(plan.gone)
        reset = 0
        for uid, rec in self.known.items():
            if uid in gone or uid in changed or rec.key not in self.on_disk or not rec.on_server:
                continue
            # only a real flag change is put back: a file's place (a mail reader moves unread
            # mail from new/ to cur/) and the form of its name (no ":2," yet) are left as they are
            fl, kw = self.mf.flags_of(self.on_disk[rec.key][1])
            if fl == rec.flags and kw == self.mf.kw.representable(rec.keywords):
                continue
            self._retag(rec.key, rec.flags, rec.keywords)
            reset += 1
        if reset:
            self.mf.sync_dirs()
        self.res.flags_changed += len(plan.set_flags) + reset
        fetch = self.skip_too_big(self.rebind_known_mail(list(plan.fetch)))
        adopt = (self.on_disk.keys() - self.known_keys) if fetch else set()
        if adopt:
            pairs = self.hint_pairs(fetch, adopt)
            self.bind(pairs, None)
            fetch, adopt = [u for u in fetch if u not in pairs], adopt - set(pairs.values())
        self.download(fetch + list(plan.refetch), set(plan.refetch), adopt)
        if gone:
            for uid in sorted(gone):
                self._unlink(self.known[uid].key)
            self.mf.sync_dirs()
            crashpoint.hit("deleted-local")
            with self.state.transaction() as tx:
                tx.forget(self.fid, self.validity, sorted(gone))
            self.res.deleted_local += len(gone)
        self.save_counters()

    def _unlink(self, key: str) -> None:
        """Remove a message file, found again if a mail reader renamed it (gone already: nothing
        to do)."""
        if key in self.on_disk:
            self.mf.remove(key, self.on_disk.pop(key))

    # -- two-way sync ------------------------------------------------------------------

    def sync(self) -> None:
        exists_here = (self.path / "cur").is_dir() or (self.path / "new").is_dir()
        if not exists_here and self.acc.create in ("server", "none") \
                and self.state.folder_synced(self.info.name) is None:
            self.res.skipped = True
            self.res.notices.append("exists only on the server; not created locally (create = "
                                    f"\"{self.acc.create}\")")
            return
        if exists_here and self.quick_skip():
            self.res.skipped = True
            return
        if exists_here and self.fast_read(writable=True, exact=True):
            self.sync_server_changes()
            return
        self.prepare_local()
        base_keys = self.state.keys(self.fid, uidvalidity=self.fstate["uidvalidity"], on_server=True) \
            if self.fstate["uidvalidity"] is not None else set()
        if base_keys and not self.existed:
            # the whole folder is gone locally: never read as "delete everything" on the server;
            # folder deletions do not propagate, so it is downloaded again
            self.res.notices.append(f"the local folder was missing ({len(base_keys)} messages known); "
                                    "downloaded again from the server (folder deletions never propagate)")
            if not self.opts.dry_run:
                with self.state.transaction() as tx:
                    tx.forget_folder(self.fid)
                self.fstate = self.state.folder(self.info.name, self.fstate["path"])
                self.known_keys = set()
        self.resume_uploads()
        fresh = bool(base_keys) and not self.existed  # (dry run: as if the state were forgotten)
        # what each file says: system flags from its letters, keywords through dovecot-keywords;
        # keywords that got no letter (more than 26) live in the state only and read as unchanged
        base_kw = {r.key: r.keywords for r in self.state.records(self.fid, self.fstate["uidvalidity"] or 0).values()}
        local_flags = {}
        for k, (_sub, name) in self.on_disk.items():
            fl, kw = self.mf.flags_of(name)
            hidden = base_kw.get(k, frozenset()) - self.mf.kw.representable(base_kw.get(k, frozenset()))
            local_flags[k] = fl | kw | hidden
        # files of messages the state knows as gone from the server (kept by backup mode, or from
        # before a UIDVALIDITY change) are archived copies: never uploaded, only re-matched
        archived = self.known_keys - self.known_keys_on_server()
        local_same = self.on_disk.keys() - archived == self.known_keys_on_server() and all(
            local_flags.get(k) == f for k, f in self.base_flags_by_key().items())
        if not fresh and self.status_unchanged() and local_same:
            self.res.skipped = True
            self.remember_in_step()
            return
        if fresh:
            self.st = self.s.status(self.info.name)
            # read the server as if nothing had been synced (what a real run does after forgetting)
            self.fstate = {**dict(self.fstate), "uidvalidity": None, "uidnext": None, "highestmodseq": None,
                           "messages": None}
        self.read_server(writable=not self.opts.dry_run)
        if fresh:
            self.known = {}
        base = {u: r for u, r in self.known.items() if r.on_server}
        base_keys_now = {r.key for r in base.values()}
        archived = (self.known_keys - base_keys_now) & self.on_disk.keys()
        fetch_new = set(self.skip_too_big(sorted(u for u in self.new_full if u not in self.known)))
        plan = plan_sync(base, self.flags, self.present, fetch_new,
                         {k: f for k, f in local_flags.items() if k not in archived}, self.acc.conflict)
        why = deletion_guard(plan, len(base), self.acc.max_delete)
        if why and not self.opts.force:
            self.res.plan = plan
            raise SafetyAbort(f"{why}; nothing was changed in this folder",
                              hint="check what happened, then run with --force if it is right")
        plan = self.pair_new(plan, archived)
        if self.opts.dry_run:
            plan = self.preview_content_pairs(plan, archived)
        self.res.plan = plan
        self.res.conflicts.extend(plan.conflicts)
        if self.opts.dry_run:
            self.res.rebound += len(plan.pair)
            return
        self.apply(plan, base, adopt=(set(plan.upload) | archived), local_flags=local_flags)
        self.save_counters()

    def sync_server_changes(self) -> None:
        """Two-way, the fast path (fast_read): the Maildir is as the last run left it, each file
        with its recorded flags, so only the server changed: its flag changes are pulled, its new
        mail fetched, its expunges deleted locally (under the deletion guard), nothing is pushed
        or uploaded. The same plan and apply as the full path, over the changed messages only."""
        base = {u: r for u, r in self.known.items() if r.on_server}
        local_flags = {r.key: r.flags | r.keywords for r in base.values()}  # (fast_read checked them)
        archived = set()
        if self.new_full:  # archived copies may be new server mail (pair_new, download)
            archived = {r.key for _rid, r in self.state.off_server_records(self.fid, self.validity)} \
                & self.on_disk.keys()
        fetch_new = set(self.skip_too_big(sorted(u for u in self.new_full if u not in self.known)))
        plan = plan_sync(base, self.flags, self.present, fetch_new, local_flags, self.acc.conflict)
        why = deletion_guard(plan, self.state.count_on_server(self.fid, self.validity, 2**32), self.acc.max_delete)
        if why and not self.opts.force:
            self.res.plan = plan
            raise SafetyAbort(f"{why}; nothing was changed in this folder",
                              hint="check what happened, then run with --force if it is right")
        plan = self.pair_new(plan, archived)
        self.res.plan = plan
        self.res.conflicts.extend(plan.conflicts)
        self.apply(plan, base, adopt=archived, local_flags=local_flags)
        self.save_counters()

    def pair_new(self, plan, archived: set[str]):
        """New on the server and new (or archived) locally may be the same message: an upload a
        kill interrupted, a lost state, a UIDVALIDITY change, a Maildir another tool wrote.
        Unambiguous (Message-ID, size) pairs go into the plan (plan.pair: bound by apply, without
        a transfer) instead of a download and an upload; the rest are matched by content while
        downloading (see download). Bound pairs keep the union of both sides' flags."""
        cands = set(plan.upload) | archived
        if not cands or not plan.fetch:
            return plan
        pairs = self.hint_pairs(list(plan.fetch), cands)
        if not pairs:
            return plan
        return dataclasses.replace(plan, fetch=tuple(u for u in plan.fetch if u not in pairs),
                                   upload=tuple(k for k in plan.upload if k not in pairs.values()),
                                   pair=tuple(sorted(pairs.items())))

    def preview_content_pairs(self, plan, archived: set[str]):
        """Dry run: the pairs download() would find by content (a local file that is a server
        message in another form, without a usable Message-ID and size pair), found the same way,
        so the dry run shows what the run will do. Only server messages that may match (the
        Message-ID of a candidate file, or the size of one of its forms) are read, with
        BODY.PEEK; nothing is written."""
        cands = (set(plan.upload) | archived) - {k for _u, k in plan.pair}
        if not cands or not plan.fetch:
            return plan
        m = Matcher()
        for k in cands:
            ident = self._identity(k)
            if ident is not None:
                m.add(k, ident)
        mids = {i.message_id for i in m.ident.values() if i.message_id}
        sizes = set().union(*(i.sizes for i in m.ident.values())) if len(m) else set()
        meta = self.s.message_ids(plan.fetch)
        want = [u for u, (size, mid) in meta.items() if (mid and mid in mids) or size in sizes]
        pairs: dict[int, str] = {}
        for batch in batches({u: meta[u][0] for u in want}, want, self.acc.batch_bytes):
            for uid, body, *_ in self.s.bodies(batch):
                hit = m.by_content(Identity.of(body)) if body is not None else None
                if hit is not None:
                    pairs[uid] = hit[0]
        if not pairs:
            return plan
        keys = set(pairs.values())
        return dataclasses.replace(plan, fetch=tuple(u for u in plan.fetch if u not in pairs),
                                   upload=tuple(k for k in plan.upload if k not in keys),
                                   pair=plan.pair + tuple(sorted(pairs.items())))

    def _identity(self, key: str) -> Identity | None:
        """The identity of a local file, read once a run (a message file's bytes never change;
        the hint pairing, the dry run's preview and the download all ask)."""
        if key not in self._idents:
            try:
                self._idents[key] = Identity.of(self.mf.read(self.on_disk[key]))
            except OSError:
                return None  # gone meanwhile (a mail client): not a candidate
        return self._idents[key]

    def hint_pairs(self, fetch: list[int], cands: set[str]) -> dict[int, str]:
        """Local files (cands) that are new server messages (fetch) by unambiguous (Message-ID,
        size) pairs, sizes of the file's forms allowed for (identity.Matcher): UID -> key. Reads
        the server's Message-IDs and sizes; changes nothing."""
        m = Matcher()
        for k in cands:
            ident = self._identity(k)
            if ident is not None and ident.message_id:
                m.add(k, ident)
        if not len(m):
            return {}
        meta = self.s.message_ids(fetch)
        pairs = m.pair_by_hint(meta)
        self.hint_sizes.update((uid, meta[uid][0]) for uid in pairs)
        return pairs

    def bind(self, pairs: dict[int, str], local_flags: dict[str, frozenset[str]] | None) -> None:
        """Bind each local file to its server message (hint_pairs): the file takes the flags
        (local_flags given, two-way: both sides' flags, the server's updated after the downloads;
        else the server's), then the state records the pair."""
        if not pairs:
            return
        merged_flags = {}
        for uid, key in pairs.items():
            fl, kw = self.flags.get(uid, (frozenset(), frozenset()))
            if local_flags is not None:
                merged = fl | kw | local_flags.get(key, frozenset())
                if merged != fl | kw:
                    self.push_after.append((uid, merged))
                fl, kw = split_flags(merged)
            self._retag(key, fl, kw)
            merged_flags[uid] = (fl, kw)
        self.mf.sync_dirs()  # renames durable before the state records them
        with self.state.transaction() as tx:
            for uid, key in pairs.items():
                fl, kw = merged_flags[uid]
                ident = self._identity(key)
                tx.forget_key(self.fid, key)
                tx.add(self.fid, self.validity, Record(uid=uid, key=key, flags=fl, keywords=kw,
                                                       size=self.hint_sizes[uid], sha256=ident.sha256,
                                                       message_id=ident.message_id), None)
        self.res.rebound += len(pairs)
        self.adopted |= set(pairs.values())

    def known_keys_on_server(self) -> set[str]:
        if self.fstate["uidvalidity"] is None:
            return set()
        return self.state.keys(self.fid, uidvalidity=self.fstate["uidvalidity"], on_server=True)

    def base_flags_by_key(self) -> dict[str, frozenset[str]]:
        if self.fstate["uidvalidity"] is None:
            return {}
        return {r.key: r.flags | r.keywords for r in self.state.records(self.fid, self.fstate["uidvalidity"]).values()
                if r.on_server}

    def apply(self, plan, base: dict[int, Record], adopt: set[str], local_flags: dict[str, frozenset[str]]) -> None:
        state, fid, validity, mf = self.state, self.fid, self.validity, self.mf
        # 0. local files that are new server messages (plan.pair): bound, nothing transferred
        self.bind(dict(plan.pair), local_flags)
        unchanged = self.sel.get("highestmodseq") if self.s.condstore else None
        # 1. flags first: to the server (refused where it changed meanwhile), then locally.
        #    One STORE FLAGS per message with its whole new set, so adding one flag and removing
        #    another is one change the server either takes or refuses.
        refused = self._store_sets([(uid, (self._remote_all(uid, base) | add) - remove)
                                    for uid, add, remove in plan.push], unchanged)
        if refused:
            self.diverged = True  # local flags not recorded yet
            self.res.notices.append(f"{len(refused)} messages changed on the server during the run; "
                                    "their flags are merged on the next run")
        pulls = {uid: fl for uid, fl in plan.pull if uid not in refused}
        for uid, fl in pulls.items():
            self._retag(base[uid].key, *split_flags(fl))
        if pulls:
            mf.sync_dirs()
        records = [(u, fl, kw) for u, fl, kw in plan.record if u not in refused]
        if records:
            with state.transaction() as tx:
                for uid, fl, kw in records:
                    tx.set_flags(fid, validity, uid, fl, kw)
        self.res.flags_changed += len(records)
        self.res.flags_pushed += len(plan.push) - len(refused & {u for u, _, _ in plan.push})
        # 2. messages: server -> Maildir (binding local copies of the same bytes), then uploads
        fetch = self.rebind_known_mail(list(plan.fetch))
        self.download(fetch + list(plan.refetch), set(plan.refetch), adopt, union=True)
        if self.push_after:
            self._store_sets(self.push_after, None)
            self.push_after = []
        uploads = [k for k in plan.upload if k not in self.adopted]
        self.upload([*uploads, *(base[u].key for u in plan.reupload)],
                    replaced={base[u].key: u for u in plan.reupload})
        # 3. deletions: local files for server expunges, server messages for removed files
        if plan.delete_local:
            kept: set[int] = set()
            for uid in plan.delete_local:
                key = base[uid].key
                if key in self.on_disk:
                    where = self.on_disk.pop(key)
                    now = mf.locate(key, where)  # a mail reader may have renamed it since the scan
                    if now is not None and now != where and self.acc.conflict != "server" \
                            and mf.flags_of(now[1]) != mf.flags_of(where[1]):
                        # its flags changed locally after all: the next run sees the conflict
                        # (expunged on the server, changed locally) and applies the policy
                        self.on_disk[key] = now
                        kept.add(uid)
                    elif now is not None:
                        mf.remove(key, now)  # gone already (deleted by a mail reader): fine
            done = [u for u in plan.delete_local if u not in kept]
            self.diverged |= bool(kept)
            mf.sync_dirs()
            with state.transaction() as tx:
                tx.forget(fid, validity, done)
            self.res.deleted_local += len(done)
        delete_remote = list(plan.delete_remote)
        if delete_remote:
            # a file a mail reader renamed while the scan listed its directory may have been missed
            # by it: a file there now is no deletion (look again, so a message is never deleted
            # on the server for a file that is still here)
            here = mf.scan()
            delete_remote = [u for u in delete_remote if base[u].key not in here]
        if delete_remote:
            # the base learns \Deleted first: a kill before the expunge then reads as "still to
            # delete", not as "changed on the server"
            with state.transaction() as tx:
                for uid in delete_remote:
                    tx.set_flags(fid, validity, uid, base[uid].flags | {"\\Deleted"}, base[uid].keywords)
            refused_del = self.s.store(delete_remote, frozenset({"\\Deleted"}), frozenset(), unchanged)
            doomed = [u for u in delete_remote if u not in refused_del]
            crashpoint.hit("marked-deleted")
            if refused_del:
                self.res.notices.append(f"{len(refused_del)} messages removed locally were changed on the "
                                        "server meanwhile; not deleted there (see conflict on the next run)")
            expunged = self.s.expunge(doomed) if doomed else True
            crashpoint.hit("expunged")
            self.diverged |= bool(refused_del) or not expunged  # the next run looks again
            if not expunged:
                self.res.notices.append("the server lacks UIDPLUS and other messages are marked \\Deleted: "
                                        "messages removed locally are marked \\Deleted, expunged on a later run")
            else:
                with state.transaction() as tx:
                    tx.forget(fid, validity, doomed)
                self.res.deleted_remote += len(doomed)
        if plan.forget:
            with state.transaction() as tx:
                tx.forget(fid, validity, plan.forget)

    def _remote_all(self, uid: int, base: dict[int, Record]) -> frozenset[str]:
        fl, kw = self.flags.get(uid, (base[uid].flags, base[uid].keywords) if uid in base else (frozenset(), frozenset()))
        return fl | kw

    def _store_sets(self, targets, unchanged: int | None) -> set[int]:
        """STORE FLAGS.SILENT with each message's whole set, grouped by set; returns refused UIDs."""
        groups: dict[frozenset[str], list[int]] = {}
        for uid, full in targets:
            groups.setdefault(frozenset(full), []).append(uid)
        refused: set[int] = set()
        for full, uids in groups.items():
            refused |= self.s.store_flags(uids, full, unchanged)
        return refused

    # -- uploads: crash-safe via a journal of pending uploads -----------------------------

    def upload(self, keys: list[str], replaced: dict[str, int]) -> None:
        """APPEND local files. Each upload is journaled first, so a run killed after APPEND but
        before the new UID was recorded finds the uploaded copy instead of uploading again."""
        for key in keys:
            if self.stop.is_set():
                raise Stopped()
            if key not in self.on_disk or key in self.adopted:
                continue
            path = self.path.joinpath(*self.on_disk[key])
            try:
                # found again by its key if a mail reader renamed it since the scan
                got = self.mf.load(key, self.on_disk[key])
            except OSError as exc:
                raise storage_error(exc, f"cannot read {path}") from None
            if got is None:  # deleted by a mail reader meanwhile: a local deletion for the next run
                del self.on_disk[key]
                continue
            raw, st, self.on_disk[key] = got
            name, mtime = self.on_disk[key][1], st.st_mtime
            data = crlf(raw)
            flags, keywords = self.mf.flags_of(name)
            sha = hashlib.sha256(raw).hexdigest()
            mid = message_id(raw)
            with self.state.transaction() as tx:
                tx.journal_upload(self.fid, key, self.sel.get("uidnext") or 0, len(data), mid, sha,
                                  replaces=replaced.get(key))
            crashpoint.hit("upload-journaled")
            when = datetime.fromtimestamp(mtime, timezone.utc)
            uid = self.s.append(self.info.name, data, flags | keywords, when)
            crashpoint.hit("appended")
            if uid is None:
                uid = self.find_uploaded(mid, data, self.sel.get("uidnext") or 1)
            with self.state.transaction() as tx:
                if key in replaced:
                    tx.forget(self.fid, self.validity, [replaced[key]])
                    self.known.pop(replaced[key], None)
                if uid is not None:
                    tx.add(self.fid, self.validity, Record(uid=uid, key=key, flags=flags, keywords=keywords,
                                                           size=len(raw), sha256=sha, message_id=mid), mtime)
                tx.clear_upload(self.fid, key)
            if uid is None:
                self.diverged = True  # a file the state does not know yet
                self.res.notices.append(f"uploaded {name} but could not learn its UID; it is matched by "
                                        "Message-ID and content on the next run")
            self.res.uploaded += 1

    def find_uploaded(self, mid: str, data: bytes, since_uid: int = 1) -> int | None:
        """The UID of a message we uploaded (data: the bytes as sent), among UIDs the state does
        not know: by Message-ID and size where the message has one, else by size and then by
        content among the UIDs the server assigned since the upload started."""
        known = set(self.state.records(self.fid, self.validity))
        size = len(data)
        if mid:
            cands = [u for u in self.s.search_message_id(mid) if u not in known]
            sizes = self.s.sizes(cands)
            match = [u for u in cands if sizes.get(u) == size]
            if len(match) == 1:
                return match[0]
        newer = self.s.new_messages(max(since_uid, 1))
        cands = [u for u, (sz, _fl, _kw) in newer.items() if sz == size and u not in known]
        want = hashlib.sha256(data).hexdigest()
        for uid, body, *_ in self.s.bodies(cands[:20]) if cands else ():
            if body is not None and hashlib.sha256(body).hexdigest() == want:
                return uid
        return None

    def resume_uploads(self) -> None:
        """Uploads a killed run journaled: bind the server copy if it arrived, else forget the
        journal entry (the file is uploaded again as a new local message)."""
        pending = self.state.pending_uploads(self.fid)
        if not pending:
            return
        if self.opts.dry_run:
            return
        sel = self.s.select(self.info.name)
        self.validity = sel.get("uidvalidity")
        for key, uidnext, _size, mid, sha, replaces in pending:
            uid = None
            got = self.mf.load(key, self.on_disk[key]) if key in self.on_disk else None
            if got is None:
                self.on_disk.pop(key, None)  # deleted by a mail reader meanwhile
            else:
                raw, _st, self.on_disk[key] = got  # (renamed meanwhile: its name now)
                uid = self.find_uploaded(mid, crlf(raw), uidnext)
            with self.state.transaction() as tx:
                if uid is not None:
                    if replaces is not None:  # it put back a message the server expunged: that UID is gone
                        tx.forget(self.fid, self.validity, [replaces])
                    flags, keywords = self.mf.flags_of(self.on_disk[key][1])
                    tx.add(self.fid, self.validity, Record(uid=uid, key=key, flags=flags, keywords=keywords,
                                                           size=len(raw), sha256=sha, message_id=mid), None)
                tx.clear_upload(self.fid, key)
        self.known_keys = self.state.keys(self.fid)
