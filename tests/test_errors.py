"""Every error a user can meet: one line on stderr, what and how to fix, a documented exit code,
no traceback; nothing lost."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from tests import faults
from tests.dovecot import free_port
from tests.helpers import local_files, msg, sha


def same_messages(user) -> None:
    """The backup holds every server message exactly once, by content (SHA-256), and nothing else."""
    server = [body for msgs in user.server_messages().values() for body, _fl in msgs.values()]
    files = local_files(user.maildir)
    assert sorted(sha(b) for b in files.values()) == sorted(sha(b) for b in server), \
        (len(files), len(server))
    assert not any((user.maildir / "tmp").iterdir())


def one_line_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    err = [line for line in r.stderr.splitlines() if line.startswith("mailsync: error")]
    assert len(err) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_wrong_password(user):
    r = user.run("sync", "test", env=user.env(MAILSYNC_TEST_PASSWORD="wrong-password"))
    one_line_error(r, 3, "login as", "failed", "check username and password")
    assert "wrong-password" not in r.stderr + r.stdout


def test_unknown_account(user):
    one_line_error(user.run("sync", "tset"), 2, "unknown account 'tset'", "did you mean 'test'")


def test_connection_refused_names_host_and_port(user):
    port = free_port()
    user.write_config(port=port)
    one_line_error(user.run("sync", "test"), 5, f"127.0.0.1:{port}", "refused")


def test_server_that_never_answers_times_out(user):
    with faults.Silent() as silent:
        user.write_config('timeout = 2', port=silent.port)
        r = user.run("sync", "test", timeout=60)
    one_line_error(r, 5, f"127.0.0.1:{silent.port}", "timed out")


def test_plaintext_port_is_refused_not_used(user):
    with faults.Plaintext() as plain:
        user.write_config(port=plain.port)
        r = user.run("sync", "test")
    one_line_error(r, 4, "TLS handshake", "plaintext port")


def test_untrusted_certificate_shows_fingerprint_and_how_to_pin(user):
    user.write_config(ca=False)  # the system store does not know the test CA
    r = user.run("sync", "test")
    line = one_line_error(r, 4, "certificate", "SHA-256", 'fingerprint = "sha256:')
    fp = line.split('fingerprint = "sha256:')[1].split('"')[0]
    # pinning the fingerprint shown is enough to connect (self-signed servers)
    user.write_config(f'fingerprint = "sha256:{fp}"', ca=False)
    assert user.run("sync", "test").returncode == 0


def test_pin_mismatch_is_refused(user):
    user.write_config('fingerprint = "sha256:' + ":".join(["AB"] * 32) + '"', ca=False)
    one_line_error(user.run("sync", "test"), 4, "does not match the pinned fingerprint")


@pytest.mark.parametrize("kind", ["wronghost", "expired"])
def test_bad_certificates_are_refused(user, dovecot, tmp_path, kind):
    ca = dovecot.root / "ca"
    cert, key = faults.make_cert(tmp_path, ca / "ca.pem", ca / "ca.key", kind,
                                 hosts=["wrong.example"] if kind == "wronghost" else ["127.0.0.1"],
                                 expired=kind == "expired")
    with faults.TlsGreeter(cert, key) as srv:
        user.write_config(port=srv.port)
        r = user.run("sync", "test")
    line = one_line_error(r, 4, "not accepted", "SHA-256")
    assert ("expired" in line) if kind == "expired" else ("mismatch" in line.lower() or "match" in line)


def test_broken_config_names_file_and_key(user):
    user.config.write_text(user.config.read_text() + 'hots = "x"\n')
    one_line_error(user.run("sync", "test"), 2, str(user.config), "unknown key 'hots'", "did you mean 'host'")
    user.config.write_text("[accounts.test\nhost=")
    one_line_error(user.run("sync", "test"), 2, str(user.config), "invalid TOML")
    user.write_config()
    user.config.write_text(user.config.read_text().replace(f"port = {user.server.imaps_port}", 'port = "993"'))
    one_line_error(user.run("sync", "test"), 2, "'port' must be a port number")


def test_missing_config_file(user, tmp_path):
    user.config.unlink()
    r = user.run("sync", "test")
    one_line_error(r, 2, "not found", "--config")


def test_password_command_runs_without_shell(user, tmp_path):
    script = tmp_path / "pw.sh"
    script.write_text(f"#!/bin/sh\necho '{user.password}'\n")
    script.chmod(0o700)
    user.append("INBOX", [msg(1)])
    user.write_config(f'password_command = "{script}"').write_text(
        user.config.read_text().replace('password_env = "MAILSYNC_TEST_PASSWORD"\n', ""))
    r = user.run("sync", "test", env=user.env(MAILSYNC_TEST_PASSWORD=""))
    assert r.returncode == 0, r.stderr
    same_messages(user)
    # shell syntax is not interpreted: no accidental command execution. The words are split as a
    # shell would, so the program is "pw.sh;", which does not exist: exit 2, naming it
    user.append("INBOX", [msg(2)])
    user.write_config(f'password_command = "{script}; touch {tmp_path}/pwned"').write_text(
        user.config.read_text().replace('password_env = "MAILSYNC_TEST_PASSWORD"\n', ""))
    r = user.run("sync", "test", env=user.env(MAILSYNC_TEST_PASSWORD=""))
    one_line_error(r, 2, "password_command", f"program '{script};' not found")
    assert not (tmp_path / "pwned").exists()
    assert list(local_files(user.maildir).values()) == [msg(1)]  # nothing was fetched without a password


def test_second_run_is_refused_while_one_holds_the_lock(user):
    user.append("INBOX", [msg(1)])
    user.maildir.mkdir(parents=True)
    fd = os.open(user.maildir / ".mailsync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    try:
        one_line_error(user.run("sync", "test"), 7, "another mailsync run (pid 4242)")
    finally:
        os.close(fd)
    assert local_files(user.maildir) == {}  # the refused run stored nothing
    # a lock file left by a killed run (no one holds the lock) is taken over
    r = user.run("sync", "test")
    assert r.returncode == 0, r.stderr
    assert list(local_files(user.maildir).values()) == [msg(1)]


def test_server_hanging_up_mid_run_is_retried_then_completes(user):
    user.append("INBOX", [msg(i, body="x" * 3000) for i in range(30)])
    with faults.CutProxy(user.server.imaps_port, cut_after=20_000, cut_connections=1) as proxy:
        user.write_config("retries = 2", port=proxy.port)
        r = user.run("sync", "test", "--json")
        assert proxy.cuts == 1
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 30
    same_messages(user)


def test_server_hanging_up_every_time_exits_6_and_keeps_what_was_saved(user):
    # 30 messages of about 10 KB in batches of 64 KiB (6 a batch); every connection is cut after
    # 100,000 bytes, so each try commits a batch or more and then loses the connection
    sent = [msg(i, body="x" * 10_000) for i in range(30)]
    user.append("INBOX", sent)
    with faults.CutProxy(user.server.imaps_port, cut_after=100_000, cut_connections=100) as proxy:
        user.write_config("retries = 1\nbatch_bytes = 65536", port=proxy.port)
        r = user.run("sync", "test")
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("mailsync: error")]
    assert len(err) == 1 and err[0].startswith("mailsync: error: INBOX: ") and "lost" in err[0], r.stderr
    saved = local_files(user.maildir)
    # what was saved is whole server messages, each once, and some of them (the cut came later)
    assert 0 < len(saved) < 30, len(saved)
    assert all(b in sent for b in saved.values()) and len(set(saved.values())) == len(saved)
    # then the server behaves: the next run fetches only the rest, and keeps what was saved
    user.write_config()
    r = user.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 30 - len(saved)
    files = local_files(user.maildir)
    assert all(files.get(p) == b for p, b in saved.items())
    same_messages(user)
    assert sorted(files.values()) == sorted(sent)


def test_unknown_mode_is_a_clear_error(user):
    one_line_error(user.run("sync", "test", "--mode", "bogus"), 2, "unknown mode 'bogus'")
    user.write_config('protocol = "pop3"\nmode = "mirror"', port=user.server.pop3s_port)
    one_line_error(user.run("sync", "test"), 2, "POP3 is download-only: mode 'mirror' needs IMAP")
    assert not local_files(user.maildir)


def test_debug_shows_traceback_but_never_the_password(user):
    env = user.env(MAILSYNC_TEST_PASSWORD="hunter2-wrong")
    # without --debug: the one error line, no traceback, no log
    r = user.run("sync", "test", env=env)
    line = one_line_error(r, 3, "login as", "failed")
    assert "hunter2-wrong" not in r.stderr + r.stdout
    # with --debug: the same error line and exit code, plus the traceback of where it was raised
    # and the debug log (the IMAP library's included); still never the password
    r = user.run("--debug", "sync", "test", env=env)
    assert r.returncode == 3, r.stderr
    assert "Traceback (most recent call last):" in r.stderr, r.stderr
    assert "mailsync.errors.AuthError: login as" in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("mailsync: error")] == [line]
    assert "imapclient" in r.stderr, r.stderr
    assert "hunter2-wrong" not in r.stderr + r.stdout and user.password not in r.stderr + r.stdout
    # --debug after the command name works too (docs/commands.md); a config error needs no login
    plain = user.run("sync", "tset")
    one_line_error(plain, 2, "unknown account 'tset'")
    r = user.run("sync", "tset", "--debug")
    assert r.returncode == 2, r.stderr
    assert "Traceback (most recent call last):" in r.stderr, r.stderr
    assert "mailsync.errors.ConfigError: unknown account 'tset'" in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("mailsync: error")] == \
        [ln for ln in plain.stderr.splitlines() if ln.startswith("mailsync: error")]


def test_non_ascii_password_logs_in(user, dovecot):
    from tests.helpers import MailUser
    u = MailUser.create(dovecot, f"{user.name}u", user.tmp / "u8")
    u.password = "pässwörd-ünïcode"
    (dovecot.root / "passwd.d" / u.name).write_text(f"{u.name}:{{PLAIN}}{u.password}::::::\n")
    r = u.run("sync", "test")
    assert r.returncode == 0, r.stderr


def test_imap_account_pointed_at_the_pop3s_port(user):
    user.write_config(port=user.server.pop3s_port)
    one_line_error(user.run("sync", "test"), 5, "did not greet like an IMAP server", "993")
    user.write_config('protocol = "pop3"', port=user.server.imaps_port)
    r = user.run("sync", "test")
    one_line_error(r, 5, "did not greet like a POP3 server", "995")


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_starttls_on_the_plaintext_port(user, protocol):
    """starttls = true: the plaintext port, then STARTTLS/STLS, certificate verified as always."""
    user.append("INBOX", [msg(1), msg(2)])
    port = user.server.imap_port if protocol == "imap" else user.server.pop3_port
    user.write_config(f'starttls = true\nprotocol = "{protocol}"', port=port)
    r = user.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 2
    # and the certificate is still checked after STARTTLS
    user.write_config(f'starttls = true\nprotocol = "{protocol}"', port=port, ca=False)
    one_line_error(user.run("sync", "test"), 4, "certificate")


def test_starttls_not_offered_is_refused_not_used_in_plaintext(user):
    with faults.Plaintext(starttls=False) as plain:
        user.write_config("starttls = true\ntimeout = 5", port=plain.port)
        r = user.run("sync", "test")
    one_line_error(r, 4, "does not offer STARTTLS", "refusing")


def test_plain_password_in_a_world_readable_config_draws_a_warning_and_stays_secret(user):
    user.append("INBOX", [msg(1)])
    text = user.write_config().read_text().replace('password_env = "MAILSYNC_TEST_PASSWORD"',
                                                   f'password = "{user.password}"')
    user.config.write_text(text)
    user.config.chmod(0o644)
    r = user.run("sync", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert "readable by others" in r.stderr and "chmod 600" in r.stderr
    assert user.password not in r.stdout + r.stderr
    user.config.chmod(0o600)
    r = user.run("sync", "test")
    assert "readable by others" not in r.stderr
    # nothing mailsync wrote holds the password
    for p in user.maildir.rglob("*"):
        if p.is_file():
            assert user.password.encode() not in p.read_bytes(), p
