"""Mutant check: each entry below is a small, named change that breaks a promise in
docs/reliability.md. `make mutants` (`python -m tests.mutants`) applies them one at a time to a
scratch copy of the repository, runs the tests that must notice, and fails if any mutant survives
(the tests still pass with it) or no longer applies (its code moved: rewrite its patch).

A mutant names a function (`Class.method` or `function`) in a file, and text inside that
function to replace: the text must occur exactly once in the function's source. Naming the
function, not a line number, keeps a mutant working while the code around it moves. When code
moves to another function or file, move the mutant with it; never drop one to make the check pass.

Before the mutants, the tests they use run once on the unchanged copy (`--no-baseline` skips
that): a test that fails without any mutant would "catch" every mutant.

    python -m tests.mutants               # all, two at a time
    python -m tests.mutants --list        # names, targets and tests
    python -m tests.mutants NAME [NAME…]  # some
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str                           # the promise it breaks
    file: str                          # relative to the repository
    function: str                      # "Class.method" or "function"
    patch: tuple[tuple[str, str], ...]  # (old, new) pairs, each old exactly once in the function
    tests: tuple[str, ...]             # pytest node ids that must notice (run in this order, -x)


def m(name: str, why: str, file: str, function: str, old: str, new: str, *tests: str,
      more: tuple[tuple[str, str], ...] = ()) -> Mutant:
    return Mutant(name, why, file, function, ((old, new), *more), tests)


FJ = "mailsync/folderjob.py"

MUTANTS: list[Mutant] = [
    m("upload-without-date",
      "an upload keeps the file's date as its INTERNALDATE",
      FJ, "FolderJob.upload",
      "when = datetime.fromtimestamp(mtime, timezone.utc)", "when = None",
      "tests/test_sync.py::test_local_new_message_is_uploaded_once_with_flags_and_date"),
    m("reupload-dropped",
      "conflict = local / union: a message expunged on the server but changed locally is uploaded again",
      FJ, "FolderJob.apply",
      "self.upload([*uploads, *(base[u].key for u in plan.reupload)],", "self.upload([*uploads],",
      "tests/test_sync.py::test_conflict_local_uploads_again_what_the_server_expunged",
      "tests/test_sync.py::test_conflict_union_uploads_again_what_the_server_expunged"),
    m("reupload-forgets-what-it-replaces",
      "a re-upload killed after its APPEND is bound on the next run, not uploaded again",
      FJ, "FolderJob.upload",
      "replaces=replaced.get(key))", "replaces=None)",
      "tests/test_sync.py::test_conflict_upload_again_killed_then_rerun_uploads_once"),
    m("deleted-not-recorded-before-expunge",
      "the state learns \\Deleted before the EXPUNGE, so a kill between them is not read as a "
      "change on the server",
      FJ, "FolderJob.apply",
      'tx.set_flags(fid, validity, uid, base[uid].flags | {"\\\\Deleted"}, base[uid].keywords)', "pass",
      "tests/test_sync.py::test_kill_during_sync_then_rerun_gives_same_end_state"),
    m("no-batch-flush",
      "a downloaded batch is flushed to disk (syncfs/fsync) before the state records it",
      "mailsync/delivery.py", "Delivery.commit",
      "mf.sync([key for key, _fl, _kw in self.staged])", "pass",
      "tests/test_durability.py"),
    m("no-directory-fsync",
      "new/, cur/ and tmp/ are fsync()ed after files are linked into them",
      "mailsync/maildir.py", "MaildirFolder.sync_dirs",
      'for sub in ("new", "cur", "tmp"):', "for sub in ():",
      "tests/test_durability.py"),
    m("published-before-recorded",
      "the state records a batch before its files are published into new/ and cur/",
      "mailsync/delivery.py", "Delivery.commit",
      "            on_disk[key] = (place(fl), mf.publish(key, fl, kw))\n"
      '            crashpoint.hit("published")',
      '            crashpoint.hit("published")',
      "tests/test_durability.py",
      more=(('        crashpoint.hit("staged")\n',
             '        crashpoint.hit("staged")\n'
             "        for key, fl, kw in self.staged:\n"
             "            on_disk[key] = (place(fl), mf.publish(key, fl, kw))\n"),)),
    m("revoked-token-fails-folder-by-folder",
      "a refresh token revoked during a run stops it with exit 12 and one line",
      "mailsync/engine.py", "_FolderRunner.__call__",
      "        except AuthError as exc:  # a new connection's login failed (OAuth2: the refresh token\n"
      "            self._stop_run(exc)  # was revoked): every folder would fail alike, the run stops\n"
      "            res.fail(Outcome.FAILED, str(exc))\n",
      "",
      "tests/test_oauth_e2e.py::test_refresh_token_revoked_during_a_run_stops_it_with_12_and_one_line"),
    m("guard-off-by-one",
      "the deletion guard stops a plan that deletes more than 10% of a folder (and more than 5)",
      "mailsync/plan.py", "deletion_guard",
      "if n > limit:", "if n > limit + 1:",
      "tests/test_sync_model.py::test_deletion_guard_default",
      "tests/test_sync.py::test_mass_deletion_trips_the_guard"),
    m("backup-deletes-expunged",
      "backup mode never deletes local mail: a message expunged on the server stays",
      FJ, "FolderJob.backup",
      "tx.set_on_server(self.fid, self.validity, plan.gone, False)",
      "tx.set_on_server(self.fid, self.validity, plan.gone, False)\n"
      "                for u in plan.gone:\n"
      "                    if self.known[u].key in self.on_disk:\n"
      "                        os.unlink(self.path.joinpath(*self.on_disk.pop(self.known[u].key)))",
      "tests/test_backup.py::test_expunged_on_server_stays_in_backup"),
    m("counters-before-download",
      "a folder's counters (UIDNEXT...) are saved only after its messages are durable",
      FJ, "FolderJob.backup",
      "        self.download(fetch + list(plan.refetch), set(plan.refetch), adopt)\n        self.save_counters()",
      "        self.save_counters()\n        self.download(fetch + list(plan.refetch), set(plan.refetch), adopt)",
      "tests/test_crash.py", "tests/test_kill_sweep.py::test_backup_killed_at_22_points"),
    m("no-tmp-cleanup",
      "tmp/ leftovers of a killed run are removed by the next run",
      "mailsync/delivery.py", "recover",
      "mf.clean_tmp(keep=known - on_disk.keys())", "pass",
      "tests/test_backup.py::test_killed_run_leaves_nothing_in_tmp_after_the_next_run",
      "tests/test_kill_sweep.py::test_backup_killed_at_22_points"),
    m("recorded-before-durable",
      "a message (IMAP UID, POP3 UIDL) is recorded only after its file is flushed to disk",
      "mailsync/delivery.py", "Delivery.commit",
      '        mf.sync([key for key, _fl, _kw in self.staged])\n        crashpoint.hit("staged")\n',
      '        crashpoint.hit("staged")\n',
      "tests/test_durability.py",
      more=(('        crashpoint.hit("recorded")\n',
             '        crashpoint.hit("recorded")\n        mf.sync([key for key, _fl, _kw in self.staged])\n'),)),
    m("pop3-recorded-before-staged",
      "POP3: a UIDL is recorded only after its message is written and flushed",
      "mailsync/pop3.py", "_download",
      "                key = mf.stage(body, None)\n",
      "                key = mf.stage(body, None)\n"
      "                with state.transaction() as tx:\n"
      "                    tx.pop3_add(ids[n], key, len(body), sha, message_id(body), time.time())\n",
      "tests/test_pop3.py::test_kill_then_rerun_exactly_once"),
    m("migrate-skips-destination-index",
      "migrate never copies a message the destination already holds",
      "mailsync/transfer.py", "Destination.holds",
      "        by_id, by_size, _ = index\n", "        return None\n",
      "tests/test_transfer.py::test_message_already_on_destination_is_not_duplicated",
      "tests/test_transfer.py::test_migrate_killed_then_rerun_copies_each_message_once",
      "tests/test_transfer.py::test_migrate_with_the_connection_cut_at_20_offsets"),
    m("transfer-without-date",
      "migrate and restore keep each message's date (INTERNALDATE, a file's mtime) on the destination",
      "mailsync/transfer.py", "_read",
      "flags, when))", "flags, None))",
      "tests/test_transfer.py::test_migrate_keeps_dates_in_every_folder",
      "tests/test_transfer.py::test_restore_of_an_fs_layout_maildir_with_lf_files"),
    m("restore-stops-at-an-unreadable-file",
      "a file restore cannot read fails alone: the others are uploaded (exit 9)",
      "mailsync/transfer.py", "_read",
      "            res.failed += 1\n", "            raise\n",
      "tests/test_transfer.py::test_restore_goes_on_past_a_file_it_cannot_read"),
    m("fetch-marks-read",
      "fetching never marks mail read on the server (BODY.PEEK[])",
      "mailsync/imap.py", "<module>",
      'BODY_ITEMS = [b"BODY.PEEK[]",', 'BODY_ITEMS = [b"BODY[]",',
      "tests/test_backup.py::test_fetching_never_marks_mail_read_in_either_mode"),
    m("deleted-locally-not-refetched",
      "backup: a file deleted locally is fetched again",
      "mailsync/plan.py", "plan_backup",
      "refetch.append(uid)  # a backup never silently loses a message", "pass",
      "tests/test_backup.py::test_file_deleted_locally_is_fetched_again"),
    m("pop3-deletes-what-is-not-on-disk",
      "POP3 delete_after_days deletes only messages whose file is on disk",
      "mailsync/pop3.py", "_download",
      'if uidl in rows and rows[uidl]["key"] in on_disk and', "if uidl in rows and",
      "tests/test_pop3.py::test_delete_after_days_never_deletes_what_is_not_on_disk"),
    m("mirror-unguarded",
      "mirror mode: the deletion guard stops a folder where the server expunged too much",
      FJ, "FolderJob.mirror",
      "if why and not self.opts.force:", "if why and False:",
      "tests/test_mirror.py::test_mirror_deletion_guard_then_force"),
    m("mirror-keeps-local-flags",
      "mirror mode: flags changed in the Maildir are put back to the server's",
      FJ, "FolderJob.mirror",
      "            self._retag(rec.key, rec.flags, rec.keywords)\n", "",
      "tests/test_mirror.py::test_mirror_follows_the_server_and_never_changes_it"),
    m("adopt-by-exact-bytes-only",
      "a Maildir another tool wrote is adopted: a file that is the server's message in another form is bound, not stored twice",
      FJ, "FolderJob.download",
      "if not hits and by_hash and may_differ(body.head):", "if False:",
      "tests/test_adopt.py::test_backup_adopts_the_maildir"),
    m("identity-keeps-tool-headers",
      "headers sync tools add (X-TUID...) do not make another message",
      "mailsync/identity.py", "canonical",
      "if not any(h in head.lower() for h in ADDED_HEADERS):", "if True:",
      "tests/test_identity.py::test_lf_and_added_headers_are_the_same_message",
      "tests/test_adopt.py::test_sync_adopts_the_maildir"),
    m("ctrl-c-after-the-outcome",
      "a Ctrl-C once the exit code is decided does not turn a finished run into an interrupted one",
      "mailsync/command.py", "run_command",
      "            _ignore_ctrl_c()\n", "",
      "tests/test_crash.py::test_ctrl_c_once_the_outcome_is_decided_is_ignored"),
    m("fast-path-trusts-foreign-changes",
      "a mail reader's change made while a run renames files without listing the folder is seen by the next run",
      FJ, "FolderJob.watched_stamp",
      "return stamp if stamp is not None and seen == {k: n for k, n in mine.items() if n} else None",
      "return stamp",
      "tests/test_fastpath.py::test_a_mail_reader_change_during_a_fast_run_is_seen_by_the_next_run"),
    m("fast-path-trusts-a-stale-stamp",
      "a folder a mail reader changed since the last run is listed, not worked on from the state alone",
      FJ, "FolderJob.fast_read",
      ' or f["local_stamp"] != local_stamp(self.path)):', "):",
      "tests/test_fastpath.py::test_a_mail_reader_change_between_runs_takes_the_full_path_and_is_kept",
      more=(('if not watch.ok or f["local_stamp"] != local_stamp(self.path) or', "if not watch.ok or"),)),
    m("stamp-not-settled",
      "a local stamp is taken only once cur/ and new/ have settled, so a change right after it moves their mtime",
      FJ, "local_stamp",
      "if left <= 0:", "if True:",
      "tests/test_fastpath.py::test_local_stamp_waits_for_the_timestamp_tick_to_pass",
      "tests/test_fastpath.py::test_a_mail_reader_change_right_after_a_run_is_seen_by_the_next_run",
      "tests/test_fastpath.py::test_sync_mode_sees_a_local_change_made_right_after_a_run"),
    m("rematch-ambiguous",
      "after a UIDVALIDITY change only unambiguous (Message-ID, size) pairs are re-bound",
      "mailsync/plan.py", "rematch",
      "if len(uids) == 1 and len(recs) == 1:", "if uids and recs:",
      "tests/test_units.py::test_rematch_only_unambiguous_pairs"),
    m("watch-idle-never-renewed",
      "watch ends and begins IDLE again every idle_renew seconds, so a network that drops quiet connections never cuts it",
      "mailsync/watch.py", "Watcher._idle_loop",
      "left = a.acc.idle_renew - (time.monotonic() - began)", "left = 3600 - (time.monotonic() - began)",
      "tests/test_watch.py::test_idle_is_renewed_before_a_quiet_connection_is_cut"),
    m("watch-eof-read-as-silence",
      "watch notices a connection that the server or the network ended, and reconnects",
      "mailsync/watch.py", "_idle_check",
      'raise ConnectionLost(f"the server closed the connection ({exc})") from None', "break",
      "tests/test_watch.py::test_a_quiet_connection_cut_by_the_network_is_reopened"),
    m("watch-no-sync-on-reconnect",
      "mail delivered while the watch's connection was down is fetched as soon as it is back",
      "mailsync/watch.py", "Watcher._idle",
      'self.wake.put((acc.name, f"{label}: listening"))', "pass",
      "tests/test_watch.py::test_server_restart_while_idling"),
    m("watch-notify-ignores-folders",
      "watch: a folder that `folders` leaves out wakes nothing",
      "mailsync/watch.py", "_changes",
      "if selected(name, patterns):", "if True:",
      "tests/test_watch.py::test_notify_covers_every_folder_on_one_connection"),
    m("pool-threads-while-cpu-busy",
      "a download that keeps Python busy stays on its connections: more threads would only take turns at the interpreter lock",
      "mailsync/runner.py", "Pool._another_helps",
      "if (cpu - cpu0) / (now - since) < CPU_BOUND:", "if True:",
      "tests/test_units.py::test_pool_opens_no_more_connections_while_python_is_busy"),
    m("deferred-stamp-unwatched",
      "a folder's stamp taken at the end of the run still notices a mail reader's change made before it",
      FJ, "FolderJob.finish_stamp",
      "stamp = self.stamp_in_step()", "stamp = local_stamp(self.path, wait=True)",
      "tests/test_fastpath.py::test_a_mail_reader_change_before_the_end_of_the_run_is_seen_by_the_next_run"),
    m("pop3-reads-past-its-answer",
      "a pipelined POP3 answer is read up to its end and no further: the next message stays whole",
      "mailsync/pop3.py", "read_dotted",
      "out += f.read(m.end() - len(tail))", "out += f.read(len(data))",
      "tests/test_units.py::test_pop3_answers_read_byte_exact_and_never_past_their_end"),
    m("watch-line-read-in-pieces",
      "an answer that arrives in pieces during IDLE is read whole, so the watch keeps listening",
      "mailsync/watch.py", "_idle_check",
      "sock.settimeout(line_timeout)", "sock.setblocking(False)",
      "tests/test_units.py::test_idle_answers_split_across_reads_are_read_whole"),
    m("fetch-fast-reading-unquotes",
      "the fast reading of a FETCH response gives exactly what the tokenizer gives, quoted strings marked as such",
      "mailsync/fetch.py", "_add",
      "value = _Quoted(value[1:-1])", "value = value[1:-1]",
      "tests/test_fetch.py::test_the_fast_reading_of_common_responses_agrees_with_the_tokenizer"),
]


# ----------------------------------------------------------------------------- applying

class Stale(Exception):
    """The mutant's patch no longer applies: its code moved or changed."""


