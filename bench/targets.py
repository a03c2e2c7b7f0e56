"""The project's performance targets, measured side by side in one run: mailsync against mbsync
(isync) over IMAPS and against mpop over POP3S, on private Dovecots (tests/dovecot.py) and the
corpus of bench/tools.py. `make bench` runs

    python -m bench.targets --messages 10000 --scale 100000 --repeat 3 --write-docs

and prints one table, run | target | mailsync | mbsync (or mpop) | ratio | holds?. A quick check
of the harness itself (small sizes; the numbers mean little):

    python -m bench.targets --quick                  # = --messages 1000 --scale 3000, no OfflineIMAP

What it runs (every timed run is a whole tool process; its Maildir is checked afterwards, see
bench/tools.py):

- at --messages (5 folders) and at --scale (5 folders; mailsync and mbsync only): each repeat gives
  every tool a fresh Maildir, then, every tool in turn (order rotated between repeats):
    1. full backup;
    2. first no-change run, right after the full backup;
    3. steady no-change run, 3 s later (the state of a cron job: after at least one no-change run);
    4. 1% of the messages \\Flagged on the server, then a run;
    5. --fixed-flags (100) more messages \\Flagged, then a run: the same number of changes at
       both sizes, so its time at --scale against --messages shows whether a flag change costs
       O(changed messages) or O(folder size);
    6. --new (100) new messages in INBOX, then a run.
  Runs 3 to 6 come 3 s after the previous scenario, as cron runs would. The server changes are undone
  after each repeat. Peak RSS is that of the full backups (the largest of the repeats).
  At --messages, OfflineIMAP runs too (not with --quick or --tools); it is not in the targets.
- POP3S, on the --messages corpus's INBOX (a fifth of it): full download and a no-change re-run,
  mailsync against mpop.
- 300 folders of 20 messages (--many-folders, --many-per): full backup, first and steady
  no-change runs, mailsync against mbsync. Then one more full backup by mailsync, untimed, under
  strace, whose trace is checked with tests/test_durability.py's rules: every message flushed
  (syncfs/fsync) before the state records it, and before it is linked into new/ or cur/.
- with --scale: one folder of --scale messages, mailsync's full backup (--single-repeat runs, 1 by
  default), for its peak RSS.

Every target's value is a median over the repeats (peak RSS: the largest). --write-docs rewrites
the marked sections of docs/benchmarks.md: targets (the table, the machine, tool versions), tools
(--messages), scale (--scale) and pop3, and their charts.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.backup import build_corpus
from bench.measure import DEFAULT_DIR, rss_method, workdir
from bench.tools import (
    PACKAGES,
    PASSWORD,
    ROOT,
    USER,
    checked_run,
    count,
    folder_name,
    new_messages,
    prepare,
    uidnext,
    warm_up,
)
from tests import corpus
from tests.dovecot import Dovecot

PAUSE = 3.0  # seconds between scenarios after the first no-change run, as between two cron runs
# Nothing is deleted until the end of the whole run. A file system is slow to create files after
# a mass deletion: ext4 does not reuse an inode for 60 s after it was freed, 360 s while its inode
# table block is dirty (and creating files in that block dirties it again), and until then every
# creation scans past those inodes. Measured here: right after the previous repeat's Maildirs were
# deleted, a full backup of 10,000 messages took 0.5 to 1.5 s longer for mailsync (~200 us of
# system time per created file; perf: recently_deleted under ext4_create), and mbsync pays the
# same. A user's backup does not follow a mass deletion. (Needs the disk space of every run: about
# 20 GB with --scale 100000.)


# --- running scenarios ---

@dataclass
class Scenario:
    key: str
    label: str
    messages: int                                  # expected in the Maildir afterwards
    flagged: int | None                            # expected flagged ones (None: not checked)
    change: Callable[[int], None] | None = None    # the server change made before it (given the repeat)
    pause: float = 0.0                             # seconds to wait before it


def run_scenarios(server: Dovecot, proto: str, tools: list[str], scenarios: list[Scenario], repeat: int,
                  work: Path, tag: str, undo: Callable[[int], None] | None = None) -> report.Results:
    tmpdir = work / "tmp"
    tmpdir.mkdir(exist_ok=True)
    results: report.Results = {}
    for rep in range(repeat):
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        runs = {tool: prepare(proto, tool, work / f"{tag}-{rep}-{tool}", server, tmpdir) for tool in order}
        try:
            for sc in scenarios:
                if sc.pause:
                    time.sleep(sc.pause)
                if sc.change:
                    sc.change(rep)
                for tool in order:
                    r = checked_run(tool, runs[tool], sc.messages, sc.flagged,
                                    f"'{sc.label}' ({tag}, repeat {rep + 1})")
                    results.setdefault((sc.key, tool), []).append(r)
                    print(f"  {tag:>8} {rep + 1}/{repeat} {sc.label:>30} {tool:>11}: {r.wall:7.2f} s, "
                          f"CPU {r.cpu:6.2f} s, {r.rss_mb:5.0f} MB{'' if r.ok else '  WRONG RESULT'}",
                          file=sys.stderr)
        finally:
            if undo:
                undo(rep)
    return results  # (the Maildirs stay until the end: see the note at the top)


def imap_scenarios(server: Dovecot, n: int, folders: int, fixed: int, new: int) -> tuple[list[Scenario], Callable]:
    per = n // folders
    total = per * folders
    flag_per = max(1, total // 100 // folders)
    fixed_per = max(1, fixed // folders)
    if per < flag_per + fixed_per:
        raise SystemExit(f"{n} messages in {folders} folders are too few for {fixed} more flags")
    flagged, fixed = flag_per * folders, fixed_per * folders
    first_new: dict[int, int] = {}

    def flag(lo: int, hi: int) -> None:
        for f in range(folders):
            server.doveadm("flags", "add", "-u", USER, "\\Flagged", "mailbox", folder_name(f), "uid", f"{lo}:{hi}")

    def add_new(rep: int) -> None:
        first_new[rep] = uidnext(server, "INBOX")
        start = 50_000_000 + rep * new
        server.seed(USER, "INBOX", new_messages(new, start), start=start)

    def undo(rep: int) -> None:
        for f in range(folders):
            server.doveadm("flags", "remove", "-u", USER, "\\Flagged", "mailbox", folder_name(f),
                           "uid", f"1:{flag_per + fixed_per}")
        if rep in first_new and new:  # (with none added, first_new:* would name the last message)
            server.doveadm("expunge", "-u", USER, "mailbox", "INBOX", "uid", f"{first_new.pop(rep)}:*")

    scenarios = [
        Scenario("full", "full backup", total, 0),
        Scenario("no-change", "first no-change run", total, 0),
        Scenario("no-change-2", "steady no-change run", total, 0, pause=PAUSE),
        Scenario("flags", f"1% flags changed ({flagged})", total, flagged,
                 change=lambda rep: flag(1, flag_per), pause=PAUSE),
        Scenario("flags-fixed", f"{fixed} more flags changed", total, flagged + fixed,
                 change=lambda rep: flag(flag_per + 1, flag_per + fixed_per), pause=PAUSE),
    ]
    if new:
        scenarios.append(Scenario("new", f"{new} new messages in INBOX", total + new, flagged + fixed,
                                  change=add_new, pause=PAUSE))
    return scenarios, undo


def build_many(server: Dovecot, folders: int, per: int, seed: int = 7) -> int:
    """folders folders ('Folder 001' ...) of per messages each, the corpus's mix of sizes (half of
    them \\Seen), written straight into the server's Maildir and indexed with one force-resync."""
    import random
    rnd = random.Random(seed)
    root = server.maildir(USER)
    total = 0
    for f in range(folders):
        path = root / f".Folder {f + 1:03d}"
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
            server._own(path, path / sub)
        for i in range(per):
            r = rnd.random()
            size = rnd.randint(20_000, 100_000) if r < 0.09 else (rnd.randint(1_000_000, 2_000_000) if r < 0.095
                                                                  else rnd.randint(1_500, 8_000))
            n = 10_000_000 + f * 1_000 + i
            data = corpus.ordinary(n, size, tag=f"mf{f}-")
            seen = i < per // 2
            p = path / ("cur" if seen else "new") / f"{1700000000 + n}.seed{n}_{len(data)}.test{':2,S' if seen else ''}"
            p.write_bytes(data)
            server._own(p)
            total += len(data)
    server.doveadm("force-resync", "-u", USER, "*")
    server.doveadm("mailbox", "status", "-u", USER, "messages highestmodseq", "*")
    server.doveadm("fetch", "-u", USER, "uid flags size.physical", "all")
    return total


