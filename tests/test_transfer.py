"""migrate (server to server) and restore (Maildir to server) between two users of the real Dovecot."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

from tests import corpus
from tests.helpers import MailUser, msg, sha


@pytest.fixture
def pair(user, dovecot, tmp_path):
    """user = the source; dst = a second, empty account that names its Sent folder "Sent Items"."""
    dst = MailUser.create(dovecot, f"{user.name}d", tmp_path / "dst")
    c = dst.imap()
    c.create_folder("Sent Items")
    c.logout()
    src_cfg = user.write_config().read_text()
    dst_cfg = src_cfg.replace("[accounts.test]", "[accounts.dst]").replace(user.name, dst.name)
    dst_cfg = dst_cfg.replace('password_env = "MAILSYNC_TEST_PASSWORD"', 'password_env = "DST_PASSWORD"')
    user.config.write_text(src_cfg + "\n" + dst_cfg)
    user.dst = dst
    return user


def fill(u):
    u.append("INBOX", [msg(1), msg(2)], flags=[b"\\Seen"])
    u.append("INBOX", [msg(3)], flags=[b"\\Flagged", b"$Work"])
    u.append("Sent", [msg(4)], flags=[b"\\Seen"])
    u.append("Archive/2024", [msg(5), msg(6)])
    u.append("Entwürfe", [msg(7)], flags=[b"\\Draft"])
    u.server.seed(u.name, "INBOX", corpus.MALFORMED[:4], start=50)


def content(u, mapping=None):
    """folder -> sorted (sha, flags) for the whole account, folder names mapped."""
    out = {}
    for folder, msgs in u.server_messages().items():
        name = (mapping or {}).get(folder, folder)
        out[name] = sorted((sha(b), tuple(sorted(f))) for b, f in msgs.values())
    return {k: v for k, v in out.items() if v}


def internaldates(u, folder):
    c = u.imap()
    c.select_folder(folder, readonly=True)
    uids = c.search("ALL")
    got = sorted((sha(d[b"BODY[]"]), d[b"INTERNALDATE"].timestamp())
                 for d in c.fetch(uids, [b"BODY.PEEK[]", b"INTERNALDATE"]).values()) if uids else []
    c.logout()
    return got


def migrate(u, *args):
    r = u.run("migrate", "test", "dst", "--json", *args, env=u.env(DST_PASSWORD=u.dst.password,
                                                                     XDG_STATE_HOME=str(u.tmp / "state")))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_migrate_copies_everything_with_flags_dates_and_special_folders(pair):
    fill(pair)
    s = migrate(pair)
    assert s["totals"]["copied"] == 11 and s["totals"]["failed"] == 0
    assert content(pair.dst) == content(pair, {"Sent": "Sent Items"})
    assert internaldates(pair.dst, "INBOX") == internaldates(pair, "INBOX")
    # a second run copies nothing
    s = migrate(pair)
    assert s["totals"]["copied"] == 0 and s["totals"]["present"] == 11
    # and flags changed on the source follow (the source wins)
    c = pair.imap()
    c.select_folder("Archive/2024")
    c.add_flags([1], [b"\\Answered"])
    c.logout()
    s = migrate(pair)
    assert s["totals"]["flags_updated"] == 1
    assert content(pair.dst) == content(pair, {"Sent": "Sent Items"})


def test_migrate_killed_then_rerun_copies_each_message_once(pair):
    fill(pair)
    env = pair.env(DST_PASSWORD=pair.dst.password, XDG_STATE_HOME=str(pair.tmp / "state"),
                   MAILSYNC_CRASH_AT="appended:2")
    r = pair.run("migrate", "test", "dst", env=env)
    assert r.returncode == 137, r.stderr  # killed right after an APPEND, before it was recorded
    s = migrate(pair)
    assert 0 < s["totals"]["copied"] < 11
    assert content(pair.dst) == content(pair, {"Sent": "Sent Items"})


def test_message_already_on_destination_is_not_duplicated(pair):
    fill(pair)
    pair.dst.append("INBOX", [msg(1), corpus.MALFORMED[2]])  # copied by hand before (one without Message-ID)
    s = migrate(pair)
    assert s["totals"]["present"] == 2 and s["totals"]["copied"] == 9
    dst_inbox = [b for b, _ in pair.dst.server_messages()["INBOX"].values()]
    assert len(dst_inbox) == len(set(dst_inbox)) == 7


def test_restore_a_backup_into_an_empty_account(pair):
    fill(pair)
    assert pair.run("sync", "test").returncode == 0  # the backup
    env = pair.env(DST_PASSWORD=pair.dst.password)
    r = pair.run("restore", "dst", "--from", str(pair.maildir), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["copied"] == 11
    want = content(pair)
    want["Sent Items"] = []  # created empty by the fixture
    got = content(pair.dst)
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}
    assert internaldates(pair.dst, "INBOX") == internaldates(pair, "INBOX")
    # again: nothing uploaded twice
    r = pair.run("restore", "dst", "--from", str(pair.maildir), "--json", env=env)
    assert json.loads(r.stdout)["totals"]["copied"] == 0


def test_restore_of_an_fs_layout_maildir_with_lf_files(pair, tmp_path):
    root = tmp_path / "fsmail"
    for d in ("cur", "new", "tmp"):
        (root / d).mkdir(parents=True)
        (root / "Projects" / "Été" / d).mkdir(parents=True)
    (root / "cur" / "1.a.host:2,S").write_bytes(b"Subject: one\nMessage-ID: <one@x>\n\nbody\n")
    (root / "Projects" / "Été" / "new" / "2.b.host:2,").write_bytes(b"Subject: two\n\nno id\n")
    os.utime(root / "cur" / "1.a.host:2,S", (1_000_000_000, 1_000_000_000))  # 2001: the file's date
    env = pair.env(DST_PASSWORD=pair.dst.password)
    r = pair.run("restore", "dst", "--from", str(root), "--json", env=env)
    assert r.returncode == 0, r.stderr
    srv = pair.dst.server_messages()
    assert [b for b, _ in srv["INBOX"].values()] == [b"Subject: one\r\nMessage-ID: <one@x>\r\n\r\nbody\r\n"]
    assert [b for b, _ in srv["Projects/Été"].values()] == [b"Subject: two\r\n\r\nno id\r\n"]
    assert [when for _, when in internaldates(pair.dst, "INBOX")] == [1_000_000_000]  # its INTERNALDATE
    r = pair.run("restore", "dst", "--from", str(root), "--json", env=env)
    assert json.loads(r.stdout)["totals"]["copied"] == 0


def test_restore_goes_on_past_a_file_it_cannot_read(pair, tmp_path):
    """One unreadable file fails (exit 9, one error line naming it); the others are uploaded."""
    root = tmp_path / "mail"
    for d in ("cur", "new", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "cur" / "1.a.host:2,S").write_bytes(msg(1))
    (root / "cur" / "2.b.host:2,").mkdir()  # open() fails: EISDIR (permissions do not stop root)
    (root / "cur" / "3.c.host:2,").write_bytes(msg(3))
    env = pair.env(DST_PASSWORD=pair.dst.password)
    r = pair.run("restore", "dst", "--from", str(root), "--json", env=env)
    assert r.returncode == 9, r.stderr
    totals = json.loads(r.stdout)["totals"]
    assert (totals["copied"], totals["failed"]) == (2, 1)
    assert r.stderr == f"mailsync: error: INBOX: cannot read {root}/cur/2.b.host:2,: Is a directory\n"
    assert sorted(sha(b) for b, _ in pair.dst.server_messages()["INBOX"].values()) == sorted([sha(msg(1)), sha(msg(3))])


def test_migrate_honours_max_bytes_per_second(pair):
    import time
    pair.append("INBOX", [msg(i, body="z" * 10_000) for i in range(4)])  # about 40 KB
    text = pair.config.read_text().replace("[accounts.dst]", "[accounts.dst]\nmax_bytes_per_second = 16384")
    pair.config.write_text(text)
    t0 = time.monotonic()
    s = migrate(pair)
    assert s["totals"]["copied"] == 4
    assert time.monotonic() - t0 >= 2.0  # 40 KB at 16 KB/s


def test_migrate_keeps_dates_in_every_folder(pair):
    fill(pair)
    c = pair.imap()
    c.append("Archive/2024", msg(8), msg_time=datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc))
    c.logout()
    migrate(pair)
    assert datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc).timestamp() in \
        [when for _, when in internaldates(pair.dst, "Archive/2024")]
    for folder, target in (("Archive/2024", "Archive/2024"), ("Sent", "Sent Items"), ("Entwürfe", "Entwürfe")):
        assert internaldates(pair.dst, target) == internaldates(pair, folder)


def test_migrate_delete_removes_what_is_gone_from_the_source_guarded(pair):
    pair.append("Work", [msg(i) for i in range(1, 21)])
    migrate(pair)
    c = pair.imap()
    c.select_folder("Work")
    c.delete_messages([1])
    c.expunge()
    c.logout()
    s = migrate(pair)  # without --delete nothing goes
    assert s["totals"]["deleted"] == 0 and len(pair.dst.server_messages()["Work"]) == 20
    s = migrate(pair, "--delete")
    assert s["totals"]["deleted"] == 1 and len(pair.dst.server_messages()["Work"]) == 19
    c = pair.imap()
    c.select_folder("Work")
    c.delete_messages(list(range(2, 12)))
    c.expunge()
    c.logout()
    r = pair.run("migrate", "test", "dst", "--delete", env=pair.env(DST_PASSWORD=pair.dst.password,
                                                                      XDG_STATE_HOME=str(pair.tmp / "state")))
    assert r.returncode == 10 and "would delete 10 of 19" in r.stderr and "--force" in r.stderr
    assert len(pair.dst.server_messages()["Work"]) == 19
    s = migrate(pair, "--delete", "--force")
    assert s["totals"]["deleted"] == 10 and len(pair.dst.server_messages()["Work"]) == 9


def test_throttled_server_is_waited_for_not_failed(monkeypatch):
    """A provider answering NO [THROTTLED] gets backoff and the same APPEND again (fault
    injection at the session boundary: the one thing a local Dovecot cannot be made to say)."""
    from pathlib import Path

    from mailsync import transfer
    from mailsync.config import parse
    from mailsync.errors import ServerError

    class ThrottlingSession:
        caps = {"MULTIAPPEND", "UIDPLUS"}

        def __init__(self):
            self.calls = 0

        def multiappend(self, folder, items):
            self.calls += 1
            if self.calls < 3:
                raise ServerError("127.0.0.1:993 refused a command: [THROTTLED] Too many requests, try again")
            return [10, 11]

    sleeps = []
    monkeypatch.setattr(transfer.time, "sleep", sleeps.append)
    acc = parse({"accounts": {"d": {"host": "h", "username": "u", "maildir": "/tmp/x"}}}, Path("/x")).account("d")
    dst = transfer.Destination.__new__(transfer.Destination)
    dst.acc, dst.s, dst.last_bytes, dst.window_start = acc, ThrottlingSession(), 0.0, 0.0
    assert dst.append_many("INBOX", [(b"a", frozenset(), None), (b"b", frozenset(), None)]) == [10, 11]
    assert dst.s.calls == 3 and sleeps == [1, 2]


def test_copy_deleted_on_destination_by_hand_is_copied_again(pair):
    pair.append("INBOX", [msg(1), msg(2)])
    migrate(pair)
    c = pair.dst.imap()
    c.select_folder("INBOX")
    c.delete_messages([1])
    c.expunge()
    c.logout()
    s = migrate(pair)
    assert s["totals"]["copied"] == 1
    assert sorted(sha(b) for b, _ in pair.dst.server_messages()["INBOX"].values()) == sorted([sha(msg(1)), sha(msg(2))])


def upload_bursts(chunks: list[tuple[str, int]], least: int = 8000) -> list[tuple[int, int]]:
    """(first, last) byte counted from the client of each run of client bytes longer than `least`
    with no server byte in between: the message data of an APPEND (LITERAL+ sends it unbroken)."""
    out, sent, start = [], 0, None
    for way, n in [*chunks, ("down", 0)]:
        if way == "up":
            start = sent if start is None else start
            sent += n
            continue
        if start is not None and sent - start >= least:
            out.append((start, sent))
        start = None
    return out


def test_migrate_with_the_connection_cut_at_20_offsets(pair):
    """The destination's connection cut during the APPENDs of a migrate: 19 cuts inside the bytes
    uploaded (the MULTIAPPEND of INBOX's 8 messages, then Work's 6, ~2.5 KB each) and one on the
    server's answer to INBOX's (stored, never confirmed). Each offset starts again: a new, empty
    destination account and a new migration state. The cut run fails with one line and leaves the
    destination short; the next clean run copies exactly what is missing: every source message
    once, nothing else."""
    from tests import faults
    pair.append("INBOX", [msg(i, body="m" * 2500) for i in range(8)])
    pair.append("Work", [msg(100 + i, body="m" * 2500) for i in range(6)])
    want = content(pair)
    total, inbox = sum(map(len, want.values())), len(want["INBOX"])
    base = pair.config.read_text()
    dst_line = f'port = {pair.server.imaps_port}\nusername = "{pair.dst.name}"'
    assert base.count(dst_line) == 1

    def fresh(n):
        dst = MailUser.create(pair.server, f"{pair.name}d{n}", pair.tmp / f"d{n}")
        env = pair.env(DST_PASSWORD=dst.password, XDG_STATE_HOME=str(pair.tmp / f"state{n}"))
        return dst, env

    def point_at(dst, port, extra=""):
        pair.config.write_text(base.replace(dst_line, f'port = {port}\nusername = "{dst.name}"{extra}'))

    # where the APPENDs are in the destination's traffic: one clean copy through a proxy that cuts nothing
    dst, env = fresh("p")
    with faults.CutProxy(pair.server.imaps_port, cut_after=0, cut_connections=0) as probe:
        point_at(dst, probe.port)
        r = pair.run("migrate", "test", "dst", env=env)
    assert r.returncode == 0 and content(dst) == want, r.stderr
    assert len(probe.chunks) == 1, probe.traffic  # migrate opens one destination connection
    bursts = upload_bursts(probe.chunks[0])
    assert len(bursts) == 2, (bursts, probe.chunks)  # one MULTIAPPEND per folder, INBOX first
    (a1, b1), (a2, b2) = bursts
    # (direction, offset, messages the destination holds after the cut): a cut in a MULTIAPPEND's
    # data stores none of it (RFC 3502); a cut answer leaves INBOX stored but not recorded
    cuts = [("up", a1 + (b1 - a1) * k // 12, 0) for k in range(1, 12)] \
        + [("up", a2 + (b2 - a2) * k // 9, inbox) for k in range(1, 9)] \
        + [("reply", (a1 + b1) // 2, inbox)]
    assert len(cuts) == 20
    for n, (direction, offset, held) in enumerate(cuts):
        where = (direction, offset)
        dst, env = fresh(n)
        with faults.CutProxy(pair.server.imaps_port, cut_after=offset, cut_connections=1000,
                             direction=direction) as proxy:
            point_at(dst, proxy.port, "\nretries = 0")
            r = pair.run("migrate", "test", "dst", env=env)
        assert proxy.cuts >= 1, (where, proxy.traffic)
        assert r.returncode in (6, 9), (where, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and "mailsync: error" in r.stderr, (where, r.stderr)
        got = content(dst)
        assert sum(map(len, got.values())) == held < total, (where, got)
        point_at(dst, pair.server.imaps_port)
        r = pair.run("migrate", "test", "dst", "--json", env=env)
        assert r.returncode == 0, (where, r.stderr)
        assert content(dst) == want, where  # every message exactly once, nothing else
        totals = json.loads(r.stdout)["totals"]
        assert (totals["copied"], totals["present"]) == (total - held, held), (where, totals)
