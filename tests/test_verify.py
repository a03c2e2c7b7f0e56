"""mailsync.verify against the real Dovecot: a good backup passes; damage is named by UID and file."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from mailsync.config import parse
from mailsync.errors import LockedError
from mailsync.model import split_name
from mailsync.state import RunLock
from mailsync.verify import EXIT_DAMAGED, BackupIncomplete, verify
from tests.helpers import local_files, msg


def account(user, **extra):
    sec = {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
           "maildir": str(user.maildir), "ca_file": str(user.server.ca_file), **extra}
    return parse({"accounts": {"t": sec}}, Path("/x.toml")).account("t")


def backup(user):
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr


def run_verify(user, **kw):
    rep = verify(account(user), user.password, **kw)
    json.dumps(rep.to_json())  # always serialisable
    return rep


def folder(rep, name="INBOX"):
    return next(f for f in rep.folders if f.name == name)


def db(user):
    return sqlite3.connect(user.maildir / ".mailsync.db")


def file_of(user, uid: int, folder_id: int | None = None) -> Path:
    """The file the state binds to uid (INBOX unless folder_id is given)."""
    c = db(user)
    fid = folder_id or c.execute("SELECT id FROM folders WHERE name='INBOX'").fetchone()[0]
    key = c.execute("SELECT key FROM messages WHERE folder_id=? AND uid=?", (fid, uid)).fetchone()[0]
    c.close()
    [path] = [p for p in local_files(user.maildir) if split_name(p.name)[0] == key]
    return path


def snapshot(user):
    """The state's rows and the Maildir's files (names and bytes): verify must change neither."""
    c = db(user)
    rows = c.execute("SELECT * FROM messages ORDER BY id").fetchall() + c.execute(
        "SELECT * FROM folders ORDER BY id").fetchall()
    c.close()
    return rows, {p: b for p, b in local_files(user.maildir).items()}


def test_good_backup_verifies(user):
    user.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen", b"$Work"])
    user.append("INBOX", [msg(3)])
    user.append("Archive/2024", [msg(4), msg(5)], flags=[b"\\Flagged"])
    backup(user)
    before = snapshot(user)
    rep = run_verify(user, deep=True)
    assert rep.ok and rep.exit_code == 0, rep.text()
    assert {f.name for f in rep.folders} == {"INBOX", "Archive/2024"}
    inbox = folder(rep)
    assert (inbox.server_messages, inbox.local_files, inbox.state_records) == (3, 3, 3)
    assert inbox.deep_checked == 3 and folder(rep, "Archive/2024").deep_checked == 2
    assert not (inbox.missing or inbox.hash_mismatches or inbox.flag_differences or inbox.extra or inbox.kept)
    lines = rep.text().splitlines()
    assert lines[0].startswith("INBOX: ok (3 on server, 3 files, 3 in state")
    assert any(line.startswith("Archive/2024: ok") for line in lines)
    assert "backup verified" in lines[-1]
    # read-only on both sides: the state and the files are unchanged, nothing was marked \Seen
    assert snapshot(user) == before
    flags = {u: fl for u, (_, fl) in user.server_messages()["INBOX"].items()}
    assert flags[3] == frozenset()
    j = rep.to_json()
    assert j["ok"] is True and j["exit_code"] == 0 and j["totals"]["server_messages"] == 5


def test_corrupted_file_is_named(user):
    user.append("INBOX", [msg(1), msg(2), msg(3)])
    backup(user)
    victim = file_of(user, 2)
    victim.write_bytes(victim.read_bytes().replace(b"hello", b"HELLO"))
    rep = run_verify(user)
    assert not rep.ok and rep.exit_code == EXIT_DAMAGED == 11
    [p] = folder(rep).hash_mismatches
    assert p.uid == 2 and p.file == f"{victim.parent.name}/{victim.name}"
    assert "UID 2" in rep.text() and victim.name in rep.text()
    assert "hash mismatch" in rep.text() and "backup incomplete or damaged" in rep.text()
    assert rep.to_json()["folders"][0]["hash_mismatches"][0]["uid"] == 2


def test_deleted_file_is_missing(user):
    user.append("INBOX", [msg(1), msg(2)])
    user.append("Work", [msg(3), msg(4)])
    backup(user)
    fid = db(user).execute("SELECT id FROM folders WHERE name='Work'").fetchone()[0]
    victim = file_of(user, 1, fid)
    key = split_name(victim.name)[0]
    victim.unlink()
    rep = run_verify(user)
    assert not rep.ok and rep.exit_code == 11
    assert folder(rep).ok
    work = folder(rep, "Work")
    [p] = work.missing
    assert p.uid == 1 and key in p.file
    assert (work.server_messages, work.local_files, work.state_records) == (2, 1, 2)
    line = next(ln for ln in rep.text().splitlines() if "missing" in ln)
    assert "UID 1" in line and key in line
    assert rep.text().splitlines()[0].startswith("INBOX: ok")


def test_extra_file_is_named_but_not_a_failure(user):
    user.append("INBOX", [msg(1)])
    backup(user)
    [src] = local_files(user.maildir)
    extra = src.parent / "1700000000.M1P1Q1Rdeadbeef.elsewhere:2,S"
    extra.write_bytes(msg(77))
    rep = run_verify(user)
    assert rep.ok, rep.text()  # extra files are warnings: they lose nothing
    [p] = folder(rep).extra
    assert p.uid is None and p.file.endswith(extra.name)
    assert folder(rep).local_files == 2
    assert f"warning: extra file: {p.file}" in rep.text()
    assert "1 warning" in rep.text().splitlines()[0]


def test_flag_changed_on_server_is_a_flag_difference(user):
    user.append("INBOX", [msg(1), msg(2)])
    backup(user)
    c = user.imap()
    c.select_folder("INBOX")
    c.add_flags([2], [b"\\Flagged", b"$Later"])
    c.logout()
    rep = run_verify(user)
    assert rep.ok, rep.text()  # flag differences are warnings
    [p] = folder(rep).flag_differences
    assert p.uid == 2 and p.file.endswith(file_of(user, 2).name)
    assert "$Later" in p.detail and "\\Flagged" in p.detail and "changed on the server" in p.detail
    line = next(ln for ln in rep.text().splitlines() if "flags differ" in ln)
    assert "UID 2" in line and file_of(user, 2).name in line


def test_deep_catches_content_altered_with_the_state(user):
    user.append("INBOX", [msg(1), msg(2)])
    backup(user)
    victim = file_of(user, 1)
    data = victim.read_bytes().replace(b"hello", b"HELLO")  # same size
    victim.write_bytes(data)
    c = db(user)
    c.execute("UPDATE messages SET sha256=? WHERE uid=1", (hashlib.sha256(data).hexdigest(),))
    c.commit()
    c.close()
    assert run_verify(user).ok  # the state agrees with the file: only the server can tell
    rep = run_verify(user, deep=True)
    assert not rep.ok and rep.exit_code == 11
    inbox = folder(rep)
    assert not inbox.hash_mismatches and not inbox.size_mismatches
    [p] = inbox.deep_mismatches
    assert p.uid == 1 and p.file.endswith(victim.name)
    assert inbox.deep_checked == 2
    line = next(ln for ln in rep.text().splitlines() if "content mismatch" in ln)
    assert "UID 1" in line and victim.name in line


def test_size_differing_from_the_state_is_named(user):
    user.append("INBOX", [msg(1), msg(2)])
    backup(user)
    c = db(user)
    c.execute("UPDATE messages SET size=size+1 WHERE uid=2")
    c.commit()
    c.close()
    rep = run_verify(user)
    assert not rep.ok
    [p] = folder(rep).size_mismatches
    assert p.uid == 2 and p.file.endswith(file_of(user, 2).name)


def test_expunged_on_server_is_kept_not_an_error(user):
    user.append("INBOX", [msg(1), msg(2), msg(3)])
    backup(user)
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([2])
    c.expunge()
    c.logout()
    kept_file = file_of(user, 2)
    # before the next sync (the state still says on the server) ...
    rep = run_verify(user, deep=True)
    assert rep.ok, rep.text()
    inbox = folder(rep)
    assert [p.uid for p in inbox.kept] == [2] and inbox.kept[0].file.endswith(kept_file.name)
    assert (inbox.server_messages, inbox.local_files, inbox.state_records) == (2, 3, 3)
    assert not inbox.missing and not inbox.lost
    assert "1 kept after removal from the server" in rep.text()
    # ... and after it (on_server = 0)
    backup(user)
    rep = run_verify(user)
    assert rep.ok and [p.uid for p in folder(rep).kept] == [2]
    assert rep.to_json()["totals"]["kept"] == 1


def test_new_mail_since_the_backup_is_missing(user):
    user.append("INBOX", [msg(1)])
    backup(user)
    user.append("INBOX", [msg(2)])
    rep = run_verify(user)
    assert not rep.ok
    [p] = folder(rep).missing
    assert p.uid == 2 and "since the last sync" in p.detail
    backup(user)
    assert run_verify(user).ok


def test_uidvalidity_change_is_a_folder_error(user):
    user.append("Work", [msg(1)])
    backup(user)
    c = user.imap()
    c.delete_folder("Work")
    c.logout()
    user.append("Work", [msg(1)])
    rep = run_verify(user)
    assert not rep.ok
    work = folder(rep, "Work")
    assert "UIDVALIDITY" in work.error and "run a sync first" in work.error
    assert work.uidvalidity_server != work.uidvalidity_state
    assert "run a sync first" in rep.text()
    backup(user)
    assert run_verify(user).ok


def test_lost_archived_copy_fails_a_backup(user):
    user.append("INBOX", [msg(1), msg(2)])
    backup(user)
    victim = file_of(user, 1)
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([1])
    c.expunge()
    c.logout()
    backup(user)
    victim.unlink()  # the only copy left
    rep = run_verify(user)
    assert not rep.ok
    [p] = folder(rep).lost
    assert p.uid == 1 and split_name(victim.name)[0] in p.file


def test_verify_takes_the_run_lock_and_needs_a_backup(user):
    user.append("INBOX", [msg(1)])
    with pytest.raises(BackupIncomplete) as e:
        run_verify(user)
    assert e.value.exit_code == 11
    backup(user)
    with RunLock(user.maildir), pytest.raises(LockedError):
        run_verify(user)
    assert run_verify(user).ok


def test_sync_mode_upload_of_an_lf_file_verifies(user):
    """Sync mode uploads a local file written with LF line ends: the state holds the file's size and
    hash, the server its CRLF form. That is not damage, with or without --deep."""
    user.append("INBOX", [msg(1)])
    user.write_config('mode = "sync"')
    backup(user)
    (user.maildir / "cur" / "1700000000.M1P1Q1Rcafe.here:2,S").write_bytes(msg(2).replace(b"\r\n", b"\n"))
    backup(user)
    assert len(user.server_messages()["INBOX"]) == 2
    rep = verify(account(user, mode="sync"), user.password, deep=True)
    assert rep.ok, rep.text()
    assert folder(rep).deep_checked == 2 and not folder(rep).size_mismatches


def test_verify_command_line_exit_codes(user):
    from tests.helpers import local_files, msg as _msg
    user.append("INBOX", [_msg(1), _msg(2)])
    assert user.run("sync", "test").returncode == 0
    r = user.run("verify", "test")
    assert r.returncode == 0, r.stdout + r.stderr
    victim = sorted(local_files(user.maildir))[0]
    victim.write_bytes(b"corrupted")
    r = user.run("verify", "test")
    assert r.returncode == 11 and victim.name in r.stdout
