"""`mailsync fleet run`: many jobs from one jobs file and one template, against the real Dovecot;
the templates and the jobs file checks; run_job's retries by cause; next_wait."""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailsync import config as config_mod
from mailsync.errors import ConfigError, ConnectError, ServerError
from mailsync.fleet.backend import Backend
from mailsync.fleet.jobs import Job, JobsError, read_jobs
from mailsync.fleet.run import schedule
from mailsync.fleet.work import NETWORK, THROTTLE, blank_result, next_wait, run_job
from tests.dovecot import Dovecot, free_port
from tests.faults import ThrottleProxy
from tests.helpers import ROOT, MailUser, msg
from tests.test_kill_sweep import as_backup, local_state, server_state

_ids = itertools.count(1)


# -- helpers ---------------------------------------------------------------------------------

def new_user(dovecot, tmp: Path, password: str | None = None) -> MailUser:
    """A server account whose password is what the template's password_command prints
    ("pw-NAME"), unless password says otherwise (a wrong one)."""
    name = f"fl{os.getpid()}x{next(_ids)}"
    dovecot.add_user(name, password or f"pw-{name}")
    return MailUser(dovecot, name, f"pw-{name}" if password is None else password, tmp)


def box_template(name: str, server, tmp: Path, more: str = "") -> str:
    """A [templates.NAME] like [templates.box] on another server (or with more keys)."""
    return f"""
[templates.{name}]
host = "127.0.0.1"
port = {server.imaps_port}
ca_file = "{server.ca_file}"
username = "{{user}}"
password_command = ["printf", "%s", "pw-{{user}}"]
maildir = "{tmp}/backups/{{user}}"
{more}"""


def write_config(tmp: Path, dovecot, port: int | None = None, extra: str = "", box: str = "") -> Path:
    """One template per role, filled from the jobs file's `user` (and `target`) columns; box:
    more keys for [templates.box], extra: more tables."""
    cfg = tmp / "fleet.toml"
    common = f'host = "127.0.0.1"\nport = {port or dovecot.imaps_port}\nca_file = "{dovecot.ca_file}"\n'
    cfg.write_text(f"""
[templates.box]
{common}username = "{{user}}"
password_command = ["printf", "%s", "pw-{{user}}"]
maildir = "{tmp}/backups/{{user}}"
{box}
[templates.new]
{common}username = "{{target}}"
password_command = "printf %s pw-{{target}}"
maildir = "{tmp}/unused/{{target}}"
{extra}""")
    return cfg


