"""oauth2.py against the test authorization server (tests/oauth_server.py); no Dovecot.

The sign-in flows (loopback with the test as the browser, paste, device with authorization_pending
then slow_down), the token store (0600 file in a 0700 dir, atomic, keyring), the token source
(refresh with rotation, invalid_grant -> ReauthRequired, the expiry margin, token_command, one
refresh for many threads and for two processes), and where tokens must never show up."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest

from mailsync import oauth2
from mailsync.config import Account, OAuth2
from mailsync.errors import AuthError, ConfigError, ConnectError, StorageError
from mailsync.oauth2 import (
    OAuthError,
    ReauthRequired,
    TokenSource,
    TokenStore,
    authorize,
    endpoints,
    status,
)
from tests.oauth_server import DEVICE_GRANT, AuthServer, make_jwt, verify_jwt

KEY = b"mailsync-test-signing-key"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    monkeypatch.delenv("MAILSYNC_TOKEN_STORE", raising=False)
    return home


@pytest.fixture
def make_server():
    servers: list[AuthServer] = []

    def make(**kw) -> AuthServer:
        servers.append(AuthServer(KEY, "alice", **kw).start())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server) -> AuthServer:
    return make_server()


def make_acc(server: AuthServer | None, name: str = "work", protocol: str = "imap", **oauth) -> Account:
    conf: dict = {"provider": "custom", "scopes": ("mail.read", "offline_access")}
    if server is not None:
        conf.update(client_id=server.client_id, authorize_url=server.authorize_url, token_url=server.token_url,
                    device_url=server.device_url)
    conf.update(oauth)
    return Account(name=name, host="imap.example.org", username="alice@example.org", maildir=Path("/nonexistent"),
                   protocol=protocol, timeout=10, auth="oauth2", oauth2=OAuth2(**conf))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


def approve(url: str) -> str:
    """The browser signs in: where the server sends it (its 302 Location)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as ei:
        opener.open(url, timeout=5)
    assert ei.value.code == 302
    return ei.value.headers["Location"]


def visit(url: str) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
        return r.read().decode()


def url_in(lines: list[str], timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            m = re.search(r"http://127\.0\.0\.1:\d+/authorize\?\S+", line)
            if m:
                return m.group(0)
        time.sleep(0.005)
    raise AssertionError(f"no authorization URL printed: {lines}")


def sign_in(acc: Account) -> list[str]:
    """The paste flow, the quickest way to stored tokens."""
    lines: list[str] = []
    authorize(acc, "paste", lines.append, read_line=lambda: approve(url_in(lines)))
    return lines


def as_browser(lines: list[str], pages: list[str], tamper=None) -> threading.Thread:
    def run():
        target = approve(url_in(lines))
        pages.append(visit(tamper(target) if tamper else target))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def post(url: str, **fields) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode())
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# -- endpoints ---------------------------------------------------------------------------------

def test_provider_defaults_and_overrides():
    ms = make_acc(None, provider="microsoft", client_id="c", scopes=None, tenant="contoso.onmicrosoft.com")
    ep = endpoints(ms)
    assert ep.authorize_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
    assert ep.token_url.endswith("/contoso.onmicrosoft.com/oauth2/v2.0/token")
    assert ep.device_url.endswith("/oauth2/v2.0/devicecode")
    assert ep.scopes == ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access")
    pop = endpoints(make_acc(None, protocol="pop3", provider="microsoft", client_id="c", scopes=None))
    assert pop.scopes == ("https://outlook.office.com/POP.AccessAsUser.All", "offline_access")
    assert "/common/" in pop.token_url
    g = endpoints(make_acc(None, provider="google", client_id="c", scopes=None))
    assert (g.authorize_url, g.token_url, g.scopes) == (
        "https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token",
        ("https://mail.google.com/",))
    assert dict(g.extra) == {"access_type": "offline", "prompt": "consent"}
    own = endpoints(make_acc(None, provider="microsoft", client_id="c", scopes=("x",),
                             token_url="https://proxy.example/token"))
    assert own.token_url == "https://proxy.example/token" and own.scopes == ("x",)
    assert own.authorize_url.startswith("https://login.microsoftonline.com/")


