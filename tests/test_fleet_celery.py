"""`mailsync fleet run --broker`: the Celery backend on a real redis-server (started here on a free
127.0.0.1 port) with two real `mailsync fleet worker` processes (concurrency 2 each), against the
session's Dovecot; every mailbox checked message by message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mailsync.fleet.celery_backend import status
from mailsync.fleet.run import COLUMNS
from tests.helpers import ROOT, msg
from tests.redis_server import RedisServer
from tests.test_fleet import (  # noqa: F401
    box_template,
    content,
    fast_fail_dovecot,
    fleet,
    new_user,
    seed,
    write_config,
    write_jobs,
)
from tests.test_kill_sweep import as_backup, local_state, server_state

# short for the tests (docs/fleet.md has the defaults and why)
WORKER_OPTS = ["--visibility-timeout", "8", "--lock-ttl", "3", "--restore-interval", "1", "--retry-countdown", "1"]


class Workers:
    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.procs: list[subprocess.Popen | None] = [None, None]

    def start(self, i: int) -> None:
        env = dict(os.environ, XDG_STATE_HOME=str(self.root / "state"))
        env.pop("MAILSYNC_CRASH_AT", None)
        with open(self.root / f"worker{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [sys.executable, "-m", "mailsync", "fleet", "worker", "--broker", self.url, "--concurrency", "2",
                 *WORKER_OPTS], env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)  # its own process group: killed as a whole (pool processes too)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs if p is not None and p.poll() is None}

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)
        for i, p in enumerate(self.procs):
            if p is not None and p.pid == pid:
                p.wait()
                self.procs[i] = None

    def ensure(self) -> None:
        for i, p in enumerate(self.procs):
            if p is None or p.poll() is not None:
                self.start(i)

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    try:
        r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def workers(redis_server, tmp_path_factory):
    w = Workers(redis_server.url, tmp_path_factory.mktemp("workers"))
    w.ensure()
    yield w
    w.stop()


@pytest.fixture
def broker(redis_server, workers):
    """The broker URL, with both workers running (a test may have killed one, or Redis restarted)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    workers.ensure()
    return redis_server.url


