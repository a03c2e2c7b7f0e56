"""Runs a backup: gather per folder, plan (mailsync.plan), apply in byte-bounded batches.

Folders are worked on by a small pool of IMAP connections. The state is committed per batch,
after the batch's files are durable, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailsync.config import Account
from mailsync.errors import (AuthError, ConnectionLost, MailsyncError, PartialFailure, SafetyAbort,
                             SessionError, StorageError)
from mailsync.folders import map_paths, selected
from mailsync.folderjob import FolderJob, Options
from mailsync.imap import FolderInfo, ImapSession
from mailsync.localfolders import local_folders
from mailsync.maildir import make_dirs
from mailsync.model import FolderResult, Outcome
from mailsync.runner import Pool, Stopped, fan_out, with_session
from mailsync.state import RunLock, State

log = logging.getLogger("mailsync.engine")
DEFERRED_STAMPS = 64  # folders whose stamp waits for the end of the run (_FolderRunner.defer)

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
            t0 = time.monotonic()
            session = connect()
            pool = Pool(connect, acc.connections, session, grace=time.monotonic() - t0)
            try:
                _run(acc, state, pool, session, result, progress, mode, opts)
            finally:
                pool.close()
        finally:
            state.close()
    result.seconds = time.monotonic() - started
    return result


def _run(acc: Account, state: State, pool: Pool, session: ImapSession, result: RunResult,
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
    try:
        results = fan_out(work, lambda f: runner(f, paths[f.name]), acc.connections, runner.stop,
                          on_interrupt=runner.interrupt)
        runner.finish_stamps(record=True)
    finally:
        runner.finish_stamps(record=False)  # (interrupted: the watches closed, no stamp)
    by_name = {r.name: r for r in skipped + results}
    result.folders.extend(by_name[n] for n in order if n in by_name)
    if runner.fatal is not None:
        raise runner.fatal


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
    def __init__(self, acc: Account, state: State, pool: Pool, progress: Progress, mode: str,
                 opts: Options) -> None:
        self.acc, self.state, self.pool, self.progress = acc, state, pool, progress
        self.mode, self.opts = mode, opts
        self.stop = threading.Event()  # set on a storage error (no point going on) or on Ctrl-C
        self.interrupted = False       # Ctrl-C
        self.fatal: MailsyncError | None = None  # the first error that stops the run (storage, login): raised
        self._lock = threading.Lock()
        self.deferred: list[FolderJob] = []  # fast-path folders whose stamp is taken at the end (defer)

    def defer(self, job: FolderJob) -> bool:
        """Take job's stamp at the end of the run (finish_stamps), unless DEFERRED_STAMPS wait
        already: each holds an inotify instance, and the system allows a user 128."""
        with self._lock:
            if len(self.deferred) >= DEFERRED_STAMPS:
                return False
            self.deferred.append(job)
            return True

    def finish_stamps(self, record: bool) -> None:
        """Record the deferred stamps: one wait for the last folder changed (20 ms at most), where
        each folder used to wait in turn. A stamp is only a shortcut: if one cannot be taken, the
        next run lists that folder."""
        jobs, self.deferred = self.deferred, []
        for job in jobs:
            try:
                if record:
                    job.finish_stamp()
            except (MailsyncError, OSError, sqlite3.Error) as exc:
                log.info("%s: no stamp recorded: %s", job.info.name, exc)
            finally:
                job.drop_watch()

    def _stop_run(self, exc: MailsyncError) -> None:
        self.stop.set()
        with self._lock:
            if self.fatal is None:
                self.fatal = exc

    def interrupt(self) -> None:
        self.interrupted = True

    def __call__(self, info: FolderInfo, path: Path) -> FolderResult:
        """One folder, retried on a lost connection (runner.with_session); its outcome typed."""
        res = FolderResult(name=info.name)
        t0 = time.monotonic()

        def work(session: ImapSession) -> None:
            job = FolderJob(self.acc, self.state, session, info, path, res, self.progress, self.stop, self.opts)
            job.defer_stamp = self.defer
            {"sync": job.sync, "mirror": job.mirror}.get(self.mode, job.backup)()

        def on_retry(err: SessionError, delay: int) -> None:
            self.progress("retry", {"folder": info.name, "error": str(err), "delay": delay})

        try:
            with_session(self.pool, work, retries=self.acc.retries, stop=self.stop, on_retry=on_retry)
        except Stopped:
            if self.interrupted or self.fatal is None:
                res.fail(Outcome.INTERRUPTED, "interrupted")
            else:
                res.fail(Outcome.FAILED, "skipped after an error that stops the run: " + str(self.fatal).partition(";")[0])
        except SafetyAbort as exc:
            res.fail(Outcome.GUARDED, str(exc))
        except ConnectionLost as exc:  # (retried as often as the account allows)
            res.fail(Outcome.LOST, str(exc))
        except SessionError as exc:  # a refused command: retrying will not help
            res.fail(Outcome.REFUSED, str(exc))
        except StorageError as exc:
            self._stop_run(exc)
            res.fail(Outcome.FAILED, str(exc))
        except sqlite3.Error as exc:  # the state file itself (disk full, damaged)
            fatal = StorageError(f"cannot use the state file: {exc}", hint="free disk space or check the disk")
            self._stop_run(fatal)
            res.fail(Outcome.FAILED, str(fatal))
        except AuthError as exc:  # a new connection's login failed (OAuth2: the refresh token
            self._stop_run(exc)  # was revoked): every folder would fail alike, the run stops
            res.fail(Outcome.FAILED, str(exc))
        except MailsyncError as exc:  # e.g. no further session could be opened
            res.fail(Outcome.FAILED, str(exc))
        except OSError as exc:  # e.g. a folder name too long for the file system
            res.fail(Outcome.FAILED, f"{exc.strerror or exc}: {exc.filename or path}")
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
