"""Benchmark mailsync against mbsync (isync) and OfflineIMAP over IMAPS, and against mpop over
POP3S, on the same private Dovecot and corpus. `make bench` runs it; by hand:

    python -m bench.tools --messages 10000 --repeat 3             # IMAPS: mailsync, mbsync, offlineimap
    python -m bench.tools --messages 100000 --tools mailsync,mbsync --repeat 1 --section scale
    python -m bench.tools --pop3 --messages 10000 --repeat 3      # POP3S: mailsync, mpop (the INBOX)

Every tool runs in its closest configuration to the others: pull only, from the server into a
Maildir, certificate verified against the test CA, data flushed to disk (fsync) before it is
recorded. IMAPS scenarios: full first backup into an empty Maildir, no-change re-run, re-run after
1% of the messages got \\Flagged on the server, re-run after 100 new messages arrived in INBOX.
POP3S scenarios: full download of INBOX, no-change re-run.

Each repeat gives every tool a fresh Maildir and runs the scenarios in turn: all tools' full
backups, then all no-change runs, then the server change is made once and every tool runs, and so
on, so every tool sees exactly the same change. The tool order rotates from one repeat to the next;
the server changes are undone at the end of each repeat. After each run the tool's Maildir is
checked (message count; number of flagged messages). Wall time is that of the tool's process,
CPU seconds are its user + system time, peak RSS its maximum resident set size (see
bench/measure.py for why that is taken with GNU time).

Work files go under --dir (default .bench/ in the repository, not /tmp: on some machines file
creation in /tmp is much slower than elsewhere on the same disk). --write-docs rewrites the marked
section of docs/benchmarks.md (`<!-- bench:SECTION:start -->` ... `end -->`) and the chart.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.backup import build_corpus
from bench.measure import DEFAULT_DIR, Run, measure, rss_method, workdir
from tests import corpus
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "bench", "bench-pw"
IMAP_TOOLS = ["mailsync", "mbsync", "offlineimap"]
POP3_TOOLS = ["mailsync", "mpop"]
PACKAGES = {"mbsync": "isync", "offlineimap": "offlineimap3", "mpop": "mpop"}


def folder_name(f: int) -> str:
    return "INBOX" if f == 0 else f"Folder {f}/Sub"  # as bench.backup.build_corpus names them


# --- one configuration per tool; each returns (command, the Maildir to check) ---

def setup_mailsync(d: Path, server: Dovecot) -> tuple[list[str], Path]:
    mail = d / "Mail"
    cfg = d / "config.toml"
    cfg.write_text(f'[accounts.b]\nhost = "127.0.0.1"\nport = {server.imaps_port}\nusername = "{USER}"\n'
                   f'password_env = "BENCH_PW"\nca_file = "{server.ca_file}"\nmaildir = "{mail}"\n'
                   f'mode = "backup"\n')
    return [sys.executable, "-m", "mailsync", "--config", str(cfg), "sync", "b", "--quiet"], mail


def setup_mbsync(d: Path, server: Dovecot) -> tuple[list[str], Path]:
    mail = d / "Mail"
    mail.mkdir()
    cfg = d / "mbsyncrc"
    # the certificate names localhost and 127.0.0.1; mbsync checks DNS names only
    cfg.write_text(f"""FSync yes

IMAPAccount b
Host localhost
Port {server.imaps_port}
User {USER}
Pass {PASSWORD}
SSLType IMAPS
CertificateFile {server.ca_file}

IMAPStore remote
Account b

MaildirStore local
Inbox {mail}
SubFolders Maildir++

Channel b
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
Expunge None
SyncState *
""")
    cfg.chmod(0o600)
    return ["mbsync", "-q", "-c", str(cfg), "-a"], mail


def setup_offlineimap(d: Path, server: Dovecot) -> tuple[list[str], Path]:
    mail = d / "Mail"
    mail.mkdir()
    cfg = d / "offlineimaprc"
    # localhost, as for mbsync: OfflineIMAP matches the certificate's DNS names only
    cfg.write_text(f"""[general]
accounts = b
metadata = {d / 'offlineimap'}
fsync = true