# -- the flows ---------------------------------------------------------------------------------

def test_loopback_flow_stores_tokens(server, state_home, monkeypatch):
    monkeypatch.setattr(oauth2.webbrowser, "open", lambda url: pytest.fail("no browser was asked for"))
    lines: list[str] = []
    pages: list[str] = []
    browser = as_browser(lines, pages)
    authorize(make_acc(server), "loopback", lines.append, open_browser=False, timeout=10)
    browser.join(5)
    assert "close this tab" in pages[0]
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url_in(lines)).query))
    assert q["code_challenge_method"] == "S256" and q["response_type"] == "code"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", q["redirect_uri"])
    assert q["scope"] == "mail.read offline_access" and q["login_hint"] == "alice@example.org"
    assert server.counts["authorization_code"] == 1
    st = status(make_acc(server))
    assert st["stored"] and st["scopes"] == ["mail.read", "offline_access"] and st["access_expires_at"]
    assert st["store"] == str(state_home / "mailsync" / "tokens" / "work.json")
    src = TokenSource(make_acc(server))
    assert verify_jwt(KEY, src.token())["sub"] == "alice"
    assert 3500 < src.expires_in() <= 3600
    assert server.counts["refresh_token"] == 0


def test_loopback_opens_the_browser_when_a_display_is_likely(server, monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    pages: list[str] = []

    def browser(url):
        threading.Thread(target=lambda: pages.append(visit(url)), daemon=True).start()
        return True

    monkeypatch.setattr(oauth2.webbrowser, "open", browser)
    authorize(make_acc(server), "loopback", lambda line: None, timeout=10)
    assert pages and status(make_acc(server))["stored"]


def test_loopback_refuses_an_answer_with_another_state(server):
    lines: list[str] = []
    pages: list[str] = []
    as_browser(lines, pages, tamper=lambda url: re.sub(r"state=[^&]+", "state=forged", url))
    with pytest.raises(OAuthError, match="state differs"):
        authorize(make_acc(server), "loopback", lines.append, open_browser=False, timeout=10)
    assert server.counts["authorization_code"] == 0 and not status(make_acc(server))["stored"]


def test_loopback_times_out(server):
    with pytest.raises(OAuthError, match="within 1 seconds"):
        authorize(make_acc(server), "loopback", lambda line: None, open_browser=False, timeout=1)


def test_paste_flow(server):
    lines = sign_in(make_acc(server))
    assert any("Paste" in line for line in lines)
    assert server.counts["authorization_code"] == 1
    assert verify_jwt(KEY, TokenSource(make_acc(server)).token())["sub"] == "alice"


def test_sign_in_refused_by_the_user(server):
    server.deny = True
    with pytest.raises(OAuthError, match="access_denied: the user declined"):
        sign_in(make_acc(server))


def test_device_flow_honours_pending_and_slow_down(make_server):
    server = make_server(device_pending=2, device_slow_down=1, device_interval=0)
    lines: list[str] = []
    sleeps: list[float] = []
    authorize(make_acc(server), "device", lines.append, sleep=sleeps.append)
    assert sleeps == [0, 0, 0, 5]  # slow_down: the interval grew by 5 s (RFC 8628 3.5)
    assert server.counts[DEVICE_GRANT] == 4 and server.counts["device"] == 1
    assert "WDJB-MJHT" in lines[0] and server.url + "/activate" in lines[0]
    assert status(make_acc(server))["stored"]


def test_device_flow_with_real_sleep_waits_the_interval(make_server):
    server = make_server(device_pending=0, device_slow_down=0, device_interval=1)
    authorize(make_acc(server), "device", lambda line: None)
    asked, *polls = server.device_polls()[0]
    assert len(polls) == 1 and polls[0] - asked >= 0.95


@pytest.mark.parametrize("outcome,text", [("access_denied", "refused"), ("expired_token", "expired")])
def test_device_flow_failures(make_server, outcome, text):
    server = make_server(device_pending=0, device_slow_down=0, device_outcome=outcome)
    with pytest.raises(OAuthError, match=text):
        authorize(make_acc(server), "device", lambda line: None, sleep=lambda s: None)
    assert not status(make_acc(server))["stored"]


def test_google_refuses_the_device_flow(no_network):
    acc = make_acc(None, provider="google", client_id="c", scopes=None)
    with pytest.raises(OAuthError) as ei:
        authorize(acc, "device", lambda line: pytest.fail("nothing is shown"))
    assert "Google does not allow the device flow" in ei.value.message
    assert "loopback" in ei.value.hint and "paste" in ei.value.hint


def test_client_secret_goes_in_the_body_and_is_required(make_server):
    server = make_server(client_secret="s3cr3t-value")
    with pytest.raises(OAuthError) as ei:
        sign_in(make_acc(server))
    assert "invalid_client" in ei.value.message and "AADSTS7000218" in ei.value.message
    assert "client_secret_command" in ei.value.hint
    sign_in(make_acc(server, client_secret_command=["sh", "-c", "echo s3cr3t-value"]))
    assert status(make_acc(server))["stored"]
    assert not any("s3cr3t" in p for p in server.paths)


# -- refreshing --------------------------------------------------------------------------------

def test_refresh_rotates_and_stores_the_new_refresh_token_at_once(server):
    acc = make_acc(server)
    sign_in(acc)
    store = TokenStore(acc)
    before = store.load()
    src = TokenSource(acc)
    first = src.token()
    src.expired()
    second = src.token()
    assert second != first and verify_jwt(KEY, second)["sub"] == "alice"
    after = store.load()
    assert server.counts["refresh_token"] == 1
    assert after["access_token"] == second
    assert after["refresh_token"] != before["refresh_token"]
    assert server.valid_refresh_tokens() == {after["refresh_token"]}
    code, answer = post(server.token_url, grant_type="refresh_token", refresh_token=before["refresh_token"],
                        client_id=server.client_id)
    assert (code, answer["error"]) == (400, "invalid_grant")


def test_refresh_without_rotation_keeps_the_refresh_token(make_server):
    server = make_server(rotate=False)
    acc = make_acc(server)
    sign_in(acc)
    before = TokenStore(acc).load()
    src = TokenSource(acc)
    src.clock = lambda: time.time() + 7200
    src.token()
    assert server.counts["refresh_token"] == 1
    assert TokenStore(acc).load()["refresh_token"] == before["refresh_token"]


def test_invalid_grant_is_reauth_required(server):
    acc = make_acc(server)
    sign_in(acc)
    server.revoke()
    src = TokenSource(acc)
    src.token()
    src.expired()
    with pytest.raises(ReauthRequired) as ei:
        src.token()
    e = ei.value
    assert isinstance(e, AuthError) and e.exit_code == 12  # docs/exit-codes.md (11 is verify's)
    assert "run `mailsync auth work`" in e.message and "invalid_grant" in e.message and "AADSTS70008" in e.message


def test_nothing_stored_is_reauth_required(server):
    with pytest.raises(ReauthRequired, match="mailsync auth work"):
        TokenSource(make_acc(server)).token()


def test_expiry_margin(make_server):
    server = make_server(ttl=2)
    acc = make_acc(server)
    sign_in(acc)
    src = TokenSource(acc)
    src.token()
    assert server.counts["refresh_token"] == 0 and 1 < src.expires_in() <= 2
    src.clock = lambda: time.time() + 1.5  # 0.5 s left, under a third of 2 s
    src.token()
    assert server.counts["refresh_token"] == 1


def test_margin_is_300_seconds_for_long_lived_tokens(server):
    acc = make_acc(server)
    sign_in(acc)
    src = TokenSource(acc)
    src.token()
    src.clock = lambda: time.time() + 3600 - 310
    src.token()
    assert server.counts["refresh_token"] == 0
    src.clock = lambda: time.time() + 3600 - 290
    src.token()
    assert server.counts["refresh_token"] == 1


def test_expired_with_a_token_another_connection_replaced_keeps_the_new_one(server):
    acc = make_acc(server)
    sign_in(acc)
    src = TokenSource(acc)
    old = src.token()
    src.expired()
    new = src.token()
    src.expired(old)  # a late report about the old token
    assert src.token() == new and server.counts["refresh_token"] == 1


def test_four_threads_cause_one_refresh(make_server):
    server = make_server(refresh_delay=0.2)
    acc = make_acc(server)
    sign_in(acc)
    src = oauth2.token_source(acc)
    assert oauth2.token_source(acc) is src
    src.token()
    src.expired()
    barrier = threading.Barrier(4)
    got: list[str] = []

    def worker():
        barrier.wait()
        got.append(src.token())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 4 and len(set(got)) == 1
    assert server.counts["refresh_token"] == 1


_CHILD = """
import sys, time
from pathlib import Path
from mailsync.config import Account, OAuth2
from mailsync.oauth2 import TokenSource
url = sys.argv[1]
acc = Account(name="work", host="h", username="alice", maildir=Path("/x"), auth="oauth2",
              oauth2=OAuth2(client_id="mailsync-test", token_url=url + "/token", scopes=("mail.read",)))
src = TokenSource(acc)
src.token()
src.expired()
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
print(src.token())
"""


def test_two_processes_refresh_once(make_server, state_home):
    server = make_server(refresh_delay=0.3)
    sign_in(make_acc(server))
    start = str(time.time() + 1.0)
    env = dict(os.environ, XDG_STATE_HOME=str(state_home), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, server.url, start], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=20) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]  # one refreshed, the other took what it stored
    assert server.counts["refresh_token"] == 1


