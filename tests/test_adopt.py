"""Adopting a Maildir another tool filled: mailsync pointed at an existing mbsync, OfflineIMAP or
mutt/delivery-agent Maildir must take the files it finds as the copies of the server's messages.

Nothing may be stored twice: a backup downloads nothing the Maildir already has (`new == 0`,
every message `rematched`), a two-way sync plans and makes no upload and no download for them,
and the user's own files stay where they are, byte for byte. A flag changed locally the way
mutt changes it (renaming `:2,S` to `:2,FS`) reaches the server.

The Maildirs are written by the real tools against the test Dovecot (tests/adopt_tools.py), once
per module; every test gets a copy of one, and a fresh server account cloned from the account the
tool synced (same UIDs, UIDVALIDITY, flags and dates).

The `flat` layout (OfflineIMAP's default: INBOX/, Work/, Archive.2020/ under the root) has its
unit tests at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mailsync.config import parse
from mailsync.errors import ConfigError
from mailsync.identity import canonical
from mailsync.localfolders import local_folders
from mailsync.maildir import SUBDIRS, disk_component, folder_path
from tests import adopt_tools as T
from tests.helpers import MailUser

# ----------------------------------------------------------------------------- the Maildirs


@dataclass(frozen=True)
class Kind:
    name: str
    layout: str                 # the mailsync layout that names this tool's directories
    dirs: dict[str, str]        # server folder -> its directory, relative to the Maildir root


MAILDIRPP = {"INBOX": ".", "Work": ".Work", "Archive/2020": ".Archive.2020"}
FLAT = {"INBOX": "INBOX", "Work": "Work", "Archive/2020": "Archive.2020"}
KINDS = {k.name: k for k in (
    Kind("mbsync-maildir++", "maildir++", MAILDIRPP),
    Kind("mbsync-verbatim", "fs", {"INBOX": ".", "Work": "Work", "Archive/2020": "Archive/2020"}),
    Kind("mbsync-flatten", "flat", FLAT),
    Kind("offlineimap", "flat", FLAT),
    Kind("mutt", "maildir++", MAILDIRPP),
)}


@dataclass
class Template:
    kind: Kind
    server: Path     # snapshot of the server account the tool synced
    maildir: Path    # what the tool wrote
    messages: dict   # that account: folder -> uid -> (bytes, flags)


_builds = itertools.count(1)


def _build(kind: Kind, dovecot, tmp: Path) -> Template:
    # a new account each time: the module's fixtures can be set up twice in one process (when
    # pytest runs this module's tests in two groups), and a reused account would be seeded twice
    u = MailUser.create(dovecot, f"adopt{os.getpid()}x{next(_builds)}{kind.name.replace('+', 'p').replace('-', '')}", tmp)
    T.seed_corpus(u)
    work = tmp / "tool"
    if kind.name == "mbsync-maildir++":
        mail = T.run_mbsync(u, work, "Maildir++")
    elif kind.name == "mbsync-verbatim":
        mail = T.run_mbsync(u, work, "Verbatim")
    elif kind.name == "mbsync-flatten":
        mail = T.run_mbsync(u, work, "Flatten")
    elif kind.name == "offlineimap":
        mail = T.run_offlineimap(u, work)
    else:
        mail = T.write_mutt_maildir(work / "Mail", T.corpus())
    return Template(kind, T.snapshot_server(u, tmp / "server"), mail, u.server_messages())


@pytest.fixture(scope="module")
def templates(dovecot, tmp_path_factory):
    """kind name -> Template, each made once per module, when a test first asks for it."""
    made: dict[str, Template] = {}

    def get(name: str) -> Template:
        if name not in made:
            made[name] = _build(KINDS[name], dovecot, tmp_path_factory.mktemp(name))
        return made[name]
    return get


@dataclass
class Adopted:
    user: MailUser
    kind: Kind
    mail: Path          # the test's own copy of the tool's Maildir
    template: Template

    def configure(self, mode: str = "backup") -> None:
        self.user.write_config(f'layout = "{self.kind.layout}"\nmode = "{mode}"\n', maildir=self.mail)

    def folder_dir(self, folder: str) -> Path:
        return (self.mail / self.kind.dirs[folder]).resolve()

    def run(self, *args: str):
        return self.user.run("sync", "test", *args, timeout=120)


@pytest.fixture(params=list(KINDS))
def adopted(request, templates, user) -> Adopted:
    """A fresh account cloned from the one the tool synced, and a copy of the tool's Maildir."""
    t = templates(request.param)
    T.clone_server(t.server, user)
    assert user.server_messages() == t.messages, "the cloned server account differs from the template"
    mail = user.tmp / "Mail"
    shutil.copytree(t.maildir, mail, symlinks=True)
    a = Adopted(user, t.kind, mail, t)
    a.configure()
    return a


