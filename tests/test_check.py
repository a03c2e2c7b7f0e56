"""`mailsync check`: each step against the real Dovecot and the fault endpoints; the exit code
of the first failing step, a likely cause with a fix, and never the password."""

from __future__ import annotations

import re
import ssl
import time

import pytest

from mailsync.check import CheckTarget, run_check, target_from_account, target_from_hostport
from mailsync.config import Account
from mailsync.errors import MailsyncError
from mailsync.imap import fingerprint_hex, pretty_fingerprint
from tests import faults
from tests.dovecot import free_port


def target(port: int, **kw) -> CheckTarget:
    kw.setdefault("timeout", 3.0)
    return CheckTarget(host=kw.pop("host", "127.0.0.1"), port=port, protocol=kw.pop("protocol", "imap"),
                       username=kw.pop("username", None), ca_file=kw.pop("ca_file", None),
                       fingerprint=kw.pop("fingerprint", None), **kw)


def check(t: CheckTarget, password: str | None = None, **kw) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run_check(t, password, emit=lines.append, **kw)
    assert all(line[:5] in ("ok   ", "FAIL ", "warn ", "info ", "  lik") for line in lines), lines
    return code, lines


def failed(lines: list[str], *needles: str) -> str:
    """The run stopped at a FAIL line followed by exactly one likely-cause line; returns both."""
    assert len([ln for ln in lines if ln.startswith("FAIL ")]) == 1, lines
    assert lines[-2].startswith("FAIL ") and lines[-1].startswith("  likely cause: "), lines
    assert "; fix: " in lines[-1]
    text = "\n".join(lines[-2:])
    for n in needles:
        assert n in text, (n, lines)
    return text


def fp_of(pem_path) -> str:
    return fingerprint_hex(ssl.PEM_cert_to_DER_cert(pem_path.read_text()))


def pin_from(text: str) -> str:
    """The ready-to-paste line as config.py would normalise it."""
    m = re.search(r'fingerprint = "sha256:([0-9A-F:]+)"', text)
    assert m, text
    return m.group(1).replace(":", "")


# -- passing ---------------------------------------------------------------------------------


def test_good_imaps_endpoint_with_login(user, dovecot):
    t = target(dovecot.imaps_port, username=user.name, ca_file=dovecot.ca_file, timeout=10)
    code, lines = check(t, user.password)
    out = "\n".join(lines)
    assert code == 0, out
    assert not any(ln.startswith("FAIL") for ln in lines)
    assert "TLSv1.2" in out or "TLSv1.3" in out
    assert pretty_fingerprint(fp_of(dovecot.root / "ca" / "server.pem")) in out
    assert "CONDSTORE yes, QRESYNC yes, UIDPLUS yes" in out
    assert re.search(r"round trip \(\d+ x NOOP\): min [\d.]+ ms, median [\d.]+ ms", out), out
    assert any(ln.startswith("ok   login as " + user.name) for ln in lines)
    assert lines[-1].startswith("ok   all checks passed")
    assert user.password not in out


def test_good_pop3s_endpoint_with_login(user, dovecot):
    t = target(dovecot.pop3s_port, protocol="pop3", username=user.name, ca_file=dovecot.ca_file, timeout=10)
    code, lines = check(t, user.password)
    out = "\n".join(lines)
    assert code == 0, out
    caps = next(ln for ln in lines if ln.startswith("ok   capabilities"))
    assert "UIDL" in caps
    assert "+OK" in out and "logout" in out and "NOOP" in out
    assert user.password not in out


def test_without_password_everything_but_login_is_checked(dovecot):
    code, lines = check(target(dovecot.imaps_port, ca_file=dovecot.ca_file, timeout=10))
    assert code == 0, lines
    assert any("login not tried" in ln for ln in lines)
    assert lines[-1] == "ok   all checks passed (without login)"


def test_ports_lists_the_usual_ports(dovecot):
    code, lines = check(target(dovecot.imaps_port, ca_file=dovecot.ca_file, timeout=10), ports=True)
    assert code == 0, lines
    for port in (143, 110, 993, 995):
        assert any(re.match(rf"info port {port} \(.*\): (open|closed)", ln) for ln in lines), (port, lines)
    # the probe comes before the connection step, and never fails the run
    assert [ln for ln in lines if ln.startswith("info port ")] == lines[1:5]


def test_ports_probe_never_fails_the_run():
    code, lines = check(target(free_port()), ports=True)
    assert code == 5
    assert len([ln for ln in lines if ln.startswith("info port ")]) == 4


# -- step 1 and 2: DNS, TCP ------------------------------------------------------------------------


