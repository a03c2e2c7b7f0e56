"""The durable order of delivery, checked on the real system calls (strace).

A kill -9 cannot show a missing fsync: the page cache survives the process. So these tests run
the real `mailsync` command under `strace -f -y`, parse the trace, and check the order that
docs/reliability.md ("Two-phase delivery, state after durability") promises for every message:

  1. written to tmp/<key>, a new file (O_CREAT|O_EXCL);
  2. made durable after it was written (closed): a syncfs() on an fd in its Maildir folder, or an
     fsync()/fdatasync() of the file itself;
  3. then a commit of the state: an fsync/fdatasync of .mailsync.db-wal (or .mailsync.db), by the
     thread that publishes the file;
  4. then link()ed into new/ or cur/ (never renamed: a link does not replace a file) and its
     tmp/ name unlinked;
  5. every directory a link or unlink changed (new/, cur/, tmp/) is fsync()ed before that thread
     commits the state again (the next batch, the folder's counters) and before the process ends.

Rule 5 also covers flag renames (retag: link + unlink in new/ or cur/), which must be durable
before the state commit that records the new flags.

Thread handling: with -f every line starts with the thread id; a system call another thread
interrupts is split into `<unfinished ...>` and `<... name resumed>` lines. Each call is kept with
the line where it started and the line where it returned; "A before B" means A returned before B
started (strace holds a thread at the entry stop until it has printed it, so line order is real
time order).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, msg

DB_FILES = (".mailsync.db", ".mailsync.db-wal")
SUBS = ("tmp", "new", "cur")
# link/unlink/rename are not system calls on every architecture (aarch64 has only the *at forms):
# a regex names whichever exist
TRACE = ("trace=openat,close,fsync,fdatasync,syncfs,"
         "/^(link|linkat|unlink|unlinkat|rename|renameat|renameat2)$")


# ----------------------------------------------------------------------------- running under strace

def strace_path() -> str:
    path = shutil.which("strace") or ("/usr/bin/strace" if os.path.exists("/usr/bin/strace") else None)
    if path is None:
        pytest.fail("strace is not installed: these tests check the order of mailsync's fsync/syncfs/link "
                    "system calls with strace. Install it (`apt-get install strace`; `make test` installs it).")
    return path


def traced_run(user, trace: Path) -> subprocess.CompletedProcess:
    """`python -m mailsync --config ... sync test` under strace; the trace goes to `trace`."""
    cmd = [strace_path(), "-f", "-qq", "-y", "--seccomp-bpf", "-e", TRACE, "-o", str(trace),
           sys.executable, "-m", "mailsync", "--config", str(user.config), "sync", "test"]
    r = subprocess.run(cmd, env=user.env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    if r.returncode != 0 and ("ptrace" in r.stderr.lower() or not trace.exists() or trace.stat().st_size == 0):
        pytest.fail(f"strace could not trace mailsync (exit {r.returncode}): {r.stderr.strip()[-600:]}\n"
                    "ptrace must be allowed: run as root, or in a container add CAP_SYS_PTRACE "
                    "(docker run --cap-add=SYS_PTRACE), or lower kernel.yama.ptrace_scope")
    assert r.returncode == 0, f"mailsync failed under strace (exit {r.returncode}):\n{r.stderr}"
    return r


# ----------------------------------------------------------------------------- parsing the trace

@dataclass
class Call:
    start: int                  # line (1-based) where the call was entered
    end: int                    # line where it returned (== start unless it was <unfinished ...>)
    tid: int
    name: str
    args: list[str]
    ret: int | None
    ret_path: str | None        # -y: the path of a returned fd
    text: str

    def before(self, other: "Call") -> bool:
        return self.end < other.start

    def where(self) -> str:
        return f"line {self.start}" + (f"-{self.end}" if self.end != self.start else "") + f" [tid {self.tid}]"


_HEAD = re.compile(r"^(\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([A-Za-z0-9_]+) resumed>(.*)$")
_UNFINISHED = " <unfinished ...>"


def _split_call(text: str) -> tuple[str, list[str], str] | None:
    """'name(a, b, c) = ret' -> (name, [a, b, c], 'ret'), aware of strings and -y <path> notes."""
    m = re.match(r"^([A-Za-z0-9_]+)\(", text)
    if not m:
        return None
    args, cur, depth, i = [], [], 0, m.end()
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "<" and i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_"):  # 5</path>, AT_FDCWD</dir>
            j = text.find(">", i)
            j = len(text) - 1 if j < 0 else j
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append("".join(cur).strip())
                rest = text[i + 1:].strip()
                return m.group(1), [a for a in args if a], rest[1:].strip() if rest.startswith("=") else rest
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    return None


def _string(arg: str) -> str | None:
    if not arg.startswith('"'):
        return None
    quoted = arg[:arg.rfind('"') + 1]
    try:
        return ast.literal_eval("b" + quoted).decode("utf-8", "surrogateescape")
    except (SyntaxError, ValueError):
        return quoted[1:-1]


def _fd_path(arg: str) -> str | None:
    m = re.match(r"^(?:-?\d+|AT_FDCWD)<(.*)>$", arg)
    return m.group(1) if m else None


def parse_trace(path: Path) -> list[Call]:
    calls: list[Call] = []
    pending: dict[int, tuple[int, str]] = {}  # tid -> (start line, text up to <unfinished ...>)
    for n, line in enumerate(path.read_text("utf-8", "surrogateescape").splitlines(), 1):
        m = _HEAD.match(line)
        if not m:
            continue
        tid, text = int(m.group(1)), m.group(2)
        if text.startswith(("---", "+++")):
            continue  # signals, exits
        start = n
        if text.endswith(_UNFINISHED):
            pending[tid] = (n, text[:-len(_UNFINISHED)])
            continue
        r = _RESUMED.match(text)
        if r:
            if tid not in pending:
                continue
            start, head = pending.pop(tid)
            text = head + r.group(2)
        parsed = _split_call(text)
        if parsed is None:
            continue
        name, args, ret_text = parsed
        rm = re.match(r"^(-?\d+)(?:<(.*)>)?", ret_text)
        ret = int(rm.group(1)) if rm else None
        calls.append(Call(start, n, tid, name, args, ret, rm.group(2) if rm else None, text))
    return calls


# ----------------------------------------------------------------------------- what the calls mean

def _resolve(dirfd_arg: str | None, path: str) -> str:
    if not os.path.isabs(path):
        base = _fd_path(dirfd_arg) if dirfd_arg else None
        path = os.path.join(base or str(ROOT), path)
    return os.path.normpath(path)


@dataclass
class Trace:
    root: Path                                  # the account's Maildir
    file: Path
    calls: list[Call]
    creates: dict[str, list[Call]] = field(default_factory=dict)   # path -> openat(O_CREAT)
    closes: list[Call] = field(default_factory=list)
    syncs: list[Call] = field(default_factory=list)               # fsync/fdatasync/syncfs, ok
    commits: list[Call] = field(default_factory=list)             # fsync/fdatasync of the state db
    links: list[tuple[Call, str, str]] = field(default_factory=list)    # (call, src, dst)
    renames: list[tuple[Call, str, str]] = field(default_factory=list)
    unlinks: list[tuple[Call, str]] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path, file: Path) -> "Trace":
        t = cls(Path(os.path.normpath(root)), file, parse_trace(file))
        for c in t.calls:
            if c.ret is None or c.ret < 0:
                continue  # failed calls change nothing
            a = c.args
            if c.name == "openat" and len(a) >= 3 and "O_CREAT" in a[2]:
                p = _string(a[1])
                if p is not None:
                    t.creates.setdefault(_resolve(a[0], p), []).append(c)
            elif c.name == "close":
                t.closes.append(c)
            elif c.name in ("fsync", "fdatasync", "syncfs") and a and _fd_path(a[0]):
                t.syncs.append(c)
                p = _fd_path(a[0])
                if c.name != "syncfs" and os.path.dirname(p) == str(t.root) and os.path.basename(p) in DB_FILES:
                    t.commits.append(c)
            elif c.name == "link" and len(a) >= 2:
                t.links.append((c, _resolve(None, _string(a[0]) or ""), _resolve(None, _string(a[1]) or "")))
            elif c.name == "linkat" and len(a) >= 4:
                t.links.append((c, _resolve(a[0], _string(a[1]) or ""), _resolve(a[2], _string(a[3]) or "")))
            elif c.name == "rename" and len(a) >= 2:
                t.renames.append((c, _resolve(None, _string(a[0]) or ""), _resolve(None, _string(a[1]) or "")))
            elif c.name in ("renameat", "renameat2") and len(a) >= 4:
                t.renames.append((c, _resolve(a[0], _string(a[1]) or ""), _resolve(a[2], _string(a[3]) or "")))
            elif c.name == "unlink" and a:
                t.unlinks.append((c, _resolve(None, _string(a[0]) or "")))
            elif c.name == "unlinkat" and len(a) >= 2 and "AT_REMOVEDIR" not in "".join(a[2:]):
                t.unlinks.append((c, _resolve(a[0], _string(a[1]) or "")))
        return t

    def place(self, path: str) -> tuple[str, str] | None:
        """A file in <folder>/{tmp,new,cur}/ of this Maildir -> (folder, sub)."""
        sub_dir = os.path.dirname(path)
        folder = os.path.dirname(sub_dir)
        if os.path.basename(sub_dir) in SUBS and (folder == str(self.root) or folder.startswith(str(self.root) + "/")):
            return folder, os.path.basename(sub_dir)
        return None

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def folder_name(self, folder: str) -> str:
        return "INBOX (the Maildir root)" if folder == str(self.root) else self.rel(folder) + "/"

    def fail(self, problems: list[str]) -> None:
        if problems:
            more = f"\n... and {len(problems) - 8} more" if len(problems) > 8 else ""
            pytest.fail(f"{len(problems)} durability problems (trace: {self.file}):\n- "
                        + "\n- ".join(problems[:8]) + more, pytrace=False)

    # -- the checks --------------------------------------------------------------------------

    def publishes(self) -> list[tuple[Call, str, str, str]]:
        """(link, folder, tmp path, destination) of each message published from tmp/."""
        out = []
        for c, src, dst in self.links:
            ps, pd = self.place(src), self.place(dst)
            if ps and pd and ps[1] == "tmp" and pd[1] in ("new", "cur") and ps[0] == pd[0]:
                out.append((c, ps[0], src, dst))
        return out

    def delivery_problems(self) -> list[str]:
        """Steps 1 to 4 for every message published from tmp/ (step 5: dirs_problems)."""
        problems = []
        for c, src, dst in self.renames:
            ps, pd = self.place(src), self.place(dst)
            if ps and pd and ps[1] == "tmp" and pd[1] in ("new", "cur"):
                problems.append(f"step 4: {self.rel(src)} was published with {c.name}() ({c.where()}), which can "
                                f"replace an existing file; the promise is link() then unlink()")
        for link, folder, src, dst in self.publishes():
            name = self.rel(src)
            created = [c for c in self.creates.get(src, []) if c.before(link)]
            if not created:
                problems.append(f"step 1 missing: {name} was linked ({link.where()}) but never created in tmp/ "
                                f"by this run (no openat O_CREAT)")
                continue
            create = created[-1]
            if "O_EXCL" not in create.args[2]:
                problems.append(f"step 1: {name} was not created with O_EXCL ({create.where()}: {create.text})")
            # written = its fd closed (the data and the mtime are in); a flush before that proves nothing
            closes = [c for c in self.closes if create.before(c) and c.before(link) and c.args
                      and c.args[0].split("<")[0] == str(create.ret) and _fd_path(c.args[0]) == src]
            written = closes[0] if closes else create
            flushes = [s for s in self.syncs if written.before(s) and s.before(link) and self._covers(s, folder, src)]
            if not flushes:
                problems.append(
                    f"step 2 missing: {name} (written {written.where()}) was linked into "
                    f"{self.rel(os.path.dirname(dst))}/ ({link.where()}) without being made durable first: no "
                    f"syncfs() on an fd in the folder {self.folder_name(folder)} and no fsync() of the file in between")
                continue
            commits = [k for k in self.commits if k.tid == link.tid and flushes[0].before(k) and k.before(link)]
            if not commits:
                before = [k for k in self.commits if k.tid == link.tid and written.before(k) and k.before(link)]
                why = (f"the state was committed ({before[-1].where()}) before the batch was durable"
                       if before else "the state was not committed at all in between")
                problems.append(
                    f"step 3 out of order: no SQLite commit (fsync/fdatasync of {DB_FILES[1]}) between making "
                    f"{name} durable ({flushes[0].where()}: {flushes[0].name}) and linking it "
                    f"({link.where()}); {why}. The state must record a batch after it is durable and before "
                    f"it is published")
            unlinked = [u for u, p in self.unlinks if p == src and link.before(u)]
            if not unlinked:
                problems.append(f"step 4: the tmp/ name {name} was not unlinked after its link ({link.where()})")
        return problems

    def _covers(self, s: Call, folder: str, src: str) -> bool:
        p = _fd_path(s.args[0])
        if s.name == "syncfs":  # the whole file system; the fd must be in this Maildir folder
            return p == folder or os.path.dirname(p) == folder or os.path.dirname(os.path.dirname(p)) == folder
        return p == src

    def dirs_problems(self, what: str) -> list[str]:
        """Step 5 (and flag renames): every directory of the Maildir a link or an unlink changed is
        fsync()ed after the change and before the changing thread commits the state again (and
        before the process ends)."""
        label: dict[int, str] = {}  # id(call) -> what the change was
        events: list[tuple[int, str, Call, str]] = []
        linked_src = {}
        for c, src, dst in self.links:
            if self.place(dst):
                retag = (self.place(src) or ("", ""))[1] != "tmp"
                label[id(c)] = f"{'a flag rename (retag) to' if retag else 'publishing'} {self.rel(dst)}"
                events.append((c.start, "change", c, dst))
                linked_src[src] = retag
        for c, p in self.unlinks:
            if p in linked_src and self.place(p):
                label[id(c)] = (f"removing the old name {self.rel(p)} of a flag rename (retag)" if linked_src[p]
                                else f"removing the tmp/ name {self.rel(p)} after publishing it")
                events.append((c.start, "change", c, p))
        for s in self.syncs:
            if s.name in ("fsync", "fdatasync"):
                events.append((s.start, "dirsync", s, _fd_path(s.args[0])))
        for k in self.commits:
            events.append((k.start, "commit", k, ""))
        events.sort(key=lambda e: e[0])
        dirty: dict[int, dict[str, tuple[Call, str]]] = {}  # tid -> dir -> (first change, its path)
        problems = []

        def report(tid: int, until: str) -> None:
            for d, (c, _p) in sorted(dirty.pop(tid, {}).items()):
                problems.append(f"{what}: directory {self.rel(d)}/ was changed by {label[id(c)]} "
                                f"({c.name}, {c.where()}) but not fsync()ed before {until}")

        for _, kind, c, p in events:
            if kind == "change":
                d = os.path.dirname(p)
                dirty.setdefault(c.tid, {}).setdefault(d, (c, p))
            elif kind == "dirsync":
                for tid in list(dirty):
                    for d, (ch, _p) in list(dirty[tid].items()):
                        if d == p and ch.before(c):
                            del dirty[tid][d]
                    if not dirty[tid]:
                        del dirty[tid]
            elif kind == "commit" and dirty.get(c.tid):
                report(c.tid, f"the same thread's next state commit ({c.where()}: {c.name} of "
                              f"{os.path.basename(_fd_path(c.args[0]))})")
        for tid in list(dirty):
            report(tid, "the process ended")
        return problems


# ----------------------------------------------------------------------------- the tests

BODY = "x" * 25_000  # 65,536-byte batches: 2 messages a batch


def batches_in(t: Trace, folder: str) -> int:
    """How many times the folder went from writing tmp/ files to publishing them."""
    events = sorted([(c.start, "w") for p, cs in t.creates.items() for c in cs
                     if t.place(p) == (folder, "tmp")]
                    + [(c.start, "l") for c, f, _s, _d in t.publishes() if f == folder])
    return sum(1 for i, (_, k) in enumerate(events) if k == "l" and (i == 0 or events[i - 1][1] == "w"))


def test_backup_delivers_in_durable_order(user, tmp_path):
    """Backup, two folders on two connections (two threads, whose calls interleave in the trace:
    <unfinished ...>/resumed lines), two batches each; INBOX goes to new/, Work (\\Seen) to cur/.
    Steps 1-5 for every message."""
    user.server.seed(user.name, "INBOX", [msg(i, BODY) for i in range(4)])
    user.server.seed(user.name, "Work", [msg(100 + i, BODY) for i in range(4)], flags="S")
    user.write_config("batch_bytes = 65536\nconnections = 2")
    trace = tmp_path / "backup.strace"
    traced_run(user, trace)
    t = Trace.load(user.maildir, trace)
    t.fail(t.delivery_problems() + t.dirs_problems("step 5 missing (fsync new/, cur/, tmp/ after linking)"))
    # the test itself: it saw what it is about
    published = t.publishes()
    inbox, work = str(t.root), str(t.root / ".Work")
    assert sorted(os.path.basename(os.path.dirname(d)) for _c, f, _s, d in published if f == inbox) == ["new"] * 4
    assert sorted(os.path.basename(os.path.dirname(d)) for _c, f, _s, d in published if f == work) == ["cur"] * 4
    assert batches_in(t, inbox) >= 2 and batches_in(t, work) >= 2, "expected 2 batches per folder"
    assert any(c.name == "syncfs" for c in t.syncs) or not sys.platform.startswith("linux"), \
        "on Linux each batch is made durable with one syncfs(), not an fsync() per file"


def test_backup_flag_renames_durable_before_state(user, tmp_path):
    """A second backup after flags changed on the server renames files (link + unlink): new/ ->
    cur/ for a message now \\Seen, cur/ -> cur/ for one now \\Flagged. The directories must be
    fsync()ed before the state commit that records the new flags."""
    user.server.seed(user.name, "INBOX", [msg(i, BODY) for i in range(2)])
    user.server.seed(user.name, "Work", [msg(100 + i, BODY) for i in range(2)], flags="S")
    user.write_config("batch_bytes = 65536\nconnections = 1")
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    c = user.imap()
    try:
        c.select_folder("INBOX")
        c.add_flags(c.search("ALL")[:1], [b"\\Seen"])
        c.select_folder("Work")
        c.add_flags(c.search("ALL")[:1], [b"\\Flagged"])
    finally:
        c.logout()
    trace = tmp_path / "retag.strace"
    traced_run(user, trace)
    t = Trace.load(user.maildir, trace)
    t.fail(t.dirs_problems("flag rename not durable before the state records the new flags"))
    retags = sorted((t.rel(os.path.dirname(s)), t.rel(os.path.dirname(d))) for _c, s, d in t.links)
    assert retags == [(".Work/cur", ".Work/cur"), ("new", "cur")], f"expected two flag renames, saw {retags}"
    assert t.commits, "no state commit seen in the trace"


def test_pop3_delivers_in_durable_order(user, tmp_path):
    """POP3 download, 5 messages in 3 batches: steps 1-5 for every message."""
    user.server.seed(user.name, "INBOX", [msg(i, BODY) for i in range(5)])
    user.write_config('protocol = "pop3"\nbatch_bytes = 65536', port=user.server.pop3s_port)
    trace = tmp_path / "pop3.strace"
    traced_run(user, trace)
    t = Trace.load(user.maildir, trace)
    t.fail(t.delivery_problems() + t.dirs_problems("step 5 missing (fsync new/, cur/, tmp/ after linking)"))
    published = t.publishes()
    assert len(published) == 5 and all(f == str(t.root) for _c, f, _s, _d in published)
    assert batches_in(t, str(t.root)) >= 2, "expected at least 2 batches"