def function_span(source: str, qualname: str) -> tuple[int, int]:
    """Character offsets of the named function's source (the whole module for "<module>")."""
    if qualname == "<module>":
        return 0, len(source)
    tree = ast.parse(source)
    parts = qualname.split(".")
    nodes: list[ast.AST] = list(tree.body)
    node = None
    for i, part in enumerate(parts):
        want = (ast.FunctionDef, ast.AsyncFunctionDef) if i == len(parts) - 1 else (ast.ClassDef,)
        node = next((n for n in nodes if isinstance(n, want) and n.name == part), None)
        if node is None:
            raise Stale(f"no {'function' if i == len(parts) - 1 else 'class'} {'.'.join(parts[:i + 1])}")
        nodes = list(node.body)
    lines = source.splitlines(keepends=True)
    start = sum(len(x) for x in lines[:node.lineno - 1])
    end = sum(len(x) for x in lines[:node.end_lineno])
    return start, end


def patched(mutant: Mutant, root: Path) -> str:
    """The mutant's file under root with its patch applied (raises Stale if it does not apply)."""
    path = root / mutant.file
    if not path.exists():
        raise Stale(f"{mutant.file} does not exist")
    source = path.read_text()
    start, end = function_span(source, mutant.function)
    body = source[start:end]
    for old, new in mutant.patch:  # in order, each on the body as the ones before left it
        n = body.count(old)
        if n != 1:
            raise Stale(f"{mutant.function} in {mutant.file} holds {n} copies of {old.strip()[:60]!r}, not 1")
        body = body.replace(old, new)
    source = source[:start] + body + source[end:]
    try:
        ast.parse(source)
    except SyntaxError as exc:
        raise Stale(f"the patched {mutant.file} does not parse: {exc}") from None
    return source