# -- token_command -----------------------------------------------------------------------------

def test_token_command(tmp_path):
    runs = tmp_path / "runs"
    cmd = ["sh", "-c", f'echo run >> "{runs}"; echo "tok-$(wc -l < "{runs}" | tr -d " ")"']
    acc = make_acc(None, token_command=cmd)
    src = TokenSource(acc)
    assert src.token() == "tok-1" and src.token() == "tok-1"  # cached
    assert src.expires_in() is None  # it gives no expiry
    src.clock = lambda: time.time() + 250  # cached for a short time only
    assert src.token() == "tok-2"
    src.expired()
    assert src.token() == "tok-3"


def test_token_command_jwt_expiry_is_read(tmp_path):
    jwt = make_jwt("alice", KEY, 1000)
    src = TokenSource(make_acc(None, token_command=f"echo {jwt}"))
    assert src.token() == jwt and 990 < src.expires_in() <= 1000


def test_token_command_failure(tmp_path):
    src = TokenSource(make_acc(None, token_command=["sh", "-c", "echo 'not signed in' >&2; exit 3"]))
    with pytest.raises(ConfigError, match="token_command failed with exit code 3: not signed in"):
        src.token()


# -- the store ---------------------------------------------------------------------------------

def test_token_file_is_private_and_written_atomically(server, state_home, monkeypatch):
    acc = make_acc(server)
    sign_in(acc)
    tokens = state_home / "mailsync" / "tokens"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_home / "mailsync").stat().st_mode) == 0o700
    assert sorted(os.listdir(tokens)) == ["work.json", "work.lock"]
    for name in ("work.json", "work.lock"):
        assert stat.S_IMODE((tokens / name).stat().st_mode) == 0o600
    before = (tokens / "work.json").read_text()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(oauth2.os, "replace", full)
    with pytest.raises(StorageError, match="No space left"):
        TokenStore(acc).save({"refresh_token": "x"})
    assert sorted(os.listdir(tokens)) == ["work.json", "work.lock"]  # no tmp left
    assert (tokens / "work.json").read_text() == before


