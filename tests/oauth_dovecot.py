"""An OAuth2-only Dovecot (SASL XOAUTH2 and OAUTHBEARER, RFC 7628) over the session Dovecot's mail store.

Dovecot validates HS256 JWTs itself (passdb oauth2, introspection_mode = local): no token server.
Seed and inspect mail through the password instance (`dovecot`, `MailUser`), log in with tokens here:

    from tests.oauth_dovecot import make_jwt, oauth_dovecot_fixture  # noqa: F401  (the fixture)

    def test_x(oauth_dovecot, tmp_path):
        u = oauth_dovecot.new_user(tmp_path)          # a MailUser on the password instance
        u.append("INBOX", [msg(1)])
        token = oauth_dovecot.token(u.name, ttl=300)  # or make_jwt(u.name, oauth_dovecot.key, 300)
        c = IMAPClient("127.0.0.1", port=oauth_dovecot.imaps_port, ssl_context=oauth_dovecot.ssl_context())
        c.oauth2_login(u.name, token)

Auth penalty: after a failed login, Dovecot delays every later login from the same client IP on this
instance (4 s, 8 s, 15 s, until ~15 s pass without failures or a login succeeds). The instance is
shared by the session, so make deliberate failures from another loopback address (`FAIL_SOURCES`,
`imaplib_ssl(..., source=...)`), or last.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import itertools
import json
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dovecot import Dovecot
from tests.helpers import MailUser

# client source addresses for deliberate failures (Linux routes all of 127/8 to lo): the penalty is
# per client IP, so failures from these do not slow down logins from 127.0.0.1
FAIL_SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 40))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(user: str, key: bytes, ttl: float, **claims) -> str:
    """An HS256 JWT with sub=user, iat=now, exp=now+ttl (negative ttl: already expired).

    Extra claims are added or override those; a claim given as None is left out (e.g. exp=None)."""
    now = int(time.time())
    body = {"sub": user, "iat": now, "exp": int(now + ttl)}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    header = {"alg": "HS256", "typ": "JWT"}
    signing_input = ".".join(_b64url(json.dumps(p, separators=(",", ":")).encode()) for p in (header, body))
    sig = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(sig)}"


def xoauth2_response(user: str, token: str) -> str:
    """The base64 SASL XOAUTH2 initial response (as sent after `AUTH XOAUTH2` / `AUTHENTICATE XOAUTH2`)."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode("ascii")


def oauthbearer_response(user: str, token: str, host: str = "127.0.0.1", port: int = 0) -> str:
    """The base64 SASL OAUTHBEARER (RFC 7628) initial response."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    raw = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


class _IMAP4_SSL_From(imaplib.IMAP4_SSL):
    source: str | None = None

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0) if self.source else None)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class _IMAP4_From(imaplib.IMAP4):
    source: str | None = None

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0) if self.source else None)


def imaplib_plain(port: int, source: str | None = None, timeout: float = 30) -> imaplib.IMAP4:
    """A stdlib IMAP4 connection (for STARTTLS) to 127.0.0.1:port, optionally from another source address.

    Dovecot counts a connection whose client and server addresses are equal as secured: from 127.0.0.1
    it takes logins without STARTTLS; from 127.0.0.2 it does not."""
    cls = type("IMAP4_From", (_IMAP4_From,), {"source": source})
    return cls("127.0.0.1", port, timeout=timeout)


def imaplib_ssl(port: int, ca_file: Path, source: str | None = None, timeout: float = 30) -> imaplib.IMAP4_SSL:
    """A stdlib IMAP4_SSL connection to 127.0.0.1:port, optionally from another loopback source address."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    cls = type("IMAP4_SSL_From", (_IMAP4_SSL_From,), {"source": source})
    return cls("127.0.0.1", port, ssl_context=ctx, timeout=timeout)


@dataclass
class OAuthDovecot(Dovecot):
    """Bearer-token-only Dovecot serving `base`'s mail store, with `base`'s test CA and certificate."""

    base: Dovecot | None = None

    def __post_init__(self) -> None:
        if self.base is None:
            raise ValueError("OAuthDovecot needs base: the password Dovecot whose mail it serves")
        if self.oauth2_key is None:
            self.oauth2_key = secrets.token_bytes(32)
        if self.mail_root is None:
            self.mail_root = self.base.root
        super().__post_init__()

    @property
    def key(self) -> bytes:
        assert self.oauth2_key is not None
        return self.oauth2_key

    def write_config(self) -> None:
        ca = self.root / "ca"
        if not ca.exists():  # the same CA and certificates as the password instance
            shutil.copytree(self.base.root / "ca", ca)
        super().write_config()

    def start(self) -> OAuthDovecot:
        super().start()
        # Dovecot.start returns once the ports accept; the master writes its pid file a moment later, and
        # stop() without it is a no-op that leaves the daemon running
        deadline = time.monotonic() + 10
        while not (self.root / "run" / "master.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def token(self, user: str, ttl: float = 600, **claims) -> str:
        return make_jwt(user, self.key, ttl, **claims)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def new_user(self, tmp: Path, name: str | None = None) -> MailUser:
        """A new mail account, made like conftest's `user` on the password instance (MailUser: seed,
        append, server_messages there); the same mailbox is reachable here with a token for `name`."""
        name = name or f"o{os.getpid()}x{next(_ids)}"
        return MailUser.create(self.base, name, tmp)


_ids = itertools.count(1)
# the fixture may be imported into several test modules, and pytest then makes one fixture per module:
# share one instance between them, stopped when the last of them is torn down
_shared: dict[str, object] = {"server": None, "refs": 0}


@pytest.fixture(scope="session", name="oauth_dovecot")
def oauth_dovecot_fixture(dovecot):
    """The session's OAuth2-only Dovecot over the `dovecot` fixture's mail store.

    Import it into a test module as `oauth_dovecot_fixture` (ruff then wants only a noqa F401 on the
    import; importing the name `oauth_dovecot` works as well, but every test argument is then an F811)."""
    if _shared["server"] is None:
        root = Path(tempfile.mkdtemp(prefix="mailsync-dovecot-oauth-"))
        # no 2 s pause before each failure reply (the auth penalty stays: see the module docstring)
        _shared["server"] = OAuthDovecot(root, users={}, base=dovecot, extra_conf="auth_failure_delay = 0\n").start()
    _shared["refs"] += 1
    server = _shared["server"]
    yield server
    _shared["refs"] -= 1
    if _shared["refs"] == 0:
        _shared["server"] = None
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


oauth_dovecot = oauth_dovecot_fixture
