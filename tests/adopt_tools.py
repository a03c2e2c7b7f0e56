"""Maildirs that other tools wrote, for the adoption tests (tests/test_adopt.py).

A user switching to mailsync from mbsync (isync) or OfflineIMAP points it at the Maildir those
tools already filled. These helpers make such Maildirs with the REAL tools against the test
Dovecot, never by imitation:

- seed_corpus(user): a small realistic account (INBOX, Work, Archive/2020; \\Seen, \\Flagged,
  \\Answered; messages without Message-ID, two different messages sharing one Message-ID, an
  exact duplicate pair);
- run_mbsync(user, workdir, "Maildir++" | "Verbatim" | "Flatten"): mbsync's Maildir, after a
  second run that uploaded a few messages put into the Maildir by hand;
- run_offlineimap(user, workdir): OfflineIMAP's Maildir in its default layout (one directory per
  folder, INBOX included, `.` as separator; `,U=` and `,FMD5=` in the file names);
- write_mutt_maildir(target, corpus): what mutt or a delivery agent (procmail, maildrop) writes:
  LF line ends, unique names in new/ and cur/, flags after `:2,`.

Each tool runs with a timeout and with HOME and XDG_CONFIG_HOME in the work directory, so nothing
touches the real home. A missing tool fails the test with how to install it (TOOL_PACKAGES).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import local_files

# the command -> the Debian package that has it
TOOL_PACKAGES = {"mbsync": "isync", "offlineimap": "offlineimap3"}
TOOL_TIMEOUT = 120  # seconds for one run of a tool

FOLDERS = ("INBOX", "Work", "Archive/2020")


def require(tool: str) -> str:
    """The tool's path, or the test fails (never skips) saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        pkg = TOOL_PACKAGES[tool]
        pytest.fail(f"{tool} is not installed; the adoption tests need the real tool: "
                    f"run `apt-get install -y {pkg}` (as root; Debian package {pkg}), or `make test`",
                    pytrace=False)
    return path


# ----------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Mail:
    folder: str          # server name, '/' as separator
    data: bytes          # as the server holds it (CRLF)
    flags: tuple[bytes, ...]
    when: datetime       # INTERNALDATE


def _m(n: int, subject: str, body: str, *, mid: str | None = "", date: str = "Mon, 2 Nov 2026 10:00:00 +0000",
       frm: str = "Alice Example <alice@example.com>", extra: str = "") -> bytes:
    head = [f"Return-Path: <{frm.split('<')[-1].rstrip('>')}>",
            ("Received: from mx.example.com (mx.example.com [192.0.2.7])\r\n\tby mail.example.org with ESMTPS"
             f" id {n:08X}; {date}"),
            f"From: {frm}", "To: Bob Example <bob@example.org>", f"Subject: {subject}", f"Date: {date}"]
    if mid is not None:
        head.append(f"Message-ID: {mid or f'<adopt-{n}@example.com>'}")
    head += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
             "Content-Transfer-Encoding: 8bit"]
    if extra:
        head.append(extra)
    lines = "\r\n".join(head) + "\r\n\r\n" + body.replace("\n", "\r\n")
    if not lines.endswith("\r\n"):
        lines += "\r\n"
    return lines.encode("utf-8")


