"""The incremental run's fast paths, against the real Dovecot, with mailsync.engine.run called
in-process so the test can see what a run reads: a folder the server changed but the Maildir did
not (cur/ and new/ still carry their recorded stamp) is worked on from the changed UIDs alone,
without listing the folder or loading every record (FolderJob.fast_read); and the run right after
a backup skips every folder without listing it (the stamp is recorded once the directories have
settled, folderjob.local_stamp). Every change a mail reader makes, between runs or during one,
is still seen by the next run."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from mailsync import engine
from mailsync.config import parse
from mailsync.maildir import MaildirFolder
from mailsync.model import Outcome, flags_from_letters, split_name
from mailsync.state import State
from tests.helpers import local_files, msg
from tests.test_backup import check_backup_matches_server


def account(user, mode: str = "backup"):
    return parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file),
                                    "mode": mode}}}, Path("/x.toml")).account("t")


class Spy:
    """Counts what a run reads: folder listings (scan, listing, locate, os.scandir of cur/ or new/) and
    whole-folder state loads (records, keys, flags_by_key); records_of's UIDs."""

    def __init__(self, monkeypatch) -> None:
        self.calls: dict[str, int] = {}
        self.records_of: set[int] = set()
        for owner, name in ((MaildirFolder, "scan"), (MaildirFolder, "listing"), (MaildirFolder, "locate"),
                            (State, "records"), (State, "keys"), (State, "flags_by_key")):
            monkeypatch.setattr(owner, name, self._counted(name, getattr(owner, name)))
        real_scandir = os.scandir

        def scandir(path=".", *a):
            if os.path.basename(os.fspath(path)) in ("cur", "new"):  # (sync lists the root for new folders)
                self.calls["scandir"] = self.calls.get("scandir", 0) + 1
            return real_scandir(path, *a)
        monkeypatch.setattr(os, "scandir", scandir)
        real_of = State.records_of

        def records_of(state, fid, uidvalidity, uids):
            uids = set(uids)
            self.records_of |= uids
            return real_of(state, fid, uidvalidity, uids)
        monkeypatch.setattr(State, "records_of", records_of)

    def _counted(self, name, fn):
        def counted(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **kw)
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.records_of.clear()

    @property
    def listed(self) -> bool:
        return any(self.calls.get(n) for n in ("scan", "listing", "locate", "scandir"))

    @property
    def loaded_all(self) -> bool:
        return any(self.calls.get(n) for n in ("records", "keys", "flags_by_key"))


def run(user, spy: Spy | None = None, mode: str = "backup"):
    if spy is not None:
        spy.reset()
    r = engine.run(account(user, mode), user.password, mode=mode)
    assert not r.failed, [(f.name, f.error) for f in r.failed]
    return {f.name: f for f in r.folders}


def stamps(user) -> dict[str, str | None]:
    db = sqlite3.connect(user.maildir / ".mailsync.db")
    try:
        return dict(db.execute("SELECT name, local_stamp FROM folders").fetchall())
    finally:
        db.close()


def names(root: Path) -> set[str]:
    """Every message file under the Maildir, as subdir/name (listed without the spied scandir)."""
    out = set()
    for p in local_files(root):
        out.add(f"{p.parent.name}/{p.name}")
    return out


def file_of(user, body: bytes) -> Path:
    return next(p for p, b in local_files(user.maildir).items() if b == body)


def set_server_flags(user, folder: str, uids, flags, add: bool = True) -> None:
    c = user.imap()
    try:
        c.select_folder(folder)
        (c.add_flags if add else c.remove_flags)(list(uids), list(flags))
    finally:
        c.logout()


N = 100


@pytest.fixture
def backed_up(user):
    """A 100-message INBOX (and a small Work folder) backed up once."""
    user.append("INBOX", [msg(i) for i in range(1, N + 1)])
    user.append("Work", [msg(1000 + i) for i in range(3)])
    run(user)
    return user


def test_first_no_change_run_after_a_backup_skips_every_folder_without_listing(backed_up, monkeypatch):
    user = backed_up
    assert all(stamps(user).values()), stamps(user)  # recorded by the backup itself
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert {n: f.outcome for n, f in res.items()} == {"INBOX": Outcome.SKIPPED, "Work": Outcome.SKIPPED}
    assert not spy.listed and not spy.loaded_all, spy.calls