# ----------------------------------------------------------------------------- checks


def _files(folder_dir: Path) -> dict[Path, bytes]:
    out = {}
    for sub in ("cur", "new"):
        d = folder_dir / sub
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file():
                    out[p] = p.read_bytes()
    return out


def all_files(root: Path) -> dict[Path, bytes]:
    return T.maildir_files(root)


def mail_dirs(root: Path) -> set[Path]:
    """Every directory under root that is a Maildir folder (has cur/ or new/)."""
    out = set()
    for dirpath, dirs, _files_ in os.walk(root):
        if "cur" in dirs or "new" in dirs:
            out.add(Path(dirpath).resolve())
    return out


def duplicates_problems(a: Adopted, server: dict) -> list[str]:
    """Each server folder's directory holds exactly one file per server message (by content:
    line ends and tool-added headers aside), and no other directory holds mail."""
    problems = []
    for folder, msgs in sorted(server.items()):
        d = a.folder_dir(folder)
        local = Counter(canonical(b) for b in _files(d).values())
        want = Counter(canonical(data) for data, _flags in msgs.values())
        if local != want:
            extra = sum((local - want).values())
            missing = sum((want - local).values())
            problems.append(f"{folder} ({d.relative_to(a.mail.resolve())}/): {sum(local.values())} files for "
                            f"{len(msgs)} server messages ({extra} extra copies, {missing} missing)")
    expected = {a.folder_dir(f) for f in server}
    others = mail_dirs(a.mail) - expected
    for d in sorted(others):
        n = len(_files(d))
        problems.append(f"a second directory for mail: {d.relative_to(a.mail.resolve())}/ with {n} files")
    return problems


def kept_problems(a: Adopted) -> list[str]:
    """Every file the tool wrote is still there: same folder, same unique name, same bytes
    (only its flags after ':2,' may differ, and new/ may have become cur/)."""
    problems = []
    for folder, rel in a.kind.dirs.items():
        before = {T.unique_part(p.name): data for p, data in _files(a.template.maildir / rel).items()}
        after = {T.unique_part(p.name): data for p, data in _files(a.folder_dir(folder)).items()}
        gone = sorted(set(before) - set(after))
        changed = sorted(k for k in before if k in after and after[k] != before[k])
        if gone:
            problems.append(f"{folder}: {len(gone)} of the user's {len(before)} files are gone, e.g. {gone[0]}")
        if changed:
            problems.append(f"{folder}: {len(changed)} of the user's files were rewritten, e.g. {changed[0]}")
    return problems


def summary(r) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    try:
        return json.loads(r.stdout)
    except ValueError:
        pytest.fail(f"--json printed no JSON: {r.stdout[-2000:]!r}")


def rematched(s: dict) -> int:
    return sum(f["rematched"] for f in s["folders"])


def n_messages(server: dict) -> int:
    return sum(len(m) for m in server.values())


