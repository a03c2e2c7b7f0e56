"""login.py: one login path per protocol. The authenticator's choice (unit tests), then against
the real Dovecot: the same function logs IMAP and POP3 sessions in, LOGIN and AUTHENTICATE PLAIN
both work, capabilities are read again after STARTTLS/STLS, a SASL authenticator is one class, and
a wrong password is an AuthError naming the account with the password nowhere (message, traceback,
--debug log; also when the server echoes it)."""

from __future__ import annotations

import base64
import itertools
import logging
import poplib
import socket
import ssl
import traceback
from dataclasses import dataclass, replace

import pytest
from imapclient import IMAPClient

from mailsync import login
from mailsync.config import Account
from mailsync.errors import AuthError, ConfigError
from mailsync.imap import ImapSession
from mailsync.login import Capabilities, Login, PasswordAuth, Sasl, Unusable
from mailsync.pop3 import Pop3Session
from tests import faults
from tests.dovecot import free_port
from tests.helpers import msg

DOVECOT_IMAP = Capabilities.imap(["IMAP4rev1", "SASL-IR", "LOGIN-REFERRALS", "ID", "ENABLE", "IDLE", "LITERAL+",
                                  "AUTH=PLAIN", "AUTH=LOGIN"])
DOVECOT_POP3 = Capabilities.pop3(["CAPA", "TOP", "UIDL", "RESP-CODES", "USER", "SASL PLAIN LOGIN"])


_sources = itertools.count(2)


@pytest.fixture(autouse=True)
def own_source_address(monkeypatch):
    """Each connection these tests open comes from an address of its own in 127/8 (Linux routes
    all of it to lo). Dovecot delays every login from an address after a failed one (its auth
    penalty); these tests fail logins on purpose, and would otherwise wait it out again and again."""
    real = socket.create_connection

    def connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kw):
        if source_address is None and address[0] == "127.0.0.1":
            n = next(_sources)
            source_address = (f"127.0.{n // 250 % 250}.{n % 250 + 2}", 0)
        return real(address, timeout, source_address, **kw)
    monkeypatch.setattr(socket, "create_connection", connect)


def account(server, username: str, protocol: str = "imap", **kw) -> Account:
    port = server.imaps_port if protocol == "imap" else server.pop3s_port
    kw.setdefault("port", port)
    return Account(name="t", host="127.0.0.1", username=username, maildir=server.root / "unused",
                   protocol=protocol, ca_file=server.ca_file, timeout=30, **kw)


def plain(user: str, password: str) -> bytes:
    return b"\0" + user.encode() + b"\0" + password.encode()


# -- choosing how to log in (no server) -----------------------------------------------------------


def test_capabilities_are_read_alike_for_both_protocols():
    assert "auth=plain" in DOVECOT_IMAP and "STARTTLS" not in DOVECOT_IMAP
    assert DOVECOT_IMAP.sasl == {"PLAIN", "LOGIN"}
    assert "UIDL" in DOVECOT_POP3 and "SASL" in DOVECOT_POP3 and DOVECOT_POP3.sasl == {"PLAIN", "LOGIN"}
    assert DOVECOT_POP3.listed[-1] == "SASL PLAIN LOGIN"
    assert Capabilities.imap([b"idle", b"Auth=XOAUTH2"]).sasl == {"XOAUTH2"}
    assert not Capabilities().listed and "UIDL" not in Capabilities()


def test_password_uses_login_where_it_can():
    auth = PasswordAuth("me@example.com", 'S3cret "quoted" \\ too')
    assert auth.imap(DOVECOT_IMAP) == Login("me@example.com", 'S3cret "quoted" \\ too')
    assert auth.pop3(DOVECOT_POP3) == Login("me@example.com", 'S3cret "quoted" \\ too')
    assert "S3cret" not in repr(auth) and "S3cret" not in repr(auth.imap(DOVECOT_IMAP))