def test_flag_changes_rename_only_those_files_without_listing_the_folder(backed_up, monkeypatch):
    user = backed_up
    before = names(user.maildir)
    set_server_flags(user, "INBOX", [5, 17], [b"\\Flagged"])
    set_server_flags(user, "INBOX", [60], [b"\\Seen"])      # new/ -> cur/
    set_server_flags(user, "INBOX", [77], [b"$Label1"])     # a keyword: a dovecot-keywords letter
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert res["INBOX"].flags_changed == 4 and res["INBOX"].outcome is Outcome.OK
    assert res["Work"].outcome is Outcome.SKIPPED
    assert not spy.listed and not spy.loaded_all, spy.calls
    assert spy.records_of == {5, 17, 60, 77}
    after = names(user.maildir)
    assert len(before - after) == 4 and len(after - before) == 4  # exactly those files renamed
    assert {n for n in after - before if n.startswith("cur/")} == {f"cur/{split_name(file_of(user, msg(60)).name)[0]}:2,S"}
    check_backup_matches_server(user)
    # the new stamp was recorded: the next no-change run skips without listing
    assert all(stamps(user).values())
    res = run(user, spy)
    assert res["INBOX"].outcome is Outcome.SKIPPED and not spy.listed, spy.calls
    # and the next flag change takes the fast path again; removing flags too
    set_server_flags(user, "INBOX", [5], [b"\\Flagged"], add=False)
    res = run(user, spy)
    assert res["INBOX"].flags_changed == 1 and not spy.listed and spy.records_of == {5}, spy.calls
    assert "F" not in split_name(file_of(user, msg(5)).name)[1]
    check_backup_matches_server(user)


def test_new_and_expunged_mail_on_the_fast_path(backed_up, monkeypatch):
    """New mail is downloaded (the folder's names are listed once, to match files held already;
    records are not loaded); an expunged message stays in the backup, marked gone."""
    user = backed_up
    user.append("INBOX", [msg(500)])
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([3])
    c.expunge()
    c.logout()
    kept = file_of(user, msg(3))
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert res["INBOX"].new == 1 and res["INBOX"].gone == 1
    assert not spy.calls.get("scan") and not spy.calls.get("records") and not spy.calls.get("flags_by_key"), spy.calls
    assert kept.exists() and file_of(user, msg(500))
    assert all(stamps(user).values())
    res = run(user, spy)
    assert res["INBOX"].outcome is Outcome.SKIPPED and not spy.listed


def test_a_mail_reader_change_between_runs_takes_the_full_path_and_is_kept(backed_up, monkeypatch):
    user = backed_up
    read = file_of(user, msg(1))
    key, info = split_name(read.name)
    mine = read.parent.parent / "cur" / f"{key}:2,{info}FS"  # the reader reads and flags it
    os.rename(read, mine)
    file_of(user, msg(2)).unlink()                            # and deletes another
    set_server_flags(user, "INBOX", [10], [b"\\Answered"])
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert spy.calls.get("scan"), spy.calls                  # the stamp differed: the folder was listed
    assert res["INBOX"].refetched == 1 and res["INBOX"].flags_changed == 1
    assert mine.exists()                                       # backup mode keeps the reader's flags
    assert "R" in split_name(file_of(user, msg(10)).name)[1]
    # in step again: the next server change takes the fast path
    set_server_flags(user, "INBOX", [11], [b"\\Answered"])
    res = run(user, spy)
    assert res["INBOX"].flags_changed == 1 and not spy.calls.get("scan") and spy.records_of == {11}, spy.calls


def reader_change_during_a_fast_run(user, monkeypatch, owner, name: str) -> None:
    """A mail reader deletes a file when the run calls owner.name (for INBOX): the fast run
    records no stamp for INBOX, and the next run lists it and fetches the message again."""
    victim = file_of(user, msg(40))
    real = getattr(owner, name)

    def reader_then(self, *a, **kw):
        if victim.exists() and getattr(getattr(self, "info", None), "name", "INBOX") == "INBOX":
            victim.unlink()
        return real(self, *a, **kw)
    monkeypatch.setattr(owner, name, reader_then)
    set_server_flags(user, "INBOX", [7], [b"\\Flagged"])
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert res["INBOX"].flags_changed == 1 and not spy.calls.get("scan"), spy.calls  # the fast path
    assert stamps(user)["INBOX"] is None
    monkeypatch.setattr(owner, name, real)
    res = run(user, spy)
    assert spy.calls.get("scan") and res["INBOX"].refetched == 1
    assert stamps(user)["INBOX"]  # (and this run's stamp is recorded)
    check_backup_matches_server(user)


def test_a_mail_reader_change_during_a_fast_run_is_seen_by_the_next_run(backed_up, monkeypatch):
    """The run's own renames move cur/'s mtime, so they would hide a reader's change made
    meanwhile (here while it renames another file): the watched events show it."""
    reader_change_during_a_fast_run(backed_up, monkeypatch, MaildirFolder, "retag")