def plan_lines(stdout: str) -> list[str]:
    """The --dry-run text without its first line ('ACCOUNT: dry run, nothing was changed')."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines and "dry run" in lines[0], f"not a dry-run plan: {stdout!r}"
    return lines[1:]


MATCH = "match to local files (the same message, nothing transferred)"  # a dry run's line


def counted(lines: list[str]) -> dict[str, int]:
    """'download from server: 7 [...]' lines of a plan, added up over the folders."""
    out: Counter = Counter()
    for ln in lines:
        m = re.match(r"\s+([^:\[]+): (\d+)\b", ln)
        if m:
            out[m.group(1).strip()] += int(m.group(2))
    return dict(out)


def server_uid(server: dict, folder: str, data: bytes) -> int:
    uids = [uid for uid, (d, _f) in server[folder].items() if canonical(d) == canonical(data)]
    assert len(uids) == 1, f"{len(uids)} server messages in {folder} with that content"
    return uids[0]


# ----------------------------------------------------------------------------- what the tools wrote


def test_the_tools_wrote_what_the_adoption_tests_rely_on(templates):
    """The fixtures are what the tools really write (this pins it, so a new tool version that
    writes otherwise is noticed here, not as a puzzling mailsync failure)."""
    corpus_canon = Counter((m.folder, canonical(m.data)) for m in T.corpus())
    for name, kind in KINDS.items():
        t = templates(name)
        root = t.maildir
        assert mail_dirs(root) == {(root / rel).resolve() for rel in kind.dirs.values()}, name
        files = {f: _files(root / rel) for f, rel in kind.dirs.items()}
        for folder, fs in files.items():
            # one file per server message, by content, before mailsync ever ran
            assert Counter(canonical(b) for b in fs.values()) == Counter(
                canonical(d) for d, _ in t.messages[folder].values()), (name, folder)
            for p, data in fs.items():
                assert b"\r\n" not in data, f"{name}: {p} has CRLF line ends"  # every tool writes LF
        # the corpus is all there (plus what was uploaded by hand into the tool's Maildir)
        on_server = Counter((f, canonical(d)) for f, msgs in t.messages.items() for d, _ in msgs.values())
        assert not corpus_canon - on_server, name
        every = [(p, d) for fs in files.values() for p, d in fs.items()]
        if name != "mutt":  # message 1 was read in mutt before the tool's second run: it pushed \Seen
            first = [f for d, f in t.messages["INBOX"].values() if b"Subject: Adoption test 1\r\n" in d]
            assert first == [frozenset({"\\Seen"})], (name, first)
        if name.startswith("mbsync"):
            # mbsync converts to LF and adds X-TUID to every message it downloads; the copies it
            # uploads carry X-TUID on the server (CRLF) and not in the Maildir
            downloaded = [(p, d) for p, d in every if b"by hand" not in d]
            assert all(b"\nX-TUID: " in d for _p, d in downloaded)
            assert all(re.search(r",U=\d+(:2,[A-Z]*)?$", p.name) for p, _d in every)
            uploaded = [d for msgs in t.messages.values() for d, _ in msgs.values() if b"by hand" in d]
            assert len(uploaded) == 2 and all(b"\r\nX-TUID: " in d for d in uploaded)
            assert not any(b"X-TUID" in d for _p, d in every if b"by hand" in d)
            inbox = root / kind.dirs["INBOX"]
            assert (inbox / ".mbsyncstate").is_file() and (inbox / ".uidvalidity").is_file()
        elif name == "offlineimap":
            for folder, fs in files.items():
                md5 = hashlib.md5(kind.dirs[folder].encode()).hexdigest()
                for p in fs:
                    assert re.fullmatch(rf"\d+_\d+\.\d+\.[^,/]+,U=\d+,FMD5={md5}:2,[A-Z]*", p.name), p.name
            # Dovecot has UIDPLUS: OfflineIMAP needs no X-OfflineIMAP header to find an upload
            assert not any(b"X-OfflineIMAP" in d for _p, d in every)
            assert sum(b"by hand" in d for _p, d in every) == 2
        else:
            assert all(re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.[^:/]+(:2,[A-Z]*)?", p.name) for p, _d in every)
            assert all((":2," in p.name) == (p.parent.name == "cur") for p, _d in every)


# ----------------------------------------------------------------------------- backup


def test_backup_adopts_the_maildir(adopted):
    """mode backup on the tool's Maildir: nothing downloaded again, every message rematched to
    the file the Maildir already had, the user's files kept; a second run does nothing."""
    a = adopted
    server = a.user.server_messages()
    n = n_messages(server)
    s = summary(a.run("--json"))
    problems = duplicates_problems(a, server) + kept_problems(a)
    t = s["totals"]
    if t["new"] != 0:
        problems.append(f"downloaded again: new = {t['new']} (the Maildir had all {n} messages)")
    if rematched(s) != n:
        problems.append(f"rematched = {rematched(s)}, not the {n} messages the Maildir had")
    if t["failed_folders"]:
        problems.append(f"failed folders: {[f['errors'] for f in s['folders'] if f['errors']]}")
    assert not problems, f"{a.kind.name}: " + "; ".join(problems)
    assert a.user.server_messages() == server, "a backup changed the server"

    after = all_files(a.mail)
    s2 = summary(a.run("--json"))
    assert s2["totals"]["new"] == 0 and rematched(s2) == 0, s2["totals"]
    assert all_files(a.mail) == after, "a second backup changed the Maildir"

    # verify proves the adopted backup complete, and --deep says which files are the server's
    # message in another form (kept as they are) rather than byte for byte
    r = a.user.run("verify", "test", timeout=120)
    assert r.returncode == 0, f"{a.kind.name}: verify: {r.stdout}{r.stderr}"
    r = a.user.run("verify", "test", "--deep", "--json", timeout=120)
    assert r.returncode == 0, f"{a.kind.name}: verify --deep: {r.stdout}{r.stderr}"
    import json
    folders = json.loads(r.stdout)["folders"]
    other = sum(len(f["other_form"]) for f in folders)
    exact = sum(1 for p, b in after.items() if any(b == body for m in server.values() for body, _ in m.values()))
    assert other == len(after) - exact, f"{a.kind.name}: {other} in another form, {len(after) - exact} expected"