@pytest.mark.parametrize("user, password, caps", [
    ("me", "ascii-pw", DOVECOT_IMAP.listed + ("LOGINDISABLED",)),   # the server refuses LOGIN
    ("me", "pässwörd", DOVECOT_IMAP.listed),                         # LOGIN is ASCII only
    ("mé", "ascii-pw", DOVECOT_IMAP.listed),
    ("me", "line\r\nbreak", DOVECOT_IMAP.listed),                    # a quoted string cannot hold CR LF
    ("me", "tab\there", DOVECOT_IMAP.listed),
])
def test_password_uses_authenticate_plain_where_login_cannot(user, password, caps):
    step = PasswordAuth(user, password).imap(Capabilities.imap(caps))
    assert isinstance(step, Sasl) and step.mechanism == "PLAIN"
    assert step.respond(b"") == plain(user, password)
    assert step.respond(b"anything else") == b""   # client-first: nothing more to say
    assert password not in repr(step)


def test_no_password_login_at_all_is_an_auth_error():
    caps = Capabilities.imap(["IMAP4rev1", "LOGINDISABLED", "AUTH=GSSAPI"])
    with pytest.raises(Unusable) as e:
        PasswordAuth("me", "pw").imap(caps)
    assert e.value.error is AuthError and "LOGINDISABLED" in e.value.reason


@pytest.mark.parametrize("protocol, password", [("pop3", "a\nb"), ("pop3", "a\rb"), ("pop3", "a\0b"),
                                                ("imap", "a\0b")])
def test_a_password_no_protocol_can_send_is_a_config_error(protocol, password):
    auth = PasswordAuth("me", password)
    with pytest.raises(Unusable) as e:
        getattr(auth, protocol)(DOVECOT_POP3 if protocol == "pop3" else DOVECOT_IMAP)
    assert e.value.error is ConfigError and password not in e.value.reason


def test_the_account_chooses_its_authenticator(tmp_path):
    acc = Account(name="work", host="h", username="me", maildir=tmp_path, password="x")
    auth = login.authenticator(acc, "the-secret")
    assert type(auth) is PasswordAuth and auth.username == "me" and auth.secrets() == ("the-secret",)
    assert "the-secret" not in repr(auth)

    with pytest.raises(ConfigError) as e:  # (config.py allows only known kinds; this is the last guard)
        login.authenticator(Account(name="work", host="h", username="me", maildir=tmp_path, auth="gssapi"), "t")
    assert e.value.exit_code == 2 and "[accounts.work]" in str(e.value) and "gssapi" in str(e.value)


class Xoauth2(login.Authenticator):
    """What OAuth2 will add: one class (here only to show that the rest needs no change)."""

    kind = "xoauth2"

    def _step(self, caps: Capabilities) -> Sasl:
        if "XOAUTH2" not in caps.sasl:
            raise Unusable("the server does not offer XOAUTH2")
        return Sasl.client_first("XOAUTH2", f"user={self.username}\1auth=Bearer {self._secret}\1\1".encode())

    imap = pop3 = _step


def test_a_new_authenticator_is_one_class_and_a_kind(tmp_path, monkeypatch):
    @dataclass(frozen=True)
    class WithAuth(Account):
        auth: str = "password"

    monkeypatch.setitem(login.KINDS, Xoauth2.kind, Xoauth2)
    acc = WithAuth(name="g", host="h", username="me@gmail.com", maildir=tmp_path, auth="xoauth2")
    auth = login.authenticator(acc, "ya29.token")
    step = auth.imap(Capabilities.imap(["IMAP4rev1", "AUTH=XOAUTH2"]))
    assert (type(auth), step.mechanism) == (Xoauth2, "XOAUTH2")
    assert step.respond(b"") == b"user=me@gmail.com\1auth=Bearer ya29.token\1\1"
    assert step.respond(b'{"status":"401"}') == b""  # XOAUTH2's error challenge gets an empty answer
    with pytest.raises(Unusable):
        auth.pop3(DOVECOT_POP3)


def test_every_form_of_the_secret_is_masked():
    pw = 'pä"ss\\wörd'
    mask = login._Mask([pw])
    b64 = base64.b64encode(plain("me", pw)).decode()
    mask.add(b64)
    quoted = pw.replace("\\", "\\\\").replace('"', '\\"')
    for text in (pw, quoted, repr(pw.encode()), repr(quoted.encode()), b64, repr(b64.encode())):
        assert pw not in mask(f"x {text} y") and quoted not in mask(f"x {text} y") and b64 not in mask(text)
        assert login.MASK in mask(f"x {text} y"), text


