"""The same backup results from a server without CONDSTORE/QRESYNC (a full UID + FLAGS scan)."""

from __future__ import annotations

import json

from mailsync.config import parse
from mailsync.imap import ImapSession
from tests.helpers import local_files, msg
from tests.test_backup import check_backup_matches_server


def test_server_really_lacks_condstore(basic_user):
    from pathlib import Path
    cfg = parse({"accounts": {"t": {"host": "127.0.0.1", "port": basic_user.server.imaps_port,
                                    "username": basic_user.name, "maildir": "/tmp/x",
                                    "ca_file": str(basic_user.server.ca_file)}}}, Path("/x.toml"))
    s = ImapSession(cfg.account("t"), basic_user.password)
    try:
        assert not s.condstore and "CONDSTORE" not in s.caps
    finally:
        s.close()


def test_backup_incremental_and_expunge_without_condstore(basic_user):
    u = basic_user
    u.append("INBOX", [msg(i) for i in range(6)])
    u.append("Entwürfe", [msg(10)], flags=[b"\\Draft"])
    r = u.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 7
    check_backup_matches_server(u)

    c = u.imap()
    c.select_folder("INBOX")
    c.add_flags([1, 2], [b"\\Seen"])
    c.delete_messages([3])
    c.expunge()
    c.logout()
    u.append("INBOX", [msg(20)])
    r = u.run("sync", "test", "--json")
    t = json.loads(r.stdout)["totals"]
    assert (t["new"], t["flags_changed"], t["gone_from_server"]) == (1, 2, 1)
    assert len(local_files(u.maildir)) == 8  # the expunged one stays in the backup

    snap = {p: p.stat().st_mtime_ns for p in local_files(u.maildir)}
    r = u.run("sync", "test", "--json")
    t = json.loads(r.stdout)["totals"]
    assert (t["new"], t["flags_changed"], t["gone_from_server"]) == (0, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in local_files(u.maildir)} == snap