def corpus() -> list[Mail]:
    """The account every adoption test starts from: 20 in INBOX, 5 in Work, 4 in Archive/2020."""
    S, F, A = b"\\Seen", b"\\Flagged", b"\\Answered"
    day = lambda d: datetime(2026, 10, d, 9, 30, tzinfo=UTC)
    out: list[Mail] = []
    flags_cycle = [(S,), (), (S, F), (S, A), (S,), (F,), (S, A, F), ()]
    for n in range(1, 15):
        body = (f"Hello Bob,\n\nthis is message {n} of the adoption corpus.\n"
                + ("From the other side: a body line starting with From.\n" if n == 3 else "")
                + (". a line that starts with a dot\n" if n == 4 else "")
                + ("Grüße aus Köln — UTF-8 in the body.\n" if n == 5 else "")
                + ("\n" * (n % 3)) + "-- \nAlice\n")
        out.append(Mail("INBOX", _m(n, f"Adoption test {n}", body, date=f"Fri, {n} Oct 2026 09:30:00 +0000"),
                        flags_cycle[n % len(flags_cycle)], day(n)))
    # no Message-ID at all (delivery agents and scripts send such mail)
    for n in (15, 16):
        out.append(Mail("INBOX", _m(n, f"cron report {n}", f"job {n} finished\n", mid=None,
                                    frm="Cron Daemon <root@example.org>"), (S,) if n == 15 else (), day(n)))
    # two different messages with the same Message-ID
    for n, text in ((17, "first text"), (18, "a different second text, much longer than the first")):
        out.append(Mail("INBOX", _m(n, "same id, different mail", text + "\n", mid="<shared-id@example.com>"),
                        (S,), day(n)))
    # an exact duplicate pair (the same bytes twice, as a double delivery leaves it)
    dup = _m(19, "delivered twice", "this message was delivered twice\n")
    out.append(Mail("INBOX", dup, (S,), day(19)))
    out.append(Mail("INBOX", dup, (S,), day(19)))
    for n in range(1, 6):
        out.append(Mail("Work", _m(100 + n, f"Work item {n}", f"Please review item {n}.\n",
                                   mid=None if n == 4 else "", frm="Carol <carol@work.example>"),
                        [(S,), (S, F), (), (S, A), (F,)][n - 1], day(n)))
    for n in range(1, 5):
        out.append(Mail("Archive/2020", _m(200 + n, f"Old thread {n}", f"From 2020, part {n}.\n",
                                           date=f"Wed, {n} Jan 2020 08:00:00 +0000"),
                        (S,) if n != 2 else (S, A), datetime(2020, 1, n, 8, tzinfo=UTC)))
    return out


def seed_corpus(user, mails: list[Mail] | None = None) -> list[Mail]:
    """Put the corpus on the user's server account by IMAP APPEND (flags and INTERNALDATE kept)."""
    mails = corpus() if mails is None else mails
    c = user.imap()
    try:
        for folder in FOLDERS:
            if folder != "INBOX" and not c.folder_exists(folder):
                c.create_folder(folder)
        for m in mails:
            c.append(m.folder, m.data, flags=m.flags, msg_time=m.when)
    finally:
        c.logout()
    return mails


# ----------------------------------------------------------------------------- running a tool

