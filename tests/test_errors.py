"""Every error a user can meet: one line on stderr, what and how to fix, a documented exit code,
no traceback; nothing lost."""

from __future__ import annotations

import fcntl
import json
import os
import ssl

import pytest

from tests import faults
from tests.dovecot import free_port
from tests.helpers import local_files, msg


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
    line = one_line_error(r, 3, "login as", "failed", "check username and password")
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
    user.write_config(f'password_command = "{script}"').write_text(
        user.config.read_text().replace('password_env = "MAILSYNC_TEST_PASSWORD"\n', ""))
    assert user.run("sync", "test").returncode == 0
    # shell syntax is not interpreted: no accidental command execution
    user.write_config(f'password_command = "{script}; touch {tmp_path}/pwned"').write_text(
        user.config.read_text().replace('password_env = "MAILSYNC_TEST_PASSWORD"\n', ""))
    user.run("sync", "test")
    assert not (tmp_path / "pwned").exists()


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
    # a lock file left by a killed run (no one holds the lock) is taken over
    assert user.run("sync", "test").returncode == 0
    assert len(local_files(user.maildir)) == 1


def test_server_hanging_up_mid_run_is_retried_then_completes(user):
    user.append("INBOX", [msg(i, body="x" * 3000) for i in range(30)])
    with faults.CutProxy(user.server.imaps_port, cut_after=20_000, cut_connections=1) as proxy:
        user.write_config("retries = 2", port=proxy.port)
        r = user.run("sync", "test", "--json")
        assert proxy.cuts == 1
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["totals"]["new"] == 30
    assert len(local_files(user.maildir)) == 30


def test_server_hanging_up_every_time_exits_6_and_keeps_what_was_saved(user):
    user.append("INBOX", [msg(i, body="x" * 3000) for i in range(30)])
    with faults.CutProxy(user.server.imaps_port, cut_after=60_000, cut_connections=100) as proxy:
        user.write_config("retries = 1\nbatch_bytes = 65536", port=proxy.port)
        r = user.run("sync", "test")
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "INBOX" in r.stderr and "lost" in r.stderr
    saved = len(local_files(user.maildir))
    # then the server behaves: the next run completes with every message exactly once
    user.write_config()
    assert user.run("sync", "test").returncode == 0
    files = local_files(user.maildir)
    assert len(files) == 30 and len(set(files.values())) == 30
    assert saved <= 30


def test_unsupported_mode_is_a_clear_error(user):
    user.write_config('mode = "mirror"')
    one_line_error(user.run("sync", "test"), 2, "mode 'mirror' is not available")


def test_debug_shows_traceback_but_never_the_password(user):
    r = user.run("--debug", "sync", "test", env=user.env(MAILSYNC_TEST_PASSWORD="hunter2-wrong"))
    assert r.returncode == 3
    assert "hunter2-wrong" not in r.stderr + r.stdout


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