[Account b]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {mail}
sync_deletes = no

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {server.imaps_port}
ssl = yes
starttls = no
sslcacertfile = {server.ca_file}
remoteuser = {USER}
remotepass = {PASSWORD}
readonly = True
sync_deletes = no
""")
    cfg.chmod(0o600)
    return ["offlineimap", "-c", str(cfg), "-o", "-u", "quiet"], mail


def setup_mailsync_pop3(d: Path, server: Dovecot) -> tuple[list[str], Path]:
    mail = d / "Mail"
    cfg = d / "config.toml"
    cfg.write_text(f'[accounts.p]\nprotocol = "pop3"\nhost = "127.0.0.1"\nport = {server.pop3s_port}\n'
                   f'username = "{USER}"\npassword_env = "BENCH_PW"\nca_file = "{server.ca_file}"\n'
                   f'maildir = "{mail}"\n')
    return [sys.executable, "-m", "mailsync", "--config", str(cfg), "sync", "p", "--quiet"], mail


def setup_mpop(d: Path, server: Dovecot) -> tuple[list[str], Path]:
    mail = d / "Mail"
    for sub in ("cur", "new", "tmp"):
        (mail / sub).mkdir(parents=True)
    cfg = d / "mpoprc"
    cfg.write_text(f"""defaults
tls on
tls_starttls off
tls_trust_file {server.ca_file}
keep on
received_header off

account b
host 127.0.0.1
port {server.pop3s_port}
user {USER}
password {PASSWORD}
delivery maildir {mail}
uidls_file {d / 'uidls'}
""")
    cfg.chmod(0o600)  # mpop refuses a password in a file others can read
    return ["mpop", "-q", "-C", str(cfg), "b"], mail


SETUP: dict[str, dict[str, Callable[[Path, Dovecot], tuple[list[str], Path]]]] = {
    "imap": {"mailsync": setup_mailsync, "mbsync": setup_mbsync, "offlineimap": setup_offlineimap},
    "pop3": {"mailsync": setup_mailsync_pop3, "mpop": setup_mpop},
}


# --- running and checking ---

def run_tool(cmd: list[str], env: dict[str, str], log: Path) -> Run:
    r, code = measure(cmd, log, env=env, cwd=ROOT)
    if code != 0:
        tail = log.read_text(errors="replace")[-800:]
        raise SystemExit(f"{cmd[0]} exited with {code} ({' '.join(cmd)}):\n{tail}")
    return r


def tool_env(d: Path, tmpdir: Path) -> dict[str, str]:
    """The environment of a tool whose home and work files are in d."""
    return dict(os.environ, BENCH_PW=PASSWORD, HOME=str(d), TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="",
                XDG_CONFIG_HOME=str(d / ".config"), XDG_STATE_HOME=str(d / ".state"),
                XDG_CACHE_HOME=str(d / ".cache"))


Prepared = tuple[list[str], Path, Path, dict[str, str]]  # command, Maildir, log, environment


def prepare(proto: str, tool: str, d: Path, server: Dovecot, tmpdir: Path) -> Prepared:
    """A fresh directory d with the tool's configuration: (command, its Maildir, its log, its environment)."""
    d.mkdir()
    cmd, mail = SETUP[proto][tool](d, server)
    return cmd, mail, d / "output.log", tool_env(d, tmpdir)


def checked_run(tool: str, prepared: Prepared, want_n: int, want_f: int | None, what: str) -> Run:
    """Run the tool once and check its Maildir: want_n messages (and want_f flagged ones, unless None).
    A failing exit code stops the benchmark; a wrong Maildir marks the Run not ok, with a warning."""
    cmd, mail, log, env = prepared
    r = run_tool(cmd, env, log)
    n, nf = count(mail)
    r.ok = n == want_n and (want_f is None or nf == want_f)
    if not r.ok:
        print(f"WARNING: {tool} after {what}: {n} messages, {nf} flagged; expected {want_n}"
              + (f", {want_f} flagged" if want_f is not None else ""), file=sys.stderr)
    return r


def count(maildir: Path) -> tuple[int, int]:
    """Messages in the Maildir tree (files in any cur/ or new/), and how many of them have flag F."""
    n = flagged = 0
    for dirpath, _, files in os.walk(maildir):
        if os.path.basename(dirpath) not in ("cur", "new"):
            continue
        for f in files:
            if f.startswith("."):
                continue
            n += 1
            for sep in (":2,", "!2,", ";2,"):
                if sep in f:
                    flagged += "F" in f.rsplit(sep, 1)[1]
                    break
    return n, flagged


