"""mailsync verify of a POP3 backup against the real Dovecot: UIDLs, LIST sizes, the state, the files;
read-only on the server (no DELE, no QUIT)."""

from __future__ import annotations

import json
import poplib
import sqlite3
import ssl
import time
from pathlib import Path

import pytest

from mailsync.config import parse
from mailsync.model import split_name
from mailsync.verify import EXIT_DAMAGED, verify
from tests import corpus
from tests.helpers import local_files, msg


@pytest.fixture
def pu(user):
    user.write_config('protocol = "pop3"', port=user.server.pop3s_port)
    return user


def account(u, **extra):
    sec = {"host": "127.0.0.1", "port": u.server.pop3s_port, "protocol": "pop3", "username": u.name,
           "maildir": str(u.maildir), "ca_file": str(u.server.ca_file), **extra}
    return parse({"accounts": {"t": sec}}, Path("/x.toml")).account("t")


def sync(u):
    r = u.run("sync", "test")
    assert r.returncode == 0, r.stderr


def cli_verify(u, *args):
    r = u.run("verify", "test", "--json", *args)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else r.stderr


def server_list(u) -> dict[str, int]:
    """UIDL -> LIST size of every message on the server (read with poplib; no DELE)."""
    pop = poplib.POP3_SSL("127.0.0.1", u.server.pop3s_port, timeout=30,
                          context=ssl.create_default_context(cafile=str(u.server.ca_file)))
    try:
        pop.user(u.name)
        pop.pass_(u.password)
        sizes = {int(n): int(sz) for n, sz in (ln.decode().split() for ln in pop.list()[1])}
        return {uidl: sizes[int(n)] for n, uidl in (ln.decode().split() for ln in pop.uidl()[1])}
    finally:
        pop.quit()


def file_of(u, uidl: str) -> Path:
    c = sqlite3.connect(u.maildir / ".mailsync.db")
    key = c.execute("SELECT key FROM pop3 WHERE uidl=?", (uidl,)).fetchone()[0]
    c.close()
    [path] = [p for p in local_files(u.maildir) if split_name(p.name)[0] == key]
    return path


def seed(u, n=5):
    msgs = [msg(i, body="p" * 2000) for i in range(n)] + corpus.MALFORMED + [corpus.with_attachment(1, 300)]
    u.server.seed(u.name, "INBOX", msgs)
    return msgs


@pytest.fixture
def spy(monkeypatch):
    """Every command a POP3 client of this process sends."""
    sent: list[str] = []
    orig = poplib.POP3._putcmd

    def putcmd(self, line):
        sent.append(line.split()[0].upper() if line.split() else line)
        return orig(self, line)

    monkeypatch.setattr(poplib.POP3, "_putcmd", putcmd)
    return sent


