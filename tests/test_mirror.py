"""mode = "mirror": the Maildir follows the server. New mail and flags come down, what the server
expunged goes locally (under the deletion guard), local flag changes are put back, a file
deleted locally comes back; the server is never changed. On the full Dovecot and on the
IMAP4rev1-only one."""

from __future__ import annotations

import os

import pytest

from tests.helpers import local_files, msg, sha
from tests.test_backup import check_backup_matches_server


@pytest.fixture(params=["full", "basic"])
def mu(request, dovecot, basic_dovecot, tmp_path):
    from tests.conftest import _ids
    from tests.helpers import MailUser
    server = dovecot if request.param == "full" else basic_dovecot
    u = MailUser.create(server, f"m{request.param[0]}{os.getpid()}x{next(_ids)}", tmp_path)
    u.write_config('mode = "mirror"')
    return u


def file_of(u, data: bytes):
    hits = [p for p, b in local_files(u.maildir).items() if b == data]
    assert len(hits) == 1, f"{len(hits)} files hold this message"
    return hits[0]


def run(u, *extra, code=0, env=None):
    r = u.run("sync", "test", "--json", *extra, env=env)
    assert r.returncode == code, r.stderr
    return r


def totals(r):
    import json
    return json.loads(r.stdout)["totals"]


def expunge(u, folder, data_list):
    c = u.imap()
    c.select_folder(folder)
    uids = [uid for uid, d in c.fetch(c.search("ALL"), [b"BODY.PEEK[]"]).items() if d[b"BODY[]"] in data_list]
    assert len(uids) == len(data_list)
    c.delete_messages(uids)
    c.expunge()
    c.logout()


def test_mirror_follows_the_server_and_never_changes_it(mu):
    mu.append("INBOX", [msg(i) for i in range(1, 11)])
    mu.append("INBOX", [msg(11)], flags=[b"\\Seen"])
    run(mu)
    # locally: a flag added by a mail client, a file deleted, a file the server never had
    p1 = file_of(mu, msg(1))
    p1.rename(p1.with_name(p1.name.split(":2,")[0] + ":2,F"))
    file_of(mu, msg(2)).unlink()
    mine = mu.maildir / "cur" / "1700000000.mine.host:2,S"
    mine.write_bytes(b"From: me\nSubject: only here\n\nhello\n")
    # on the server: an expunge and a flag change
    expunge(mu, "INBOX", [msg(3)])
    c = mu.imap()
    c.select_folder("INBOX")
    uid4 = next(u for u, d in c.fetch(c.search("ALL"), [b"BODY.PEEK[]"]).items() if d[b"BODY[]"] == msg(4))
    c.add_flags([uid4], [b"\\Answered"])
    c.logout()
    before = mu.server_messages()
    t = totals(run(mu))
    assert mu.server_messages() == before  # the server is never changed
    assert t["deleted_local"] == 1 and t["restored"] == 1 and t["uploaded"] == 0
    assert t["flags_changed"] == 2  # msg(4) pulled, msg(1) put back
    files = local_files(mu.maildir)
    assert mine in files  # what the server never had is left alone
    del files[mine]
    mine.unlink()
    check_backup_matches_server(mu)  # every server message once, with the server's flags; msg(3) gone
    assert sha(msg(3)) not in {sha(b) for b in files.values()}
    mine.write_bytes(b"From: me\nSubject: only here\n\nhello\n")
    t = totals(run(mu))
    assert (t["new"], t["restored"], t["flags_changed"], t["deleted_local"]) == (0, 0, 0, 0)


def test_mirror_deletion_guard_then_force(mu):
    msgs = [msg(i) for i in range(1, 21)]
    mu.append("INBOX", msgs)
    run(mu)
    expunge(mu, "INBOX", msgs[:8])
    r = run(mu, code=10)
    assert "would delete 8 of 20" in r.stderr and "--force" in r.stderr
    assert sorted(sha(b) for b in local_files(mu.maildir).values()) == sorted(sha(m) for m in msgs)
    t = totals(run(mu, "--force"))
    assert t["deleted_local"] == 8
    check_backup_matches_server(mu)


@pytest.mark.parametrize("point", ["deleted-local:1", "staged:1", "recorded:1", "published:2", "folder:1"])
def test_mirror_killed_then_rerun_ends_exactly_once(mu, point):
    mu.append("INBOX", [msg(i, body="m" * 12000) for i in range(1, 13)])
    mu.append("Work", [msg(100 + i) for i in range(4)])
    mu.write_config('mode = "mirror"\nbatch_bytes = 65536')
    run(mu)
    expunge(mu, "INBOX", [msg(1, body="m" * 12000)])
    mu.append("INBOX", [msg(50 + i, body="m" * 12000) for i in range(6)])
    p = file_of(mu, msg(5, body="m" * 12000))
    p.rename(p.with_name(p.name.split(":2,")[0] + ":2,FS"))
    r = mu.run("sync", "test", env=mu.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, (point, r.stderr)
    run(mu)
    check_backup_matches_server(mu)
    assert not list(mu.maildir.rglob("tmp/*"))
    t = totals(run(mu))
    assert (t["new"], t["restored"], t["flags_changed"], t["deleted_local"]) == (0, 0, 0, 0)
