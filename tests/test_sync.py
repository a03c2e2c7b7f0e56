"""Two-way sync against the real Dovecot, with its full capabilities and with IMAP4rev1 basics."""

from __future__ import annotations

import json
import os
import time

import pytest

from mailsync.maildir import folder_path
from mailsync.model import join_name, split_name
from tests.helpers import local_files, msg, sha
from tests.test_backup import check_backup_matches_server


@pytest.fixture(params=["full", "basic"])
def su(request, user, basic_user):
    """A mail user in sync mode, on the full server or on the one without CONDSTORE/UIDPLUS."""
    u = user if request.param == "full" else basic_user
    u.write_config('mode = "sync"')
    return u


def run(u, *args, code=0):
    r = u.run("sync", "test", "--json", *args)
    assert r.returncode == code, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else r


def server_flags(u, folder="INBOX"):
    c = u.imap()
    try:
        c.select_folder(folder, readonly=True)
        uids = c.search("ALL")
        return {uid: frozenset(f.decode() for f in d[b"FLAGS"] if f != b"\\Recent")
                for uid, d in (c.fetch(uids, [b"FLAGS"]) if uids else {}).items()}
    finally:
        c.logout()


def set_local_flags(path, letters):
    key, _ = split_name(path.name)
    sub = "cur" if "S" in letters else "new"
    new = path.parent.parent / sub / join_name(key, letters)
    os.rename(path, new)
    return new


def file_of(u, body: bytes):
    return next(p for p, b in local_files(u.maildir).items() if b == body)


def test_flags_both_ways_merge_per_flag(su):
    su.append("INBOX", [msg(1), msg(2)])
    run(su)
    # local: \Seen on message 1; server: \Flagged on message 1 and \Answered on message 2
    set_local_flags(file_of(su, msg(1)), "S")
    c = su.imap()
    c.select_folder("INBOX")
    c.add_flags([1], [b"\\Flagged"])
    c.add_flags([2], [b"\\Answered"])
    c.logout()
    s = run(su)
    assert s["totals"]["conflicts"] == 0
    assert server_flags(su) == {1: {"\\Seen", "\\Flagged"}, 2: {"\\Answered"}}
    assert split_name(file_of(su, msg(1)).name)[1] == "FS"
    assert file_of(su, msg(1)).parent.name == "cur"
    assert split_name(file_of(su, msg(2)).name)[1] == "R"
    # a second sync plans and changes nothing
    s = run(su)
    t = s["totals"]
    assert (t["new"], t["uploaded"], t["flags_pushed"], t["flags_changed"], t["deleted_local"],
            t["deleted_remote"]) == (0, 0, 0, 0, 0, 0)
    check_backup_matches_server(su)