def report(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def exact(u, tmp: Path) -> bool:
    root = tmp / "backups" / u.name
    return local_state(root) == as_backup(server_state(u), root)


# -- 1. twenty backups ------------------------------------------------------------------------------

def test_twenty_backups_over_celery_are_exact(dovecot, broker, workers, tmp_path):
    users = [new_user(dovecot, tmp_path) for _ in range(20)]
    counts = {u.name: seed(u, 1 + i % 4, 1000 * i) for i, u in enumerate(users)}
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}" for u in users])
    r = fleet(cfg, jobs, "--broker", broker, "--report", str(tmp_path / "r.json"), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"fleet: 20 jobs: 20 ok, 0 failed ({sum(counts.values())} messages" in r.stdout
    for u in users:
        assert exact(u, tmp_path), u.name
    rows = report(tmp_path / "r.json")
    assert [(row["account"], row["outcome"], row["attempts"], row["messages"]) for row in rows] == \
        [(f"box-{u.name}", "ok", 1, counts[u.name]) for u in users]
    # the worker column: the Celery workers' hostname:pid (their main processes), both of them
    assert {int(row["worker"].split(":")[1]) for row in rows} == workers.pids
    # fleet status: one line per job, from the progress hash
    st = subprocess.run([sys.executable, "-m", "mailsync", "fleet", "status", "--broker", broker, "--json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert st.returncode == 0, st.stderr
    got = json.loads(st.stdout)
    assert [(j["line"], j["state"], j["messages"]) for j in got["jobs"]] == \
        [(i + 2, "ok", counts[u.name]) for i, u in enumerate(users)]


# -- 2. migrations ----------------------------------------------------------------------------------

def test_migrations_over_celery_are_exact_and_idempotent(dovecot, broker, tmp_path):
    pairs = [(new_user(dovecot, tmp_path), new_user(dovecot, tmp_path)) for _ in range(4)]
    for i, (src, _dst) in enumerate(pairs):
        seed(src, 2 + i, 1000 * i)
        src.append("Archive/2024", [msg(950 + i, "old")], flags=[b"\\Flagged"])
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,destination,user,target",
                      [f"migrate,box,new,{s.name},{d.name}" for s, d in pairs])
    r = fleet(cfg, jobs, "--broker", broker, "--report", str(tmp_path / "r1.json"), "--quiet", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    for src, dst in pairs:
        assert content(dst) == content(src), src.name
    total = [sum(len(v) for v in content(s).values()) for s, _ in pairs]
    assert [(row["outcome"], row["messages"]) for row in report(tmp_path / "r1.json")] == [("ok", n) for n in total]
    r = fleet(cfg, jobs, "--broker", broker, "--report", str(tmp_path / "r2.json"), "--quiet", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [(row["outcome"], row["messages"]) for row in report(tmp_path / "r2.json")] == [("ok", 0)] * 4
    for src, dst in pairs:
        assert content(dst) == content(src), src.name


# -- 3. a worker killed mid-job -----------------------------------------------------------------------

def test_a_job_of_a_killed_worker_is_delivered_again_and_completes(dovecot, broker, workers, tmp_path):
    big = new_user(dovecot, tmp_path)
    big.server.seed(big.name, "INBOX", [msg(i, "x" * 2000) for i in range(4000)])
    small = [new_user(dovecot, tmp_path) for _ in range(2)]
    for i, u in enumerate(small):
        seed(u, 2, 100 * i)
    # the big job is paced (8 MB at 2 MB/s: about 4 s), so that however fast this machine it is
    # still running when the test sees it and kills its worker; in batches of 256 KB, so that what
    # it stored before the kill is committed and the redelivered job fetches only the rest
    cfg = write_config(tmp_path, dovecot, extra=box_template(
        "slow", dovecot, tmp_path, "max_bytes_per_second = 2000000\nbatch_bytes = 262144\n"))
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user",
                      [f"backup,slow,{big.name}"] + [f"backup,box,{u.name}" for u in small])
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(cfg), "fleet", "run", str(jobs),
                          "--broker", broker, "--report", str(tmp_path / "r.json")],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:  # the worker that runs the big job, mid-job
        _, rows = status(broker)
        row = next((r for r in rows if r["account"] == f"slow-{big.name}"), None)
        if row and row["state"] == "running" and row["messages"] > 50:
            victim = int(row["worker"].split(":")[1])
        time.sleep(0.05)
    assert victim in workers.pids, "the big job never ran"
    workers.kill(victim)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    rows = {row["account"]: row for row in report(tmp_path / "r.json")}
    row = rows[f"slow-{big.name}"]
    assert row["outcome"] == "ok" and int(row["worker"].split(":")[1]) != victim  # finished elsewhere
    assert 0 < row["messages"] < 4000  # the second run fetched only what the first had not stored
    _, st = status(broker)
    assert next(r for r in st if r["account"] == f"slow-{big.name}")["attempt"] == 2
    for u in [big, *small]:
        assert exact(u, tmp_path), u.name  # every message, none twice


# -- 4. a wrong password ----------------------------------------------------------------------------

def test_a_wrong_password_is_reported_and_not_retried(dovecot, broker, fast_fail_dovecot, tmp_path):  # noqa: F811
    good = [new_user(dovecot, tmp_path) for _ in range(3)]
    ff = fast_fail_dovecot()
    bad = new_user(ff, tmp_path, password="not-what-the-template-says")
    for i, u in enumerate([*good, bad]):
        seed(u, 2, 100 * i)
    cfg = write_config(tmp_path, dovecot, extra=box_template("boxb", ff, tmp_path))
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user",
                      [f"backup,box,{good[0].name}", f"backup,boxb,{bad.name}",
                       f"backup,box,{good[1].name}", f"backup,box,{good[2].name}"])
    r = fleet(cfg, jobs, "--broker", broker, "--report", str(tmp_path / "r.json"), tmp=tmp_path)
    assert r.returncode == 9, r.stderr
    rows = {row["account"]: row for row in report(tmp_path / "r.json")}
    row = rows[f"boxb-{bad.name}"]
    assert (row["outcome"], row["exit_code"], row["attempts"]) == ("auth", 3, 1)
    assert f"line 3: backup boxb-{bad.name}: auth: login as" in r.stderr
    assert "fleet: 4 jobs: 3 ok, 1 failed (1 auth) (" in r.stdout
    assert "not-what-the-template-says" not in r.stderr + r.stdout + json.dumps(rows)
    for u in good:
        assert rows[f"box-{u.name}"]["outcome"] == "ok" and exact(u, tmp_path)


# -- 5. the per-host connection limit ---------------------------------------------------------------

def _peak_connections(dovecot, names: set[str], run) -> tuple[int, list[int]]:
    """Runs run() while sampling `doveadm who -1` (one line per connection) every ~20 ms: the
    largest number of connections of the accounts `names` seen at once, and the samples."""
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out = dovecot.doveadm("who", "-1")
            seen.append(sum(1 for line in out.splitlines()[1:] if line.split() and line.split()[0] in names))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        run()
    finally:
        stop.set()
        t.join()
    return max(seen), seen


def test_the_per_host_connection_limit_holds_over_all_workers(dovecot, broker, tmp_path):
    cfg = write_config(tmp_path, dovecot, box="connections = 1\n")
    peaks = {}
    for limit in (2, 10):
        users = [new_user(dovecot, tmp_path) for _ in range(6)]
        for i, u in enumerate(users):
            u.server.seed(u.name, "INBOX", [msg(i * 1000 + k, "y" * 1000) for k in range(300)])
        jobs = write_jobs(tmp_path / f"jobs{limit}.csv", "command,account,user",
                          [f"backup,box,{u.name}" for u in users])
        done: list = []

        def run(jobs=jobs, limit=limit, done=done):
            done.append(fleet(cfg, jobs, "--broker", broker, "--max-connections-per-host", str(limit), "--quiet",
                              tmp=tmp_path))

        peaks[limit], _ = _peak_connections(dovecot, {u.name for u in users}, run)
        assert done[0].returncode == 0, done[0].stderr
        for u in users:
            assert exact(u, tmp_path), u.name
    # each job opens at most `connections` (1) IMAP connection and holds that many of the host's
    # slots: with a limit of 2, never more than 2 x 1 connections of these accounts at once, and
    # 2 at once was seen (the jobs did overlap up to the limit); the same jobs with a limit of 10
    # reach more than 2 at once (the 4 worker processes run 4 jobs): the sampler would have seen
    # a limit not kept
    assert peaks[2] == 2, peaks
    assert peaks[10] > 2, peaks


# -- 6. Redis restarted mid-fleet ---------------------------------------------------------------------

def test_redis_restarted_mid_fleet(dovecot, broker, redis_server, workers, tmp_path):
    users = [new_user(dovecot, tmp_path) for _ in range(6)]
    for i, u in enumerate(users):
        u.server.seed(u.name, "INBOX", [msg(i * 10000 + k, "z" * 1000) for k in range(1500)])
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}" for u in users])
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(cfg), "fleet", "run", str(jobs),
                          "--broker", broker, "--report", str(tmp_path / "r.json"), "--broker-wait", "30",
                          "--resend-delay", "4"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    running = False
    while not running and time.monotonic() < deadline:  # restarted once the first job runs
        _, rows = status(broker)
        running = any(r["state"] == "running" for r in rows)
        time.sleep(0.02)
    assert running
    redis_server.restart(down=1.0)
    _, err = p.communicate(timeout=120)
    assert "Traceback" not in err
    # said once, on one line each: Redis went away, came back empty, the unfinished jobs are sent again
    assert f"mailsync: warning: lost the broker at {broker} (" in err
    assert f"mailsync: warning: the broker at {broker} lost its data (restarted?); sending the unfinished jobs " \
           "again in 4 s" in err
    # the fleet goes on: the running jobs store their results in the new Redis, the lost ones run
    # again (a copy of a finished job returns its stored result or, that lost too, copies nothing)
    assert p.returncode == 0, err
    assert [row["outcome"] for row in report(tmp_path / "r.json")] == ["ok"] * 6
    # the same jobs file again: completes; every message there exactly once
    r = fleet(cfg, jobs, "--broker", broker, "--quiet", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    for u in users:
        assert exact(u, tmp_path), u.name


def test_no_redis_is_one_clear_line_and_exit_5(dovecot, tmp_path):
    u = new_user(dovecot, tmp_path)
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}"])
    from tests.dovecot import free_port
    r = fleet(cfg, jobs, "--broker", f"redis://127.0.0.1:{free_port()}/0", tmp=tmp_path)
    assert r.returncode == 5, r.stderr
    assert r.stderr.startswith("mailsync: error: cannot reach the broker at redis://127.0.0.1:")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- 7. the same report rows as the local backend --------------------------------------------------------

