"""Two accounts, each with its own config and Maildir, synced by two mailsync processes at once
(as two cron jobs would): neither waits for or disturbs the other."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.helpers import ROOT, MailUser, msg
from tests.test_kill_sweep import as_backup, local_state, server_state, tmp_files


def holds_lock(maildir, p) -> bool:
    """p has taken the Maildir's run lock (mailsync writes its pid into the lock file once it holds it)."""
    try:
        return (maildir / ".mailsync.lock").read_text().strip() == str(p.pid)
    except FileNotFoundError:
        return False


def test_two_accounts_on_different_maildirs_run_in_parallel(user, dovecot, tmp_path):
    a = user
    b = MailUser.create(dovecot, f"{user.name}b", tmp_path / "b")
    body = "z" * 9000
    a.server.seed(a.name, "INBOX", [msg(i, body) for i in range(24)])
    a.server.seed(a.name, "Work", [msg(100 + i, body) for i in range(16)], flags="S")
    b.server.seed(b.name, "INBOX", [msg(200 + i, body) for i in range(24)])
    b.server.seed(b.name, "Lists/dev", [msg(300 + i, body) for i in range(16)], flags="FS")
    a.write_config("batch_bytes = 65536")
    # b syncs both ways and has a message of its own to upload
    b.write_config('mode = "sync"\nbatch_bytes = 65536')
    for d in ("cur", "new", "tmp"):
        (b.maildir / d).mkdir(parents=True, exist_ok=True)
    (b.maildir / "new" / "1700000000.own.host:2,").write_bytes(msg(399, body))

    procs = [subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(u.config), "sync", "test"],
                              env=u.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for u in (a, b)]
    # both runs hold their Maildir's run lock at the same moment: they work at the same time
    overlap = False
    deadline = time.monotonic() + 60
    while not overlap and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        overlap = all(holds_lock(u.maildir, p) for u, p in zip((a, b), procs))
        overlap = overlap and all(p.poll() is None for p in procs)
        time.sleep(0.002)
    outs = [p.communicate(timeout=120) for p in procs]
    for u, p, (_out, err) in zip((a, b), procs, outs):
        assert p.returncode == 0, (u.name, err)
        assert "another mailsync run" not in err
    assert overlap, "the two runs did not overlap"
    for u in (a, b):
        server = server_state(u)
        assert local_state(u.maildir) == as_backup(server, u.maildir), f"{u.name}: not exactly the server's mail"
        assert tmp_files(u.maildir) == 0
        assert sum(len(v) for v in server.values()) == (40 if u is a else 41)
    # each run kept to its own Maildir and state
    assert os.path.exists(a.maildir / ".mailsync.db") and os.path.exists(b.maildir / ".mailsync.db")