def test_offline_written_message_is_uploaded_once(su):
    su.append("INBOX", [msg(1)])
    run(su)
    # a mail client writes a new message (bare LF, as on Unix) straight into cur/
    data = b"From: me@example.com\nSubject: written offline\nMessage-ID: <offline1@example.com>\n\nhello\n"
    p = su.maildir / "cur" / "1700000000.offline1.host:2,S"
    p.write_bytes(data)
    os.utime(p, (1600000000, 1600000000))
    s = run(su)
    assert s["totals"]["uploaded"] == 1
    c = su.imap()
    c.select_folder("INBOX", readonly=True)
    uids = c.search("ALL")
    got = c.fetch(uids, [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"])
    c.logout()
    bodies = [d[b"BODY[]"] for d in got.values()]
    assert data.replace(b"\n", b"\r\n") in bodies
    up = next(d for d in got.values() if d[b"BODY[]"] == data.replace(b"\n", b"\r\n"))
    assert b"\\Seen" in up[b"FLAGS"]
    assert abs(up[b"INTERNALDATE"].timestamp() - 1600000000) < 2 if up[b"INTERNALDATE"].tzinfo else True
    # nothing comes back down as a duplicate, and nothing is uploaded again
    s = run(su)
    assert s["totals"]["new"] == s["totals"]["uploaded"] == 0
    assert len(local_files(su.maildir)) == 2


def test_deletions_both_ways(su):
    su.append("INBOX", [msg(i) for i in range(1, 11)])
    run(su)
    file_of(su, msg(3)).unlink()   # deleted locally
    c = su.imap()
    c.select_folder("INBOX")
    c.delete_messages([5])         # expunged on the server
    c.expunge()
    c.logout()
    s = run(su)
    assert s["totals"]["deleted_remote"] == 1 and s["totals"]["deleted_local"] == 1
    bodies = {sha(b) for b in local_files(su.maildir).values()}
    assert sha(msg(5)) not in bodies and len(bodies) == 8
    srv = su.server_messages()["INBOX"]
    assert {sha(b) for b, _ in srv.values()} == bodies
    assert run(su)["totals"]["deleted_remote"] == 0


def test_mass_deletion_trips_the_guard(su):
    su.append("INBOX", [msg(i) for i in range(1, 21)])
    run(su)
    files = sorted(local_files(su.maildir))
    for p in files[:8]:
        p.unlink()
    r = su.run("sync", "test")
    assert r.returncode == 10, r.stderr
    assert "would delete 8 of 20" in r.stderr and "--force" in r.stderr
    assert len(su.server_messages()["INBOX"]) == 20  # nothing deleted on the server
    # --dry-run shows the plan and changes nothing
    r = su.run("sync", "test", "--dry-run", "--force")
    assert r.returncode == 0 and "delete on server (removed locally): 8" in r.stdout
    assert len(su.server_messages()["INBOX"]) == 20
    r = su.run("sync", "test", "--force")
    assert r.returncode == 0, r.stderr
    assert len(su.server_messages()["INBOX"]) == 12


def test_missing_local_folder_is_never_read_as_delete_everything(su):
    import shutil
    su.append("Work", [msg(i) for i in range(3)])
    run(su)
    work = folder_path(su.maildir, ["Work"], "maildir++", False)
    shutil.rmtree(work)
    r = su.run("sync", "test")
    assert r.returncode == 0 and "missing" in r.stderr, r.stderr
    assert len(su.server_messages()["Work"]) == 3  # nothing deleted on the server
    assert len(local_files(work)) == 3             # and the folder is back
    # an emptied (but present) folder trips the guard instead
    for p in local_files(work):
        p.unlink()
    r = su.run("sync", "test")
    assert r.returncode == 10 and "would delete all 3" in r.stderr
    assert len(su.server_messages()["Work"]) == 3


def test_new_folders_are_created_on_both_sides(su):
    su.append("FromServer", [msg(1)])
    local = folder_path(su.maildir, ["Local Only", "Sub"], "maildir++", False)
    for d in ("cur", "new", "tmp"):
        (local / d).mkdir(parents=True)
    (local / "cur" / "1700000001.x.host:2,S").write_bytes(msg(2))
    s = run(su)
    assert "Local Only/Sub" in s["created_on_server"]
    srv = su.server_messages()
    assert "Local Only/Sub" in srv and len(srv["Local Only/Sub"]) == 1
    assert (folder_path(su.maildir, ["FromServer"], "maildir++", False) / "new").is_dir()
    check_backup_matches_server(su)


def test_no_change_sync_changes_nothing(su):
    su.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen"])
    su.append("Other", [msg(3)])
    run(su)
    run(su)  # settles the counters after our own first-run changes
    snap = {p: p.stat().st_mtime_ns for p in local_files(su.maildir)}
    srv = su.server_messages()
    s = run(su)
    t = s["totals"]
    assert (t["new"], t["uploaded"], t["flags_pushed"], t["flags_changed"]) == (0, 0, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in local_files(su.maildir)} == snap
    assert su.server_messages() == srv


def test_concurrent_change_on_server_is_not_overwritten(user):
    """UNCHANGEDSINCE: a flag change another client makes after we read the flags survives."""
    from pathlib import Path

    from mailsync.config import parse
    from mailsync.imap import ImapSession

    user.append("INBOX", [msg(1)])
    cfg = parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file)}}},
                Path("/x.toml"))
    s = ImapSession(cfg.account("t"), user.password)
    try:
        sel = s.select("INBOX")
        other = user.imap()
        other.select_folder("INBOX")
        other.add_flags([1], [b"\\Answered"])   # another client, after our SELECT
        other.logout()
        refused = s.store([1], frozenset({"\\Seen"}), frozenset(), sel["highestmodseq"])
    finally:
        s.close()
    assert refused == {1}
    assert server_flags(user)[1] == {"\\Answered"}