def test_a_mail_reader_change_before_the_end_of_the_run_is_seen_by_the_next_run(backed_up, monkeypatch):
    """A folder the fast path changed has its stamp taken at the end of the run, after the other
    folders' work: a reader's change after its counters were saved is among the watched events."""
    from mailsync.folderjob import FolderJob
    reader_change_during_a_fast_run(backed_up, monkeypatch, FolderJob, "finish_stamp")


def test_a_mail_reader_change_right_after_a_run_is_seen_by_the_next_run(backed_up, monkeypatch):
    """The stamp a run records is taken once cur/ and new/ have settled (folderjob.local_stamp),
    so a change made the moment the run ends still moves their mtime past it."""
    user = backed_up
    set_server_flags(user, "INBOX", [8], [b"\\Flagged"])
    run(user)
    file_of(user, msg(9)).unlink()  # at once
    spy = Spy(monkeypatch)
    res = run(user, spy)
    assert spy.calls.get("scan") and res["INBOX"].refetched == 1
    check_backup_matches_server(user)


def test_sync_mode_sees_a_local_change_made_right_after_a_run(user, monkeypatch):
    user.append("INBOX", [msg(1), msg(2)])
    run(user, mode="sync")
    f = file_of(user, msg(1))
    key, info = split_name(f.name)
    os.rename(f, f.parent.parent / "cur" / f"{key}:2,{info}F")  # at once
    run(user, mode="sync")
    server = user.server_messages()["INBOX"]
    assert any(b == msg(1) and "\\Flagged" in fl for b, fl in server.values()), server
    assert flags_from_letters(split_name(file_of(user, msg(1)).name)[1]) >= {"\\Flagged"}


def test_sync_mode_pulls_server_changes_on_the_fast_path(user, monkeypatch):
    """Two-way: the Maildir is as the last run left it, so the server's flag changes, new mail and
    expunges are applied from the changed UIDs alone; nothing is pushed; the next run skips."""
    user.append("INBOX", [msg(i) for i in range(1, 31)])
    run(user, mode="sync")
    set_server_flags(user, "INBOX", [4, 5], [b"\\Flagged", b"\\Seen"])
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([6])
    c.expunge()
    c.logout()
    spy = Spy(monkeypatch)
    res = run(user, spy, mode="sync")
    assert not spy.calls.get("scan") and not spy.calls.get("records"), spy.calls
    assert spy.records_of == {4, 5, 6}
    assert res["INBOX"].flags_changed == 2 and res["INBOX"].deleted_local == 1 and res["INBOX"].flags_pushed == 0
    assert not any(b == msg(6) for b in local_files(user.maildir).values())
    for n in (4, 5):
        f = file_of(user, msg(n))
        assert f.parent.name == "cur" and flags_from_letters(split_name(f.name)[1]) == {"\\Flagged", "\\Seen"}
    user.append("INBOX", [msg(99)])
    res = run(user, spy, mode="sync")
    assert res["INBOX"].new == 1 and not spy.calls.get("scan") and not spy.calls.get("records"), spy.calls
    res = run(user, spy, mode="sync")
    assert res["INBOX"].outcome is Outcome.SKIPPED and not spy.listed, spy.calls
    server = user.server_messages()["INBOX"]
    assert sorted(b for b, _ in server.values()) == sorted(local_files(user.maildir).values())


def test_sync_mode_local_and_server_changes_together_take_the_full_path(user, monkeypatch):
    user.append("INBOX", [msg(1), msg(2)])
    run(user, mode="sync")
    f = file_of(user, msg(1))
    key, info = split_name(f.name)
    os.rename(f, f.parent.parent / "cur" / f"{key}:2,{info}S")     # read locally
    set_server_flags(user, "INBOX", [1], [b"\\Flagged"])           # flagged on the server
    spy = Spy(monkeypatch)
    run(user, spy, mode="sync")
    assert spy.calls.get("scan")
    server = user.server_messages()["INBOX"]
    assert server[1][1] >= {"\\Seen", "\\Flagged"}
    assert flags_from_letters(split_name(file_of(user, msg(1)).name)[1]) == {"\\Seen", "\\Flagged"}