def test_local_and_celery_reports_agree(dovecot, broker, tmp_path):
    users = [new_user(dovecot, tmp_path) for _ in range(3)]
    for i, u in enumerate(users):
        seed(u, 2 + i, 100 * i)
    rows = [f"backup,box,{users[0].name}", f"backup,box,{users[1].name}", f"verify,box,{users[0].name}",
            f"backup,box,{users[2].name}", f"verify,box,{users[2].name}"]
    got = {}
    for how, args in (("local", ["--processes", "2"]), ("celery", ["--broker", broker])):
        d = tmp_path / how  # each its own Maildirs: both start from nothing
        d.mkdir()
        cfg = write_config(d, dovecot)
        jobs = write_jobs(d / "jobs.csv", "command,account,user", rows)
        r = fleet(cfg, jobs, *args, "--quiet", "--report", str(d / "r.json"), tmp=d)
        assert r.returncode == 0, r.stderr
        got[how] = [{k: row[k] for k in COLUMNS if k not in ("worker", "seconds")} for row in report(d / "r.json")]
    assert got["local"] == got["celery"]
    assert [row["outcome"] for row in got["celery"]] == ["ok"] * 5


def test_the_local_fleet_never_imports_celery_or_redis():
    code = ("import sys, mailsync.cli, mailsync.fleet.run, mailsync.fleet.backend; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'redis', 'kombu')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       check=False)
    assert r.stdout.strip() == "[]", r.stderr


# -- 8. the per-host byte rate -------------------------------------------------------------------------

def fleet_rate(cfg: Path, jobs: Path, broker: str, rate: int, report_path: Path, tmp: Path):
    """`fleet run --broker B --max-bytes-per-second-per-host RATE` (run.run's max_bytes_per_host;
    the CLI option is in mailsync/cli.py), in its own process like the CLI."""
    code = ("import sys; from pathlib import Path; from mailsync import config; from mailsync.fleet import run; "
            "sys.exit(run.run(config.load(sys.argv[1]), Path(sys.argv[2]), broker=sys.argv[3], "
            "max_bytes_per_host=int(sys.argv[4]), report=Path(sys.argv[5]), quiet=True))")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"))
    env.pop("MAILSYNC_CRASH_AT", None)
    return subprocess.run([sys.executable, "-c", code, str(cfg), str(jobs), broker, str(rate), str(report_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)


def test_the_per_host_byte_rate_holds_over_all_workers(dovecot, broker, tmp_path):
    rate = 200 * 1024
    users = [new_user(dovecot, tmp_path) for _ in range(8)]
    for i, u in enumerate(users):
        u.server.seed(u.name, "INBOX", [msg(i * 1000 + k, "r" * 10_000) for k in range(10)])  # ~100 KB each
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}" for u in users])
    t0 = time.monotonic()
    r = fleet_rate(cfg, jobs, broker, rate, tmp_path / "r.json", tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    rows = report(tmp_path / "r.json")
    assert [row["outcome"] for row in rows] == ["ok"] * 8
    total = sum(row["bytes"] for row in rows)
    assert total >= 8 * 100_000
    # the 4 worker processes ran the jobs side by side, sharing one bucket in Redis: together they
    # cannot have moved the bytes faster than the rate (the bucket starts empty; one second of
    # slack all the same). Each with its own bucket they would have needed about a quarter of it.
    assert took >= (total - rate) / rate, (took, total)
    assert len({row["worker"] for row in rows}) == 2  # both workers took jobs
    import redis

    from mailsync.fleet.celery_app import rate_key
    assert redis.Redis.from_url(broker).exists(rate_key("127.0.0.1"))  # the shared bucket was used
    for u in users:
        assert exact(u, tmp_path), u.name


def test_the_per_host_byte_rate_needs_the_broker(dovecot, tmp_path):
    from mailsync import config
    from mailsync.errors import ConfigError
    from mailsync.fleet import run
    u = new_user(dovecot, tmp_path)
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}"])
    with pytest.raises(ConfigError, match="only with --broker"):
        run.run(config.load(cfg), jobs, max_bytes_per_host=100_000, quiet=True)