def test_unresolvable_host():
    code, lines = check(target(993, host="no-such-host.invalid"))
    assert code == 5
    failed(lines, "cannot resolve", "no-such-host.invalid", "check the host name")


def test_closed_port_is_refused():
    port = free_port()
    start = time.monotonic()
    code, lines = check(target(port))
    assert code == 5
    failed(lines, f"127.0.0.1:{port}", "refused", "wrong port")
    assert time.monotonic() - start < 2


# -- step 3: TLS ----------------------------------------------------------------------------------


def test_plaintext_listener_is_named_as_plaintext_port():
    with faults.Plaintext() as plain:
        code, lines = check(target(plain.port))
    assert code == 4
    failed(lines, "plaintext port", "993", "implicit TLS", "* OK")


def test_silent_server_times_out_in_the_handshake():
    with faults.Silent() as silent:
        start = time.monotonic()
        code, lines = check(target(silent.port, timeout=1.5))
        took = time.monotonic() - start
    assert code == 5
    failed(lines, "TLS handshake", "no answer within 1.5 s")
    assert took < 5


@pytest.mark.parametrize("kind", ["wronghost", "expired"])
def test_bad_certificates_are_explained(dovecot, tmp_path, kind):
    ca = dovecot.root / "ca"
    cert, key = faults.make_cert(tmp_path, ca / "ca.pem", ca / "ca.key", kind,
                                 hosts=["wrong.example", "alt.wrong.example"] if kind == "wronghost"
                                 else ["127.0.0.1"], expired=kind == "expired")
    with faults.TlsGreeter(cert, key) as srv:
        code, lines = check(target(srv.port, ca_file=dovecot.ca_file))
    out = "\n".join(lines)
    assert code == 4, out
    fail = failed(lines, "not accepted")
    assert pretty_fingerprint(fp_of(cert)) in out          # the certificate's details were shown
    assert "info   issuer: CN=mailsync test CA" in lines
    if kind == "wronghost":
        assert "info   names (subjectAltName): DNS:wrong.example, DNS:alt.wrong.example" in lines
        assert "not issued for '127.0.0.1' but for wrong.example, alt.wrong.example" in fail
        assert 'host = "wrong.example"' in fail
    else:
        assert "expired" in fail and "renew" in fail
        assert any("EXPIRED" in ln for ln in lines)


def test_unknown_ca_prints_a_pin_that_then_passes(user, dovecot):
    t = target(dovecot.imaps_port, username=user.name, timeout=10)   # no ca_file: system store only
    code, lines = check(t, user.password)
    assert code == 4
    fail = failed(lines, "not accepted", "CN=mailsync test CA", "ca_file", 'fingerprint = "sha256:')
    pin = pin_from(fail)
    assert pin == fp_of(dovecot.root / "ca" / "server.pem")
    t.fingerprint = pin
    code, lines = check(t, user.password)
    assert code == 0, lines
    assert "ok   certificate matches the pinned fingerprint" in lines
    assert any(ln.startswith("ok   TLS handshake") for ln in lines)


def test_pin_mismatch_shows_both_fingerprints(dovecot):
    wrong = "AB" * 32
    code, lines = check(target(dovecot.imaps_port, fingerprint=wrong))
    assert code == 4
    failed(lines, "does not match the pinned fingerprint", pretty_fingerprint(wrong),
           pretty_fingerprint(fp_of(dovecot.root / "ca" / "server.pem")))


def test_unloadable_ca_file_is_a_config_error(dovecot, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    code, lines = check(target(dovecot.imaps_port, ca_file=bad))
    assert code == 2
    failed(lines, "cannot load ca_file", str(bad))


# -- step 5: greeting -------------------------------------------------------------------------------


class _TlsThen(faults.TlsGreeter):
    """Completes the TLS handshake, then sends `first` (or nothing) and waits."""

    first = b""

    def handle(self, conn) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                if self.first:
                    s.sendall(self.first)
                self.closing.wait(5)
        except OSError:
            pass


@pytest.mark.parametrize("first", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x00\x01\x02" * 2000])
def test_tls_without_a_greeting(dovecot, first):
    ca = dovecot.root / "ca"
    with _TlsThen(ca / "server.pem", ca / "server.key") as srv:
        srv.first = first
        code, lines = check(target(srv.port, ca_file=dovecot.ca_file, timeout=1.5))
    assert code == 6, lines
    failed(lines, "the server accepted TLS but did not greet: wrong protocol on this port?")


def test_imap_check_on_the_pop3_port_says_so(dovecot):
    code, lines = check(target(dovecot.pop3s_port, ca_file=dovecot.ca_file))
    assert code == 6
    failed(lines, "is a POP3 server", "--pop3")


# -- targets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,protocol,host,port", [
    ("imap.example.com", "imap", "imap.example.com", 993),
    ("imap.example.com", "pop3", "imap.example.com", 995),
    ("mail.example.com:1993", "imap", "mail.example.com", 1993),
    ("192.0.2.7:995", "pop3", "192.0.2.7", 995),
    ("[::1]:993", "imap", "::1", 993),
    ("[2001:db8::1]", "pop3", "2001:db8::1", 995),
    ("::1", "imap", "::1", 993),
])
def test_target_from_hostport(text, protocol, host, port):
    t = target_from_hostport(text, protocol)
    assert (t.host, t.port, t.protocol) == (host, port, protocol)
    assert (t.username, t.ca_file, t.fingerprint) == (None, None, None)
    assert t.timeout > 0


