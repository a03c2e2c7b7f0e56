"""kill -9 at any point, then a re-run: every server message in the backup exactly once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import local_files, msg, sha
from tests.test_backup import check_backup_matches_server


def seed(user):
    body = "y" * 3000
    user.server.seed(user.name, "INBOX", [msg(i, body) for i in range(60)])
    user.server.seed(user.name, "Work", [msg(100 + i, body) for i in range(40)], flags="S")
    user.server.seed(user.name, "Archive/2020", [msg(200 + i, body) for i in range(40)], flags="FS")
    user.write_config("batch_bytes = 65536\nconnections = 2")


def assert_exactly_once(user):
    files = local_files(user.maildir)
    hashes = [sha(b) for b in files.values()]
    assert len(hashes) == len(set(hashes)) == 140, f"{len(hashes)} files, {len(set(hashes))} distinct"
    check_backup_matches_server(user)
    for tmp in user.maildir.rglob("tmp"):
        assert not any(tmp.iterdir()), f"leftovers in {tmp}"


@pytest.mark.parametrize("point", ["staged:1", "recorded:1", "recorded:3", "published:1", "published:25",
                                   "published:70", "folder:1", "folder:2"])
def test_kill_at_durable_step_then_rerun(user, point):
    seed(user)
    r = user.run("sync", "test", env=user.env(MAILSYNC_CRASH_AT=point))
    assert r.returncode == 137, (point, r.stderr)
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(user)
    r = user.run("sync", "test", "--json")
    assert '"new": 0' in r.stdout


def test_kill_twice_in_a_row(user):
    seed(user)
    assert user.run("sync", "test", env=user.env(MAILSYNC_CRASH_AT="published:10")).returncode == 137
    assert user.run("sync", "test", env=user.env(MAILSYNC_CRASH_AT="recorded:2")).returncode == 137
    assert user.run("sync", "test").returncode == 0
    assert_exactly_once(user)


@pytest.mark.parametrize("delay", [0.25, 0.4, 0.55, 0.7])
def test_sigkill_at_a_random_moment_then_rerun(user, delay):
    seed(user)
    p = user.popen("sync", "test")
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    p.stdout.close()
    p.stderr.close()
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(user)


def test_ctrl_c_stops_promptly_and_a_rerun_completes(user):
    seed(user)
    p = user.popen("sync", "test")
    deadline = time.monotonic() + 20
    while not (user.maildir / ".mailsync.db").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the run has started (and Python installed its Ctrl-C handler)
    time.sleep(0.1)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode in (0, 130), err  # 0 if it had already finished
    if p.returncode == 130:
        assert b"interrupted" in err and b"Traceback" not in err
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(user)