# ----------------------------------------------------------------------------- sync


def test_sync_adopts_the_maildir(adopted):
    """mode sync on the tool's Maildir: the dry run plans to match every message to its file and
    nothing else (no upload, no download), the real run changes nothing on the server and stores
    nothing twice, and a second run does nothing."""
    a = adopted
    a.configure("sync")
    server = a.user.server_messages()
    n = n_messages(server)
    before = all_files(a.mail)

    r = a.run("--dry-run")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    assert all_files(a.mail) == before and a.user.server_messages() == server, "the dry run changed something"
    problems = []
    plan = plan_lines(r.stdout)
    planned = counted(plan)
    if set(planned) != {MATCH} or planned[MATCH] != n:  # reported with what the real run then does
        problems.append(f"the dry run plans {planned or plan} for a Maildir that already holds all "
                        f"{n} messages (it should match each to its file, nothing else):\n" + "\n".join(plan) + "\n")

    s = summary(a.run("--json"))
    t = s["totals"]
    problems += duplicates_problems(a, server) + kept_problems(a)
    busy = {k: t[k] for k in ("new", "restored", "uploaded", "deleted_local", "deleted_remote", "conflicts",
                              "flags_pushed", "flags_changed", "failed_folders") if t[k]}
    if busy:
        problems.append(f"the run did {busy}")
    if rematched(s) != n:
        problems.append(f"rematched = {rematched(s)}, not the {n} messages the Maildir had")
    now = a.user.server_messages()
    counts = {f: len(m) for f, m in now.items()}
    if counts != {f: len(m) for f, m in server.items()}:
        problems.append(f"server message counts {counts}, were {({f: len(m) for f, m in server.items()})}")
    elif now != server:
        problems.append("the server's messages or flags changed")
    assert not problems, f"{a.kind.name}: " + "; ".join(problems)

    after = all_files(a.mail)
    s2 = summary(a.run("--json"))
    assert {k: v for k, v in s2["totals"].items() if v} == {}, s2["totals"]
    assert rematched(s2) == 0
    assert all_files(a.mail) == after and a.user.server_messages() == server, "a second sync changed something"