def new_messages(n: int, first: int) -> list[bytes]:
    """n new messages with the corpus's mix of sizes (the same sizes every repeat; distinct numbers)."""
    rnd = random.Random(99)
    out = []
    for i in range(n):
        r = rnd.random()
        size = rnd.randint(20_000, 100_000) if r < 0.09 else (rnd.randint(1_000_000, 2_000_000) if r < 0.095
                                                              else rnd.randint(1_500, 8_000))
        out.append(corpus.ordinary(first + i, size, tag="new-"))
    return out


def uidnext(server: Dovecot, mailbox: str) -> int:
    out = server.doveadm("mailbox", "status", "-u", USER, "uidnext", mailbox)
    return int(out.strip().split("=")[-1])


def warm_up(server: Dovecot, folders: int) -> None:
    """Let Dovecot build its indexes before the first timed run, so no tool pays for that."""
    for f in range(folders):
        server.doveadm("mailbox", "status", "-u", USER, "messages highestmodseq", folder_name(f))
        server.doveadm("fetch", "-u", USER, "uid flags size.physical", "mailbox", folder_name(f), "all")


def main() -> None:
    # as after a regular install, mailsync's modules are byte-compiled (not compiled on every run)
    compileall.compile_dir(str(ROOT / "mailsync"), quiet=1)
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000, help="corpus size (default 10000)")
    ap.add_argument("--folders", type=int, default=5, help="folders of the corpus (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every scenario per tool (default 3)")
    ap.add_argument("--tools", help="comma-separated; default: all (IMAPS: mailsync,mbsync,offlineimap; "
                                    "POP3S: mailsync,mpop)")
    ap.add_argument("--pop3", action="store_true", help="POP3S comparison (mailsync, mpop) of the INBOX")
    ap.add_argument("--new", type=int, default=100, help="new messages for the last IMAP scenario (default 100)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the section's part of docs/benchmarks.md and its chart")
    ap.add_argument("--section", help="name of the docs section (default: tools, or pop3 with --pop3)")
    ap.add_argument("--chart", type=Path, help="PNG to write (default docs/benchmarks-SECTION.png with "
                                               "--write-docs, else DIR/benchmarks-SECTION.png)")
    a = ap.parse_args()
    if a.messages < a.folders or a.repeat < 1 or a.new < 0:
        raise SystemExit("need --messages >= --folders, --repeat >= 1 and --new >= 0")
    proto = "pop3" if a.pop3 else "imap"
    all_tools = POP3_TOOLS if a.pop3 else IMAP_TOOLS
    tools = [t.strip() for t in a.tools.split(",")] if a.tools else list(all_tools)
    unknown = [t for t in tools if t not in all_tools]
    if unknown or not tools:
        raise SystemExit(f"unknown tool(s) {', '.join(unknown)} for {proto.upper()}S: choose from {', '.join(all_tools)}")
    for t in tools:
        if t in PACKAGES and not shutil.which(t):
            raise SystemExit(f"{t} is not installed: apt-get install {PACKAGES[t]} (make bench does it)")
    section = a.section or ("pop3" if a.pop3 else "tools")
    chart = a.chart
    if chart is None and a.write_docs:
        chart = ROOT / "docs" / f"benchmarks-{section}.png"

    work = workdir(a.dir, f"{section}-")
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    if chart is None:
        chart = a.dir.resolve() / f"benchmarks-{section}.png"  # outside work, which is deleted
    server = Dovecot(work / "server", users={USER: PASSWORD}).start()
    try:
        t0 = time.perf_counter()
        size = build_corpus(server, USER, a.messages, a.folders)
        per = a.messages // a.folders
        total = per * a.folders
        warm_up(server, a.folders)
        print(f"corpus: {total} messages, {size / 1e6:.0f} MB in {a.folders} folders "
              f"(built in {time.perf_counter() - t0:.0f} s); tools: {', '.join(tools)}", file=sys.stderr)

        flag_per = max(1, total // 100 // a.folders)
        flagged = flag_per * a.folders
        if a.pop3:
            scenarios = [("full", f"full download ({per} messages)"), ("no-change", "no-change re-run")]
            expect = {"full": (per, None), "no-change": (per, None)}
        else:
            scenarios = [("full", "full backup"), ("no-change", "no-change re-run"),
                         ("no-change-2", "second no-change re-run"),
                         ("flags", f"{flagged} flags changed"), ("new", f"{a.new} new messages")]
            expect = {"full": (total, 0), "no-change": (total, 0), "no-change-2": (total, 0),
                      "flags": (total, flagged),
                      "new": (total + a.new, flagged)}
        results: report.Results = {}
        for rep in range(a.repeat):
            order = tools[rep % len(tools):] + tools[:rep % len(tools)]
            runs = {tool: prepare(proto, tool, work / f"{rep}-{tool}", server, tmpdir) for tool in order}
            first_new = 0
            for key, label in scenarios:
                if key == "flags":
                    for f in range(a.folders):
                        server.doveadm("flags", "add", "-u", USER, "\\Flagged", "mailbox", folder_name(f),
                                       "uid", f"1:{flag_per}")
                elif key == "no-change-2":
                    time.sleep(3)  # as between two cron runs: nothing in the Maildirs changed lately
                elif key == "new":
                    first_new = uidnext(server, "INBOX")
                    server.seed(USER, "INBOX", new_messages(a.new, 50_000_000 + rep * a.new),
                                start=50_000_000 + rep * a.new)
                for tool in order:
                    want_n, want_f = expect[key]
                    r = checked_run(tool, runs[tool], want_n, want_f, f"'{label}' (repeat {rep + 1})")
                    results.setdefault((key, tool), []).append(r)
                    print(f"  repeat {rep + 1}/{a.repeat} {label:>22} {tool:>12}: {r.wall:7.2f} s, "
                          f"CPU {r.cpu:6.2f} s, {r.rss_mb:5.0f} MB", file=sys.stderr)
            # undo this repeat's server changes, so every repeat starts from the same mailbox
            if not a.pop3:
                for f in range(a.folders):
                    server.doveadm("flags", "remove", "-u", USER, "\\Flagged", "mailbox", folder_name(f),
                                   "uid", f"1:{flag_per}")
                if first_new and a.new:  # (with none added, first_new:* would name the last message)
                    server.doveadm("expunge", "-u", USER, "mailbox", "INBOX", "uid", f"{first_new}:*")
            if not a.keep:
                for _, _, log, _ in runs.values():
                    shutil.rmtree(log.parent, ignore_errors=True)

        if a.pop3:
            inbox = server.maildir(USER)
            inbox_size = sum(f.stat().st_size for sub in ("cur", "new") for f in (inbox / sub).iterdir())
            what = f"INBOX of {per} messages, {inbox_size / 1e6:.0f} MB"
        else:
            what = f"{total} messages, {size / 1e6:.0f} MB, {a.folders} folders"
        corpus_line = (f"{what}; {a.repeat} run(s) per tool and scenario, tool order rotated between runs; "
                       f"peak RSS by {rss_method()}.")
        tbl = report.table(results, scenarios, tools)
        rat = report.ratios(results, scenarios, tools)
        print(f"\n{corpus_line}\n\n{tbl}\n")
        if rat:
            print(f"Ratios of median times (below 1: mailsync is faster):\n\n{rat}\n")
        title = f"{'POP3S' if a.pop3 else 'IMAPS'}: {what}, {a.repeat} run(s)"
        drew = report.chart(results, scenarios, tools, chart, title)
        print(f"chart: {chart}" if drew else "chart: matplotlib is not installed, no chart", file=sys.stderr)
        if a.write_docs:
            args = " ".join(sys.argv[1:])
            machine = report.machine(tools)
            body = [f"Measured {report.today()} with `python -m bench.tools {args}`, on: {machine}.",
                    "", corpus_line, "", tbl]
            if rat:
                body += ["", "Ratios of median times (below 1: mailsync is faster):", "", rat]
            if drew:
                rel = os.path.relpath(chart, report.DOCS.parent)
                body += ["", f"![{title}]({rel})"]
            report.write_section(section, "\n".join(body))
            print(f"docs: section '{section}' of {report.DOCS} rewritten", file=sys.stderr)
    finally:
        server.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work files kept in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