def test_complete_backup_verifies_and_deep(pu, spy):
    msgs = seed(pu)
    sync(pu)
    before = server_list(pu)
    files = {p: p.read_bytes() for p in local_files(pu.maildir)}
    code, j = cli_verify(pu)
    assert code == 0, j
    [f] = j["folders"]
    assert f["name"] == "INBOX" and f["path"] == "." and f["ok"]
    assert f["counts"]["server_messages"] == f["counts"]["local_files"] == f["counts"]["state_records"] == len(msgs)
    assert not (f["missing"] or f["hash_mismatches"] or f["size_mismatches"] or f["extra"] or f["kept"])
    spy.clear()  # from here on, only verify's own commands
    rep = verify(account(pu), pu.password, deep=True)
    assert rep.ok and rep.exit_code == 0, rep.text()
    assert rep.folders[0].deep_checked == len(msgs) and not rep.folders[0].deep_mismatches
    assert rep.text().splitlines()[0].startswith(f"INBOX: ok ({len(msgs)} on server, {len(msgs)} files")
    assert "backup verified" in rep.text()
    assert "RETR" in spy and "DELE" not in spy and "QUIT" not in spy
    r = pu.run("verify", "test", "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    # nothing changed on either side
    assert server_list(pu) == before
    assert {p: p.read_bytes() for p in local_files(pu.maildir)} == files


def test_deleted_file_is_missing(pu):
    seed(pu)
    sync(pu)
    uidl = sorted(server_list(pu))[1]
    victim = file_of(pu, uidl)
    victim.unlink()
    code, j = cli_verify(pu)
    assert code == EXIT_DAMAGED == 11
    [p] = j["folders"][0]["missing"]
    assert p["uid"] == uidl and split_name(victim.name)[0] in p["file"]
    assert "missing from the backup" in p["detail"]
    r = pu.run("verify", "test")
    line = next(ln for ln in r.stdout.splitlines() if "missing" in ln)
    assert f"UIDL {uidl}" in line and split_name(victim.name)[0] in line
    assert "backup incomplete or damaged" in r.stdout
    sync(pu)  # downloaded again
    assert cli_verify(pu)[0] == 0


def test_changed_file_is_a_hash_and_content_mismatch(pu):
    seed(pu)
    sync(pu)
    uidl = sorted(server_list(pu))[0]
    victim = file_of(pu, uidl)
    victim.write_bytes(victim.read_bytes().replace(b"ppp", b"PPP", 1))
    code, j = cli_verify(pu)
    assert code == 11
    [p] = j["folders"][0]["hash_mismatches"]
    assert p["uid"] == uidl and p["file"].endswith(victim.name)
    rep = verify(account(pu), pu.password, deep=True)
    assert not rep.ok
    [d] = rep.folders[0].deep_mismatches
    assert d.uid == uidl and "content mismatch" in rep.text()
    # the size the server lists differs from the state's: a size mismatch
    c = sqlite3.connect(pu.maildir / ".mailsync.db")
    c.execute("UPDATE pop3 SET size=size+1 WHERE uidl=?", (uidl,))
    c.commit()
    c.close()
    [s] = verify(account(pu), pu.password).folders[0].size_mismatches
    assert s.uid == uidl


def test_new_mail_on_the_server_is_missing_until_the_next_sync(pu):
    seed(pu, n=2)
    sync(pu)
    pu.append("INBOX", [msg(99)])
    code, j = cli_verify(pu)
    assert code == 11
    [p] = j["folders"][0]["missing"]
    assert p["file"] is None and "new on the server since the last sync" in p["detail"]
    # an extra file is a warning only
    src = next(iter(local_files(pu.maildir)))
    (src.parent / "1700000000.M1P1Q1Rdeadbeef.elsewhere:2,").write_bytes(msg(77))
    sync(pu)
    code, j = cli_verify(pu)
    assert code == 0 and len(j["folders"][0]["extra"]) == 1 and j["totals"]["warnings"] == 1


def test_verify_with_delete_after_days_never_deletes(pu, spy):
    msgs = seed(pu, n=3)
    sync(pu)
    before = server_list(pu)
    assert len(before) == len(msgs)
    c = sqlite3.connect(pu.maildir / ".mailsync.db")
    c.execute("UPDATE pop3 SET first_seen=?", (time.time() - 30 * 86400,))  # old enough to delete
    c.commit()
    c.close()
    pu.write_config('protocol = "pop3"\ndelete_after_days = 0', port=pu.server.pop3s_port)
    acc = account(pu, delete_after_days=0)
    spy.clear()
    assert verify(acc, pu.password, deep=True).ok
    assert verify(acc, pu.password).ok
    assert "DELE" not in spy and "QUIT" not in spy
    assert cli_verify(pu, "--deep")[0] == 0
    assert server_list(pu) == before  # every message, same UIDL, same size
    # a sync deletes them on the server; verify then counts them as kept
    sync(pu)
    assert server_list(pu) == {}
    code, j = cli_verify(pu)
    assert code == 0 and len(j["folders"][0]["kept"]) == len(msgs)
    assert j["folders"][0]["counts"]["server_messages"] == 0


def test_login_and_tls_failures_exit_as_for_imap(pu):
    seed(pu, n=1)
    sync(pu)
    r = pu.run("verify", "test", env=pu.env(MAILSYNC_TEST_PASSWORD="nope-wrong"))
    assert r.returncode == 3 and "nope-wrong" not in r.stderr
    pu.write_config('protocol = "pop3"', port=pu.server.pop3s_port, ca=False)
    assert pu.run("verify", "test").returncode == 4