@pytest.mark.parametrize("point", ["upload-journaled:1", "appended:1", "expunged:1", "published:1", "recorded:1"])
def test_kill_during_sync_then_rerun_gives_same_end_state(su, point):
    su.append("INBOX", [msg(i) for i in range(1, 6)])
    run(su)
    # changes on both sides: a new local message, a local deletion, a new server message
    (su.maildir / "new" / "1700000009.local.host:2,").write_bytes(msg(50))
    file_of(su, msg(2)).unlink()
    su.append("INBOX", [msg(60)])
    r = su.run("sync", "test", env=su.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode in (0, 137), r.stderr
    s = run(su)
    run(su)
    files = local_files(su.maildir)
    srv = su.server_messages()["INBOX"]
    want = {sha(m) for m in (msg(1), msg(3), msg(4), msg(5), msg(50), msg(60))}
    srv_hashes = sorted(sha(b.replace(b"\r\n", b"\n")) if False else sha(b) for b, _ in srv.values())
    assert sorted(sha(b) for b in files.values()) == sorted(want), point
    assert srv_hashes == sorted(want), point


def test_qresync_select_reports_changes_and_expunges_in_one_round_trip(user):
    from pathlib import Path

    from mailsync.config import parse
    from mailsync.imap import ImapSession

    user.append("INBOX", [msg(i) for i in range(1, 6)])
    c = user.imap()
    st = c.folder_status("INBOX", [b"UIDVALIDITY", b"HIGHESTMODSEQ"])
    c.select_folder("INBOX")
    c.add_flags([2], [b"\\Flagged"])
    c.delete_messages([4])
    c.expunge()
    c.logout()
    cfg = parse({"accounts": {"t": {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
                                    "maildir": str(user.maildir), "ca_file": str(user.server.ca_file)}}},
                Path("/x.toml"))
    s = ImapSession(cfg.account("t"), user.password)
    try:
        assert s.qresync
        counters, changed, vanished = s.select_qresync("INBOX", st[b"UIDVALIDITY"], st[b"HIGHESTMODSEQ"], True)
        assert vanished == {4}
        assert changed[2][0] == frozenset({"\\Flagged"})
        assert counters["exists"] == 4
        # the session is usable afterwards (state SELECTED)
        assert set(s.new_messages(1)) == {1, 2, 3, 5}
    finally:
        s.close()


def test_create_server_only_leaves_server_folders_alone_locally(user):
    user.append("OnlyOnServer", [msg(1)])
    user.write_config('mode = "sync"\ncreate = "server"')
    s = run(user)
    assert not folder_path(user.maildir, ["OnlyOnServer"], "maildir++", False).exists()
    assert any("not created locally" in n for f in s["folders"] for n in f["notices"])


def test_keywords_sync_both_ways_through_dovecot_keywords(su):
    from mailsync.maildir import KeywordMap
    su.append("INBOX", [msg(1), msg(2)], flags=[b"$Work"])
    run(su)
    kw = KeywordMap(su.maildir)
    assert "$Work" in kw.index  # Dovecot's dovecot-keywords format
    # locally: drop $Work from message 1 and add a new keyword known to the map
    p1 = file_of(su, msg(1))
    letter = chr(97 + kw.index["$Work"])
    set_local_flags(p1, split_name(p1.name)[1].replace(letter, ""))
    # on the server: add $Later to message 2
    c = su.imap()
    c.select_folder("INBOX")
    c.add_flags([2], [b"$Later"])
    c.logout()
    run(su)
    c = su.imap()
    c.select_folder("INBOX", readonly=True)
    got = {u: {f.decode() for f in d[b"FLAGS"]} for u, d in c.fetch([1, 2], [b"FLAGS"]).items()}
    c.logout()
    assert "$Work" not in got[1]
    assert {"$Work", "$Later"} <= got[2]
    kw = KeywordMap(su.maildir)
    info2 = split_name(file_of(su, msg(2)).name)[1]
    assert kw.keywords(info2) == {"$Work", "$Later"}
    s = run(su)
    assert s["totals"]["flags_pushed"] == s["totals"]["flags_changed"] == 0


def test_uidvalidity_change_in_sync_duplicates_nothing(su):
    su.append("Work", [msg(i) for i in range(1, 5)])
    run(su)
    c = su.imap()
    c.delete_folder("Work")
    c.logout()
    su.append("Work", [msg(i) for i in range(1, 5)] + [msg(9)])  # re-created: new UIDVALIDITY
    r = su.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    run(su)
    work = folder_path(su.maildir, ["Work"], "maildir++", False)
    assert sorted(sha(b) for b in local_files(work).values()) == sorted(sha(msg(i)) for i in (1, 2, 3, 4, 9))
    assert sorted(sha(b) for b, _ in su.server_messages()["Work"].values()) == \
        sorted(sha(msg(i)) for i in (1, 2, 3, 4, 9))


def test_lost_state_in_sync_duplicates_nothing(su):
    su.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen"])
    run(su)
    (su.maildir / "new" / "1700000000.mine.host:2,F").write_bytes(msg(3))  # and one offline message
    for p in su.maildir.glob(".mailsync.db*"):
        p.unlink()
    run(su)
    run(su)
    assert sorted(sha(b) for b in local_files(su.maildir).values()) == sorted(sha(msg(i)) for i in (1, 2, 3))
    assert sorted(sha(b) for b, _ in su.server_messages()["INBOX"].values()) == \
        sorted(sha(msg(i)) for i in (1, 2, 3))


def test_switching_a_backup_to_sync_does_not_resurrect_expunged_mail(user):
    user.append("INBOX", [msg(1), msg(2)])
    assert user.run("sync", "test").returncode == 0            # mode backup
    c = user.imap()
    c.select_folder("INBOX")
    c.delete_messages([1])
    c.expunge()
    c.logout()
    assert user.run("sync", "test").returncode == 0            # backup keeps msg 1 locally
    user.write_config('mode = "sync"')
    s = run(user)
    assert s["totals"]["uploaded"] == 0
    assert [sha(b) for b, _ in user.server_messages()["INBOX"].values()] == [sha(msg(2))]
    assert len(local_files(user.maildir)) == 2                  # the archived copy stays


def test_add_one_flag_and_remove_another_in_one_change(su):
    su.append("INBOX", [msg(1)], flags=[b"\\Seen"])
    run(su)
    set_local_flags(file_of(su, msg(1)), "F")  # -\Seen +\Flagged
    r = su.run("sync", "test", "--json")
    assert r.returncode == 0 and "changed on the server" not in r.stderr
    assert server_flags(su) == {1: {"\\Flagged"}}


def test_dry_run_changes_nothing_and_shows_the_plan(su):
    import shutil
    su.append("INBOX", [msg(1), msg(2)])
    su.append("Work", [msg(3)])
    run(su)
    file_of(su, msg(1)).unlink()
    (su.maildir / "cur" / "1700000000.x.host:2,S").write_bytes(msg(7))
    shutil.rmtree(folder_path(su.maildir, ["Work"], "maildir++", False))
    local = folder_path(su.maildir, ["New Local"], "maildir++", False)
    for d in ("cur", "new", "tmp"):
        (local / d).mkdir(parents=True)
    before_srv = su.server_messages()
    before_local = local_files(su.maildir)
    r = su.run("sync", "test", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "upload to server: 1" in r.stdout and "delete on server (removed locally): 1" in r.stdout
    assert "create folder on server: New Local" in r.stdout
    assert "Work" in r.stdout and "download from server: 1" in r.stdout  # the missing folder comes back
    assert su.server_messages() == before_srv
    assert local_files(su.maildir) == before_local
    r = su.run("sync", "test", "--dry-run", "--mode", "backup")
    assert r.returncode == 2 and "--dry-run" in r.stderr


def test_without_uidplus_other_deleted_messages_are_not_expunged(basic_user):
    u = basic_user
    u.write_config('mode = "sync"')
    u.append("INBOX", [msg(1), msg(2), msg(3)])
    run(u)
    other = u.imap()
    other.select_folder("INBOX")
    other.add_flags([3], [b"\\Deleted"])  # someone else's pending deletion
    file_of(u, msg(1)).unlink()
    r = u.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert "UIDPLUS" in r.stderr
    assert len(u.server_messages()["INBOX"]) == 3  # nothing expunged behind the other client's back
    other.remove_flags([3], [b"\\Deleted"])
    other.logout()
    s = run(u)
    assert s["totals"]["deleted_remote"] == 1
    assert sorted(sha(b) for b, _ in u.server_messages()["INBOX"].values()) == sorted([sha(msg(2)), sha(msg(3))])
    assert len(local_files(u.maildir)) == 2


def test_local_changes_after_a_skipped_run_still_reach_the_server(su):
    """The no-change fast path (cur/ and new/ unchanged since last found in step) never hides a
    local flag change or deletion made afterwards, even one that keeps the directory's mtime."""
    from tests.test_backup import age_dirs
    su.append("INBOX", [msg(1), msg(2), msg(3)])
    run(su)
    age_dirs(su.maildir)
    run(su)  # in step: the stamp is recorded
    set_local_flags(file_of(su, msg(1)), "FS")
    file_of(su, msg(2)).unlink()
    age_dirs(su.maildir, seconds=5)
    s = run(su)
    assert s["totals"]["flags_pushed"] == 1 and s["totals"]["deleted_remote"] == 1, s["totals"]
    flags = server_flags(su)
    assert sorted(map(sorted, flags.values())) == [[], ["\\Flagged", "\\Seen"]]
