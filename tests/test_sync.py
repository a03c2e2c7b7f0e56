"""Two-way sync against the real Dovecot, with its full capabilities and with IMAP4rev1 basics."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

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


def hashes(bodies) -> list[str]:
    """SHA-256 of each message, sorted: a duplicate or a missing message changes the list."""
    return sorted(sha(b) for b in bodies)


def server_hashes(u, folder="INBOX") -> list[str]:
    return hashes(b for b, _ in u.server_messages()[folder].values())


def server_content(u, folder="INBOX") -> list[tuple[str, frozenset]]:
    """(SHA-256, flags) of every message in a server folder, sorted (UIDs left out)."""
    return sorted(((sha(b), f) for b, f in u.server_messages()[folder].values()), key=_order)


def content(*pairs) -> list[tuple[str, frozenset]]:
    """What server_content must return for these (message, flags) pairs."""
    return sorted(((sha(m), frozenset(f)) for m, f in pairs), key=_order)


def _order(item):
    return item[0], sorted(item[1])


QUIET = ("new", "restored", "flags_changed", "uploaded", "flags_pushed", "deleted_local", "deleted_remote",
         "conflicts", "failed_folders")


def assert_next_run_changes_nothing(u):
    """Another sync plans nothing and changes nothing on either side (UIDs, bytes, flags, files)."""
    srv, files = u.server_messages(), local_files(u.maildir)
    t = run(u)["totals"]
    assert {k: t[k] for k in QUIET} == dict.fromkeys(QUIET, 0), t
    assert u.server_messages() == srv
    assert local_files(u.maildir) == files


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
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)  # a second sync plans and changes nothing


def test_local_new_message_is_uploaded_once_with_flags_and_date(su):
    su.append("INBOX", [msg(1)])
    run(su)
    # a mail client writes a new message (bare LF, as on Unix) straight into cur/
    data = b"From: me@example.com\nSubject: written offline\nMessage-ID: <offline1@example.com>\n\nhello\n"
    wire = data.replace(b"\n", b"\r\n")  # IMAP needs CRLF: what the server must hold
    p = su.maildir / "cur" / "1700000000.offline1.host:2,S"
    p.write_bytes(data)
    os.utime(p, (1600000000, 1600000000))
    s = run(su)
    assert s["totals"]["uploaded"] == 1 and s["totals"]["new"] == 0, s["totals"]
    c = su.imap()
    c.normalise_times = False  # INTERNALDATE as the server says it, with its zone (not naive local time)
    c.select_folder("INBOX", readonly=True)
    got = c.fetch(c.search("ALL"), [b"BODY.PEEK[]", b"FLAGS", b"INTERNALDATE"])
    c.logout()
    assert hashes(d[b"BODY[]"] for d in got.values()) == hashes([msg(1), wire])  # uploaded once
    up = next(d for d in got.values() if d[b"BODY[]"] == wire)
    assert {f for f in up[b"FLAGS"] if f != b"\\Recent"} == {b"\\Seen"}
    date = up[b"INTERNALDATE"]
    assert date.tzinfo is not None and date == datetime.fromtimestamp(1600000000, timezone.utc), date
    # the local file is left as it was (not rewritten to CRLF, not renamed)
    assert p.read_bytes() == data
    assert hashes(local_files(su.maildir).values()) == hashes([msg(1), data])
    # nothing comes back down as a duplicate, and nothing is uploaded again
    assert_next_run_changes_nothing(su)


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
    want = hashes(msg(i) for i in (1, 2, 4, 6, 7, 8, 9, 10))
    assert hashes(local_files(su.maildir).values()) == want
    assert server_hashes(su) == want
    assert_next_run_changes_nothing(su)


def test_mass_deletion_trips_the_guard(su):
    su.append("INBOX", [msg(i) for i in range(1, 21)])
    run(su)
    before = su.server_messages()
    files = sorted(local_files(su.maildir).items())
    for p, _ in files[:8]:
        p.unlink()
    kept = hashes(b for _, b in files[8:])
    r = su.run("sync", "test")
    assert r.returncode == 10, r.stderr
    assert "would delete 8 of 20" in r.stderr and "--force" in r.stderr
    assert su.server_messages() == before  # nothing deleted (or changed) on the server
    assert hashes(local_files(su.maildir).values()) == kept  # nor downloaded again
    # --dry-run shows the plan and changes nothing
    r = su.run("sync", "test", "--dry-run", "--force")
    assert r.returncode == 0 and "delete on server (removed locally): 8" in r.stdout
    assert su.server_messages() == before
    r = su.run("sync", "test", "--force")
    assert r.returncode == 0, r.stderr
    assert server_hashes(su) == kept  # exactly the 8 removed locally are gone
    assert hashes(local_files(su.maildir).values()) == kept


def test_missing_local_folder_is_never_read_as_delete_everything(su):
    import shutil
    su.append("Work", [msg(i) for i in range(3)])
    run(su)
    work = folder_path(su.maildir, ["Work"], "maildir++", False)
    before = su.server_messages()
    three = hashes(msg(i) for i in range(3))
    shutil.rmtree(work)
    r = su.run("sync", "test")
    assert r.returncode == 0 and "missing" in r.stderr, r.stderr
    assert su.server_messages() == before            # nothing deleted on the server
    assert hashes(local_files(work).values()) == three  # and the folder is back, each message once
    check_backup_matches_server(su)
    # an emptied (but present) folder trips the guard instead
    for p in local_files(work):
        p.unlink()
    r = su.run("sync", "test")
    assert r.returncode == 10 and "would delete all 3" in r.stderr
    assert su.server_messages() == before
    assert local_files(work) == {}


def test_new_folders_are_created_on_both_sides(su):
    su.append("FromServer", [msg(1)])
    local = folder_path(su.maildir, ["Local Only", "Sub"], "maildir++", False)
    for d in ("cur", "new", "tmp"):
        (local / d).mkdir(parents=True)
    (local / "cur" / "1700000001.x.host:2,S").write_bytes(msg(2))
    s = run(su)
    assert s["created_on_server"] == ["Local Only/Sub"]
    assert server_content(su, "Local Only/Sub") == content((msg(2), {"\\Seen"}))
    server_only = folder_path(su.maildir, ["FromServer"], "maildir++", False)
    assert hashes(local_files(server_only).values()) == hashes([msg(1)])
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
    assert {k: t[k] for k in QUIET} == dict.fromkeys(QUIET, 0), t
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


@pytest.mark.parametrize("point", ["upload-journaled:1", "appended:1", "marked-deleted:1", "expunged:1",
                                   "published:1", "recorded:1"])
def test_kill_during_sync_then_rerun_gives_same_end_state(su, point):
    """Killed at a crash point (on the full server and on the IMAP4rev1-only one, through `su`),
    then run again: both sides hold exactly the expected messages, each once, without flags."""
    su.append("INBOX", [msg(i) for i in range(1, 6)])
    run(su)
    # changes on both sides: a new local message, a local deletion, a new server message
    (su.maildir / "new" / "1700000009.local.host:2,").write_bytes(msg(50))
    file_of(su, msg(2)).unlink()
    su.append("INBOX", [msg(60)])
    r = su.run("sync", "test", env=su.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, f"{point} was not reached (exit {r.returncode}): {r.stderr}"
    run(su)
    want = hashes(msg(i) for i in (1, 3, 4, 5, 50, 60))
    assert hashes(local_files(su.maildir).values()) == want, point
    assert server_content(su) == content(*((msg(i), ()) for i in (1, 3, 4, 5, 50, 60))), point
    assert not list((su.maildir / "tmp").iterdir())
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)


# -- conflict: one side deleted a message, the other changed its flags (configuration.md#conflict)

def sync_config(u, conflict: str | None) -> None:
    u.write_config('mode = "sync"' + (f'\nconflict = "{conflict}"' if conflict else ""))


def expunged_on_server_flagged_locally(u, conflict: str | None):
    """Three read messages synced; then message 2 is flagged locally and expunged on the server
    (UID 2). Returns the sync's JSON summary, its stderr and the path of message 2's file."""
    sync_config(u, conflict)
    u.append("INBOX", [msg(1), msg(2), msg(3)], flags=[b"\\Seen"])
    run(u)
    p = set_local_flags(file_of(u, msg(2)), "FS")
    c = u.imap()
    c.select_folder("INBOX")
    c.delete_messages([2])
    c.expunge()
    c.logout()
    r = u.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr, p


def removed_locally_flagged_on_server(u, conflict: str | None):
    """Three unread messages synced; then message 2's file is removed locally and the message is
    flagged on the server (UID 2). Returns the sync's JSON summary and its stderr."""
    sync_config(u, conflict)
    u.append("INBOX", [msg(1), msg(2), msg(3)])
    run(u)
    file_of(u, msg(2)).unlink()
    c = u.imap()
    c.select_folder("INBOX")
    c.add_flags([2], [b"\\Flagged"])
    c.logout()
    r = u.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def check_uploaded_again(u, s, err, p):
    """conflict = local / union: the file is kept and its message uploaded again under a new UID,
    with the flags the file has."""
    assert "mailsync: conflict: INBOX: UID 2: expunged on the server, flags changed locally; " \
           "kept and uploaded again" in err, err
    t = s["totals"]
    assert (t["conflicts"], t["uploaded"], t["deleted_local"], t["deleted_remote"], t["new"]) == (1, 1, 0, 0, 0), t
    srv = u.server_messages()["INBOX"]
    assert server_content(u) == content((msg(1), {"\\Seen"}), (msg(2), {"\\Seen", "\\Flagged"}),
                                        (msg(3), {"\\Seen"}))
    [(uid, _)] = [(uid, b) for uid, (b, _) in srv.items() if b == msg(2)]
    assert uid > 3  # a new UID: expunged UIDs are never reused
    assert p.read_bytes() == msg(2)  # the same file, untouched, still flagged and read
    assert hashes(local_files(u.maildir).values()) == hashes([msg(1), msg(2), msg(3)])
    check_backup_matches_server(u)
    assert_next_run_changes_nothing(u)