def test_sync_pushes_a_flag_set_the_mutt_way(adopted):
    """Before the first mailsync run the user flags two read messages in mutt (the file is
    renamed from :2,S to :2,FS); one shares its Message-ID with another message. The sync
    sets \\Flagged on exactly those two server messages and changes nothing else."""
    a = adopted
    a.configure("sync")
    server = a.user.server_messages()
    corpus = {m.data: m for m in T.corpus() if m.folder == "INBOX"}
    four = next(d for d in corpus if b"Subject: Adoption test 4\r\n" in d)
    shared = next(d for d in corpus if b"\r\n\r\nfirst text" in d)
    inbox = a.folder_dir("INBOX")
    renamed = {}
    for data in (four, shared):
        path = next(p for p, b in _files(inbox).items() if canonical(b) == canonical(data))
        assert path.parent.name == "cur" and path.name.endswith(":2,S"), path.name
        new = path.with_name(path.name[:-len("S")] + "FS")
        os.rename(path, new)  # what mutt does when you press F on a read message
        renamed[server_uid(server, "INBOX", data)] = new

    s = summary(a.run("--json"))
    now = a.user.server_messages()
    for uid, path in renamed.items():
        assert now["INBOX"][uid][1] == frozenset({"\\Seen", "\\Flagged"}), (
            f"{a.kind.name}: UID {uid} ({path.name}) has {sorted(now['INBOX'][uid][1])} on the server, "
            "not \\Flagged \\Seen")
        assert path.exists(), f"{path.name} was renamed or removed"
    changed = sorted((f, uid) for f, msgs in server.items() for uid in msgs
                     if (f, uid) not in {("INBOX", u) for u in renamed}
                     and now.get(f, {}).get(uid, (None, None))[1] != msgs[uid][1])
    assert not changed, f"{a.kind.name}: flags changed on other messages: {changed}"
    assert {f: {u: d for u, (d, _fl) in m.items()} for f, m in now.items()} == \
        {f: {u: d for u, (d, _fl) in m.items()} for f, m in server.items()}, "server messages changed"
    problems = duplicates_problems(a, server)
    t = s["totals"]
    if t["new"] or t["uploaded"]:
        problems.append(f"new = {t['new']}, uploaded = {t['uploaded']}")
    assert not problems, f"{a.kind.name}: " + "; ".join(problems)


# ----------------------------------------------------------------------------- the flat layout

ROOT = Path("/backup/mail")

_TRICKY = st.sampled_from([
    "", ".", "..", ".hidden", "a.b", "a/b", "%", "%41", "%-", "%2E", "100%", "2024 Q1", "cur", "CUR",
    "new", "tmp", "Tmp", "mailsync", "INBOX", "inbox", "Inbox", "Entwürfe", "日本", "&", "&-", "x\x00y",
    "\x7f", "😀", " ", "-",
])
_PART = st.one_of(_TRICKY, st.text(st.characters(blacklist_categories=("Cs",)), max_size=5))
_PARTS = st.lists(_PART, min_size=1, max_size=3)


def _inbox(parts) -> bool:
    return len(parts) == 1 and parts[0].upper() == "INBOX"


@pytest.mark.parametrize("parts, utf8, expected", [
    (["INBOX"], False, "INBOX"),
    (["Work"], False, "Work"),
    (["Archive", "2020"], False, "Archive.2020"),
    (["INBOX", "Sent"], False, "INBOX.Sent"),     # servers that put every folder under INBOX
    (["a.b"], False, "a%2Eb"),                    # not the folder a/b
    (["a", "b"], False, "a.b"),
    (["Entwürfe"], False, "Entw&APw-rfe"),        # modified UTF-7, as OfflineIMAP keeps it
    (["Entwürfe"], True, "Entwürfe"),
    (["cur"], False, "%63ur"),
    (["New"], True, "%4Eew"),
    (["tmp", "x"], False, "tmp.x"),
    ([".hidden"], False, "%2Ehidden"),
    ([""], False, "%-"),
    (["..", ".."], False, "%2E%2E.%2E%2E"),
    (["mailsync", "db"], False, "mailsync.db"),   # ours are .mailsync.db, .mailsync.lock
])
def test_flat_names(parts, utf8, expected):
    assert folder_path(ROOT, parts, "flat", utf8) == ROOT / expected


@pytest.mark.parametrize("inbox", ["INBOX", "inbox", "Inbox", "iNbOx"])
@pytest.mark.parametrize("utf8", [False, True])
def test_flat_inbox_is_its_own_directory(inbox, utf8):
    assert folder_path(ROOT, [inbox], "flat", utf8) == ROOT / "INBOX"
    assert folder_path(ROOT, [inbox, "Sub"], "flat", utf8) not in (ROOT, ROOT / "INBOX")