def isolated_env(workdir: Path) -> dict[str, str]:
    """The tool's environment: HOME and the XDG directories inside workdir, nothing else of ours."""
    home = workdir / "home"
    for sub in ("", ".config", ".cache", ".local/share"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SSL_CERT_FILE")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_DATA_HOME=str(home / ".local/share"), TMPDIR=str(workdir))
    return env


def run_tool(cmd: list[str], workdir: Path, log_name: str) -> subprocess.CompletedProcess:
    """Run a tool with a timeout; fail the test with its output when it does not exit 0."""
    try:
        r = subprocess.run(cmd, check=False, env=isolated_env(workdir), cwd=workdir, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[0]} did not finish in {TOOL_TIMEOUT} s: {exc.stdout!r} {exc.stderr!r}")
    (workdir / f"{log_name}.log").write_text(f"$ {' '.join(cmd)}\nexit {r.returncode}\n"
                                             f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n")
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def _quote(value: str) -> str:
    """A string in an mbsync config file: double-quoted, \\ and \" escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ----------------------------------------------------------------------------- mbsync (isync)

# mbsync 1.4 checks the certificate against its DNS names (and CN) only, never an IP address
# SAN: with Host 127.0.0.1 it refuses the test certificate, which names DNS:localhost too
# ("Error, certificate owner does not match hostname 127.0.0.1").
MBSYNC_HOST = "localhost"


MBSYNC_STORES = ("Maildir++", "Verbatim", "Flatten")


def mbsync_dirs(store: str) -> dict[str, str]:
    """Server folder -> the directory mbsync makes for it (relative to the Maildir root)."""
    return {"Maildir++": {"INBOX": ".", "Work": ".Work", "Archive/2020": ".Archive.2020"},
            "Verbatim": {"INBOX": ".", "Work": "Work", "Archive/2020": "Archive/2020"},
            "Flatten": {"INBOX": "INBOX", "Work": "Work", "Archive/2020": "Archive.2020"}}[store]


def mbsync_config(user, workdir: Path, store: str = "Maildir++", *, expunge: str = "None") -> tuple[Path, Path]:
    """An mbsyncrc for the user's account -> (config file, the Maildir it fills).

    Maildir++: `SubFolders Maildir++`, INBOX is the Maildir root, folders are `.Work`,
    `.Archive.2020` beside its cur/new/tmp. Verbatim: `SubFolders Verbatim` with Inbox at the
    store's Path, folders nested (`Work/`, `Archive/2020/`). Flatten: `SubFolders Verbatim`,
    `Flatten .`, Inbox at Path/INBOX: `INBOX/`, `Work/`, `Archive.2020/` (as OfflineIMAP)."""
    if store not in MBSYNC_STORES:
        raise ValueError(store)
    mail = workdir / "Mail"
    mail.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "mbsyncrc"
    # Maildir++ takes no Path (mbsync: "Setting Path is incompatible with 'SubFolders Maildir++'"):
    # the folders go beside the Inbox
    if store == "Maildir++":
        where = f"Inbox {mail}\nSubFolders Maildir++\n"
    elif store == "Verbatim":
        where = f"Path {mail}/\nInbox {mail}\nSubFolders Verbatim\n"
    else:
        where = f"Path {mail}/\nInbox {mail}/INBOX\nSubFolders Verbatim\nFlatten .\n"
    cfg.write_text(f"""# written by tests/adopt_tools.py
IMAPAccount test
Host {MBSYNC_HOST}
Port {user.server.imaps_port}
User {_quote(user.name)}
Pass {_quote(user.password)}
SSLType IMAPS
CertificateFile {user.server.ca_file}

IMAPStore remote
Account test

MaildirStore local
{where}
Channel test
Far :remote:
Near :local:
Patterns *
Create Near
Sync All
Expunge {expunge}
SyncState *
""")
    cfg.chmod(0o600)
    return cfg, mail


def run_mbsync(user, workdir: Path, store: str = "Maildir++", *, hand_upload: bool = True) -> Path:
    """mbsync's Maildir of the user's account (the account is seeded by the caller).

    With hand_upload, a second run follows: first a message is put into INBOX and Work by hand
    (as mutt would save it: LF, new/) and one unread message is read in mutt (new/ -> cur/ with
    :2,S); then mbsync syncs both ways (Expunge Both): it uploads the two (with an X-TUID
    header on the server's copy) and sets \\Seen on the server."""
    require("mbsync")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, mail = mbsync_config(user, workdir, store)
    run_tool(["mbsync", "-c", str(cfg), "-a"], workdir, "mbsync-1")
    if hand_upload:
        folders = {f: mail / rel for f, rel in mbsync_dirs(store).items() if f in ("INBOX", "Work")}
        for i, (folder, path) in enumerate(folders.items()):
            data = _m(300 + i, f"saved by hand into {folder}", "written into the mbsync Maildir by hand\n")
            deliver(path, data.replace(b"\r\n", b"\n"), sub="new")
        read_like_mutt(folders["INBOX"], b"Subject: Adoption test 1\n")
        cfg, _ = mbsync_config(user, workdir, store, expunge="Both")
        run_tool(["mbsync", "-c", str(cfg), "-a"], workdir, "mbsync-2")
    return mail


# ----------------------------------------------------------------------------- OfflineIMAP

OFFLINEIMAP_HOST = "localhost"  # imaplib2 matches DNS names only: "no matching domain name found in certificate"


def offlineimap_config(user, workdir: Path) -> tuple[Path, Path]:
    """An offlineimaprc for the user's account -> (config file, the Maildir it fills). The local
    folder layout is OfflineIMAP's default: every folder in its own directory under localfolders,
    named by its full name with '.' for the server's separator (INBOX/, Work/, Archive.2020/)."""
    mail = workdir / "Mail"
    mail.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "offlineimaprc"
    cfg.write_text(f"""# written by tests/adopt_tools.py
[general]
accounts = test
metadata = {workdir / 'offlineimap-metadata'}
ui = quiet

[Account test]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {mail}

[Repository remote]
type = IMAP
remotehost = {OFFLINEIMAP_HOST}
remoteport = {user.server.imaps_port}
ssl = yes
starttls = no
sslcacertfile = {user.server.ca_file}
remoteuser = {user.name}
remotepass = {user.password}
""")
    cfg.chmod(0o600)
    return cfg, mail


def run_offlineimap(user, workdir: Path, *, hand_upload: bool = True) -> Path:
    """OfflineIMAP's Maildir of the user's account (the account is seeded by the caller).

    With hand_upload, a second run follows after a message was put into INBOX/ and Work/ by
    hand (LF, new/, a unique name without ,U=) and one unread message was read in mutt:
    OfflineIMAP uploads the two (renaming their files to its own names) and sets \\Seen."""
    require("offlineimap")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, mail = offlineimap_config(user, workdir)
    cmd = ["offlineimap", "-c", str(cfg), "-o", "-u", "quiet"]
    run_tool(cmd, workdir, "offlineimap-1")
    if hand_upload:
        for i, folder in enumerate(("INBOX", "Work")):
            data = _m(310 + i, f"saved by hand into {folder}", "written into the OfflineIMAP Maildir by hand\n")
            deliver(mail / folder, data.replace(b"\r\n", b"\n"), sub="new")
        read_like_mutt(mail / "INBOX", b"Subject: Adoption test 1\n")
        run_tool(cmd, workdir, "offlineimap-2")
    return mail


# ----------------------------------------------------------------------------- mutt / an MDA

_seq = iter(range(1, 1 << 30))


def unique_name() -> str:
    """A Maildir unique name as procmail, maildrop or mutt make one: time.M<usec>P<pid>Q<n>.host."""
    now = time.time()
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_seq)}.{socket.gethostname() or 'localhost'}"


def deliver(folder: Path, data: bytes, *, sub: str = "new", letters: str = "") -> Path:
    """Write one message into a Maildir folder the way a delivery agent does (tmp/, then rename)."""
    for s in ("cur", "new", "tmp"):
        (folder / s).mkdir(parents=True, exist_ok=True)
    name = unique_name()
    tmp = folder / "tmp" / name
    tmp.write_bytes(data)
    final = folder / sub / (name if sub == "new" else f"{name}:2,{letters}")
    os.rename(tmp, final)
    return final


def read_like_mutt(folder: Path, header: bytes) -> Path:
    """Open the unread message with that header line in mutt: its file moves from new/ to cur/
    and gets the info :2,S (whatever tool-specific part its name has stays)."""
    path = next(p for p in (folder / "new").iterdir() if header in p.read_bytes())
    final = folder / "cur" / (path.name.split(":2,")[0] + ":2,S")
    os.rename(path, final)
    return final


_LETTERS = {b"\\Draft": "D", b"\\Flagged": "F", b"\\Answered": "R", b"\\Seen": "S", b"\\Deleted": "T"}


def maildir_letters(flags) -> str:
    return "".join(sorted(_LETTERS[f] for f in flags if f in _LETTERS))


def write_mutt_maildir(target: Path, mails: list[Mail], layout: str = "maildir++") -> Path:
    """The corpus as mutt or a delivery agent leaves it: LF line ends; unread mail never opened
    in new/ (no info), the rest in cur/ with `:2,` and its flags. Maildir++ folders (.Work,
    .Archive.2020, each with a maildirfolder file), as Dovecot, maildrop and mutt use them."""
    if layout != "maildir++":
        raise ValueError(layout)
    for m in mails:
        if m.folder == "INBOX":
            folder = target
        else:
            folder = target / ("." + m.folder.replace("/", "."))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "maildirfolder").touch()
        data = m.data.replace(b"\r\n", b"\n")
        letters = maildir_letters(m.flags)
        if not letters and b"\\Seen" not in m.flags:
            p = deliver(folder, data, sub="new")
        else:
            p = deliver(folder, data, sub="cur", letters=letters)
        ts = m.when.timestamp()
        os.utime(p, (ts, ts))
    return target