def durability_check(server: Dovecot, work: Path, expected: int) -> tuple[bool | None, str]:
    """One untimed full backup by mailsync under strace, checked with tests/test_durability.py's
    rules. (True/False/None for not checked, and a description.)"""
    try:
        from tests.test_durability import TRACE, Trace
    except Exception as e:  # noqa: BLE001 - e.g. pytest missing: report it, do not fail the run
        return None, f"not checked: tests.test_durability could not be imported ({e})"
    strace = shutil.which("strace")
    if not strace:
        return None, "not checked: strace is not installed"
    tmpdir = work / "tmp"
    tmpdir.mkdir(exist_ok=True)
    cmd, mail, log, env = prepare("imap", "mailsync", work / "durability", server, tmpdir)
    trace = work / "durability" / "backup.strace"
    full = [strace, "-f", "-qq", "-y", "--seccomp-bpf", "-e", TRACE, "-o", str(trace), *cmd]
    with open(log, "ab") as err:
        code = subprocess.run(full, check=False, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=ROOT).returncode
    if code != 0:
        return False, f"mailsync under strace exited with {code}: see {log}"
    n, _ = count(mail)
    t = Trace.load(mail, trace)
    problems = t.delivery_problems() + t.dirs_problems("new/, cur/ or tmp/ not fsync()ed after linking")
    published = len(t.publishes())
    syncfs = sum(1 for c in t.syncs if c.name == "syncfs")
    fsyncs = len(t.syncs) - syncfs
    shutil.rmtree(work / "durability", ignore_errors=True)
    what = (f"{published} of {expected} messages published, {len(problems)} problems "
            f"({syncfs} syncfs, {fsyncs} fsync/fdatasync calls)")
    if problems:
        print("durability problems:\n- " + "\n- ".join(problems[:8]), file=sys.stderr)
    return (not problems and published == expected and n == expected), what