def test_unreadable_token_file(server, state_home):
    acc = make_acc(server)
    sign_in(acc)
    (state_home / "mailsync" / "tokens" / "work.json").write_text("{not json")
    with pytest.raises(StorageError, match="cannot be read") as ei:
        TokenSource(acc).token()
    assert "mailsync auth work" in ei.value.hint


def test_keyring_store(server, state_home, monkeypatch):
    class FakeKeyring:
        items: ClassVar[dict] = {}

        @classmethod
        def get_password(cls, service, user):
            return cls.items.get((service, user))

        @classmethod
        def set_password(cls, service, user, value):
            cls.items[(service, user)] = value

    monkeypatch.setitem(sys.modules, "keyring", FakeKeyring)
    monkeypatch.setenv("MAILSYNC_TOKEN_STORE", "keyring")
    acc = make_acc(server)
    sign_in(acc)
    assert status(acc)["store"] == "keyring" and status(acc)["stored"]
    assert ("mailsync", "work") in FakeKeyring.items
    assert not (state_home / "mailsync" / "tokens" / "work.json").exists()
    assert verify_jwt(KEY, TokenSource(acc).token())
    monkeypatch.setitem(sys.modules, "keyring", None)  # asked for, not installed
    with pytest.raises(ConfigError, match="keyring package is not installed"):
        TokenStore(acc)