# -- against Dovecot ---------------------------------------------------------------------------------


@pytest.fixture
def through_log_in(monkeypatch):
    """Every call of login.log_in, as (account, protocol, LoggedIn)."""
    calls = []
    real = login.log_in

    def spy(acc, credential, *, protocol=None):
        got = real(acc, credential, protocol=protocol)
        calls.append((acc.name, protocol, got))
        return got
    monkeypatch.setattr(login, "log_in", spy)
    return calls


def test_one_login_function_serves_imap_and_pop3_sessions(user, through_log_in):
    user.append("INBOX", [msg(1), msg(2)])
    s = ImapSession(account(user.server, user.name), user.password)
    try:
        assert isinstance(s.client, IMAPClient) and s.condstore and "UIDPLUS" in s.caps
        assert s.select("INBOX")["exists"] == 2
    finally:
        s.close()
    p = Pop3Session(account(user.server, user.name, "pop3"), user.password)
    try:
        assert isinstance(p.pop, poplib.POP3) and "UIDL" in p.caps
        assert len(p.listing()) == 2
    finally:
        p.close(commit=True)
    assert [(proto, got.mechanism) for _, proto, got in through_log_in] == [("imap", "LOGIN"),
                                                                             ("pop3", "USER/PASS")]
    # and by the account's protocol when none is named
    for protocol, kind in (("imap", IMAPClient), ("pop3", poplib.POP3)):
        got = login.log_in(account(user.server, user.name, protocol), user.password)
        assert isinstance(got.client, kind)
        got.client.logout() if protocol == "imap" else got.client.quit()


@pytest.mark.parametrize("server", ["dovecot", "basic_dovecot"])
def test_login_and_authenticate_plain_both_work(request, server, tmp_path):
    d = request.getfixturevalue(server)
    ascii_user, ascii_pw = f"l{free_port()}", "plain-Ascii-pw"
    utf8_user, utf8_pw = f"p{free_port()}", 'pä"ss\\wörd 1'
    d.add_user(ascii_user, ascii_pw)
    d.add_user(utf8_user, utf8_pw)
    for name, pw, want in ((ascii_user, ascii_pw, "LOGIN"), (utf8_user, utf8_pw, "AUTHENTICATE PLAIN")):
        got = login.imap_login(account(d, name), pw)
        try:
            assert got.mechanism == want
            assert got.client.select_folder("INBOX")[b"EXISTS"] == 0   # really logged in
        finally:
            login.close_imap(got.client)
    # the lower-level steps one by one, as `mailsync check` calls them: a server that advertises
    # LOGINDISABLED gets AUTHENTICATE PLAIN (Dovecot takes it), even for an ASCII password
    acc = account(d, ascii_user)
    client = login.imap_connect(acc)
    try:
        caps = login.imap_capabilities(client)
        assert "AUTH=PLAIN" in caps and "LOGINDISABLED" not in caps
        disabled = replace(caps, listed=caps.listed + ("LOGINDISABLED",), names=caps.names | {"LOGINDISABLED"})
        done = login.imap_authenticate(acc, client, disabled, PasswordAuth(ascii_user, ascii_pw))
        assert done.mechanism == "AUTHENTICATE PLAIN"
        after = login.imap_capabilities_after_login(acc, client)
        assert ("CONDSTORE" in after) == (server == "dovecot")
        client.select_folder("INBOX")
    finally:
        login.close_imap(client)


def test_capabilities_are_read_again_after_starttls(user):
    acc = account(user.server, user.name, starttls=True, port=user.server.imap_port)
    client = login.imap_connect(acc)
    try:
        assert "STARTTLS" not in login.imap_capabilities(client)   # the list from before TLS is gone
        assert client.socket().version() in ("TLSv1.2", "TLSv1.3")
    finally:
        login.close_imap(client)
    acc = account(user.server, user.name, "pop3", starttls=True, port=user.server.pop3_port)
    pop = login.pop3_connect(acc)
    try:
        caps = login.pop3_capabilities(acc, pop)
        assert "STLS" not in caps and "UIDL" in caps and isinstance(pop.sock, ssl.SSLSocket)
        assert login.pop3_authenticate(acc, pop, caps, PasswordAuth(user.name, user.password)).mechanism \
            == "USER/PASS"
        pop.quit()
    finally:
        pop.close()
    for protocol, port in (("imap", user.server.imap_port), ("pop3", user.server.pop3_port)):
        got = login.log_in(account(user.server, user.name, protocol, starttls=True, port=port), user.password)
        got.client.logout() if protocol == "imap" else got.client.quit()


