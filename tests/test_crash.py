"""kill -9 at any point, then a re-run: every server message in the backup exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, local_files, msg, sha
from tests.test_backup import check_backup_matches_server
from tests.test_kill_sweep import count_files


def seed(user, body: str = "y" * 3000, connections: int = 2):
    user.server.seed(user.name, "INBOX", [msg(i, body) for i in range(60)])
    user.server.seed(user.name, "Work", [msg(100 + i, body) for i in range(40)], flags="S")
    user.server.seed(user.name, "Archive/2020", [msg(200 + i, body) for i in range(40)], flags="FS")
    user.write_config(f"batch_bytes = 65536\nconnections = {connections}")


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


# ----------------------------------------------------------------------------- kills by signal
#
# A clean run of this corpus takes about 0.3 s, most of it start-up: the download itself is well
# under 0.1 s. A signal sent after a fixed delay mostly lands after the run has exited, so these
# tests send it on what the run has done (the K-th message file visible in cur/ or new/), and
# require it to have landed: the killed run ends by SIGKILL, the interrupted one with exit 130,
# before all the mail is there.

BIG = "z" * 12_000  # 5 messages a 64 KiB batch: 28 batches, so the download lasts long enough




def start(user, config: Path | None = None) -> subprocess.Popen:
    """`mailsync sync test` at a lower priority (nice 10): the test watching it gets the CPU as
    soon as it asks, so on a busy machine too its signal lands at the moment meant (without it,
    with both CPUs busy, a kill meant for the 120th file sometimes found all 140 there)."""
    return subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(config or user.config), "sync", "test"],
                            env=user.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: os.nice(10))


def wait_for(p: subprocess.Popen, done, timeout: float = 60) -> None:
    """Poll (every millisecond) until done() is true or the run p ended."""
    deadline = time.monotonic() + timeout
    while p.poll() is None and not done() and time.monotonic() < deadline:
        time.sleep(0.001)


def download_window(user) -> float:
    """Seconds from the first to the last message file of a clean run into another Maildir
    (the same account: a backup does not change the server)."""
    other = user.tmp / "reference"
    cfg = user.tmp / "reference.toml"
    cfg.write_text(user.config.read_text().replace(str(user.maildir), str(other)))
    p = start(user, cfg)
    first = last = None
    while p.poll() is None:
        n = count_files(other) if other.exists() else 0
        if n and first is None:
            first = time.monotonic()
        if n == 140 and last is None:
            last = time.monotonic()
        time.sleep(0.001)
    _, err = p.communicate()
    assert p.returncode == 0, err
    assert first is not None and last is not None, "the reference run was too quick to watch"
    return last - first


@pytest.mark.parametrize("moment", ["file:1", "file:20", "file:70", "file:120", "mid-download"])
def test_sigkill_at_a_random_moment_then_rerun(user, moment):
    """SIGKILL once the K-th of the 140 message files is visible, or (mid-download) a random
    15 to 60% of a clean run's download time after the first one is: the kill must land while
    the mail is still coming (killed by the signal, some files there, not all); the next run
    exits 0 with every message exactly once."""
    seed(user, BIG)
    wait = 0.0
    if moment == "mid-download":
        wait = random.uniform(0.15, 0.6) * download_window(user)
        k = 1
    else:
        k = int(moment.split(":")[1])
    p = start(user)
    wait_for(p, lambda: user.maildir.exists() and count_files(user.maildir) >= k)
    time.sleep(wait)
    p.kill()  # (only if it is still running)
    _, err = p.communicate(timeout=30)
    there = count_files(user.maildir) if user.maildir.exists() else 0
    assert p.returncode == -signal.SIGKILL, \
        f"{moment} (+{wait * 1000:.0f} ms): the run ended before the kill (exit {p.returncode}): {err[-2000:]!r}"
    assert k <= there < 140, f"{moment} (+{wait * 1000:.0f} ms): killed with {there} of 140 files there"
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(user)


@pytest.mark.parametrize("moment,connections", [("state-opened", 2), ("file:1", 2), ("file:60", 2),
                                                ("file:30", 1)])
def test_ctrl_c_stops_promptly_and_a_rerun_completes(user, moment, connections):
    """SIGINT while the run works (once its state file exists: it is logging in and listing;
    or once the K-th message file is visible): it must end within 10 seconds with exit 130,
    one `interrupted` line and no traceback, before all the mail is there (with several
    connections each folder finishes the batch it is on and stops; with one, the batch in
    progress is dropped); the next run completes with every message exactly once."""
    seed(user, BIG, connections=connections)
    p = start(user)
    if moment == "state-opened":
        wait_for(p, lambda: (user.maildir / ".mailsync.db").exists())
    else:
        k = int(moment.split(":")[1])
        wait_for(p, lambda: user.maildir.exists() and count_files(user.maildir) >= k)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)  # (only if it is still running)
    _, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert p.returncode == 130, f"{moment}: exit {p.returncode}, stderr {err[-2000:]!r}"
    assert err.decode() == "mailsync: interrupted; what was saved is kept, run again to continue\n", err[-2000:]
    assert count_files(user.maildir) < 140, f"{moment}: the run went on to the end"
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(user)



def ctrl_c_at(user, step: str):
    """Run mailsync paused at the step (crashpoint.pause), send SIGINT there, let it go on;
    returns (exit status, stdout, stderr)."""
    flag = user.tmp / f"paused-{step}"
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(user.config), "sync", "test"],
                         env=user.env(MAILSYNC_PAUSE_AT=step, MAILSYNC_PAUSE_FILE=str(flag)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not flag.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert flag.exists(), f"the run never reached {step} (exit {p.poll()})"
    p.send_signal(signal.SIGINT)
    time.sleep(0.2)  # (it is handled, or ignored, while the run waits)
    flag.unlink(missing_ok=True)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def test_ctrl_c_once_the_outcome_is_decided_is_ignored(user):
    """SIGINT after the exit code is decided, as the interpreter is about to end (while it does,
    Python restores the default SIGINT action): the run exits 0 with nothing on stderr, never by
    the signal itself (status -2, nothing said) or with a traceback."""
    seed(user)
    for i in range(2):  # the first run downloads, the second has nothing to do
        code, out, err = ctrl_c_at(user, "decided")
        assert code == 0, f"run {i}: exit {code}, stderr {err[-2000:]!r}"
        assert err == b"", err[-2000:]
        assert out.startswith(b"test: 3 folders"), out
    assert_exactly_once(user)


def test_ctrl_c_while_the_summary_is_printed_is_an_interruption(user):
    """SIGINT after the summary line, before the command ends: exit 130 and the one
    `interrupted` line; what was saved stays saved."""
    seed(user)
    code, out, err = ctrl_c_at(user, "summary")
    assert code == 130, f"exit {code}, stderr {err[-2000:]!r}"
    assert err.decode() == "mailsync: interrupted; what was saved is kept, run again to continue\n", err
    assert out.startswith(b"test: 3 folders"), out
    assert_exactly_once(user)


def test_an_error_while_ctrl_c_unwinds_still_reads_as_interrupted(monkeypatch, capsys):
    """A clean-up that fails because Ctrl-C cut short what it cleans up (here: the ROLLBACK of
    a schema migration whose COMMIT had just happened, which SQLite refuses) must not turn the
    Ctrl-C into `state file ... is unreadable` and exit 8: it is exit 130, `interrupted`."""
    import sqlite3

    import typer

    from mailsync import cli
    from mailsync.errors import StorageError
    monkeypatch.setattr(cli, "_said", {}, raising=False)

    def migrate():
        try:
            try:
                raise KeyboardInterrupt  # arrives just after the COMMIT
            except BaseException:
                raise sqlite3.OperationalError("cannot rollback - no transaction is active")
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"state file is unreadable: {exc}") from None

    with pytest.raises(typer.Exit) as got:
        with cli._Errors(False, "mailsync: interrupted; what was saved is kept, run again to continue"):
            migrate()
    assert got.value.exit_code == 130
    assert capsys.readouterr().err == "mailsync: interrupted; what was saved is kept, run again to continue\n"
    with pytest.raises(typer.Exit) as got:  # the same error without a Ctrl-C under it stays exit 8
        with cli._Errors(False):
            raise StorageError("state file is unreadable: file is not a database")
    assert got.value.exit_code == 8
