"""POP3S download-only mode against the real Dovecot POP3S listener."""

from __future__ import annotations

import hashlib
import json
import poplib
import sqlite3
import ssl
import time

import pytest

from tests import corpus, faults
from tests.helpers import local_files, msg, sha


@pytest.fixture
def pu(user):
    user.write_config('protocol = "pop3"', port=user.server.pop3s_port)
    return user


def run(u, code=0):
    r = u.run("sync", "test", "--json")
    assert r.returncode == code, r.stderr
    return json.loads(r.stdout)


def pop3_messages(u) -> dict[str, bytes]:
    """UIDL -> bytes of every message the server holds, read with poplib (not mailsync's reader),
    as the server sends them over POP3 (IMAP would show a NUL as 0x80)."""
    limit = poplib._MAXLINE
    poplib._MAXLINE = 1 << 20  # the corpus has a 5,000-byte line
    try:
        pop = poplib.POP3_SSL("127.0.0.1", u.server.pop3s_port, timeout=30,
                              context=ssl.create_default_context(cafile=str(u.server.ca_file)))
        try:
            pop.user(u.name)
            pop.pass_(u.password)
            out = {}
            for line in pop.uidl()[1]:
                n, uidl = line.decode().split()
                out[uidl] = b"".join(part + b"\r\n" for part in pop.retr(int(n))[1])  # every message ends in CRLF
            return out
        finally:
            pop.quit()
    finally:
        poplib._MAXLINE = limit


def shas(messages) -> list[str]:
    return sorted(sha(b) for b in messages)


def seed(u, n=20):
    msgs = [msg(i, body="p" * 2000) for i in range(n)] + corpus.MALFORMED + [corpus.with_attachment(1, 300)]
    u.server.seed(u.name, "INBOX", msgs)
    return msgs


def test_byte_exact_download_and_incremental_rerun(pu):
    msgs = seed(pu)
    s = run(pu)
    assert s["totals"]["new"] == len(msgs)
    files = local_files(pu.maildir)
    # exactly the server's bytes, malformed ones too (a 5,000-byte line, NUL, 8-bit, no body)
    assert sorted(files.values()) == sorted(msgs)
    assert all(p.parent.name == "new" and p.name.endswith(":2,") for p in files)
    snap = {p: p.stat().st_mtime_ns for p in files}
    s = run(pu)
    assert s["totals"]["new"] == 0 and s["totals"]["bytes"] == 0
    assert {p: p.stat().st_mtime_ns for p in local_files(pu.maildir)} == snap
    # left on the server by default, every message as it was
    assert shas(pop3_messages(pu).values()) == shas(msgs)
    pu.append("INBOX", [msg(999)])
    assert run(pu)["totals"]["new"] == 1


def test_many_messages_in_flight_arrive_byte_exact(pu):
    """More messages than RETRs are sent ahead (PIPELINING), with lines a POP3 server must
    dot-stuff ('.', '..', '.x'): every one stored exactly as it is."""
    bodies = [".\r\n..\r\n.x .{}\r\n.", "end", "\r\n.\r\n"]
    msgs = [msg(i, body=bodies[i % 3].format("y" * (i * 37 % 3000))) for i in range(3 * 64 + 5)]
    pu.server.seed(pu.name, "INBOX", msgs)
    assert run(pu)["totals"]["new"] == len(msgs)
    assert sorted(local_files(pu.maildir).values()) == sorted(msgs)


def pop3_rows(u) -> dict[str, str]:
    """The POP3 state: file key -> SHA-256 recorded for it."""
    db = sqlite3.connect(u.maildir / ".mailsync.db")
    try:
        return dict(db.execute("SELECT key, sha256 FROM pop3"))
    finally:
        db.close()