@pytest.mark.parametrize("text", ["host:", "host:0", "host:99999", "host:imap", "[::1", "[::1]x", "", "a b:1"])
def test_target_from_hostport_rejects(text):
    with pytest.raises(MailsyncError) as e:
        target_from_hostport(text, "imap")
    assert e.value.exit_code == 2


def test_target_from_account(tmp_path):
    acc = Account(name="a", host="mail.example.com", username="me", maildir=tmp_path, protocol="pop3", port=995,
                  ca_file=tmp_path / "ca.pem", fingerprint="AB" * 32, timeout=12.0, password="secret")
    t = target_from_account(acc)
    assert t == CheckTarget(host="mail.example.com", port=995, protocol="pop3", username="me",
                            ca_file=tmp_path / "ca.pem", fingerprint="AB" * 32, timeout=12.0)
    assert "secret" not in repr(t)


# -- step 6: login (last: Dovecot delays logins from an address after failed ones, until one succeeds;
# hence the generous timeouts here) -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_bad_password(user, dovecot, protocol):
    bad = "wrong-Pa55word-xyzzy"
    port = dovecot.imaps_port if protocol == "imap" else dovecot.pop3s_port
    t = target(port, protocol=protocol, username=user.name, ca_file=dovecot.ca_file, timeout=30)
    code, lines = check(t, bad)
    assert code == 3
    failed(lines, f"login as {user.name}", "wrong username or password", "app password")
    assert bad not in "\n".join(lines)
    assert not any(ln.startswith("ok   round trip") for ln in lines)   # stopped at the login
    # a successful login clears Dovecot's penalty for this address (later tests stay fast)
    assert check(t, user.password)[0] == 0


class _EchoingImap(faults.TlsGreeter):
    """A careless IMAP server: its BAD answer to LOGIN repeats the command, password included."""

    def handle(self, conn) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"* OK ready\r\n")
                f = s.makefile("rb")
                while line := f.readline():
                    tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                    if rest.upper() == b"CAPABILITY":
                        s.sendall(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
                    else:
                        s.sendall(tag + b" BAD cannot parse: " + rest + b"\r\n")
        except OSError:
            pass


@pytest.mark.parametrize("pw", ["Echo-Me-Secret", 'with "quotes" and \\'])
def test_password_echoed_by_the_server_is_masked(dovecot, pw):
    ca = dovecot.root / "ca"
    with _EchoingImap(ca / "server.pem", ca / "server.key") as srv:
        code, lines = check(target(srv.port, username="me", ca_file=dovecot.ca_file), pw)
    assert code == 3
    fail = failed(lines, "BAD cannot parse: LOGIN", "***")
    assert pw not in fail and pw.replace("\\", "\\\\").replace('"', '\\"') not in fail


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_password_with_quotes_and_non_ascii(dovecot, tmp_path, protocol):
    """IMAP: quoted string or literal as needed; POP3: UTF-8. Neither shows up in the output."""
    name, pw = f"q{protocol}{free_port()}", 'pä"ss\\wörd 1'
    dovecot.add_user(name, pw)
    port = dovecot.imaps_port if protocol == "imap" else dovecot.pop3s_port
    code, lines = check(target(port, protocol=protocol, username=name, ca_file=dovecot.ca_file, timeout=30), pw)
    assert code == 0, lines
    assert pw not in "\n".join(lines)


def test_check_command_line(user):
    r = user.run("check", "test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout and user.password not in r.stdout + r.stderr
    r = user.run("check", f"127.0.0.1:{user.server.pop3s_port}", "--pop3")
    assert r.returncode == 4  # no ca_file for a bare host: the test CA is unknown
    assert "fingerprint" in r.stdout
