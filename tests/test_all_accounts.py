"""`mailsync sync --all` (or `sync` with no account): every account of the config in one run,
one summary, and the worst exit code. And no library chatter on stderr."""

from __future__ import annotations

import json

from mailsync.cli import _worst
from tests.helpers import MailUser, local_files, msg, sha


def two_accounts(user, dovecot, tmp_path, second_password: str | None = None):
    a = user
    b = MailUser.create(dovecot, f"{user.name}b", tmp_path / "b")
    a.server.seed(a.name, "INBOX", [msg(i) for i in range(5)])
    b.server.seed(b.name, "INBOX", [msg(100 + i) for i in range(3)])
    b.server.seed(b.name, "Work", [msg(200 + i) for i in range(2)])
    pw_b = second_password or b.password
    text = a.config.read_text() + f"""
[accounts.second]
host = "127.0.0.1"
port = {b.server.imaps_port}
username = "{b.name}"
password_command = "printf %s '{pw_b}'"
maildir = "{b.maildir}"
ca_file = "{b.server.ca_file}"
"""
    a.config.write_text(text)
    return a, b


def holds_exactly(u, messages: list[bytes]) -> None:
    assert sorted(sha(d) for d in local_files(u.maildir).values()) == sorted(sha(m) for m in messages)


def test_sync_all_runs_every_account_with_one_summary(user, dovecot, tmp_path):
    a, b = two_accounts(user, dovecot, tmp_path)
    r = a.run("sync", "--all")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("test: ") and lines[1].startswith("second: "), r.stdout
    holds_exactly(a, [msg(i) for i in range(5)])
    holds_exactly(b, [msg(100 + i) for i in range(3)] + [msg(200 + i) for i in range(2)])
    # no account named is --all too; --json gives one document with every account
    r = a.run("sync", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 0
    assert [x["account"] for x in doc["accounts"]] == ["test", "second"]
    assert all(x["totals"]["new"] == 0 for x in doc["accounts"])


def test_one_failing_account_does_not_stop_the_others_and_sets_the_exit_code(user, dovecot, tmp_path):
    a, b = two_accounts(user, dovecot, tmp_path, second_password="wrong")
    r = a.run("sync", "--all", "--quiet")
    assert r.returncode == 3, r.stderr  # authentication failed, for the second account
    errors = [x for x in r.stderr.splitlines() if x.startswith("mailsync: error: ")]
    assert len(errors) == 1 and errors[0].startswith("mailsync: error: second: "), r.stderr
    assert "1 of 2 accounts had errors (second)" in r.stderr
    assert "Traceback" not in r.stderr and "wrong" not in r.stderr + r.stdout
    holds_exactly(a, [msg(i) for i in range(5)])  # the first account was backed up all the same
    assert not local_files(b.maildir)


def test_naming_an_account_and_all_is_a_usage_error(user):
    r = user.run("sync", "test", "--all")
    assert r.returncode == 2
    assert r.stderr.startswith("mailsync: error: name an account or give --all")


def test_worst_exit_code_prefers_a_stopped_account_over_a_partial_run():
    assert _worst([0, 0]) == 0
    assert _worst([0, 9, 3]) == 3
    assert _worst([10, 6]) == 10
    assert _worst([0, 6, 0]) == 6
    assert _worst([8, 5]) == 8


def test_no_library_warning_on_stderr_for_port_143(user):
    # nothing listens on 127.0.0.1:143 in the tests; imapclient warns about the port before
    # connecting, mailsync must say only its own line
    user.write_config("timeout = 2", port=143)
    r = user.run("sync", "test")
    assert r.returncode == 5, r.stderr
    assert "often used for unencrypted" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x] == [r.stderr.strip()]
    assert r.stderr.startswith("mailsync: error: ")
