"""Backups against the real Dovecot: byte-exact content, flags, incremental runs, state."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time

from mailsync.maildir import KeywordMap, folder_path
from mailsync.model import split_name
from tests import corpus
from tests.helpers import local_files, msg, sha

LETTER = {"\\Seen": "S", "\\Answered": "R", "\\Flagged": "F", "\\Draft": "D", "\\Deleted": "T"}


def summary(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def check_backup_matches_server(user, layout="maildir++", utf8=False):
    """Every server message is in the backup exactly once, byte for byte, in the right folder,
    with its flags in the file name and new/cur placement; nothing else is there."""
    server = user.server_messages()
    files = local_files(user.maildir)
    seen_paths = set()
    for folder, msgs in server.items():
        parts = folder.split("/")
        fdir = folder_path(user.maildir, parts, layout, utf8)
        here = {p: b for p, b in files.items() if p.parent.parent == fdir}
        assert len(here) == len(msgs), f"{folder}: {len(here)} files for {len(msgs)} messages"
        by_hash = {}
        for p, b in here.items():
            by_hash.setdefault(sha(b), []).append(p)
        kw = KeywordMap(fdir)
        for uid, (body, flags) in msgs.items():
            paths = by_hash.get(sha(body))
            assert paths, f"{folder} uid {uid} missing from the backup"
            p = paths.pop()
            seen_paths.add(p)
            _, info = split_name(p.name)
            keywords = {f for f in flags if not f.startswith("\\")}
            assert all(k in kw.index for k in keywords), f"keywords {keywords} not in {fdir}/dovecot-keywords"
            want = "".join(sorted([LETTER[f] for f in flags if f in LETTER]
                                  + [chr(97 + kw.index[k]) for k in keywords]))
            assert info == want, f"{p.name}: flags {info!r}, server has {sorted(flags)}"
            assert p.parent.name == ("cur" if "\\Seen" in flags else "new")
    assert seen_paths == set(files), f"extra files: {set(files) - seen_paths}"
    return server


def test_corpus_is_backed_up_byte_exact(user):
    user.append("INBOX", [msg(1), msg(2)])
    user.append("INBOX", [msg(3)], flags=[b"\\Seen", b"\\Flagged", b"\\Answered", b"$Work"])
    user.append("Entwürfe", [msg(4)], flags=[b"\\Draft"])
    user.append("Archive/2024 Q1", [msg(5), msg(6)], flags=[b"\\Seen", b"\\Deleted"])
    user.append("Projects/Été 2026/notes", [msg(7)])
    user.server.seed(user.name, "INBOX", corpus.MALFORMED, start=100)
    user.server.seed(user.name, "Sent", [corpus.with_attachment(1, 200)], flags="S")
    before = user.server_messages()

    r = user.run("sync", "test", "--json")
    s = summary(r)
    server = check_backup_matches_server(user)
    total = sum(len(m) for m in server.values())
    assert s["totals"]["new"] == total >= 17
    # fetching never marks mail as read on the server
    assert {f: {u: fl for u, (_, fl) in m.items()} for f, m in server.items()} == \
        {f: {u: fl for u, (_, fl) in m.items()} for f, m in before.items()}
    # names on disk: Maildir++ with modified UTF-7, as Dovecot does
    names = {p.name for p in user.maildir.iterdir() if p.is_dir()}
    assert {".Entw&APw-rfe", ".Archive.2024 Q1", ".Projects.&AMk-t&AOk- 2026.notes", ".Sent"} <= names
    # user-facing names are UTF-8
    assert "Projects/Été 2026/notes" in {f["name"] for f in s["folders"]}


def test_fetching_never_marks_mail_read_in_either_mode(user, tmp_path):
    """A backup reads folders with EXAMINE; a two-way sync selects them read-write, where only
    BODY.PEEK[] keeps the download from setting \\Seen on the server (and so in the file name)."""
    user.append("INBOX", [msg(1), msg(2)])
    user.append("Work", [msg(3)], flags=[b"\\Flagged"])
    before = user.server_messages()
    for mode in ("backup", "sync"):
        user.write_config(f'mode = "{mode}"', maildir=tmp_path / mode)
        r = user.run("sync", "test", "--json")
        assert summary(r)["totals"]["new"] == 3, mode
        assert user.server_messages() == before, f"{mode}: the server's flags changed"
        files = local_files(tmp_path / mode)
        assert sorted(files.values()) == sorted([msg(1), msg(2), msg(3)]), mode
        assert sorted(split_name(p.name)[1] for p in files) == ["", "", "F"], mode
        assert all(p.parent.name == "new" for p in files), mode


def test_file_modes_dates_and_keywords(user):
    user.append("INBOX", [msg(1)], flags=[b"\\Seen", b"$Label1", b"Important"])
    c = user.imap()
    c.select_folder("INBOX", readonly=True)
    internaldate = c.fetch([1], [b"INTERNALDATE"])[1][b"INTERNALDATE"]
    c.logout()
    assert user.run("sync", "test").returncode == 0
    [(path, _)] = local_files(user.maildir).items()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert abs(st.st_mtime - internaldate.timestamp()) < 1
    for d in (user.maildir, user.maildir / "cur", user.maildir / "new", user.maildir / "tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    db = user.maildir / ".mailsync.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    row = sqlite3.connect(db).execute("SELECT keywords, flags, sha256 FROM messages").fetchone()
    assert set(row[0].split("\x1f")) == {"$Label1", "Important"}
    assert row[1] == "\\Seen"
    assert row[2] == sha(path.read_bytes())
    # the state holds no secret
    assert user.password.encode() not in db.read_bytes()


def test_incremental_run_fetches_only_new_and_updates_flags(user):
    user.append("INBOX", [msg(i) for i in range(5)])
    user.append("Lists", [msg(10 + i) for i in range(3)])
    s1 = summary(user.run("sync", "test", "--json"))
    assert s1["totals"]["new"] == 8
    user.append("INBOX", [msg(20), msg(21)])
    c = user.imap()
    c.select_folder("Lists")
    c.add_flags([1, 2], [b"\\Seen"])
    c.add_flags([3], [b"\\Flagged", b"$Later"])
    c.logout()
    s2 = summary(user.run("sync", "test", "--json"))
    assert s2["totals"]["new"] == 2
    assert s2["totals"]["flags_changed"] == 3
    assert s2["totals"]["bytes"] == len(msg(20)) + len(msg(21))
    check_backup_matches_server(user)


def test_no_change_run_changes_nothing(user):
    user.append("INBOX", [msg(i) for i in range(4)], flags=[b"\\Seen"])
    user.append("Work", [msg(9)])
    ok(user.run("sync", "test"))
    snap = {p: (b, p.stat().st_mtime_ns) for p, b in local_files(user.maildir).items()}
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == s["totals"]["flags_changed"] == s["totals"]["bytes"] == 0
    assert all(f["skipped_unchanged"] for f in s["folders"])  # CONDSTORE: one STATUS per folder
    assert {p: (b, p.stat().st_mtime_ns) for p, b in local_files(user.maildir).items()} == snap


def test_expunged_on_server_stays_in_backup(user):
    user.append("INBOX", [msg(1), msg(2), msg(3)])
    ok(user.run("sync", "test"))
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([2])
    c.expunge()
    c.logout()
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["gone_from_server"] == 1
    # all three messages are still in the backup, by content, each once (the expunged one included)
    assert sorted(local_files(user.maildir).values()) == sorted([msg(1), msg(2), msg(3)])
    rows = sqlite3.connect(user.maildir / ".mailsync.db").execute(
        "SELECT uid, on_server FROM messages ORDER BY uid").fetchall()
    assert rows == [(1, 1), (2, 0), (3, 1)]
    # and a later run does not fetch it or report it again
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["gone_from_server"] == s["totals"]["new"] == 0
    assert sorted(local_files(user.maildir).values()) == sorted([msg(1), msg(2), msg(3)])


def test_file_deleted_locally_is_fetched_again(user):
    user.append("INBOX", [msg(1), msg(2)])
    ok(user.run("sync", "test"))
    victim = sorted(local_files(user.maildir))[0]
    data = victim.read_bytes()
    victim.unlink()
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["restored"] == 1
    # against the server (not what mailsync wrote): each of its messages once, by content
    server = [body for body, _fl in user.server_messages()["INBOX"].values()]
    assert sorted(sha(b) for b in local_files(user.maildir).values()) == sorted(sha(b) for b in server)
    assert data in server  # the deleted file's message is one of them: it came back
    check_backup_matches_server(user)


def test_mail_client_renaming_files_keeps_identity(user):
    """A reader that moves a file new/ -> cur/ and adds flags must not cause duplicates."""
    user.append("INBOX", [msg(1), msg(2)])
    ok(user.run("sync", "test"))
    for p in list(local_files(user.maildir)):
        key, _ = split_name(p.name)
        os.rename(p, user.maildir / "cur" / f"{key}:2,S")
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == s["totals"]["restored"] == 0
    files = local_files(user.maildir)
    assert sorted(files.values()) == sorted([msg(1), msg(2)])
    assert all(p.parent.name == "cur" and p.name.endswith(":2,S") for p in files)  # the reader's names kept


def test_folder_patterns_and_fs_layout(user):
    user.append("INBOX", [msg(1)])
    user.append("Trash", [msg(2)])
    user.append("Spam", [msg(3)])
    user.append("Entwürfe", [msg(4)])
    user.append("A/B", [msg(5)])
    user.write_config('layout = "fs"\nfolders = ["*", "!Trash", "!Sp*"]')
    s = summary(user.run("sync", "test", "--json"))
    assert sorted(f["name"] for f in s["folders"]) == ["A/B", "Entwürfe", "INBOX"]
    assert (user.maildir / "Entwürfe" / "new").is_dir()
    assert (user.maildir / "A" / "B" / "new").is_dir()
    assert not (user.maildir / "Trash").exists()
    files = local_files(user.maildir)
    assert sorted((str(p.parent.parent.relative_to(user.maildir)), b) for p, b in files.items()) == \
        [(".", msg(1)), ("A/B", msg(5)), ("Entwürfe", msg(4))]


def test_killed_run_leaves_nothing_in_tmp_after_the_next_run(user):
    """A run killed as by kill -9 right after staging a batch (MAILSYNC_CRASH_AT=staged:1) leaves
    the batch in tmp/, unrecorded. The next run removes it, stores every message exactly once, and
    leaves tmp/ holding only another program's recent file (one older than 36 hours is removed):
    docs/reliability.md, "Two-phase delivery"."""
    user.append("INBOX", [msg(i, body="x" * 5000) for i in range(20)])
    user.append("Work", [msg(100 + i, body="y" * 5000) for i in range(10)], flags=[b"\\Seen"])
    user.write_config("batch_bytes = 65536")
    r = user.run("sync", "test", env=user.env(MAILSYNC_CRASH_AT="staged:1"))
    assert r.returncode == 137, r.stderr
    left = list(user.maildir.rglob("tmp/*"))
    assert left, "the killed run left nothing in tmp/: the test no longer tests the clean-up"
    assert local_files(user.maildir) == {}  # nothing was published
    fresh = user.maildir / "tmp" / "other-program.fresh"
    old = user.maildir / "tmp" / "other-program.old"
    fresh.write_bytes(b"someone else's delivery in progress")
    old.write_bytes(b"someone else's leftover")
    past = time.time() - 37 * 3600
    os.utime(old, (past, past))
    ok(user.run("sync", "test"))
    check_backup_matches_server(user)
    assert list(user.maildir.rglob("tmp/*")) == [fresh]
    assert fresh.read_bytes() == b"someone else's delivery in progress"


def test_uidvalidity_change_rematches_without_deleting(user):
    old = [msg(i) for i in range(5)] + [corpus.MALFORMED[6]]  # the last has no Message-ID
    user.append("Work", old)
    ok(user.run("sync", "test"))
    before = local_files(user.maildir)
    c = user.imap()
    validity = c.folder_status("Work", [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    # the folder is deleted and re-created on the server (as after a migration): new UIDVALIDITY
    c.delete_folder("Work")
    c.logout()
    user.append("Work", old + [msg(99)])
    c = user.imap()
    assert c.folder_status("Work", [b"UIDVALIDITY"])[b"UIDVALIDITY"] != validity
    c.logout()
    r = user.run("sync", "test", "--json")
    s = summary(r)
    # what happened, in words a user does not read as mail lost
    assert f"notice: Work: the server renumbered this folder (UIDVALIDITY {validity} -> " in r.stderr
    assert "6 messages matched again, 1 downloaded; no local file was deleted" in r.stderr
    assert s["totals"]["new"] == 1  # only the truly new message is stored
    assert s["totals"]["gone_from_server"] == 0 and s["totals"]["renumbered"] == 6
    work = next(f for f in s["folders"] if f["name"] == "Work")
    assert work["rematched"] == 6
    assert s["totals"]["bytes"] == len(msg(99)) + 0  # Message-ID matches were not downloaded
    after = local_files(user.maildir)
    assert all(after.get(p) == b for p, b in before.items())  # nothing deleted or changed
    assert len(after) == 7
    check_backup_matches_server(user)
    # and a further run is quiet again
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == 0 and all(f["rematched"] == 0 for f in s["folders"])


def test_uids_renumbered_without_uidvalidity_change_makes_no_duplicates(user):
    """Dovecot keeps UIDVALIDITY but gives every message a new UID when only its uidlist is lost;
    some servers do the same. The backup must not store a second copy of each message."""
    user.append("INBOX", [msg(i) for i in range(4)])
    ok(user.run("sync", "test"))
    before = local_files(user.maildir)
    (user.server.maildir(user.name) / "dovecot-uidlist").unlink()
    user.server.doveadm("force-resync", "-u", user.name, "INBOX")
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert "0 new" in r.stdout and "0 gone from server" in r.stdout, r.stdout
    assert "4 renumbered by the server (matched again)" in r.stdout, r.stdout
    assert "notice: INBOX: the server gave 4 messages new UIDs: matched again, not downloaded" in r.stderr
    assert local_files(user.maildir).keys() == before.keys()
    check_backup_matches_server(user)


def test_message_expunged_between_listing_and_fetch_is_not_written_empty(user):
    """Dovecot answers BODY[] NIL for a message expunged by another client mid-run: the session
    reports it as None (docs/reliability.md), never as empty bytes or an error."""
    from mailsync.config import parse
    from mailsync.imap import ImapSession
    from pathlib import Path

    user.append("INBOX", [msg(1), msg(2)])
    cfg = parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file)}}},
                Path("/x.toml"))
    s = ImapSession(cfg.account("t"), user.password)
    try:
        s.examine("INBOX")
        other = user.imap()
        other.select_folder("INBOX")
        other.delete_messages([1])
        other.expunge()
        other.logout()
        got = {uid: body for uid, body, *_ in s.bodies([1, 2])}
    finally:
        s.close()
    assert got == {1: None, 2: msg(2)}


def test_backup_skips_a_message_expunged_after_the_listing(user, monkeypatch):
    """The download loop meets that NIL: the message expunged after the folder was listed gets no
    file (empty or otherwise) and no state row, the others are stored, the run succeeds, and the
    next run has nothing to do."""
    from pathlib import Path

    from mailsync import engine
    from mailsync.config import parse
    from mailsync.imap import ImapSession

    user.append("INBOX", [msg(1), msg(2), msg(3)])
    real = ImapSession.stream_bodies
    raced = []

    def racing(self, uids, open_body, max_body=None):
        if not raced:  # another client expunges UID 2 after mailsync listed it, before the FETCH
            other = user.imap()
            other.select_folder("INBOX")
            other.delete_messages([2])
            other.expunge()
            other.logout()
            raced.append(list(uids))
        yield from real(self, uids, open_body, max_body)

    monkeypatch.setattr(ImapSession, "stream_bodies", racing)
    acc = parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file)}}},
                Path("/x.toml")).account("t")
    r = engine.backup(acc, user.password)
    assert raced == [[1, 2, 3]]  # the race happened, with UID 2 asked for
    assert not r.failed, [f.error for f in r.failed]
    files = local_files(user.maildir)
    assert sorted(files.values()) == [msg(1), msg(3)]
    assert all(files.values())  # no empty file
    assert not any((user.maildir / "tmp").iterdir())
    db = sqlite3.connect(user.maildir / ".mailsync.db")
    assert [u for (u,) in db.execute("SELECT uid FROM messages ORDER BY uid")] == [1, 3]
    db.close()
    check_backup_matches_server(user)
    monkeypatch.setattr(ImapSession, "stream_bodies", real)
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == s["totals"]["restored"] == 0
    assert local_files(user.maildir) == files


def test_dovecot_serves_the_backup_as_its_own_mail_store(user, dovecot, tmp_path):
    user.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen"])
    user.append("Entwürfe", [msg(3)], flags=[b"\\Draft", b"\\Flagged", b"$Important", b"Later"])
    user.append("Archive/2024", [msg(4)])
    user.server.seed(user.name, "INBOX", corpus.MALFORMED[:3], start=10)
    ok(user.run("sync", "test"))
    original = user.server_messages()

    from tests.helpers import MailUser
    import shutil
    reader = MailUser.create(dovecot, f"{user.name}r", tmp_path / "reader")
    assert reader.server_messages() == {"INBOX": {}}
    home = dovecot.maildir(reader.name)
    shutil.rmtree(home)
    shutil.copytree(user.maildir, home)
    if os.getuid() == 0:
        import pwd
        pw = pwd.getpwnam("dovecot")
        for dirpath, dirs, files in os.walk(home):
            os.chown(dirpath, pw.pw_uid, pw.pw_gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)
    served = reader.server_messages()
    assert set(served) == set(original)  # same folders, no extra ones (no ".mailsync" folder)
    for folder in original:
        assert sorted((sha(b), sorted(f)) for b, f in original[folder].values()) == \
            sorted((sha(b), sorted(f)) for b, f in served[folder].values()), folder


def test_lost_state_file_adopts_existing_files_instead_of_duplicating(user):
    user.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen"])
    user.append("Work", [msg(3)])
    ok(user.run("sync", "test"))
    before = local_files(user.maildir)
    for p in user.maildir.glob(".mailsync.db*"):
        p.unlink()
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == 0
    assert local_files(user.maildir) == before
    check_backup_matches_server(user)
    assert summary(user.run("sync", "test", "--json"))["totals"]["new"] == 0


def test_version_and_help(user):
    import subprocess
    import sys
    import tomllib

    from tests.helpers import ROOT

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mailsync", *args], capture_output=True, text=True, cwd=ROOT)

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = cli("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"mailsync {version}\n", "")

    # --help: every command and the global options, exit 0; without a command: the same, exit 2
    commands = ["sync", "migrate", "restore", "verify", "compare", "check"]
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("Commands:")[1].split()
    assert all(c in listed for c in commands), r.stdout
    for opt in ("--config", "--debug", "--version", "--help"):
        assert opt in r.stdout.split("Commands:")[0], (opt, r.stdout)
    bare = cli()
    assert bare.returncode == 2 and (bare.stdout + bare.stderr).strip() == r.stdout.strip()

    # a command's help: its argument and every option the docs name for it (docs/commands.md)
    wanted = {"sync": ["ACCOUNT", "--mode", "--dry-run", "--force", "--quiet", "--json", "--config", "--debug"],
              "migrate": ["SRC", "DST", "--delete", "--force", "--quiet", "--json"],
              "restore": ["ACCOUNT", "--from", "--layout", "--quiet", "--json"],
              "verify": ["ACCOUNT", "--deep", "--quiet", "--json"],
              "compare": ["IMAP_ACCOUNT", "POP3_ACCOUNT", "--json", "--keep"],
              "check": ["TARGET", "--pop3", "--ports"]}
    for command, words in wanted.items():
        r = cli(command, "--help")
        assert r.returncode == 0, (command, r.stderr)
        assert r.stdout.startswith("Usage: ") and f" {command} " in r.stdout.splitlines()[0], r.stdout
        for w in words:
            assert w in r.stdout, (command, w, r.stdout)


def test_a_message_the_server_leaves_out_is_not_skipped_for_good(user, monkeypatch):
    """If FETCH leaves out a message the server still lists, the folder fails and its counters
    stay put, so the next run asks again (nothing is silently skipped)."""
    from pathlib import Path

    from mailsync import engine
    from mailsync.config import parse
    from mailsync.imap import ImapSession

    user.append("INBOX", [msg(1), msg(2), msg(3)])
    real = ImapSession.stream_bodies

    def forgetful(self, uids, open_body, max_body=None):
        for item in real(self, uids, open_body, max_body):
            if item[0] == 2:
                item[1].discard()
                yield (item[0], None, *item[2:])
            else:
                yield item

    monkeypatch.setattr(ImapSession, "stream_bodies", forgetful)
    acc = parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file)}}},
                Path("/x.toml")).account("t")
    r = engine.backup(acc, user.password)
    assert r.failed and "did not send 1 messages" in r.failed[0].error
    monkeypatch.setattr(ImapSession, "stream_bodies", real)
    r = engine.backup(acc, user.password)
    assert not r.failed
    check_backup_matches_server(user)


def age_dirs(maildir, seconds=30):
    """Make every cur/ and new/ look untouched for a while (as between two cron runs)."""
    past = time.time() - seconds
    for d in list(maildir.rglob("cur")) + list(maildir.rglob("new")):
        os.utime(d, (past, past))


def test_unchanged_folders_are_skipped_without_listing_yet_local_changes_are_seen(user):
    """Once a folder was found in step, a no-change run trusts cur/ and new/'s inode and mtime
    instead of listing them; a file deleted afterwards still changes that and is fetched again."""
    user.append("INBOX", [msg(1), msg(2)])
    user.append("Work", [msg(3)])
    ok(user.run("sync", "test"))
    age_dirs(user.maildir)
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["new"] == 0
    db = sqlite3.connect(user.maildir / ".mailsync.db")
    stamps = dict(db.execute("SELECT name, local_stamp FROM folders").fetchall())
    db.close()
    assert stamps["INBOX"] and stamps["Work"], stamps
    victim = next(p for p, b in local_files(user.maildir).items() if b == msg(3))
    victim.unlink()
    age_dirs(user.maildir)  # even with the mtime put back, the stamp no longer matches
    s = summary(user.run("sync", "test", "--json"))
    assert s["totals"]["restored"] == 1
    check_backup_matches_server(user)