@pytest.mark.parametrize("point", ["staged:1", "recorded:1", "published:1", "published:7"])
def test_kill_then_rerun_exactly_once(pu, point):
    msgs = seed(pu)
    pu.write_config('protocol = "pop3"\nbatch_bytes = 65536', port=pu.server.pop3s_port)
    r = pu.run("sync", "test", env=pu.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, r.stderr
    # right after the kill, the files and the state are where docs/reliability.md says: a batch is
    # written to tmp/ and flushed (`staged`), then recorded in one transaction (`recorded`), then
    # published into new/ one message at a time (`published`)
    from mailsync.model import split_name
    rows = pop3_rows(pu)
    tmp = {p.name: p.read_bytes() for p in (pu.maildir / "tmp").iterdir()}
    published = {split_name(p.name)[0]: b for p, b in local_files(pu.maildir).items()}
    assert all(b in msgs for b in list(tmp.values()) + list(published.values())), "a partial message"
    assert all(rows.get(k) == sha(b) for k, b in published.items()), "a published file not recorded"
    assert all(sha(published.get(k, tmp.get(k, b""))) == h for k, h in rows.items()), \
        "a recorded message whose file is not on disk"
    kind, n = point.split(":")
    if kind == "staged":  # flushed, not recorded: the state holds nothing of the batch yet
        assert tmp and not published, (len(tmp), len(published))
        if n == "1":
            assert rows == {}, f"{len(rows)} messages recorded before the first batch was staged"
    elif kind == "recorded":  # recorded, not published
        assert rows and not published and set(rows) <= set(tmp), (len(rows), len(tmp))
    else:
        assert len(published) == int(n), len(published)
    # the next run publishes what was recorded and downloads only the rest
    s = run(pu)
    assert s["totals"]["new"] == len(msgs) - len(rows), (s["totals"], len(rows))
    files = local_files(pu.maildir)
    assert sorted(files.values()) == sorted(msgs)
    assert not any((pu.maildir / "tmp").iterdir())
    assert run(pu)["totals"]["new"] == 0


def test_delete_after_days_deletes_only_what_is_stored_and_old(pu):
    msgs = seed(pu, n=6)
    pu.write_config('protocol = "pop3"\ndelete_after_days = 2', port=pu.server.pop3s_port)
    run(pu)
    before = pop3_messages(pu)
    assert shas(before.values()) == shas(msgs)  # stored just now: too young, nothing deleted
    # make three of them look stored three days ago
    db = sqlite3.connect(pu.maildir / ".mailsync.db")
    keys = [r[0] for r in db.execute("SELECT uidl FROM pop3 ORDER BY uidl LIMIT 3")]
    db.executemany("UPDATE pop3 SET first_seen=? WHERE uidl=?", [(time.time() - 3 * 86400, k) for k in keys])
    db.commit()
    db.close()
    assert len(keys) == 3 and set(keys) <= set(before)
    s = run(pu)
    assert s["totals"]["deleted_remote"] == 3
    # exactly those three are gone from the server, the others are there unchanged
    after = pop3_messages(pu)
    assert shas(after.values()) == shas(b for u, b in before.items() if u not in keys)
    # never deleted locally: every message, by content, once
    assert shas(local_files(pu.maildir).values()) == shas(msgs)


def test_delete_after_days_never_deletes_what_is_not_on_disk(pu):
    seed(pu, n=4)
    run(pu)
    server = pop3_messages(pu)  # what the server holds, read before anything is deleted there
    assert len(server) == 4 + len(corpus.MALFORMED) + 1
    big = corpus.with_attachment(1, 300)
    files = local_files(pu.maildir)
    assert shas(files.values()) == shas(server.values())
    # two files are deleted locally: a small message and the 300 KB one
    small = next(p for p, b in sorted(files.items()) if b != big)
    lost = small.read_bytes()
    small.unlink()
    next(p for p, b in files.items() if b == big).unlink()
    # the big one is over max_message_size now, so it cannot be fetched again: it is not on disk,
    # so it must stay on the server; the small one is fetched again first, then deleted there
    pu.write_config('protocol = "pop3"\ndelete_after_days = 0\nmax_message_size = 100000',
                    port=pu.server.pop3s_port)
    s = run(pu)
    assert s["totals"]["restored"] == 1
    assert s["totals"]["deleted_remote"] == len(server) - 1
    assert list(pop3_messages(pu).values()) == [big]
    files = local_files(pu.maildir)
    assert shas(files.values()) == shas(b for b in server.values() if b != big)
    assert lost in files.values()
    # without the size limit, it is fetched again, then deleted on the server too
    pu.write_config('protocol = "pop3"\ndelete_after_days = 0', port=pu.server.pop3s_port)
    s = run(pu)
    assert s["totals"]["restored"] == 1 and s["totals"]["deleted_remote"] == 1
    # every message the server had is in the backup, by content, exactly once (both files that
    # were deleted included), and nothing else; the server is empty
    assert shas(local_files(pu.maildir).values()) == shas(server.values())
    assert pop3_messages(pu) == {}
    assert pu.server_messages()["INBOX"] == {}
    assert not any((pu.maildir / "tmp").iterdir())


def test_changed_uidls_are_rematched_by_content(pu):
    msgs = seed(pu, n=5)
    run(pu)
    # Dovecot's UIDLs embed the UID: losing its uidlist renumbers every message
    (pu.server.maildir(pu.name) / "dovecot-uidlist").unlink()
    pu.server.doveadm("force-resync", "-u", pu.name, "INBOX")
    s = run(pu)
    assert s["totals"]["new"] == 0
    assert sorted(local_files(pu.maildir).values()) == sorted(msgs)


def test_max_message_size_skips_with_a_notice(pu):
    pu.server.seed(pu.name, "INBOX", [msg(1), corpus.with_attachment(2, 200)])
    pu.write_config('protocol = "pop3"\nmax_message_size = 100000', port=pu.server.pop3s_port)
    r = pu.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert "larger than max_message_size" in r.stderr
    assert list(local_files(pu.maildir).values()) == [msg(1)]


def test_server_without_uidl(pu, dovecot):
    msgs = [msg(1), msg(2), b"Subject: .dot\r\n\r\n.leading dot line\r\n..two\r\n"]
    ca = dovecot.root / "ca"
    with faults.Pop3NoUidl(ca / "server.pem", ca / "server.key", msgs, password=pu.password) as srv:
        pu.write_config('protocol = "pop3"', port=srv.port)
        r = pu.run("sync", "test", "--json")
        assert r.returncode == 0, r.stderr
        assert "no UIDL" in r.stderr
        files = local_files(pu.maildir)
        assert sorted(files.values()) == sorted(msgs)  # dot-stuffing undone
        r = pu.run("sync", "test", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["totals"]["new"] == 0
        assert local_files(pu.maildir) == files


def test_pop3_refuses_untrusted_certificate_and_wrong_password(pu):
    pu.write_config('protocol = "pop3"', port=pu.server.pop3s_port, ca=False)
    r = pu.run("sync", "test")
    assert r.returncode == 4 and "SHA-256" in r.stderr and "Traceback" not in r.stderr
    pu.write_config('protocol = "pop3"', port=pu.server.pop3s_port)
    r = pu.run("sync", "test", env=pu.env(MAILSYNC_TEST_PASSWORD="nope-wrong"))
    assert r.returncode == 3 and "login as" in r.stderr and "nope-wrong" not in r.stderr


def test_pop3_account_cannot_use_sync_mode(pu):
    pu.write_config('protocol = "pop3"\nmode = "sync"', port=pu.server.pop3s_port)
    r = pu.run("sync", "test")
    assert r.returncode == 2 and "download-only" in r.stderr


def test_compare_imap_and_pop3_of_one_mailbox(user):
    user.server.seed(user.name, "INBOX", [msg(i) for i in range(5)] + corpus.MALFORMED[:3])
    user.append("INBOX", [msg(50)], flags=[b"\\Seen", b"$Work"])
    user.append("Archive", [msg(60), msg(61)])
    cfg = user.write_config()
    text = cfg.read_text()
    pop = text.replace("[accounts.test]", "[accounts.pop]").replace(
        f"port = {user.server.imaps_port}", f'port = {user.server.pop3s_port}\nprotocol = "pop3"')
    cfg.write_text(text + "\n" + pop)
    r = user.run("compare", "test", "pop", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["imap"]["messages"] == 11 and d["pop3"]["messages"] == 9
    assert d["imap"]["folders"] == 2 and d["pop3"]["folders"] == 1
    assert d["imap_other_folders_messages"] == 2
    # Dovecot turns a NUL into 0x80 over IMAP but sends it as is over POP3
    assert d["only_in_imap_inbox"] == d["only_in_pop3"] == 1
    assert "yes" in d["imap"]["flags_kept"] and "no" in d["pop3"]["flags_kept"]
    # the accounts' own backups were not touched
    assert not user.maildir.exists()
    r = user.run("compare", "test", "pop")
    assert r.returncode == 0 and "flags kept" in r.stdout and "re-run" in r.stdout


def test_lost_state_file_adopts_existing_files(pu):
    msgs = seed(pu, n=3)
    run(pu)
    for p in pu.maildir.glob(".mailsync.db*"):
        p.unlink()
    s = run(pu)
    assert s["totals"]["new"] == 0
    assert sorted(local_files(pu.maildir).values()) == sorted(msgs)


@pytest.mark.parametrize("kind", ["wronghost", "expired", "pin"])
def test_pop3_refuses_bad_certificates_and_shows_the_fingerprint(pu, dovecot, tmp_path, kind):
    """Wrong host, expired, or not the pinned one: exit 4, the certificate's SHA-256 shown,
    nothing downloaded."""
    import ssl

    from tests.test_errors import one_line_error
    ca = dovecot.root / "ca"
    seed(pu, n=2)
    if kind == "pin":
        cert = ca / "server.pem"  # Dovecot's own certificate, but the pin names another one
        pu.write_config('protocol = "pop3"\nfingerprint = "sha256:' + ":".join(["AB"] * 32) + '"',
                        port=pu.server.pop3s_port, ca=False)
        r = pu.run("sync", "test")
        line = one_line_error(r, 4, "does not match the pinned fingerprint")
    else:
        cert, key = faults.make_cert(tmp_path, ca / "ca.pem", ca / "ca.key", kind,
                                     hosts=["wrong.example"] if kind == "wronghost" else ["127.0.0.1"],
                                     expired=kind == "expired")
        with faults.TlsGreeter(cert, key) as srv:
            pu.write_config('protocol = "pop3"', port=srv.port)
            r = pu.run("sync", "test")
        line = one_line_error(r, 4, "not accepted")
        assert ("expired" in line) if kind == "expired" else ("match" in line.lower()), line
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    fp = hashlib.sha256(der).hexdigest().upper()
    assert f"SHA-256 {':'.join(fp[i:i + 2] for i in range(0, 64, 2))}" in line, line
    assert local_files(pu.maildir) == {}