def test_conflict_server_removes_locally_what_the_server_expunged(su):
    """The default policy (no `conflict` key): the server's expunge wins over the local flag change."""
    s, err, p = expunged_on_server_flagged_locally(su, None)
    assert "mailsync: conflict: INBOX: UID 2: expunged on the server, flags changed locally; " \
           "removed (conflict = server)" in err, err
    t = s["totals"]
    assert (t["conflicts"], t["deleted_local"], t["uploaded"], t["deleted_remote"], t["new"]) == (1, 1, 0, 0, 0), t
    assert not p.exists()
    assert hashes(local_files(su.maildir).values()) == hashes([msg(1), msg(3)])
    assert server_content(su) == content((msg(1), {"\\Seen"}), (msg(3), {"\\Seen"}))
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)


def test_conflict_local_uploads_again_what_the_server_expunged(su):
    check_uploaded_again(su, *expunged_on_server_flagged_locally(su, "local"))


def test_conflict_union_uploads_again_what_the_server_expunged(su):
    check_uploaded_again(su, *expunged_on_server_flagged_locally(su, "union"))


def check_downloaded_again(u, s, err):
    """conflict = server / union: the message stays on the server (same UID, its new flags) and
    comes back into the Maildir with those flags."""
    assert "mailsync: conflict: INBOX: UID 2: removed locally, flags changed on the server; " \
           "kept and downloaded again" in err, err
    t = s["totals"]
    assert (t["conflicts"], t["restored"], t["deleted_remote"], t["deleted_local"], t["uploaded"], t["new"]) \
        == (1, 1, 0, 0, 0, 0), t
    assert u.server_messages()["INBOX"][2] == (msg(2), frozenset({"\\Flagged"}))
    assert server_content(u) == content((msg(1), ()), (msg(2), {"\\Flagged"}), (msg(3), ()))
    assert hashes(local_files(u.maildir).values()) == hashes([msg(1), msg(2), msg(3)])
    p = file_of(u, msg(2))
    assert p.parent.name == "new" and split_name(p.name)[1] == "F"
    check_backup_matches_server(u)
    assert_next_run_changes_nothing(u)