# -- secrets and transport ---------------------------------------------------------------------

def test_tokens_never_show(make_server, caplog):
    caplog.set_level(logging.DEBUG)
    server = make_server(client_secret="cl13nt-s3cret")
    acc = make_acc(server, client_secret_command="echo cl13nt-s3cret")
    sign_in(acc)
    src = TokenSource(acc)
    src.token()
    src.expired()
    src.token()
    server.revoke()
    src.expired()
    with pytest.raises(ReauthRequired) as ei:
        src.token()
    st = status(acc)
    assert set(st) == {"stored", "access_expires_at", "scopes", "store"}
    shown = "\n".join([caplog.text, json.dumps(st), str(ei.value), repr(ei.value), repr(src), repr(src.store),
                       repr(acc)])
    assert "refreshed" in caplog.text  # events are logged, values are not
    assert len(server.issued) == 4
    for secret in [*server.issued, "cl13nt-s3cret"]:
        assert secret not in shown
        assert not any(secret in p for p in server.paths)  # nothing secret in a URL


def test_plain_http_to_another_host_is_refused(server, no_network):
    acc = make_acc(server, token_url="http://auth.example.com/token")
    TokenStore(acc).save({"refresh_token": "r", "access_token": "a", "expires_at": 0, "lifetime": 1})
    with pytest.raises(ConfigError, match="must be https://"):
        TokenSource(acc).token()
    with pytest.raises(ConfigError, match="must be https://"):
        authorize(make_acc(server, authorize_url="http://auth.example.com/authorize"), "paste",
                  lambda line: None, read_line=lambda: pytest.fail("no URL to paste"))


def test_unreachable_token_endpoint_is_a_connect_error(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    acc = make_acc(server, token_url=f"http://127.0.0.1:{port}/token")
    TokenStore(acc).save({"refresh_token": "r", "access_token": "a", "expires_at": 0, "lifetime": 1})
    with pytest.raises(ConnectError, match=r"cannot reach the token endpoint 127\.0\.0\.1") as ei:
        TokenSource(acc).token()
    assert ei.value.exit_code == 5


def test_authorize_replaces_the_cached_source(server):
    acc = make_acc(server)
    sign_in(acc)
    src = oauth2.token_source(acc)
    src.token()
    sign_in(acc)
    fresh = oauth2.token_source(acc)
    assert fresh is not src and fresh.token() == TokenStore(acc).load()["access_token"]


def test_password_accounts_never_load_the_oauth2_code():
    """The commands import nothing of OAuth2 (nor urllib, http.server) until an account uses it:
    a password account's start-up is what it was."""
    code = ("import sys\n"
            "import mailsync.cli, mailsync.engine, mailsync.pop3, mailsync.verify, mailsync.transfer, "
            "mailsync.check, mailsync.compare, mailsync.login\n"
            "print(sorted(m for m in ('mailsync.oauth2', 'urllib.request', 'http.server', 'webbrowser') "
            "if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"loaded at start-up: {out.strip()}"