def apply(mutant: Mutant, root: Path) -> None:
    (root / mutant.file).write_text(patched(mutant, root))


# ----------------------------------------------------------------------------- running

IGNORE = shutil.ignore_patterns(".git", ".venv", ".bench", ".demo", ".pytest_cache", ".hypothesis",
                                "__pycache__", "*.egg-info", "build")


def scratch_copy(base: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="mailsync-mutant-", dir=base))
    shutil.copytree(ROOT, dst / "repo", ignore=IGNORE)
    return dst / "repo"


@dataclass
class Outcome:
    name: str
    verdict: str        # "caught", "SURVIVED", "STALE", "ERROR"
    detail: str
    seconds: float


def run_tests(repo: Path, tests: tuple[str, ...] | list[str], stop_first: bool) -> tuple[int, list[str], str]:
    """pytest in the scratch copy; returns (exit code, failed test ids, output tail)."""
    report = repo / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MAILSYNC_CRASH_AT", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           *(["-x"] if stop_first else []), *tests]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    failed = []
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                cls = case.get("classname", "")
                failed.append(cls.replace(".", "/") + ".py::" + case.get("name", ""))
    return p.returncode, failed, (p.stdout + p.stderr)[-3000:]


def check_isolated(repo: Path) -> None:
    """The scratch copy's mailsync is the one the tests import (not an installed one)."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", "import mailsync; print(mailsync.__file__)"], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(repo)):
        raise SystemExit(f"mutants: the tests would import {out}, not the scratch copy in {repo}")


def one(mutant: Mutant, base: Path) -> Outcome:
    t0 = time.monotonic()
    repo = scratch_copy(base)
    try:
        try:
            apply(mutant, repo)
        except Stale as exc:
            return Outcome(mutant.name, "STALE", f"{exc}: rewrite the mutant where its code moved",
                           time.monotonic() - t0)
        code, failed, tail = run_tests(repo, mutant.tests, stop_first=True)
        secs = time.monotonic() - t0
        if code == 1 and failed:
            return Outcome(mutant.name, "caught", f"by {failed[0]}", secs)
        if code == 0:
            return Outcome(mutant.name, "SURVIVED", "every test passed: " + ", ".join(mutant.tests), secs)
        return Outcome(mutant.name, "ERROR", f"pytest exit {code}:\n{tail}", secs)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unchanged copy")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants at a time (default 2)")
    args = ap.parse_args(argv)
    names = {x.name for x in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("mutants: two mutants share a name")
    unknown = set(args.names) - names
    if unknown:
        raise SystemExit(f"mutants: unknown: {', '.join(sorted(unknown))} (see --list)")
    chosen = [x for x in MUTANTS if not args.names or x.name in args.names]
    if args.list:
        for x in chosen:
            print(f"{x.name}\n    breaks: {x.why}\n    in: {x.file} {x.function}\n    tests: {' '.join(x.tests)}")
        return 0
    base = Path(tempfile.mkdtemp(prefix="mailsync-mutants-"))
    t0 = time.monotonic()
    try:
        repo = scratch_copy(base)
        check_isolated(repo)
        stale = []
        for x in chosen:  # every patch applies before anything runs
            try:
                patched(x, ROOT)
            except Stale as exc:
                stale.append(f"{x.name}: {exc}")
        if stale:
            print("\n".join(f"STALE {line}" for line in stale), file=sys.stderr)
            return 1
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for x in chosen for t in x.tests))
            print(f"baseline: {len(tests)} test selections on the unchanged code...", flush=True)
            code, failed, tail = run_tests(repo, tests, stop_first=False)
            if code != 0:
                print(tail)
                print(f"mutants: the tests fail WITHOUT any mutant ({', '.join(failed) or f'exit {code}'}); "
                      "fix them first", file=sys.stderr)
                return 1
            print(f"baseline: passed ({time.monotonic() - t0:.0f} s)", flush=True)
        results: list[Outcome] = []
        with ThreadPoolExecutor(max(1, args.jobs)) as ex:
            for o in ex.map(lambda x: one(x, base), chosen):
                print(f"{o.verdict:9} {o.name:38} {o.seconds:6.1f} s  {o.detail}", flush=True)
                results.append(o)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    bad = [o for o in results if o.verdict != "caught"]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants caught in {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