def test_conflict_server_downloads_again_what_was_removed_locally(su):
    """The default policy (no `conflict` key): the server's flag change wins over the local removal."""
    check_downloaded_again(su, *removed_locally_flagged_on_server(su, None))


def test_conflict_union_downloads_again_what_was_removed_locally(su):
    check_downloaded_again(su, *removed_locally_flagged_on_server(su, "union"))


def test_conflict_local_deletes_on_the_server_what_was_removed_locally(su):
    s, err = removed_locally_flagged_on_server(su, "local")
    assert "mailsync: conflict: INBOX: UID 2: removed locally, flags changed on the server; " \
           "deleted on the server (conflict = local)" in err, err
    t = s["totals"]
    assert (t["conflicts"], t["deleted_remote"], t["restored"], t["deleted_local"], t["uploaded"], t["new"]) \
        == (1, 1, 0, 0, 0, 0), t
    assert server_content(su) == content((msg(1), ()), (msg(3), ()))  # expunged, not just marked
    assert hashes(local_files(su.maildir).values()) == hashes([msg(1), msg(3)])
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)


@pytest.mark.parametrize("conflict,point", [("local", "upload-journaled:1"), ("local", "appended:1"),
                                            ("union", "appended:1")])
def test_conflict_upload_again_killed_then_rerun_uploads_once(su, conflict, point):
    """A run killed while it uploads again what the server expunged (the uploads journal holds
    it) ends, after a re-run, like an uninterrupted one: the message on the server once."""
    sync_config(su, conflict)
    su.append("INBOX", [msg(1), msg(2), msg(3)], flags=[b"\\Seen"])
    run(su)
    p = set_local_flags(file_of(su, msg(2)), "FS")
    c = su.imap()
    c.select_folder("INBOX")
    c.delete_messages([2])
    c.expunge()
    c.logout()
    r = su.run("sync", "test", env=su.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, f"{point} was not reached (exit {r.returncode}): {r.stderr}"
    run(su)
    assert server_content(su) == content((msg(1), {"\\Seen"}), (msg(2), {"\\Seen", "\\Flagged"}),
                                         (msg(3), {"\\Seen"}))
    assert p.read_bytes() == msg(2)
    assert hashes(local_files(su.maildir).values()) == hashes([msg(1), msg(2), msg(3)])
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)


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
    before = user.server_messages()
    s = run(user)
    assert not folder_path(user.maildir, ["OnlyOnServer"], "maildir++", False).exists()
    [f] = [f for f in s["folders"] if f["name"] == "OnlyOnServer"]
    assert any("not created locally" in n for n in f["notices"]), f
    assert user.server_messages() == before


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
    assert server_flags(su) == {1: frozenset(), 2: {"$Work", "$Later"}}
    kw = KeywordMap(su.maildir)
    assert kw.keywords(split_name(file_of(su, msg(1)).name)[1]) == set()
    assert kw.keywords(split_name(file_of(su, msg(2)).name)[1]) == {"$Work", "$Later"}
    check_backup_matches_server(su)
    assert_next_run_changes_nothing(su)


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
    """Without a state, each message on both sides is bound to its file (by Message-ID and size,
    or by content when it has no Message-ID), keeping the union of both sides' flags."""
    noid = b"From: a@example.com\r\nSubject: no Message-ID\r\n\r\nbound by content\r\n"
    su.append("INBOX", [msg(1), msg(2), noid], flags=[b"\\Seen"])
    run(su)
    (su.maildir / "new" / "1700000000.mine.host:2,F").write_bytes(msg(3))  # and one offline message
    set_local_flags(file_of(su, msg(1)), "FS")
    set_local_flags(file_of(su, noid), "FS")
    c = su.imap()
    c.select_folder("INBOX")
    c.add_flags([2, 3], [b"\\Answered"])
    c.logout()
    for p in su.maildir.glob(".mailsync.db*"):
        p.unlink()
    run(su)
    run(su)
    assert hashes(local_files(su.maildir).values()) == hashes([msg(1), msg(2), msg(3), noid])
    assert server_content(su) == content((msg(1), {"\\Seen", "\\Flagged"}), (msg(2), {"\\Seen", "\\Answered"}),
                                         (noid, {"\\Seen", "\\Flagged", "\\Answered"}), (msg(3), {"\\Flagged"}))
    check_backup_matches_server(su)  # the same flags in the file names
    assert_next_run_changes_nothing(su)


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
    assert server_hashes(user) == hashes([msg(2)])
    assert hashes(local_files(user.maildir).values()) == hashes([msg(1), msg(2)])  # the archived copy stays
    assert_next_run_changes_nothing(user)


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
    # nothing expunged behind the other client's back: ours is only marked, theirs is untouched
    assert server_content(u) == content((msg(1), {"\\Deleted"}), (msg(2), ()), (msg(3), {"\\Deleted"}))
    other.remove_flags([3], [b"\\Deleted"])
    other.logout()
    s = run(u)
    assert s["totals"]["deleted_remote"] == 1
    assert server_content(u) == content((msg(2), ()), (msg(3), ()))
    assert hashes(local_files(u.maildir).values()) == hashes([msg(2), msg(3)])
    assert_next_run_changes_nothing(u)


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
    assert server_flags(su) == {1: {"\\Flagged", "\\Seen"}, 3: frozenset()}  # UID 2 (message 2) is gone
    assert server_hashes(su) == hashes([msg(1), msg(3)])