# ----------------------------------------------------------------------------- server accounts

def _skip_index(_dir: str, names: list[str]) -> list[str]:
    # Dovecot's index files are caches it rebuilds from dovecot-uidlist and the file names
    return [n for n in names if n.startswith(("dovecot.index", "dovecot.list.index"))]


def snapshot_server(user, dest: Path) -> Path:
    """Copy the user's server Maildir (messages, dovecot-uidlist: UIDs and UIDVALIDITY, flags in
    the file names, file times as INTERNALDATE) to dest, without Dovecot's index caches."""
    shutil.copytree(user.server.maildir(user.name), dest, symlinks=True, ignore=_skip_index)
    return dest


def clone_server(snapshot: Path, user) -> None:
    """Make the (new, never opened) user's server account a copy of a snapshot: the same
    messages under the same UIDs and UIDVALIDITY, with the same flags and dates."""
    target = user.server.maildir(user.name)
    shutil.rmtree(target)
    shutil.copytree(snapshot, target, symlinks=True)
    for dirpath, dirs, files in os.walk(target):
        user.server._own(Path(dirpath), *(Path(dirpath) / n for n in dirs + files))


# ----------------------------------------------------------------------------- looking at a Maildir

def maildir_files(root: Path) -> dict[Path, bytes]:
    """Every message file under root (any layout): path -> bytes."""
    return local_files(root)


def unique_part(name: str) -> str:
    """A Maildir file name without its info (`:2,...`): what a flag change keeps."""
    return name.split(":2,")[0].split("!2,")[0]