def test_local_stamp_waits_for_the_timestamp_tick_to_pass(tmp_path, monkeypatch):
    """A stamp is only taken once cur/ and new/ are older than their timestamps' tick: 20 ms where
    mtimes have nanoseconds (waited out, with wait=True), 2 s where they are whole seconds (FAT, some
    NFS: never waited for). The clock is faked; the directories' mtimes are set."""
    from mailsync import folderjob
    for sub in ("cur", "new"):
        (tmp_path / sub).mkdir()
    clock = [0]
    monkeypatch.setattr(folderjob.time, "time_ns", lambda: clock[0])
    monkeypatch.setattr(folderjob.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + int(s * 1e9) + 1))

    def set_mtime(ns):
        for sub in ("cur", "new"):
            os.utime(tmp_path / sub, ns=(ns, ns))

    base = 1_700_000_000 * 10**9
    set_mtime(base + 123_456_789)                      # a fine-grained mtime, 10 ms ago
    clock[0] = base + 123_456_789 + 10_000_000
    assert folderjob.local_stamp(tmp_path) is None
    stamp = folderjob.local_stamp(tmp_path, wait=True)
    assert stamp and clock[0] - (base + 123_456_789) >= folderjob.STAMP_SETTLE_FINE_NS
    set_mtime(base)                                    # whole seconds: a coarse file system
    clock[0] = base + 1_500_000_000
    assert folderjob.local_stamp(tmp_path) is None and folderjob.local_stamp(tmp_path, wait=True) is None
    clock[0] = base + 2_000_000_001
    assert folderjob.local_stamp(tmp_path) == stamp.replace("123456789", "000000000").replace(
        str(base + 123_456_789), str(base))


def test_mirror_mode_on_the_fast_path(user, monkeypatch):
    """Mirror: the server's flag changes and expunges (deleted locally, under the deletion guard)
    from the changed UIDs alone; a file a mail reader reflagged is put back by the full path."""
    user.append("INBOX", [msg(i) for i in range(1, 21)])
    run(user, mode="mirror")
    set_server_flags(user, "INBOX", [2], [b"\\Flagged"])
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([3])
    c.expunge()
    c.logout()
    spy = Spy(monkeypatch)
    res = run(user, spy, mode="mirror")
    assert not spy.listed and not spy.loaded_all and spy.records_of == {2, 3}, spy.calls
    assert res["INBOX"].flags_changed == 1 and res["INBOX"].deleted_local == 1
    check_backup_matches_server(user)
    f = file_of(user, msg(4))
    key, info = split_name(f.name)
    os.rename(f, f.parent / f"{key}:2,{info}T")  # a reader marks it trashed
    set_server_flags(user, "INBOX", [5], [b"\\Answered"])
    res = run(user, spy, mode="mirror")
    assert spy.calls.get("scan") and res["INBOX"].flags_changed == 2
    check_backup_matches_server(user)
    res = run(user, spy, mode="mirror")
    assert res["INBOX"].outcome is Outcome.SKIPPED and not spy.listed, spy.calls


SYSTEM_FLAGS = {"\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted"}


@pytest.mark.parametrize("mode,point", [("backup", "staged:1"), ("backup", "recorded:1"), ("backup", "published:1"),
                                        ("backup", "folder:1"), ("sync", "recorded:1"), ("sync", "published:1"),
                                        ("sync", "folder:1"), ("mirror", "published:1"), ("mirror", "deleted-local:1")])
def test_a_fast_run_killed_at_a_durable_step_then_rerun(user, mode, point):
    """kill -9 at each durable step of a run on the fast path (flags changed, new mail, an expunge
    on the server): the next run completes it, every message once with the server's flags, and
    the run after that has nothing to do."""
    user.write_config(f'mode = "{mode}"')
    user.append("INBOX", [msg(i) for i in range(1, 21)])
    assert user.run("sync", "test").returncode == 0
    set_server_flags(user, "INBOX", [2, 3], [b"\\Flagged"])
    user.append("INBOX", [msg(100), msg(101)])
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([4])
    c.expunge()
    c.logout()
    assert stamps(user)["INBOX"]
    r = user.run("sync", "test", env=user.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, (point, r.stderr)
    if point != "folder:1":  # (killed after its new stamp was recorded)
        assert stamps(user)["INBOX"] is None  # cleared by the fast path (the full path leaves it)
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    server = user.server_messages()["INBOX"]
    files: dict[bytes, list[Path]] = {}
    for p, b in local_files(user.maildir).items():
        files.setdefault(b, []).append(p)
    for body, flags in server.values():
        assert len(files.get(body, [])) == 1, (point, body[:60])
        assert flags_from_letters(split_name(files[body][0].name)[1]) == flags & SYSTEM_FLAGS
    assert set(files) - {b for b, _ in server.values()} == ({msg(4)} if mode == "backup" else set())
    assert not any((user.maildir / "tmp").iterdir())
    r = user.run("sync", "test", "--json")
    assert r.returncode == 0 and '"new": 0' in r.stdout and '"flags_changed": 0' in r.stdout, r.stdout