@settings(max_examples=300, deadline=None)
@given(parts=_PARTS, utf8=st.booleans())
@example(parts=["cur"], utf8=False)
@example(parts=[".."], utf8=True)
@example(parts=["", ""], utf8=False)
def test_flat_paths_stay_one_level_inside_the_root(parts, utf8):
    path = folder_path(ROOT, parts, "flat", utf8)
    assert path.parent == ROOT
    name = path.name
    assert name and name not in (".", "..") and "/" not in name and "\x00" not in name
    assert not name.startswith("."), "hidden, or one of mailsync's .mailsync.* files"
    assert name.lower() not in SUBDIRS
    assert os.path.normpath(path) == str(path)


@settings(max_examples=500, deadline=None)
@given(a=_PARTS, b=_PARTS, utf8=st.booleans())
@example(a=["a.b"], b=["a", "b"], utf8=False)
@example(a=["cur"], b=["%63ur"], utf8=False)
@example(a=["INBOX"], b=["INBOX", ""], utf8=True)
@example(a=[""], b=["%-"], utf8=True)
def test_flat_names_are_injective(a, b, utf8):
    assume(a != b and not (_inbox(a) and _inbox(b)))
    assert folder_path(ROOT, a, "flat", utf8) != folder_path(ROOT, b, "flat", utf8)


@given(name=_PART, utf8=st.booleans())
def test_flat_component_is_maildirpp_component(name, utf8):
    # one escaping for both layouts that join with '.'; only the leading dot and INBOX differ
    assert disk_component(name, "flat", utf8) == disk_component(name, "maildir++", utf8)


@settings(max_examples=100, deadline=None)
@given(names=st.lists(_PARTS, min_size=1, max_size=6), utf8=st.booleans())
@example(names=[["INBOX"], ["Work"], ["Archive", "2020"], ["cur"], ["a.b"], ["", "x"]], utf8=False)
def test_flat_local_folders_finds_what_folder_path_writes(names, utf8):
    """Sync mode lists the Maildir's folders (local_folders) to create the ones the server lacks:
    for flat it must read back exactly what folder_path writes, INBOX as INBOX/, and never take
    the root itself (OfflineIMAP's root is no Maildir) or mailsync's own files for a folder."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        want = {}
        for parts in names:
            path = folder_path(root, parts, "flat", utf8)
            (path / "cur").mkdir(parents=True, exist_ok=True)
            want[("INBOX",) if _inbox(parts) else tuple(parts)] = path
        (root / ".mailsync.db").write_bytes(b"")
        for sub in SUBDIRS:  # a stray Maildir at the root is not INBOX in this layout
            (root / sub).mkdir(exist_ok=True)
        found, bad = local_folders(root, "flat", utf8)
        assert bad == [] and found == want


def test_config_accepts_flat_with_modified_utf7_names_by_default(tmp_path):
    base = {"host": "h", "username": "u", "maildir": str(tmp_path / "m"), "password_env": "X"}
    acc = parse({"accounts": {"a": {**base, "layout": "flat"}}}, tmp_path / "c.toml").account("a")
    assert acc.layout == "flat" and acc.utf8_names is False
    acc = parse({"accounts": {"a": {**base, "layout": "flat", "utf8_names": True}}},
                tmp_path / "c.toml").account("a")
    assert acc.utf8_names is True
    with pytest.raises(ConfigError, match="flat"):
        parse({"accounts": {"a": {**base, "layout": "offlineimap"}}}, tmp_path / "c.toml")


def test_restore_of_an_offlineimap_maildir_detects_flat_and_uploads_each_message_once(templates, user):
    """An OfflineIMAP Maildir (INBOX/, Work/, Archive.2020/ under a root without mail) restored
    into an empty account: the layout is detected, every message arrives once, in its folder."""
    t = templates("offlineimap")
    r = user.run("restore", "test", "--from", str(t.maildir), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    got = user.server_messages()

    def canon(msgs):
        return Counter(hashlib.sha256(canonical(b)).hexdigest() for b, _ in msgs.values())

    want = {f: canon(m) for f, m in t.messages.items() if m}
    assert {f: canon(m) for f, m in got.items() if m} == want
    r = user.run("restore", "test", "--from", str(t.maildir), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert {f: canon(m) for f, m in user.server_messages().items() if m} == want  # nothing twice