class PlainSasl(login.Authenticator):
    """A SASL mechanism through AUTHENTICATE and AUTH (what OAuth2 needs), added as one class."""

    kind = "sasl-plain"

    def _step(self, caps: Capabilities) -> Sasl:
        return Sasl.client_first("PLAIN", plain(self.username, self._secret))

    imap = pop3 = _step


def test_a_sasl_authenticator_logs_in_to_both_protocols(user, monkeypatch, through_log_in):
    @dataclass(frozen=True)
    class WithAuth(Account):
        auth: str = "password"

    monkeypatch.setitem(login.KINDS, PlainSasl.kind, PlainSasl)
    user.append("INBOX", [msg(1)])
    for protocol in ("imap", "pop3"):
        acc = WithAuth(**{**account(user.server, user.name, protocol).__dict__, "auth": "sasl-plain"})
        s = (ImapSession if protocol == "imap" else Pop3Session)(acc, user.password)
        if protocol == "imap":
            assert s.select("INBOX")["exists"] == 1
            s.close()
        else:
            assert len(s.listing()) == 1
            s.close(commit=True)
    assert [got.mechanism for *_, got in through_log_in] == ["AUTHENTICATE PLAIN", "AUTH PLAIN"]
    # a refusal by SASL is the same AuthError as any other
    with pytest.raises(AuthError) as e:
        login.pop3_login(account(user.server, user.name, "pop3"), PlainSasl(user.name, "wrong-sasl-pw"))
    assert e.value.refusal.mechanism == "AUTH PLAIN" and "wrong-sasl-pw" not in str(e.value)
    login.pop3_login(account(user.server, user.name, "pop3"), user.password).client.quit()  # clears the penalty


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_wrong_password_is_an_auth_error_naming_the_account(user, protocol):
    bad = "Wrong-pw-9f3a"
    acc = account(user.server, user.name, protocol)
    with pytest.raises(AuthError) as e:
        login.log_in(acc, bad)
    err = e.value
    assert err.exit_code == 3
    assert str(err).startswith(f"login as {user.name} at 127.0.0.1:{acc.port} failed: ")
    assert "check username and password" in err.hint
    assert err.refusal.status == ("NO" if protocol == "imap" else "-ERR")
    shown = str(err) + repr(err) + "".join(traceback.format_exception(err)) + repr(err.refusal)
    assert bad not in shown
    # the same refusal through the session every command uses
    with pytest.raises(AuthError) as e:
        (ImapSession if protocol == "imap" else Pop3Session)(acc, bad)
    assert str(e.value) == str(err) and bad not in "".join(traceback.format_exception(e.value))
    got = login.log_in(acc, user.password)   # (a success clears Dovecot's delay for this address)
    got.client.logout() if protocol == "imap" else got.client.quit()


@pytest.mark.parametrize("protocol, non_ascii", [("imap", False), ("imap", True), ("pop3", False)])
def test_debug_output_never_holds_the_password(user, dovecot, protocol, non_ascii):
    from tests.helpers import MailUser
    u = user
    if non_ascii:   # AUTHENTICATE PLAIN: neither the password nor its base64 may show
        u = MailUser.create(dovecot, f"{user.name}n", user.tmp / "n")
        u.password = "pässwörd-Debug-ü"
        dovecot.add_user(u.name, u.password)
    port = u.server.imaps_port if protocol == "imap" else u.server.pop3s_port
    u.write_config(f'protocol = "{protocol}"', port=port)
    secrets = [u.password, base64.b64encode(plain(u.name, u.password)).decode()]
    r = u.run("--debug", "sync", "test")
    assert r.returncode == 0, r.stderr
    if protocol == "imap":
        assert ("AUTHENTICATE **REDACTED**" if non_ascii else "LOGIN **REDACTED**") in r.stderr, r.stderr
    bad = "Debug-Wrong-pw-77"
    r2 = u.run("--debug", "sync", "test", env=u.env(MAILSYNC_TEST_PASSWORD=bad))
    assert r2.returncode == 3, r2.stderr
    assert "Traceback" in r2.stderr and f"login as {u.name}" in r2.stderr
    for out in (r.stdout + r.stderr, r2.stdout + r2.stderr):
        for s in secrets + [bad, base64.b64encode(plain(u.name, bad)).decode()]:
            assert s not in out
    assert u.run("sync", "test").returncode == 0   # clears Dovecot's delay


