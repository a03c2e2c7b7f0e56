"""Runs a backup: gather per folder, plan (mailsync.plan), apply in byte-bounded batches.

Folders are worked on by a small pool of IMAP connections. The state is committed per batch,
after the batch's files are durable, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mailsync.config import Account
from mailsync.errors import (ConnectionLost, MailsyncError, PartialFailure, SafetyAbort, ServerError,
                             SessionError, StorageError)
from mailsync.folders import map_paths, selected
from mailsync.folderjob import FolderJob, Options, Stopped
from mailsync.imap import FolderInfo, ImapSession
from mailsync.localfolders import local_folders
from mailsync.maildir import make_dirs
from mailsync.model import FolderResult, Outcome
from mailsync.state import RunLock, State

log = logging.getLogger("mailsync.engine")

Progress = Callable[[str, dict], None]


def _quiet(event: str, data: dict) -> None:
    pass


@dataclass
class RunResult:
    """One account's run (engine.run, pop3.download): a FolderResult per folder. The exit code
    and the `--json` summary are derived from it here; cli.py only prints them."""

    account: str
    folders: list[FolderResult] = field(default_factory=list)
    seconds: float = 0.0
    error: MailsyncError | None = None
    created: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[FolderResult]:
        return [f for f in self.folders if f.failed]

    @property
    def exit_code(self) -> int:
        """0 when no folder failed; 6 when every failed folder lost its connection, 10 when the
        deletion guard stopped every one of them, else 9 (docs/exit-codes.md)."""
        failed = self.failed
        if not failed:
            return 0
        if all(f.outcome is Outcome.LOST for f in failed):
            return ConnectionLost.exit_code
        if all(f.outcome is Outcome.GUARDED for f in failed):
            return SafetyAbort.exit_code
        return PartialFailure.exit_code

    def to_json(self) -> dict:
        """The `mailsync sync --json` document of this account (docs/commands.md)."""
        fs = self.folders
        return {
            "account": self.account,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "folders": [_folder_json(f) for f in fs],
            "totals": {
                "new": sum(f.new for f in fs),
                "restored": sum(f.refetched for f in fs),
                "flags_changed": sum(f.flags_changed for f in fs),
                "gone_from_server": sum(f.gone_from_server for f in fs),
                "renumbered": sum(f.renumbered for f in fs),
                "bytes": sum(f.bytes for f in fs),
                "failed_folders": sum(1 for f in fs if f.failed),
                "uploaded": sum(f.uploaded for f in fs),
                "flags_pushed": sum(f.flags_pushed for f in fs),
                "deleted_local": sum(f.deleted_local for f in fs),
                "deleted_remote": sum(f.deleted_remote for f in fs),
                "conflicts": sum(len(f.conflicts) for f in fs),
            },
            "created_on_server": list(self.created),
        }


def _folder_json(f: FolderResult) -> dict:
    return {"name": f.name, "new": f.new, "restored": f.refetched, "flags_changed": f.flags_changed,
            "gone_from_server": f.gone_from_server, "rematched": f.rebound, "renumbered": f.renumbered,
            "bytes": f.bytes, "seconds": round(f.seconds, 3), "skipped_unchanged": f.skipped,
            "notices": list(f.notices), "uploaded": f.uploaded, "flags_pushed": f.flags_pushed,
            "deleted_local": f.deleted_local, "deleted_remote": f.deleted_remote,
            "conflicts": list(f.conflicts), "skipped_too_big": f.skipped_too_big,
            "errors": [f.error] if f.failed else []}


class _Pool:
    """Logged-in sessions shared by the folder workers; at most `size` are opened."""

    def __init__(self, connect: Callable[[], ImapSession], size: int, first: ImapSession) -> None:
        self._connect, self.size = connect, size
        self._free: queue.SimpleQueue[ImapSession] = queue.SimpleQueue()
        self._free.put(first)
        self._opened = 1
        self._all = [first]
        self._lock = threading.Lock()

    def take(self) -> ImapSession:
        while True:
            got = None
            with self._lock:
                try:
                    got = self._free.get_nowait()
                except queue.Empty:
                    open_new = self._opened < self.size
                    if open_new:
                        self._opened += 1
            if got is None and not open_new:
                try:
                    got = self._free.get(timeout=0.5)
                except queue.Empty:
                    continue  # a session may have been dropped meanwhile: maybe open one
            if got is not None:
                if not got.broken:
                    return got
                self.drop(got)  # out of step since it was given back: open another
                continue
            try:
                s = self._connect()
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
        if s.broken:  # a reply was cut or could not be read: never reuse it
            self.drop(s)
        else:
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
    return run(acc, password, mode="backup", progress=progress)


def run(acc: Account, password: str, *, mode: str, progress: Progress = _quiet,
        opts: Options | None = None, connect: Callable[[], ImapSession] | None = None) -> RunResult:
    """Run `mode` ("backup", "mirror" or "sync") over every selected folder of acc. connect opens
    one logged-in session (default: ImapSession over TLS; the tests' model server passes its own)."""
    opts = opts or Options()
    connect = connect or (lambda: ImapSession(acc, password))
    started = time.monotonic()
    result = RunResult(account=acc.name)
    root = acc.maildir
    make_dirs(root)
    with RunLock(root):
        state = State(root)
        try:
            session = connect()
            pool = _Pool(connect, acc.connections, session)
            try:
                _run(acc, state, pool, session, result, progress, mode, opts)
            finally:
                pool.close()
        finally:
            state.close()
    result.seconds = time.monotonic() - started
    return result


def _run(acc: Account, state: State, pool: _Pool, session: ImapSession, result: RunResult,
         progress: Progress, mode: str, opts: Options) -> None:
    listed = session.list_folders()
    if mode == "sync":
        listed += _create_missing(acc, state, session, listed, result, opts)
    infos = []
    for f in listed:
        if not selected(f.name, acc.folders):
            continue
        if f.error:
            result.folders.append(FolderResult(name=f.name, error=f.error))
        else:
            infos.append(f)
    paths, collisions = map_paths(infos, acc.maildir, acc.layout, acc.utf8_names)
    for name, why in collisions.items():
        result.folders.append(FolderResult(name=name, error=why))
    work, seen = [], set()
    for f in infos:  # a name the server lists twice is worked on once (map_paths reported it)
        if f.name in paths and f.name not in seen:
            seen.add(f.name)
            work.append(f)
    # the root Maildir (INBOX) first, so the tree is a valid Maildir even if interrupted
    work.sort(key=lambda f: (paths[f.name] != acc.maildir, f.name))
    progress("folders", {"count": len(work)})
    runner = _FolderRunner(acc, state, pool, progress, mode, opts)
    order = [f.name for f in work]
    skipped, work = _skip_unchanged(acc, state, session, work, paths, progress, opts)
    if len(work) <= 1 or acc.connections == 1:
        results = [runner(f, paths[f.name]) for f in work]
    else:
        ex = ThreadPoolExecutor(max_workers=min(acc.connections, len(work)))
        try:
            results = list(ex.map(lambda f: runner(f, paths[f.name]), work))
        except BaseException:
            runner.interrupted = True
            runner.stop.set()  # Ctrl-C: workers stop at their next batch
            _join(ex)
            raise
        _join(ex)
    by_name = {r.name: r for r in skipped + results}
    result.folders.extend(by_name[n] for n in order if n in by_name)
    if runner.fatal is not None:
        raise runner.fatal


def _join(ex: ThreadPoolExecutor) -> None:
    """Wait for the folder workers to end. A Ctrl-C meanwhile does not cut the wait short: the
    state and the connections are closed next, and must not be while a worker still uses them
    (the workers were told to stop; each finishes the batch it is on)."""
    interrupted = None
    while True:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _skip_unchanged(acc: Account, state: State, session: ImapSession, work: list[FolderInfo],
                    paths: dict[str, Path], progress: Progress, opts: Options):
    """Before the pool starts: on the first connection, set aside the folders that are unchanged
    on both sides (FolderJob.quick_skip: one STATUS and two stat() calls each), so a run where
    little changed opens no further connections. Returns (their results, the folders left)."""
    if opts.dry_run or not session.condstore:
        return [], work
    skipped: list[FolderResult] = []
    left: list[FolderInfo] = []
    for i, info in enumerate(work):
        res = FolderResult(name=info.name)
        try:
            quick = FolderJob(acc, state, session, info, paths[info.name], res, progress, threading.Event(),
                              opts).quick_skip()
        except (MailsyncError, OSError, sqlite3.Error):
            return skipped, left + work[i:]  # the folder workers deal with it (and report it)
        if quick:
            res.outcome = Outcome.SKIPPED
            skipped.append(res)
            progress("folder_done", {"result": res})
        else:
            left.append(info)
    return skipped, left


class _FolderRunner:
    def __init__(self, acc: Account, state: State, pool: _Pool, progress: Progress, mode: str,
                 opts: Options) -> None:
        self.acc, self.state, self.pool, self.progress = acc, state, pool, progress
        self.mode, self.opts = mode, opts
        self.stop = threading.Event()  # set on a storage error (no point going on) or on Ctrl-C
        self.interrupted = False       # Ctrl-C
        self.fatal: StorageError | None = None  # the first storage error: the run raises it
        self._lock = threading.Lock()

    def _storage_failed(self, exc: StorageError) -> None:
        self.stop.set()
        with self._lock:
            if self.fatal is None:
                self.fatal = exc

    def __call__(self, info: FolderInfo, path: Path) -> FolderResult:
        res = FolderResult(name=info.name)
        t0 = time.monotonic()
        attempt = 0
        while True:
            if self.stop.is_set():
                if self.interrupted:
                    res.fail(Outcome.INTERRUPTED, "interrupted")
                else:
                    res.fail(Outcome.FAILED, "skipped after a local storage error")
                break
            try:
                session = self.pool.take()
            except SessionError as exc:  # no session could be opened: lost or refused, retried
                session = None
                err: SessionError = exc
            except MailsyncError as exc:
                res.fail(Outcome.FAILED, str(exc))
                break
            else:
                try:
                    job = FolderJob(self.acc, self.state, session, info, path, res, self.progress, self.stop,
                                    self.opts)
                    {"sync": job.sync, "mirror": job.mirror}.get(self.mode, job.backup)()
                    self.pool.give(session)
                    break
                except SafetyAbort as exc:
                    self.pool.give(session)
                    res.fail(Outcome.GUARDED, str(exc))
                    break
                except Stopped:
                    self.pool.give(session)
                    res.fail(Outcome.INTERRUPTED, "interrupted")
                    break
                except ServerError as exc:  # a refused command: retrying will not help
                    self.pool.give(session)
                    res.fail(Outcome.REFUSED, str(exc))
                    break
                except ConnectionLost as exc:
                    self.pool.drop(session)
                    err = exc
                except StorageError as exc:
                    self.pool.give(session)
                    self._storage_failed(exc)
                    res.fail(Outcome.FAILED, str(exc))
                    break
                except sqlite3.Error as exc:  # the state file itself (disk full, damaged)
                    self.pool.give(session)
                    fatal = StorageError(f"cannot use the state file: {exc}", hint="free disk space or check the disk")
                    self._storage_failed(fatal)
                    res.fail(Outcome.FAILED, str(fatal))
                    break
                except OSError as exc:  # e.g. a folder name too long for the file system
                    self.pool.give(session)
                    res.fail(Outcome.FAILED, f"{exc.strerror or exc}: {exc.filename or path}")
                    break
            attempt += 1
            if attempt > self.acc.retries:
                res.fail(Outcome.LOST if isinstance(err, ConnectionLost) else Outcome.REFUSED, str(err))
                break
            delay = min(2 ** (attempt - 1), 30)
            log.info("%s: %s; retrying in %ss", info.name, err, delay)
            self.progress("retry", {"folder": info.name, "error": str(err), "delay": delay})
            self.stop.wait(delay)  # (a Ctrl-C meanwhile ends the wait: the loop then stops)
        res.seconds = time.monotonic() - t0
        self.progress("folder_done", {"result": res})
        return res


def _create_missing(acc: Account, state: State, session: ImapSession, listed: list[FolderInfo],
                    result: RunResult, opts: Options) -> list[FolderInfo]:
    """Two-way sync: a folder that exists only in the Maildir is created on the server
    (create = "both" or "server"), unless the state knew it on the server (then it was deleted
    there, and folder deletions never propagate: it is left alone and reported)."""
    if acc.create not in ("both", "server"):
        return []
    delim = next((f.delimiter for f in listed if f.delimiter), None) or "/"
    on_server = {f.name for f in listed}
    known = {row["name"] for row in state.folders() if row["uidvalidity"] is not None}
    found, bad = local_folders(acc.maildir, acc.layout, acc.utf8_names)
    for p in bad:
        result.folders.append(FolderResult(name=str(p), notices=[f"directory {p} is not a valid folder name; skipped"]))
    created: list[FolderInfo] = []
    for parts in sorted(found):
        name = "INBOX" if parts == ("INBOX",) else delim.join(parts)
        if name in on_server or parts == ("INBOX",) or not selected(name, acc.folders):
            continue
        if any(delim in p for p in parts) and len(parts) > 0:
            result.folders.append(FolderResult(name=name, error=f"a local folder name contains the server's "
                                               f"separator '{delim}'; rename it"))
            continue
        if name in known:
            result.folders.append(FolderResult(name=name, notices=[
                "deleted on the server; the local copy is kept (folder deletions never propagate)"]))
            continue
        result.created.append(name)
        if opts.dry_run:
            continue  # nothing to read on the server yet
        session.create(name)
        created.append(FolderInfo(name=name, delimiter=delim, flags=()))
    return created