# --- the targets table ---

def med(results: report.Results, key: str, tool: str) -> float | None:
    runs = results.get((key, tool))
    return statistics.median(r.wall for r in runs) if runs else None


def peak(results: report.Results, key: str, tool: str) -> float | None:
    runs = results.get((key, tool))
    return max(r.rss_mb for r in runs) if runs else None


def all_ok(results: report.Results, *keys: tuple[str, str]) -> bool:
    return all(r.ok for k in keys for r in results.get(k, []))


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} s"


def mb(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f} MB"


def verdict(value: float | None, limit: float, ok: bool = True, lt: bool = False) -> str:
    if value is None:
        return "not measured"
    if not ok:
        return "NO: a run left the wrong messages or flags"
    if value < limit or (not lt and value <= limit):
        return "yes"
    x = value / limit
    return f"NO, {100 * (x - 1):.0f}% over" if x < 2 else f"NO, {x:.1f}× the target"


def n_(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def targets_rows(sizes: dict[int, report.Results], pop3: report.Results | None, many: report.Results | None,
                 many_label: str, single: report.Results | None, single_n: int | None,
                 durable: tuple[bool | None, str] | None, fixed: int, inbox: int,
                 labels: dict[int, dict[str, str]]) -> list[list[str]]:
    rows: list[list[str]] = []
    ns = sorted(sizes)
    small, large = ns[0], ns[-1]

    def vs(label: str, target: str, limit: float, res: report.Results, key: str, other: str = "mbsync") -> None:
        a, b = med(res, key, "mailsync"), med(res, key, other)
        ratio = a / b if a is not None and b else None
        rows.append([label, target, secs(a), secs(b), "–" if ratio is None else f"{ratio:.2f}×",
                     verdict(ratio, limit, all_ok(res, (key, "mailsync"), (key, other)))])

    # no-change, steady (the target against mbsync is at the smaller size)
    vs(f"no-change, steady, {n_(small)}", "≤ 1.0× mbsync", 1.0, sizes[small], "no-change-2")
    for n in ns:
        r = sizes[n]
        a, b = med(r, "no-change-2", "mailsync"), med(r, "no-change-2", "mbsync")
        rows.append([f"no-change, steady, {n_(n)}", "≤ 0.10 s", secs(a), secs(b), "–",
                     verdict(a, 0.10, all_ok(r, ("no-change-2", "mailsync")))])
    if large != small:
        a, b = med(sizes[small], "no-change-2", "mailsync"), med(sizes[large], "no-change-2", "mailsync")
        c, d = med(sizes[small], "no-change-2", "mbsync"), med(sizes[large], "no-change-2", "mbsync")
        g = b / a if a and b is not None else None
        rows.append([f"no-change, steady, {n_(small)} → {n_(large)}",
                     f"flat: {n_(large)} ≤ 1.5× {n_(small)} (or ≤ 0.10 s)",
                     f"{secs(a)} → {secs(b)}", f"{secs(c)} → {secs(d)}", "–" if g is None else f"{g:.2f}×",
                     verdict(g, 1.5, all_ok(sizes[small], ("no-change-2", "mailsync"))
                             and all_ok(sizes[large], ("no-change-2", "mailsync")))
                     if b is None or b > 0.10 else "yes"])
    # first no-change after a full backup
    for n in ns:
        r = sizes[n]
        a, s = med(r, "no-change", "mailsync"), med(r, "no-change-2", "mailsync")
        g = a / s if a is not None and s else None
        rows.append([f"first no-change after the full backup, {n_(n)}", "≤ 1.5× mailsync's steady no-change",
                     f"{secs(a)} (steady {secs(s)})", secs(med(r, "no-change", "mbsync")),
                     "–" if g is None else f"{g:.2f}× steady",
                     verdict(g, 1.5, all_ok(r, ("no-change", "mailsync"), ("no-change-2", "mailsync")))])
    # flags
    for n in ns:
        vs(f"{labels[n]['flags']}, {n_(n)}", "≤ 1.0× mbsync", 1.0, sizes[n], "flags")
    if large != small:
        a, b = med(sizes[small], "flags-fixed", "mailsync"), med(sizes[large], "flags-fixed", "mailsync")
        c, d = med(sizes[small], "flags-fixed", "mbsync"), med(sizes[large], "flags-fixed", "mbsync")
        g = b / a if a and b is not None else None
        rows.append([f"{fixed} flags changed, {n_(small)} → {n_(large)}",
                     f"O(changed messages): {n_(large)} ≤ 1.5× {n_(small)}", f"{secs(a)} → {secs(b)}",
                     f"{secs(c)} → {secs(d)}", "–" if g is None else f"{g:.2f}×",
                     verdict(g, 1.5, all_ok(sizes[small], ("flags-fixed", "mailsync"))
                             and all_ok(sizes[large], ("flags-fixed", "mailsync")))])
        a, b = med(sizes[small], "flags", "mailsync"), med(sizes[large], "flags", "mailsync")
        c, d = med(sizes[small], "flags", "mbsync"), med(sizes[large], "flags", "mbsync")
        g = b / a if a and b is not None else None
        rows.append([f"1% flags changed, {n_(small)} → {n_(large)}",
                     f"(for information: {large / small:g}× the changes, {large / small:g}× the messages)",
                     f"{secs(a)} → {secs(b)}", f"{secs(c)} → {secs(d)}", "–" if g is None else f"{g:.2f}×", "–"])
    # many folders
    if many is not None:
        vs(f"no-change, steady, {many_label}", "≤ 1.0× mbsync", 1.0, many, "no-change-2")
    # new messages
    for n in ns:
        key = "new"
        if (key, "mailsync") in sizes[n]:
            vs(f"{labels[n]['new']}, {n_(n)}", "≤ 1.0× mbsync", 1.0, sizes[n], key)
    # full backup
    for n in ns:
        vs(f"full backup, {n_(n)}", "≤ 0.4× mbsync", 0.4, sizes[n], "full")
    if durable is not None:
        ok, what = durable
        rows.append(["full backup: every message flushed before it is recorded",
                     "durable order (strace; tests/test_durability.py's rules)", what, "FSync yes", "–",
                     "not checked" if ok is None else ("yes" if ok else "NO")])
    # memory
    r = sizes[large]
    a, b = peak(r, "full", "mailsync"), peak(r, "full", "mbsync")
    rows.append([f"peak RSS, full backup, {n_(large)}", "< 100 MB", mb(a), mb(b),
                 "–" if a is None or not b else f"{a / b:.1f}×", verdict(a, 100, all_ok(r, ("full", "mailsync")), lt=True)])
    if single is not None and single_n:
        a = peak(single, "full", "mailsync")
        rows.append([f"peak RSS, full backup, one folder of {n_(single_n)}", "< 100 MB", mb(a), "–", "–",
                     verdict(a, 100, all_ok(single, ("full", "mailsync")), lt=True)])
    # POP3S
    if pop3 is not None:
        vs(f"POP3S full download (INBOX, {inbox})", "≤ 1.0× mpop", 1.0, pop3, "full", other="mpop")
    return rows


def markdown(rows: list[list[str]]) -> str:
    head = ["run", "target", "mailsync", "mbsync (or mpop)", "ratio", "holds?"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def detail(results: report.Results, scenarios: list[Scenario], tools: list[str]) -> str:
    pairs = [(s.key, s.label) for s in scenarios]
    t = report.table(results, pairs, tools)
    rat = report.ratios(results, pairs, tools)
    return t + (f"\n\nRatios of median times (below 1: mailsync is faster):\n\n{rat}" if rat else "")


# --- main ---

def main() -> None:
    compileall.compile_dir(str(ROOT / "mailsync"), quiet=1)  # as after a regular install
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, help="the first size (default 10000; 1000 with --quick)")
    ap.add_argument("--scale", type=int, help="the second size, mailsync and mbsync only (default: none; "
                                              "3000 with --quick); also the single-folder corpus")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every scenario per tool (default 3)")
    ap.add_argument("--folders", type=int, default=5, help="folders of the sized corpora (default 5)")
    ap.add_argument("--tools", help="IMAP tools at --messages (default mailsync,mbsync,offlineimap; "
                                    "mailsync,mbsync with --quick); mbsync is needed for the targets")
    ap.add_argument("--fixed-flags", type=int, default=100, help="flags changed in the O(changes) run (default 100)")
    ap.add_argument("--new", type=int, default=100, help="new messages in INBOX (default 100)")
    ap.add_argument("--many-folders", type=int, default=300, help="folders of the many-folder corpus (default 300)")
    ap.add_argument("--many-per", type=int, default=20, help="messages per folder there (default 20)")
    ap.add_argument("--single-repeat", type=int, default=1,
                    help="full backups of the single --scale folder (default 1)")
    ap.add_argument("--quick", action="store_true", help="small sizes, no OfflineIMAP: checks the harness")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the marked sections of docs/benchmarks.md")
    ap.add_argument("--docs", type=Path, default=report.DOCS,
                    help="the page --write-docs rewrites (default docs/benchmarks.md); charts go next to it")
    ap.add_argument("--out", type=Path, help="also write the targets table to this file (default DIR/targets.md)")
    a = ap.parse_args()
    if a.messages is None:
        a.messages = 1000 if a.quick else 10_000
    if a.scale is None and a.quick:
        a.scale = 3000
    tools = ([t.strip() for t in a.tools.split(",")] if a.tools
             else ["mailsync", "mbsync"] + ([] if a.quick else ["offlineimap"]))
    if "mailsync" not in tools or "mbsync" not in tools or not set(tools) <= {"mailsync", "mbsync", "offlineimap"}:
        raise SystemExit("--tools: mailsync and mbsync, and optionally offlineimap")
    if a.repeat < 1 or a.messages < a.folders or (a.scale is not None and a.scale <= a.messages):
        raise SystemExit("need --repeat >= 1, --messages >= --folders and --scale > --messages")
    for t in [*tools, "mpop"]:
        if t in PACKAGES and not shutil.which(t):
            raise SystemExit(f"{t} is not installed: apt-get install {PACKAGES[t]} (make bench does it)")
    all_tools = [*tools, "mpop"]
    t_start = time.perf_counter()

    work = workdir(a.dir, "targets-")
    docs = a.docs.resolve()
    charts = docs.parent if a.write_docs else a.dir.resolve()
    sizes: dict[int, report.Results] = {}
    size_scenarios: dict[int, list[Scenario]] = {}
    size_what: dict[int, str] = {}
    pop3 = many = single = None
    pop3_scen: list[Scenario] = []
    many_scen: list[Scenario] = []
    durable = None
    inbox = a.messages // a.folders
    many_label = f"{a.many_folders} folders × {a.many_per}"
    single_what = ""

    def server_for(name: str) -> Dovecot:
        return Dovecot(work / name, users={USER: PASSWORD}).start()

    def done_with(server: Dovecot, name: str) -> None:
        server.stop()  # (its files stay until the end: see the note at the top)

    try:
        # the sized corpora
        for n in [a.messages] + ([a.scale] if a.scale else []):
            name = f"server-{n}"
            server = server_for(name)
            try:
                t0 = time.perf_counter()
                size = build_corpus(server, USER, n, a.folders)
                warm_up(server, a.folders)
                total = n // a.folders * a.folders
                size_what[n] = f"{total} messages, {size / 1e6:.0f} MB, {a.folders} folders"
                print(f"corpus: {size_what[n]} (built in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                scen, undo = imap_scenarios(server, n, a.folders, a.fixed_flags, a.new)
                size_scenarios[n] = scen
                sizes[n] = run_scenarios(server, "imap", tools if n == a.messages else ["mailsync", "mbsync"],
                                         scen, a.repeat, work, n_(n), undo)
                if n == a.messages:
                    pop3_scen = [Scenario("full", f"full download ({inbox} messages)", inbox, None),
                                 Scenario("no-change", "no-change re-run", inbox, None)]
                    pop3 = run_scenarios(server, "pop3", ["mailsync", "mpop"], pop3_scen, a.repeat, work, "pop3")
            finally:
                done_with(server, name)
        # many folders
        server = server_for("server-many")
        try:
            t0 = time.perf_counter()
            m_total = a.many_folders * a.many_per
            size = build_many(server, a.many_folders, a.many_per)
            print(f"corpus: {many_label} = {m_total} messages, {size / 1e6:.0f} MB "
                  f"(built in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            many_scen = [Scenario("full", "full backup", m_total, 0),
                         Scenario("no-change", "first no-change run", m_total, 0),
                         Scenario("no-change-2", "steady no-change run", m_total, 0, pause=PAUSE)]
            many = run_scenarios(server, "imap", ["mailsync", "mbsync"], many_scen, a.repeat, work, "folders")
            t0 = time.perf_counter()
            durable = durability_check(server, work, m_total)
            print(f"durability (strace, {time.perf_counter() - t0:.0f} s): {durable[1]}", file=sys.stderr)
        finally:
            done_with(server, "server-many")
        # one large folder
        if a.scale:
            server = server_for("server-single")
            try:
                t0 = time.perf_counter()
                size = build_corpus(server, USER, a.scale, 1)
                warm_up(server, 1)
                single_what = f"{a.scale} messages, {size / 1e6:.0f} MB, in INBOX"
                print(f"corpus: {single_what} (built in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                single = run_scenarios(server, "imap", ["mailsync"], [Scenario("full", "full backup", a.scale, 0)],
                                       a.single_repeat, work, "single")
            finally:
                done_with(server, "server-single")

        cmdline = "python -m bench.targets " + " ".join(sys.argv[1:])
        # the detailed sections and charts (tools: --messages, scale: --scale, pop3)
        parts = [("tools", a.messages, tools), ("scale", a.scale, ["mailsync", "mbsync"])]
        for section, n, ts in parts:
            if not n or n not in sizes:
                continue
            scen = size_scenarios[n]
            pairs = [(s.key, s.label) for s in scen]
            title = f"IMAPS: {size_what[n]}, {a.repeat} run(s)"
            chart = charts / f"benchmarks-{section}.png"
            drew = report.chart(sizes[n], pairs, ts, chart, title)
            d = detail(sizes[n], scen, ts)
            print(f"\n{size_what[n]}:\n\n{d}", file=sys.stderr)
            if a.write_docs:
                body = [f"Measured {report.today()} with `{cmdline}`, on: {report.machine(ts)}.", "",
                        (f"{size_what[n]}; {a.repeat} run(s) per tool and scenario, tool order rotated between "
                        f"runs; peak RSS by {rss_method()}."), "", d]
                if drew:
                    body += ["", f"![{title}](benchmarks-{section}.png)"]
                report.write_section(section, "\n".join(body), docs)
        if pop3 is not None:
            pairs = [(s.key, s.label) for s in pop3_scen]
            title = f"POP3S: INBOX of {inbox} messages, {a.repeat} run(s)"
            chart = charts / "benchmarks-pop3.png"
            drew = report.chart(pop3, pairs, ["mailsync", "mpop"], chart, title)
            d = detail(pop3, pop3_scen, ["mailsync", "mpop"])
            print(f"\nPOP3S, INBOX of {inbox} messages:\n\n{d}", file=sys.stderr)
            if a.write_docs:
                body = [f"Measured {report.today()} with `{cmdline}`, on: {report.machine(['mailsync', 'mpop'])}.",
                        "", (f"INBOX of {inbox} messages; {a.repeat} run(s) per tool and scenario, tool order "
                        f"rotated between runs; peak RSS by {rss_method()}."), "", d]
                if drew:
                    body += ["", f"![{title}](benchmarks-pop3.png)"]
                report.write_section("pop3", "\n".join(body), docs)
        if a.write_docs:
            print(f"docs: sections tools, scale, pop3 of {docs} rewritten", file=sys.stderr)
        if many:
            print(f"\n{many_label} = {a.many_folders * a.many_per} messages:\n\n"
                  f"{detail(many, many_scen, ['mailsync', 'mbsync'])}", file=sys.stderr)
        # the table
        labels = {n: {s.key: s.label for s in scen} for n, scen in size_scenarios.items()}
        rows = targets_rows(sizes, pop3, many, many_label, single, a.scale, durable, a.fixed_flags, inbox, labels)
        tbl = markdown(rows)
        elapsed = time.perf_counter() - t_start
        growth = f"{max(sizes) / min(sizes):g}"
        notes = [
            f"Sizes: {'; '.join(size_what[n] for n in sorted(size_what))}; {many_label}"
            + (f"; one folder: {single_what}" if single_what else "") + ". "
            f"Times are medians of {a.repeat} run(s) per tool (wall time of the tool's process, Python start-up "
            f"included), side by side in this run, tool order rotated; peak RSS is the largest of the runs "
            f"(by {rss_method()}). Each run's Maildir was checked (messages, flagged messages).",
            "",
            "Criteria: \"steady\" is a no-change run 3 s after a previous no-change run."
            + (" \"flat\" holds when the steady no-change run at the larger size takes at most 1.5× its time at "
               "the smaller one (or at most 0.10 s). \"O(changed messages)\" compares runs after the same number "
               f"of changes ({a.fixed_flags} messages \\Flagged) in a corpus {growth}× larger: it holds when the "
               "larger takes at most 1.5× the smaller's time." if len(sizes) > 1 else "")
            + " The flush check traces one more full backup (of the many-folder corpus) and checks the order of "
            "its system calls.",
        ]
        text = f"{tbl}\n\n" + "\n".join(notes) + f"\n\n(`{cmdline}` took {elapsed / 60:.1f} min)\n"
        print("\n" + text)
        out = a.out or a.dir.resolve() / "targets.md"
        out.write_text(text)
        print(f"table: {out}", file=sys.stderr)
        if a.write_docs:
            machine = report.machine(all_tools)  # the tools that ran, with their versions
            head = f"Measured {report.today()} with `{cmdline}` ({elapsed / 60:.0f} min), on: {machine}."
            many_detail = detail(many, many_scen, ["mailsync", "mbsync"]) if many else ""
            body = [head, "", tbl, "", *notes]
            if many_detail:
                body += ["", f"{many_label} = {a.many_folders * a.many_per} messages:", "", many_detail]
            if single:
                r = single[("full", "mailsync")]
                body += ["", (f"One folder, {single_what}: mailsync's full backup "
                         f"{statistics.median(x.wall for x in r):.1f} s, peak RSS {max(x.rss_mb for x in r):.0f} MB "
                         f"({len(r)} run(s)).")]
            report.write_section("targets", "\n".join(body), docs)
            print(f"docs: section 'targets' of {docs} rewritten", file=sys.stderr)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work files kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
