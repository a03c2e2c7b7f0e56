"""The OAuth2-only test Dovecot (tests/oauth_dovecot.py) is what mailsync's OAuth2 tests need.

Checks of the test infrastructure with imapclient, imaplib and poplib, not of mailsync. Deliberate
failures come last and from other loopback addresses (Dovecot's auth penalty is per client IP).
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import time

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.helpers import msg
from tests.oauth_dovecot import (
    FAIL_SOURCES,
    imaplib_plain,
    imaplib_ssl,
    make_jwt,
    oauth_dovecot_fixture,  # noqa: F401  (the session fixture `oauth_dovecot`)
    oauthbearer_response,
    xoauth2_response,
)


def imaps(server) -> IMAPClient:
    return IMAPClient("127.0.0.1", port=server.imaps_port, ssl=True, ssl_context=server.ssl_context(), timeout=30)


def inbox_bodies(c: IMAPClient) -> list[bytes]:
    c.select_folder("INBOX", readonly=True)
    uids = c.search("ALL")
    data = c.fetch(uids, [b"BODY.PEEK[]"]) if uids else {}
    return [data[u][b"BODY[]"] for u in sorted(data)]


def test_make_jwt_shape():
    token = make_jwt("alice", b"k", 60, aud="mail", iat=None)
    header, body, sig = (base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split("."))
    assert json.loads(header) == {"alg": "HS256", "typ": "JWT"}
    claims = json.loads(body)
    assert claims["sub"] == "alice" and claims["aud"] == "mail" and "iat" not in claims
    assert 55 <= claims["exp"] - time.time() <= 61
    assert len(sig) == 32


def test_xoauth2_imaps_sees_mail_seeded_on_password_instance(oauth_dovecot, dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    dovecot.seed(u.name, "INBOX", [msg(1), msg(2)])
    c = imaps(oauth_dovecot)
    caps = c.capabilities()
    assert b"AUTH=XOAUTH2" in caps and b"AUTH=OAUTHBEARER" in caps and b"AUTH=PLAIN" not in caps
    c.oauth2_login(u.name, oauth_dovecot.token(u.name))
    try:
        assert inbox_bodies(c) == [msg(1), msg(2)]
    finally:
        c.logout()


def test_oauthbearer_imaps_writes_to_the_shared_store(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    c = imaps(oauth_dovecot)
    c.oauthbearer_login(u.name, make_jwt(u.name, oauth_dovecot.key, 600))
    try:
        c.create_folder("Archive")
        c.append("Archive", msg(3))
    finally:
        c.logout()
    seen = u.server_messages()  # through the password instance
    assert [body for body, _ in seen["Archive"].values()] == [msg(3)]


def test_starttls_port_needs_starttls_from_a_non_local_address(oauth_dovecot, tmp_path):
    # from 127.0.0.1 to 127.0.0.1 Dovecot counts the plaintext connection as secured, so use 127.0.0.2
    u = oauth_dovecot.new_user(tmp_path)
    c = imaplib_plain(oauth_dovecot.imap_port, source=FAIL_SOURCES[-1])
    try:
        assert "LOGINDISABLED" in c.capabilities and "AUTH=XOAUTH2" not in c.capabilities
        c.starttls(oauth_dovecot.ssl_context())
        assert {"AUTH=XOAUTH2", "AUTH=OAUTHBEARER"} <= set(c.capabilities)
        token = oauth_dovecot.token(u.name)
        assert c.authenticate("XOAUTH2", lambda _: base64.b64decode(xoauth2_response(u.name, token)))[0] == "OK"
    finally:
        c.logout()


def test_pop3_two_step_auth_xoauth2(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    u.append("INBOX", [msg(4), msg(5)])
    p = poplib.POP3_SSL("127.0.0.1", oauth_dovecot.pop3s_port, context=oauth_dovecot.ssl_context(), timeout=30)
    try:
        assert p._shortcmd("AUTH XOAUTH2").startswith(b"+")
        p._putcmd(xoauth2_response(u.name, oauth_dovecot.token(u.name)))
        assert p._getresp().startswith(b"+OK")
        assert p.stat()[0] == 2
        assert b"\r\n".join(p.retr(1)[1]) + b"\r\n" == msg(4)
    finally:
        p.quit()


def test_doveadm_kick_ends_a_live_imap_session(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    c = imaps(oauth_dovecot)
    c.oauth2_login(u.name, oauth_dovecot.token(u.name))
    c.select_folder("INBOX")
    assert u.name in oauth_dovecot.doveadm("who")
    oauth_dovecot.doveadm("kick", u.name)
    deadline = time.monotonic() + 10
    with pytest.raises((imaplib.IMAP4.abort, OSError)):  # BYE or EOF
        while time.monotonic() < deadline:
            c.noop()
            time.sleep(0.05)


# -- deliberate failures: last, and each from its own loopback address -------------------------------

def refused(server, source: str, mech: str, response: str) -> tuple[str, list[bytes]]:
    """AUTHENTICATE with an initial response, answer a challenge with an empty line; the NO and the
    challenges seen."""
    c = imaplib_ssl(server.imaps_port, server.ca_file, source=source)
    challenges = []

    def answer(challenge: bytes) -> bytes:
        if not challenges and challenge == b"":
            challenges.append(b"")
            return base64.b64decode(response)
        challenges.append(challenge)
        return b""

    try:
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.authenticate(mech, answer)
        return str(e.value), challenges[1:]
    finally:
        c.shutdown()


FAILED_401 = {"status": "401", "schemes": "bearer", "scope": "mail"}


def test_expired_token_refused(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    token = oauth_dovecot.token(u.name, ttl=-60)
    err, challenges = refused(oauth_dovecot, FAIL_SOURCES[0], "XOAUTH2", xoauth2_response(u.name, token))
    assert "AUTHENTICATIONFAILED" in err
    assert [json.loads(ch) for ch in challenges] == [FAILED_401]


def test_token_for_another_user_refused(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path / "u")
    other = oauth_dovecot.new_user(tmp_path / "o")
    token = oauth_dovecot.token(other.name)
    err, _ = refused(oauth_dovecot, FAIL_SOURCES[1], "OAUTHBEARER", oauthbearer_response(u.name, token))
    assert "AUTHENTICATIONFAILED" in err


def test_token_signed_with_another_key_refused(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    token = make_jwt(u.name, b"not the key", 600)
    err, _ = refused(oauth_dovecot, FAIL_SOURCES[2], "XOAUTH2", xoauth2_response(u.name, token))
    assert "AUTHENTICATIONFAILED" in err


def test_password_login_refused(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    c = imaplib_ssl(oauth_dovecot.imaps_port, oauth_dovecot.ca_file, source=FAIL_SOURCES[3])
    try:
        with pytest.raises(imaplib.IMAP4.error, match="Unsupported authentication mechanism"):
            c.login(u.name, u.password)
    finally:
        c.shutdown()
    with pytest.raises(LoginError):  # imapclient's view, from 127.0.0.1
        imaps(oauth_dovecot).login(u.name, u.password)
    # the password instance still takes the password for the same mailbox
    u.imap().logout()


def test_valid_logins_from_127_0_0_1_are_not_delayed_by_the_failures(oauth_dovecot, tmp_path):
    u = oauth_dovecot.new_user(tmp_path)
    t = time.monotonic()
    c = imaps(oauth_dovecot)
    c.oauth2_login(u.name, oauth_dovecot.token(u.name))
    c.logout()
    assert time.monotonic() - t < 2