class _Echoing(faults.TlsGreeter):
    """A careless IMAPS server: it answers LOGIN and the AUTHENTICATE response with BAD, repeating
    what it got; or it greets with PREAUTH."""

    preauth = False

    def handle(self, conn) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"* PREAUTH welcome\r\n" if self.preauth else b"* OK ready\r\n")
                f = s.makefile("rb")
                while line := f.readline():
                    tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                    if rest.upper() == b"CAPABILITY":
                        s.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                    elif rest.upper().startswith(b"AUTHENTICATE"):
                        s.sendall(b"+ \r\n")
                        s.sendall(tag + b" BAD cannot parse: " + f.readline().strip() + b"\r\n")
                    elif rest.upper() == b"LOGOUT":
                        s.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                        return
                    else:
                        s.sendall(tag + b" BAD cannot parse: " + rest + b"\r\n")
        except OSError:
            pass


@pytest.mark.parametrize("pw", ['Echo-Me "quoted" \\ S3cret', "Échø-Mé-S3cret"])
def test_a_server_that_echoes_the_password_never_shows_it(dovecot, caplog, pw):
    ca = dovecot.root / "ca"
    caplog.set_level(logging.DEBUG)
    with _Echoing(ca / "server.pem", ca / "server.key") as srv:
        acc = Account(name="t", host="127.0.0.1", port=srv.port, username="me", maildir=dovecot.root,
                      ca_file=dovecot.ca_file, timeout=5)
        with pytest.raises(AuthError) as e:
            login.log_in(acc, pw)
    text = str(e.value)
    assert "BAD cannot parse" in text and login.MASK in text, text
    forms = [pw, pw.replace("\\", "\\\\").replace('"', '\\"'), base64.b64encode(plain("me", pw)).decode()]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "cannot parse" in logged   # the server's answer was logged, masked
    for form in forms:
        assert form not in text and form not in logged and form not in repr(e.value.refusal)


def test_preauth_is_refused_not_used(dovecot):
    ca = dovecot.root / "ca"
    with _Echoing(ca / "server.pem", ca / "server.key") as srv:
        srv.preauth = True
        acc = Account(name="t", host="127.0.0.1", port=srv.port, username="me", maildir=dovecot.root,
                      ca_file=dovecot.ca_file, timeout=5)
        with pytest.raises(AuthError) as e:
            login.log_in(acc, "pw")
    assert "PREAUTH" in str(e.value) and e.value.exit_code == 3


class _Trickling(faults.TlsGreeter):
    """Greets, then answers CAPABILITY one byte every 0.2 s, for 10 s, never finishing the line."""

    def handle(self, conn) -> None:
        try:
            conn.settimeout(15)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"* OK ready\r\n")
                s.makefile("rb").readline()
                for c in (b"* CAPABILITY IMAP4rev1 " + b"X" * 100)[:50]:
                    if self.closing.wait(0.2):
                        return
                    s.sendall(bytes([c]))
        except OSError:
            pass


def test_check_gives_each_command_one_deadline_on_the_shared_login_path(dovecot):
    """mailsync check runs login.py's steps over its own connection (imap_attach), with one
    deadline per command: a server that trickles a byte now and then cannot hold it."""
    import time

    from mailsync.check import CheckTarget, run_check
    ca = dovecot.root / "ca"
    with _Trickling(ca / "server.pem", ca / "server.key") as srv:
        lines: list[str] = []
        start = time.monotonic()
        code = run_check(CheckTarget(host="127.0.0.1", port=srv.port, ca_file=dovecot.ca_file, timeout=1.5),
                         None, emit=lines.append)
        took = time.monotonic() - start
    assert code == 6, lines
    assert lines[-2] == f"FAIL capabilities: no answer from 127.0.0.1:{srv.port} within 1.5 s", lines
    assert took < 5, took