def write_jobs(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def fleet(cfg: Path, jobs: Path, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"))
    env.pop("MAILSYNC_CRASH_AT", None)
    return subprocess.run([sys.executable, "-m", "mailsync", "--config", str(cfg), "fleet", "run", str(jobs), *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)


def content(u: MailUser) -> dict[str, list]:
    """folder -> sorted (sha256, flags) of every message of the account on the server."""
    return server_state(u)


def seed(u: MailUser, n: int, base: int) -> int:
    """n messages in INBOX, and n // 2 + 1 (read) in Work; returns how many in all."""
    u.server.seed(u.name, "INBOX", [msg(base + i, f"for {u.name}") for i in range(n)])
    u.server.seed(u.name, "Work", [msg(base + 50 + i, f"work of {u.name}") for i in range(n // 2 + 1)], flags="S")
    return n + n // 2 + 1


@pytest.fixture
def fast_fail_dovecot(dovecot):
    """Makes throwaway Dovecots over the session's mail store that refuse a wrong password at once
    (no auth_failure_delay). Dovecot's auth penalty (per client IP, it delays every login after a
    failed one by 4 s and more) stays on such an instance, off the session's: one per failure."""
    started: list[Dovecot] = []

    def start() -> Dovecot:
        root = Path(tempfile.mkdtemp(prefix="mailsync-dovecot-fleet-"))
        shutil.copytree(dovecot.root / "ca", root / "ca")  # no new keys to make
        started.append(Dovecot(root, users={}, mail_root=dovecot.root, extra_conf="auth_failure_delay = 0\n").start())
        return started[-1]

    yield start
    for d in started:
        os.kill(int((d.root / "run" / "master.pid").read_text()), signal.SIGTERM)  # no wait for its shutdown
        shutil.rmtree(d.root, ignore_errors=True)


# -- the fleet against the real server ----------------------------------------------------------

def test_twenty_backups_from_one_template(dovecot, tmp_path):
    users = [new_user(dovecot, tmp_path) for _ in range(20)]
    counts = {u.name: seed(u, 1 + i % 4, 1000 * i) for i, u in enumerate(users)}
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user,notes",
                      [f"backup,box,{u.name},row {i}" for i, u in enumerate(users)])
    r = fleet(cfg, jobs, "--processes", "4", "--report", str(tmp_path / "report.json"), "--quiet", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # --quiet
    for u in users:  # message by message: each Maildir holds exactly its own server's mail
        root = tmp_path / "backups" / u.name
        assert local_state(root) == as_backup(server_state(u), root), u.name
    rows = json.loads((tmp_path / "report.json").read_text())
    assert len(rows) == 20
    assert {r["account"]: r["messages"] for r in rows} == {f"box-{n}": c for n, c in counts.items()}
    for row in rows:
        assert (row["command"], row["outcome"], row["exit_code"], row["attempts"], row["folders"]) == \
            ("backup", "ok", 0, 1, 2)
        assert row["destination"] is None and row["error"] == "" and row["bytes"] > 0
        assert row["worker"].split(":")[1].isdigit() and row["seconds"] > 0
    assert len({row["worker"] for row in rows}) > 1  # spread over the worker processes
    # a verify pass over every backup (and a backup again of each: one job per account at a time,
    # so neither meets the other's run lock), with a CSV report
    jobs = write_jobs(tmp_path / "jobs2.csv", "command,account,user",
                      [f"{c},box,{u.name}" for u in users for c in ("verify", "backup")])
    r = fleet(cfg, jobs, "--processes", "4", "--report", str(tmp_path / "report.csv"), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"fleet: 40 jobs: 40 ok, 0 failed ({sum(counts.values())} messages" in r.stdout
    with open(tmp_path / "report.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 40 and tuple(table[0]) == ("line", "account", "command", "destination", "outcome",
                                                     "exit_code", "messages", "bytes", "folders", "seconds",
                                                     "attempts", "worker", "error")
    assert [int(row["line"]) for row in table] == list(range(2, 42))
    verified = {row["account"]: int(row["messages"]) for row in table if row["command"] == "verify"}
    assert verified == {f"box-{n}": c for n, c in counts.items()}  # every message checked
    assert {(row["outcome"], row["exit_code"]) for row in table} == {("ok", "0")}
    assert {row["messages"] for row in table if row["command"] == "backup"} == {"0"}  # nothing new


def test_fleet_of_migrations_is_exact_and_idempotent(dovecot, tmp_path):
    pairs = [(new_user(dovecot, tmp_path), new_user(dovecot, tmp_path)) for _ in range(3)]
    for i, (src, _dst) in enumerate(pairs):
        seed(src, 2 + i, 1000 * i)
        src.append("Sent", [msg(900 + i, "sent")], flags=[b"\\Seen"])
        src.append("Archive/2024", [msg(950 + i, "old"), msg(960 + i, "older")], flags=[b"\\Flagged"])
    _dst0 = pairs[0][1]
    _dst0.append("INBOX", [msg(0, f"for {pairs[0][0].name}")])  # already there (copied by hand): not twice
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,destination,user,target",
                      [f"migrate,box,new,{s.name},{d.name}" for s, d in pairs])
    r = fleet(cfg, jobs, "--report", str(tmp_path / "r1.json"), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    for src, dst in pairs:
        assert content(dst) == content(src), src.name
    rows = json.loads((tmp_path / "r1.json").read_text())
    total = [sum(len(v) for v in content(s).values()) for s, _ in pairs]
    assert [(row["account"], row["destination"], row["outcome"]) for row in rows] == \
        [(f"box-{s.name}", f"new-{d.name}", "ok") for s, d in pairs]
    assert [row["messages"] for row in rows] == [total[0] - 1, total[1], total[2]]
    assert rows[0]["details"]["present"] == 1
    # the same jobs file again: nothing copied, nothing doubled, still ok
    r = fleet(cfg, jobs, "--report", str(tmp_path / "r2.json"), tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "r2.json").read_text())
    assert [(row["outcome"], row["messages"]) for row in rows] == [("ok", 0)] * 3
    assert [row["details"]["present"] for row in rows] == total
    for src, dst in pairs:
        assert content(dst) == content(src), src.name


def test_a_wrong_password_fails_that_job_only(dovecot, fast_fail_dovecot, tmp_path):
    good = [new_user(dovecot, tmp_path) for _ in range(3)]
    # on a server of its own (template boxb): Dovecot delays every login after a failed one
    bad = new_user(fast_fail_dovecot(), tmp_path, password="not-what-the-template-says")
    for i, u in enumerate([*good, bad]):
        seed(u, 2, 100 * i)

    def config(ff: Dovecot) -> Path:
        ff.add_user(bad.name, bad.password)
        return write_config(tmp_path, dovecot, extra=box_template("boxb", ff, tmp_path))

    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user",
                      [f"backup,box,{good[0].name}", f"backup,boxb,{bad.name}", f"backup,box,{good[1].name}",
                       f"backup,box,{good[2].name}"])
    # the login check finds it, and copies nothing
    cfg = config(bad.server)
    r = fleet(cfg, jobs, "--check-logins", "--report", str(tmp_path / "c.json"), "--quiet", tmp=tmp_path)
    assert r.returncode == 9, r.stderr
    assert [(row["outcome"], row["attempts"]) for row in json.loads((tmp_path / "c.json").read_text())] == \
        [("ok", 1), ("auth", 1), ("ok", 1), ("ok", 1)]
    assert not (tmp_path / "backups").exists()
    # the run: that job fails, the others finish
    ff = fast_fail_dovecot()
    cfg = config(ff)
    r = fleet(cfg, jobs, "--processes", "2", "--report", str(tmp_path / "r.json"), "--retries", "3", tmp=tmp_path)
    assert r.returncode == 9, r.stderr
    rows = {row["account"]: row for row in json.loads((tmp_path / "r.json").read_text())}
    row = rows[f"boxb-{bad.name}"]
    assert (row["outcome"], row["exit_code"], row["attempts"]) == ("auth", 3, 1)  # never retried
    assert row["error"].startswith(f"login as {bad.name} at 127.0.0.1:{ff.imaps_port} failed")
    assert "not-what-the-template-says" not in r.stderr + r.stdout + json.dumps(rows)
    assert f"line 3: backup boxb-{bad.name}: auth: login as" in r.stderr
    assert "fleet: 4 jobs: 3 ok, 1 failed (1 auth) (" in r.stdout
    assert not any((tmp_path / "backups" / bad.name).rglob("*,*"))  # no message file
    for u in good:
        assert rows[f"box-{u.name}"]["outcome"] == "ok"
        root = tmp_path / "backups" / u.name
        assert local_state(root) == as_backup(server_state(u), root)


def test_bad_rows_are_all_reported_and_nothing_runs(dovecot, tmp_path):
    u = new_user(dovecot, tmp_path)
    seed(u, 2, 0)
    cfg = write_config(tmp_path, dovecot)
    jobs = write_jobs(tmp_path / "jobs.csv", "command,account,destination,user", [
        f"backup,box,,{u.name}",              # 2: fine
        f"backup,bx,,{u.name}",               # 3: unknown account or template (did you mean box?)
        "backup,box,,",                       # 4: no value for {user}
        f"backup,box,,{u.name}",              # 5: the same job as line 2
        f"backup,box,new,{u.name}",           # 6: a destination on a backup
        f"copy,box,,{u.name}",                # 7: unknown command
        "# verify,box,,commented-out",        # skipped
        f"migrate,box,,{u.name}",             # 9: migrate without a destination
        f"verify,box,,{u.name}",              # 10: fine
    ])
    r = fleet(cfg, jobs, tmp=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("mailsync: error:")]
    assert f"{jobs}: 6 bad rows and a bad header; nothing was run" in errors[0]
    by_line = {int(e.split(", line ")[1].split(":")[0]): e for e in errors[1:]}
    assert sorted(by_line) == [1, 3, 4, 5, 6, 7, 9]
    assert "template 'new' uses column target, which the jobs file lacks" in by_line[1]  # once, not per row
    assert "unknown account or template 'bx'" in by_line[3] and "did you mean 'box'" in by_line[3]
    assert "{user}" in by_line[4]
    assert "the same job as line 2" in by_line[5]
    assert "a destination is for migrate only" in by_line[6]
    assert "unknown command 'copy'" in by_line[7]
    assert "migrate needs a destination" in by_line[9]
    assert not (tmp_path / "backups").exists()  # nothing ran
    assert r.stdout == ""


# -- run_job: retries by cause, in this process ------------------------------------------------

def test_run_job_retries_a_throttled_job_after_the_suggested_wait(dovecot, tmp_path):
    u = new_user(dovecot, tmp_path)
    n = seed(u, 3, 0)
    cfg = write_config(tmp_path, dovecot)
    job = read_jobs(write_jobs(tmp_path / "j.csv", "command,account,user", [f"sync,box,{u.name}"]),
                    config_mod.load(cfg))[0].to_dict()
    waits, events = [], []

    def hook(attempt, j):
        assert j == job
        if attempt == 1:
            raise ServerError("imap.example refused a command: NO [THROTTLED] Request is throttled. "
                              "Suggested Backoff Time: 1500 milliseconds")

    res = run_job(str(cfg), job, attempt_hook=hook, sleep=waits.append,
                  progress=lambda e, d: events.append(d) if e == "retry" else None)
    assert waits == [1.5]
    assert events[0]["cause"] == THROTTLE and events[0]["wait"] == 1.5
    assert (res["outcome"], res["exit_code"], res["attempts"], res["messages"], res["error"]) == ("ok", 0, 2, n, "")
    root = tmp_path / "backups" / u.name
    assert local_state(root) == as_backup(server_state(u), root)
    json.dumps(res)  # JSON-able as it is


def test_a_throttling_provider_gets_its_backoff_then_the_fleet_succeeds(dovecot, tmp_path):
    """Through a proxy that answers the first folder command of the first connections with Office
    365's `NO [THROTTLED] ... Suggested Backoff Time: 1500 milliseconds` (the real Dovecot behind
    it): the job waits what the server said, runs again, and ends ok with every message."""
    users = [new_user(dovecot, tmp_path) for _ in range(2)]
    counts = [seed(u, 4, 10 * i) for i, u in enumerate(users)]
    ca = dovecot.root / "ca"
    with ThrottleProxy(dovecot.imaps_port, ca / "server.pem", ca / "server.key", throttled=1) as proxy:
        cfg = write_config(tmp_path, dovecot, port=proxy.port, box="connections = 1\n")
        jobs = write_jobs(tmp_path / "jobs.csv", "command,account,user", [f"backup,box,{u.name}" for u in users])
        r = fleet(cfg, jobs, "--processes", "1", "--report", str(tmp_path / "r.json"), "--quiet", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert proxy.refused == 1  # the provider did throttle once
    rows = {row["account"]: row for row in json.loads((tmp_path / "r.json").read_text())}
    attempts = sorted(row["attempts"] for row in rows.values())
    assert attempts == [1, 2], rows  # the throttled job ran again, the other once
    again = next(row for row in rows.values() if row["attempts"] == 2)
    assert again["seconds"] >= 1.5, again  # it waited the 1500 ms the server asked for first
    for u, n in zip(users, counts, strict=True):
        row = rows[f"box-{u.name}"]
        assert (row["outcome"], row["exit_code"], row["messages"]) == ("ok", 0, n), row
        root = tmp_path / "backups" / u.name
        assert local_state(root) == as_backup(server_state(u), root)  # every message, exactly once


def test_run_job_backs_off_on_network_failures_then_gives_up(dovecot, tmp_path):
    cfg = write_config(tmp_path, dovecot, port=free_port())  # nothing listens there: refused at once
    job = Job(line=2, command="backup", account="box", destination=None, values={"user": "x"}).to_dict()
    waits = []
    res = run_job(str(cfg), job, sleep=waits.append, retries=3)
    assert res["account"] == "box-x"  # resolved on the worker
    assert waits == [5, 10, 20]
    assert (res["outcome"], res["exit_code"], res["attempts"]) == ("network", ConnectError.exit_code, 4)
    assert "refused" in res["error"] and "\n" not in res["error"]


def test_run_job_config_problems_are_not_retried(dovecot, tmp_path):
    cfg = write_config(tmp_path, dovecot, extra='\n[templates.nopw]\nhost = "127.0.0.1"\nusername = "{user}"\n'
                                               f'password_command = ["false"]\nmaildir = "{tmp_path}/m/{{user}}"\n')
    waits = []
    job = Job(line=2, command="backup", account="nopw", destination=None, values={"user": "x"},
              account_name="nopw-x").to_dict()
    res = run_job(str(cfg), job, sleep=waits.append)
    assert (res["outcome"], res["exit_code"], res["attempts"], waits) == ("config", 2, 1, [])
    assert "password_command failed" in res["error"]
    # a job whose account the config no longer makes as it did
    res = run_job(str(cfg), {**job, "account_name": "nopw-y"}, sleep=waits.append)
    assert (res["outcome"], res["exit_code"], res["attempts"], waits) == ("config", 2, 0, [])


# -- the scheduler, on a fake backend (the seam a Celery backend plugs into) -----------------------

class FakeBackend(Backend):
    """Jobs end in submission order, a few per results() call; records what was in flight."""

    def __init__(self, capacity: int, interrupt_after: int | None = None) -> None:
        self.capacity, self.interrupt_after = capacity, interrupt_after
        self.inflight: list[tuple[int, dict]] = []
        self.seen: list[list[str]] = []  # accounts in flight at each results() call
        self.submitted = 0

    def submit(self, job: dict) -> int:
        self.submitted += 1
        self.inflight.append((self.submitted, job))
        return self.submitted

    def results(self, timeout=None):
        self.seen.append([j["account_name"] for _, j in self.inflight])
        if self.interrupt_after is not None and self.submitted >= self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt
        done, self.inflight = self.inflight[:2], self.inflight[2:]
        return [(h, {**blank_result(j), "outcome": "ok", "exit_code": 0}) for h, j in done]


def fake_jobs(names: list[str]) -> list[Job]:
    return [Job(line=i + 2, command="backup", account=n, destination=None, account_name=n)
            for i, n in enumerate(names)]


def test_schedule_never_runs_two_jobs_of_one_account_at_once():
    names = ["a", "a", "b", "c", "a", "d", "e", "b", "f"]
    b = FakeBackend(capacity=3)
    results, interrupted = schedule(fake_jobs(names), b, lambda j: frozenset({j.account_name}))
    assert not interrupted and sorted(results) == list(range(2, 11))
    assert all(len(now) == len(set(now)) <= 3 for now in b.seen)  # no account twice, capacity kept
    assert b.seen[0] == ["a", "b", "c"]  # file order, the second "a" waits its turn


def test_schedule_stops_submitting_on_ctrl_c_and_waits_for_the_running():
    b = FakeBackend(capacity=2, interrupt_after=2)
    results, interrupted = schedule(fake_jobs(["a", "b", "c", "d"]), b, lambda j: frozenset({j.account_name}))
    assert interrupted and b.submitted == 2 and sorted(results) == [2, 3]  # c and d never started


# -- next_wait -------------------------------------------------------------------------------

def test_next_wait_throttle_follows_the_server():
    assert next_wait(THROTTLE, "NO [THROTTLED] Suggested Backoff Time: 299499 milliseconds", 1) == 299.499
    assert next_wait(THROTTLE, "BAD too many commands, backoff 30", 1) == 30
    assert next_wait(THROTTLE, "NO rate limit exceeded, retry after 2 minutes", 1) == 120
    assert next_wait(THROTTLE, "NO [UNAVAILABLE] try again later", 1) == 60  # no wait given: 60 s
    assert next_wait(THROTTLE, "Suggested Backoff Time: 7200000 milliseconds", 1) == 15 * 60  # capped
    assert next_wait(THROTTLE, "retry after 0 seconds", 1) == 1
    assert next_wait(THROTTLE, "throttled", 10) == 60 and next_wait(THROTTLE, "throttled", 11) is None


def test_next_wait_network_backoff_grows_and_is_capped():
    assert [next_wait(NETWORK, "", a) for a in (1, 2, 3, 4)] == [5, 10, 20, None]  # default: 3 retries
    assert [next_wait(NETWORK, "", a, retries=10) for a in range(1, 12)] == \
        [5, 10, 20, 40, 80, 160, 300, 300, 300, 300, None]
    assert next_wait(NETWORK, "", 1, retries=0) is None


def test_next_wait_never_retries_auth_config_or_others():
    for cause in ("auth", "config", "other"):
        for attempt in (1, 2):
            assert next_wait(cause, "NO [THROTTLED] too many, Suggested Backoff Time: 10 ms", attempt) is None


# -- templates and the jobs file (no server) -----------------------------------------------------

def parse(text: str, tmp: Path) -> config_mod.Config:
    p = tmp / "c.toml"
    p.write_text(text)
    return config_mod.load(p)


TEMPLATE = """
[templates.old]
host = "imap.old.example"
username = "{user}@old.example"
password_command = "vault read -field=pw 'old/{user}'"
maildir = "/srv/mail/{user}"
folders = ["*", "!{{braces}}"]
"""


def test_fill_template(tmp_path):
    cfg = parse(TEMPLATE, tmp_path)
    assert cfg.templates["old"].fields == ("user",) and cfg.accounts == {}
    a = config_mod.fill_template(cfg, "old", {"user": "alice", "unused": "x"})
    assert (a.name, a.username, a.maildir, a.folders) == ("old-alice", "alice@old.example", Path("/srv/mail/alice"),
                                                          ("*", "!{braces}"))
    # a command is split before it is filled: a value stays one argument
    assert a.password_command == ["vault", "read", "-field=pw", "old/alice"]
    b = config_mod.fill_template(cfg, "old", {"user": "bob smith"})
    assert b.password_command[-1] == "old/bob smith"
    assert b.name.startswith("old-bob_smith~") and len(b.name) == len("old-bob_smith~") + 8  # unique, file-safe
    assert config_mod.fill_template(cfg, "old", {"user": "bob_smith"}).name == "old-bob_smith"
    with pytest.raises(ConfigError, match=r"\[templates.old\]: no value for \{user\}"):
        config_mod.fill_template(cfg, "old", {})
    with pytest.raises(ConfigError, match="may not hold '/'"):
        config_mod.fill_template(cfg, "old", {"user": "../etc"})
    with pytest.raises(ConfigError, match="unknown template 'olt'; did you mean 'old'"):
        config_mod.fill_template(cfg, "olt", {"user": "a"})
    # filled, the account gets the usual checks
    cfg = parse(TEMPLATE + 'mode = "{mode}"\n', tmp_path)
    assert config_mod.fill_template(cfg, "old", {"user": "a", "mode": "sync"}).mode == "sync"
    with pytest.raises(ConfigError, match=r"\[templates.old\]: 'mode' is 'bogus'"):
        config_mod.fill_template(cfg, "old", {"user": "a", "mode": "bogus"})


@pytest.mark.parametrize("extra, error", [
    ("[accounts.old]\nhost = 'h'\nusername = 'u'\nmaildir = '/m'\n", "both an \\[accounts.old\\] and a"),
    ("[templates.x]\nhost = 'h'\nusername = '{u}'\nmaildir = '/m/{u}'\nportt = 1\n", "unknown key 'portt'"),
    ("[templates.x]\nhost = 'h'\nusername = '{u}'\nmaildir = '/m/{u}'\nport = '{p}'\n", "'port' must be a port"),
    ("[templates.x]\nhost = 'h'\nusername = '{u}'\nmaildir = '/m/{u}'\npassword = 'pw-{u}'\n",
     "'password' may not hold a placeholder"),
    ("[templates.x]\nhost = 'h'\nusername = '{u!r}'\nmaildir = '/m'\n", "not a plain column name"),
    ("[templates.x]\nhost = 'h'\nusername = '{u'\nmaildir = '/m'\n", "write a literal brace"),
    ("[templates.x]\nhost = '{h}'\nmaildir = '/m/{u}'\n", "missing key 'username'"),
    ("[templates.x]\nhost = 'h'\nusername = '{u}'\nmaildir = '/m/{u}'\nconnections = 99\n", "'connections' must be"),
])
def test_templates_are_checked_when_the_config_loads(tmp_path, extra, error):
    with pytest.raises(ConfigError, match=error):
        parse(TEMPLATE + extra, tmp_path)


def test_jobs_hold_no_secrets_and_travel_as_plain_dicts(tmp_path):
    cfg = parse(TEMPLATE + '\n[templates.new]\nhost = "imap.new.example"\nusername = "{target}"\n'
                'password_command = "vault read -field=pw new/{target}"\nmaildir = "/srv/new/{target}"\n', tmp_path)
    jobs = read_jobs(write_jobs(tmp_path / "j.csv", "command,account,destination,user,target,secret_notes",
                                ["migrate,old,new,alice,alice.n,hunter2", "BACKUP,old,,bob,,hunter2"]), cfg)
    assert [j.to_dict() for j in jobs] == [
        {"line": 2, "command": "migrate", "account": "old", "destination": "new",
         "values": {"target": "alice.n", "user": "alice"}, "account_name": "old-alice",
         "destination_name": "new-alice.n"},
        {"line": 3, "command": "backup", "account": "old", "destination": None, "values": {"user": "bob"},
         "account_name": "old-bob", "destination_name": None}]
    for j in jobs:
        d = json.loads(json.dumps(j.to_dict()))
        assert Job.from_dict(d) == j
        assert "hunter2" not in json.dumps(d)  # a column no template uses does not travel
    # two accounts, one Maildir: refused
    cfg2 = parse(TEMPLATE.replace('"/srv/mail/{user}"', '"/srv/mail/all"'), tmp_path)
    with pytest.raises(JobsError) as e:
        read_jobs(write_jobs(tmp_path / "m.csv", "command,account,user", ["backup,old,a", "verify,old,b"]), cfg2)
    why = "'old-b' keeps its Maildir in /srv/mail/all, as 'old-a' does (line 2); give each account its own maildir"
    assert e.value.problems == [(3, why)]
    # a column a template needs and the file lacks: said once, on the header
    with pytest.raises(JobsError) as e:
        read_jobs(write_jobs(tmp_path / "k.csv", "command,account", ["backup,old", "verify,old"]), cfg)
    assert [line for line, _ in e.value.problems] == [1, 2, 3]
    assert "template 'old' uses column user, which the jobs file lacks" in e.value.problems[0][1]


def test_normal_commands_never_import_the_fleet():
    code = "import sys, mailsync.cli; print(sorted(m for m in sys.modules if 'fleet' in m or 'celery' in m))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       check=False)
    assert r.stdout.strip() == "[]", r.stderr
