"""`mailsync watch` against the real Dovecot: new mail arrives through IDLE without a timer, the
watch survives a server restart, a kill -9 and a network that forgets quiet connections, and every
message ends up in the Maildir exactly once. Waits are bounded; nothing asserts a duration (the
delivery latency is measured by bench/watch.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.dovecot import Dovecot
from tests.faults import QuietCutProxy
from tests.helpers import ROOT, MailUser, local_files, msg, sha

WAIT = 30  # seconds: the bound on every wait below (a slow CI machine, not a target)


class Watch:
    """A running `mailsync watch --json`: its events as they come, its stderr at the end."""

    def __init__(self, user: MailUser, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(user.config), "watch",
                                      "--json", *args], env=user.env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=ROOT, text=True)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self.events.append(json.loads(line))

    def of(self, event: str) -> list[dict]:
        return [e for e in list(self.events) if e["event"] == event]

    def wait_for(self, what, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"watch ended (exit {self.proc.returncode}): {self.proc.stderr.read()}"
                                     f"{''.join(self.lines)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s; events: {''.join(self.lines)}")
            time.sleep(0.02)

    def listening(self, n: int = 1) -> None:
        """Wait for n IDLE connections, and for the syncs that follow to end (nothing printed for
        half a second)."""
        self.wait_for(lambda: len(self.of("listening")) >= n)
        seen = [len(self.lines), time.monotonic()]

        def quiet() -> bool:
            if len(self.lines) != seen[0]:
                seen[:] = [len(self.lines), time.monotonic()]
            return time.monotonic() - seen[1] > 0.5
        self.wait_for(quiet)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(5)
        self.stderr = self.proc.stderr.read()
        return self.proc.returncode


def bodies(root: Path) -> list[str]:
    """The content hash of every message file under the Maildir (duplicates show twice)."""
    return sorted(sha(b) for b in local_files(root).values())


def has(root: Path, messages: list[bytes]) -> bool:
    return set(map(sha, messages)) <= set(bodies(root))


# what the test Dovecot offers, but NOTIFY: a server where the watch keeps folders in IDLE one by one
NO_NOTIFY = ("IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS "
             "THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS "
             "LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
             "LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ SPECIAL-USE")


@pytest.fixture
def own_dovecot(dovecot, user):
    """A Dovecot of the test's own over the session's mail store, without NOTIFY, to stop and start
    at will (mail delivered through the session's Dovecot is in its folders too); the test's user
    can log in to it."""
    root = Path(tempfile.mkdtemp(prefix="mailsync-dovecot-watch-"))
    shutil.copytree(dovecot.root / "ca", root / "ca")
    d = Dovecot(root, users={}, mail_root=dovecot.root,
                extra_conf=f"auth_failure_delay = 0\nprotocol imap {{\n  imap_capability = {NO_NOTIFY}\n}}\n").start()
    d.add_user(user.name, user.password)
    yield d
    pid = root / "run" / "master.pid"
    if pid.exists():
        os.kill(int(pid.read_text()), signal.SIGTERM)  # no wait for its shutdown
    shutil.rmtree(root, ignore_errors=True)


def test_new_mail_arrives_through_idle_without_a_timer(user):
    first = msg(1)
    user.append("INBOX", [first])
    user.write_config('poll_interval = 3600\n')  # nothing but IDLE can bring the later mail
    w = Watch(user)
    try:
        w.wait_for(lambda: has(user.maildir, [first]))
        w.listening()
        later = [msg(n, body="later") for n in range(2, 6)]
        for i, m in enumerate(later):
            user.append("INBOX", [m])
            w.wait_for(lambda i=i: has(user.maildir, later[:i + 1]))
        assert any("changed on server" in e["reason"] for e in w.of("sync"))
    finally:
        assert w.stop() == 0, w.stderr
    assert bodies(user.maildir) == sorted(map(sha, [first] + later))  # each exactly once
    assert w.of("stopped") and "Traceback" not in w.stderr
    assert all(e["exit_code"] == 0 for e in w.of("sync"))
    # SIGTERM released the account: a sync by hand runs at once
    r = user.run("sync", "test", "--quiet")
    assert r.returncode == 0, r.stderr


def test_notify_covers_every_folder_on_one_connection(user):
    """The test Dovecot has NOTIFY: mail filed into any folder, and a folder made later, are pushed
    through one connection; nothing is left to the timer."""
    user.append("Work", [msg(1)])
    user.append("Junk", [msg(0, body="old spam")])
    user.write_config('poll_interval = 3600\nfolders = ["*", "!Junk"]\n')
    w = Watch(user)
    try:
        w.listening()
        (listening,) = w.of("listening")
        assert listening["notify"] is True and listening["folder"] == "all folders"
        filed = msg(2, body="filed")
        user.append("Work", [filed])
        w.wait_for(lambda: has(user.maildir, [filed]))
        made = msg(3, body="in a new folder")
        user.append("Projects/New", [made])
        w.wait_for(lambda: has(user.maildir, [made]))
        syncs = len(w.of("sync"))
        user.append("Junk", [msg(4, body="spam")])  # not a synced folder: no wake-up for it
        user.append("INBOX", [msg(5)])
        w.wait_for(lambda: len(w.of("sync")) > syncs)
        time.sleep(1)  # (a notification about Junk would have come by now: Dovecot sends them in 0.5 s)
    finally:
        assert w.stop() == 0, w.stderr
    reasons = [e["reason"] for e in w.of("sync")]
    assert any("Work: changed on server" in r for r in reasons)
    assert any("Projects/New: changed on server" in r or "folders changed on server" in r for r in reasons)
    assert not any("Junk" in r for r in reasons)
    assert len(w.of("listening")) == 1


def test_a_burst_of_deliveries_is_fetched_once_each(user):
    user.write_config('poll_interval = 3600\n')
    w = Watch(user)
    try:
        w.listening()
        burst = [msg(n, body="burst") for n in range(40)]
        user.append("INBOX", burst)
        w.wait_for(lambda: sum(e["totals"]["new"] for e in w.of("sync")) >= 40)
    finally:
        assert w.stop() == 0, w.stderr
    assert bodies(user.maildir) == sorted(map(sha, burst))
    assert sum(e["totals"]["new"] for e in w.of("sync")) == 40


def test_folders_not_in_idle_are_polled(own_dovecot, user):
    """A server without NOTIFY: INBOX in IDLE, the other folders synced every poll_interval."""
    user.append("Work", [msg(1)])
    user.write_config('poll_interval = 2\n', port=own_dovecot.imaps_port)
    w = Watch(user)
    try:
        w.listening()
        m = msg(2, body="filed")
        user.append("Work", [m])
        w.wait_for(lambda: has(user.maildir, [m]))
        w.wait_for(lambda: any(e["totals"]["new"] == 1 for e in w.of("sync")[1:]))
    finally:
        assert w.stop() == 0, w.stderr
    (brought,) = [e for e in w.of("sync")[1:] if e["totals"]["new"] == 1]
    assert brought["reason"] == "poll"


def test_watch_folders_each_get_an_idle_connection(own_dovecot, user):
    user.append("Work", [msg(1)])
    user.write_config('poll_interval = 3600\nwatch_folders = ["INBOX", "Work"]\n', port=own_dovecot.imaps_port)
    w = Watch(user)
    try:
        w.listening(2)
        assert {e["folder"] for e in w.of("listening")} == {"INBOX", "Work"}
        assert not any(e["notify"] for e in w.of("listening"))
        m = msg(2, body="work mail")
        user.append("Work", [m])
        w.wait_for(lambda: has(user.maildir, [m]))
        w.wait_for(lambda: any(e["totals"]["new"] == 1 for e in w.of("sync")[1:]))
        (brought,) = [e for e in w.of("sync")[1:] if e["totals"]["new"] == 1]
        assert brought["reason"] == "Work: changed on server"
    finally:
        assert w.stop() == 0, w.stderr


def test_server_restart_while_idling(own_dovecot, dovecot, user):
    """The watch's server goes away and comes back: it reconnects with backoff, fetches what was
    delivered meanwhile, and goes on listening; every message once."""
    user.write_config('poll_interval = 3600\n', port=own_dovecot.imaps_port)
    w = Watch(user)
    try:
        w.listening()
        own_dovecot.stop()
        w.wait_for(lambda: w.of("disconnected"))
        meanwhile = [msg(n, body="while down") for n in range(3)]
        user.append("INBOX", meanwhile)  # through the session's Dovecot: same mail store
        own_dovecot.start()
        w.wait_for(lambda: has(user.maildir, meanwhile))
        w.listening(2)
        assert w.of("listening")[-1]["reconnected"] is True
        after = msg(9, body="after restart")
        user.append("INBOX", [after])
        w.wait_for(lambda: has(user.maildir, [after]))
    finally:
        assert w.stop() == 0, w.stderr
    assert bodies(user.maildir) == sorted(map(sha, meanwhile + [after]))


def test_a_server_down_at_start_is_waited_for(own_dovecot, user):
    """At boot the network or the server may not be up yet: the watch says so and tries again,
    instead of exiting."""
    user.write_config('poll_interval = 3600\n', port=own_dovecot.imaps_port)
    mail = [msg(1, body="waiting")]
    user.append("INBOX", mail)
    own_dovecot.stop()
    w = Watch(user)
    try:
        w.wait_for(lambda: w.of("error"))
        (first,) = w.of("error")[:1]
        assert first["exit_code"] == 5 and first["retry_in"] == 1 and "127.0.0.1" in first["error_text"]
        own_dovecot.start()
        w.wait_for(lambda: has(user.maildir, mail))
        w.listening()
    finally:
        assert w.stop() == 0, w.stderr
    assert bodies(user.maildir) == [sha(mail[0])]


def test_kill_9_while_idling_then_restart(user):
    user.write_config('poll_interval = 3600\n')
    before = [msg(n) for n in range(3)]
    user.append("INBOX", before)
    w = Watch(user)
    w.wait_for(lambda: has(user.maildir, before))
    w.listening()
    w.proc.kill()
    w.proc.wait(WAIT)
    meanwhile = [msg(n, body="while dead") for n in range(3, 6)]
    user.append("INBOX", meanwhile)
    w2 = Watch(user)
    try:
        w2.wait_for(lambda: has(user.maildir, meanwhile))
        w2.listening()
        later = msg(7, body="later")
        user.append("INBOX", [later])
        w2.wait_for(lambda: has(user.maildir, [later]))
    finally:
        assert w2.stop() == 0, w2.stderr
    assert bodies(user.maildir) == sorted(map(sha, before + meanwhile + [later]))
    assert not os.listdir(user.maildir / "tmp")


def test_idle_is_renewed_before_a_quiet_connection_is_cut(dovecot, user):
    """A network that cuts connections quiet for 3 s (as NAT boxes do, after longer): with
    idle_renew = 1 the IDLE connection is never quiet that long, so it is never cut and push keeps
    working. Without renewing, the proxy cuts it and the watch has to reconnect."""
    with QuietCutProxy(dovecot.imaps_port, quiet=3.0) as proxy:
        user.write_config('poll_interval = 3600\nidle_renew = 1\n', port=proxy.port)
        w = Watch(user)
        try:
            w.listening()
            w.wait_for(lambda: len(w.of("idle_renewed")) >= 6)  # at least 6 s in IDLE
            m = msg(1, body="pushed")
            user.append("INBOX", [m])
            w.wait_for(lambda: has(user.maildir, [m]))
        finally:
            assert w.stop() == 0, w.stderr
        assert w.of("disconnected") == [] and len(w.of("listening")) == 1
        assert proxy.cuts == 0


def test_a_quiet_connection_cut_by_the_network_is_reopened(dovecot, user):
    """The same network with the default idle_renew (25 minutes): the IDLE connection is cut; the
    watch notices, reconnects, syncs, and push works again."""
    with QuietCutProxy(dovecot.imaps_port, quiet=1.5) as proxy:
        user.write_config('poll_interval = 3600\n', port=proxy.port)
        w = Watch(user)
        try:
            w.listening()
            w.wait_for(lambda: w.of("disconnected"))
            w.listening(2)
            m = msg(1, body="after the cut")
            user.append("INBOX", [m])
            w.wait_for(lambda: has(user.maildir, [m]))
        finally:
            assert w.stop() == 0, w.stderr
        assert proxy.cuts >= 1
    assert bodies(user.maildir) == [sha(m)]


def test_local_changes_are_pushed_in_sync_mode(user):
    user.append("INBOX", [msg(1)])
    user.write_config('mode = "sync"\npoll_interval = 3600\n')
    w = Watch(user)
    try:
        w.listening()
        w.wait_for(lambda: len(w.of("sync")) >= 2)  # the start, and the one when IDLE began
        (f,) = [p for p in local_files(user.maildir)]
        key = f.name.split(":2,")[0]
        os.rename(f, user.maildir / "cur" / f"{key}:2,FS")  # a mail reader: read and flagged

        w.wait_for(lambda: any("local change" in e["reason"].split(", ") and e["totals"]["flags_pushed"] == 1
                               for e in w.of("sync")))
        (_, (_, flags)), = user.server_messages()["INBOX"].items()
        assert {"\\Seen", "\\Flagged"} <= flags
    finally:
        assert w.stop() == 0, w.stderr


def test_pop3_accounts_are_polled(dovecot, user, tmp_path):
    user.config.write_text(
        f'[accounts.test]\nprotocol = "pop3"\nhost = "127.0.0.1"\nport = {dovecot.pop3s_port}\n'
        f'username = "{user.name}"\npassword_env = "MAILSYNC_TEST_PASSWORD"\nmaildir = "{user.maildir}"\n'
        f'ca_file = "{dovecot.ca_file}"\npoll_interval = 1\n')
    w = Watch(user)
    try:
        w.wait_for(lambda: w.of("sync"))
        m = msg(1, body="pop")
        user.append("INBOX", [m])
        w.wait_for(lambda: has(user.maildir, [m]))
        assert not w.of("listening")  # POP3 has no push
    finally:
        assert w.stop() == 0, w.stderr
    assert bodies(user.maildir) == [sha(m)]


def test_wrong_password_ends_the_watch_at_start(own_dovecot, user):
    user.write_config(port=own_dovecot.imaps_port)
    r = user.run("watch", env=user.env(MAILSYNC_TEST_PASSWORD="wrong"), timeout=WAIT)
    assert r.returncode == 3
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("mailsync: error:") and "password" in line.lower()
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_bad_watch_setting_is_a_config_error(user):
    user.write_config("idle_renew = 3600\n")
    r = user.run("watch", timeout=WAIT)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "idle_renew" in line and "1740" in line


def test_text_output_is_one_line_per_sync(user):
    user.append("INBOX", [msg(1)])
    user.write_config('poll_interval = 3600\n')
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(user.config), "watch"],
                         env=user.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    deadline = time.monotonic() + WAIT
    while not local_files(user.maildir) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert "test: start" in lines[0] and "1 new" in lines[0]
    assert lines[-1].endswith("test: stopped; what was saved is kept")
    assert err == ""
