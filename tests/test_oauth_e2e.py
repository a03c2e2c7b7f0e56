"""OAuth2 end to end: the real `mailsync` CLI (a subprocess) against the token-only Dovecot
(tests/oauth_dovecot.py) and the test authorization server (tests/oauth_server.py).

What a user notices: `mailsync auth` (device flow, and loopback with the test as the browser) stores
tokens and `--status` shows them without a token; with them every command works over XOAUTH2 and
OAUTHBEARER (backup byte for byte, two-way sync, POP3, migrate, verify, check); token_command; a
run longer than the access token's life, with the session kicked mid-run, finishes with every
message once; a refused refresh token is exit 12 and one line; refused logins are exit 3 and one
line; an access token the server refuses is replaced once (a run, and `mailsync check`), unless the
token source has no other. Every test ends with a sweep: no token, SASL response or client secret in
any output (mailsync's argv in /proc, stdout, stderr, --json, --debug), the state databases, the
Maildir or any other file under the test's directory, except the token store itself.

Dovecot's auth penalty (per client IP) delays every login after a failed one: the tests that must
not fail a login come first; the refusals come last and log in from other loopback addresses
(FAIL_SOURCES, set in the child by a sitecustomize that binds its outgoing sockets).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, MailUser, local_files, msg
from tests.oauth_dovecot import (
    FAIL_SOURCES,
    OAuthDovecot,
    make_jwt,
    oauth_dovecot_fixture,  # noqa: F401  (the session fixture `oauth_dovecot`)
    oauthbearer_response,
    xoauth2_response,
)
from tests.oauth_server import AuthServer

ACCOUNT = "test"
URL = re.compile(r"http://127\.0\.0\.1:\d+/authorize\?\S+")


# -- the rig: one mail user, one authorization server, one config, every CLI run recorded ----------

@dataclass
class Rig:
    od: OAuthDovecot
    u: MailUser
    auth: AuthServer | None
    tmp: Path
    client_secret: str = field(default_factory=lambda: "cs-" + secrets.token_urlsafe(24))
    seen: list[str] = field(default_factory=list)  # argv, stdout and stderr of every run

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def token_file(self) -> Path:
        return self.state / "mailsync" / "tokens" / f"{ACCOUNT}.json"

    @property
    def private(self) -> Path:
        """Where the test keeps what holds secrets by design (the client secret, token_command's log)."""
        p = self.tmp / "private"
        p.mkdir(exist_ok=True)
        return p

    @property
    def issued_log(self) -> Path:
        return self.private / "issued.txt"

    # -- config
    def oauth_table(self, mechanism: str | None = None, token_command: list[str] | None = None) -> str:
        lines = [f"[accounts.{ACCOUNT}.oauth2]"]
        if token_command is not None:
            lines.append(f"token_command = {json.dumps(token_command)}")
        else:
            (self.private / "client_secret").write_text(self.client_secret + "\n")
            assert self.auth is not None
            lines += ['provider = "custom"', f'client_id = "{self.auth.client_id}"',
                      f'client_secret_command = ["cat", "{self.private / "client_secret"}"]',
                      'scopes = ["mail", "offline_access"]', f'authorize_url = "{self.auth.authorize_url}"',
                      f'token_url = "{self.auth.token_url}"', f'device_url = "{self.auth.device_url}"']
        if mechanism:
            lines.append(f'mechanism = "{mechanism}"')
        return "\n".join(lines) + "\n"

    def configure(self, *, protocol: str = "imap", mechanism: str | None = None, extra: str = "",
                  token_command: list[str] | None = None, maildir: Path | None = None, more: str = "") -> None:
        port = self.od.pop3s_port if protocol == "pop3" else self.od.imaps_port
        self.u.config.write_text(
            f'[accounts.{ACCOUNT}]\nhost = "127.0.0.1"\nport = {port}\nprotocol = "{protocol}"\n'
            f'username = "{self.u.name}"\nmaildir = "{maildir or self.u.maildir}"\nca_file = "{self.od.ca_file}"\n'
            f'auth = "oauth2"\n{extra}\n' + self.oauth_table(mechanism, token_command) + "\n" + more)

    # -- running the CLI
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAILSYNC_CRASH_AT", "MAILSYNC_TOKEN_STORE", "MAILSYNC_TEST_PASSWORD")}
        env.update(XDG_STATE_HOME=str(self.state), PYTHONUNBUFFERED="1", **extra)
        return env

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(self.u.config), *args],
                             env=env or self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
        # Popen returns once the child has exec'd: this is mailsync's own command line, as `ps` shows it
        try:
            argv = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # (ended already; it takes Python longer than this to start)
            argv = ""
        assert not argv or " -m mailsync --config " in argv, argv
        self.seen.append(argv)
        return p

    def run(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        p = self.popen(*args, env=env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"mailsync {' '.join(args)} did not end: {err[-2000:]}") from None
        self.seen += [out, err]
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def ok(self, *args: str, **kw) -> subprocess.CompletedProcess:
        r = self.run(*args, **kw)
        assert r.returncode == 0, (args, r.returncode, r.stderr[-3000:])
        return r

    def sign_in(self) -> None:
        """`mailsync auth --flow device`, as a user on a machine without a browser."""
        r = self.ok("auth", ACCOUNT, "--flow", "device")
        assert "enter the code WDJB-MJHT" in r.stderr and f"{self.auth.url}/activate" in r.stderr, r.stderr
        assert r.stdout.startswith(f"mailsync: {ACCOUNT}: authorized; tokens stored ({self.token_file})"), r.stdout

    def stored(self) -> dict:
        return json.loads(self.token_file.read_text())

    # -- the secrets sweep
    def secrets(self) -> set[str]:
        tokens = list(self.auth.issued) if self.auth else []
        if self.issued_log.exists():
            tokens += self.issued_log.read_text().split()
        assert tokens, "no token was issued: nothing to look for"
        out = {self.client_secret}
        for t in tokens:
            out.add(t)
            if t.count(".") == 2:  # a JWT: its signature alone is as secret as the whole
                out.add(t.rsplit(".", 1)[1])
                out |= {xoauth2_response(self.u.name, t),
                        oauthbearer_response(self.u.name, t, "127.0.0.1", self.od.imaps_port),
                        oauthbearer_response(self.u.name, t, "127.0.0.1", self.od.pop3s_port)}
        return out

    def sweep(self, db: bool = True) -> None:
        """No secret in any output, nor in any file under tmp except the token store (and the test's
        own private files): Maildir, .mailsync.db (and its -wal), the migrate state, the config."""
        found = self.secrets()
        assert self.seen
        for text in self.seen:
            for s in found:
                assert s not in text, f"a secret ({s[:6]}...) in mailsync's output:\n{text[:3000]}"
        files = 0
        for dirpath, _dirs, names in os.walk(self.tmp):
            d = Path(dirpath)
            if d == self.private or d == self.token_file.parent:
                continue
            for name in names:
                data = (d / name).read_bytes()
                files += 1
                for s in found:
                    assert s.encode() not in data, f"a secret ({s[:6]}...) in {d / name}"
        assert files and (not db or any(self.tmp.rglob("*.db"))), "the sweep saw no state database"


@pytest.fixture
def make_rig(oauth_dovecot, tmp_path):
    started: list[AuthServer] = []

    def make(name: str = "rig", server: bool = True, **server_kw) -> Rig:
        tmp = tmp_path / name
        u = oauth_dovecot.new_user(tmp)
        auth = None
        if server:
            server_kw.setdefault("device_slow_down", 0)  # (slow_down adds 5 s; tests/test_oauth2.py covers it)
            auth = AuthServer(oauth_dovecot.key, u.name, client_id="mailsync-e2e", **server_kw).start()
            started.append(auth)
        rig = Rig(oauth_dovecot, u, auth, tmp)
        if auth is not None:
            auth.client_secret = rig.client_secret
        return rig

    yield make
    for s in started:
        s.stop()


# -- what the user sees ------------------------------------------------------------------------------

def by_folder(root: Path) -> dict[str, list[bytes]]:
    """Maildir++ tree -> folder name -> sorted message bytes (a missing or extra file shows)."""
    out: dict[str, list[bytes]] = {}
    for p, data in local_files(root).items():
        top = p.parent.parent
        name = "INBOX" if top == root else top.name[1:].replace(".", "/")
        out.setdefault(name, []).append(data)
    return {k: sorted(v) for k, v in out.items()}


def server_folders(u: MailUser) -> dict[str, list[bytes]]:
    """The account as the password instance shows it: folder -> sorted message bytes."""
    return {f: sorted(b for b, _ in m.values()) for f, m in u.server_messages().items() if m}


def oauth_logins(od: OAuthDovecot, user: str) -> list[str]:
    """The token instance's log lines about user's logins (successful: `Login: ... method=X`)."""
    log = (od.root / "dovecot.log").read_text(errors="replace")
    return [line for line in log.splitlines() if f"user=<{user}>" in line or f"({user})" in line]


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailsync: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def spend(rig: Rig) -> None:
    """Make the stored access token one that has run out (as after a night)."""
    data = rig.stored()
    data["expires_at"] = time.time() - 10
    rig.token_file.write_text(json.dumps(data))


def seed(rig: Rig, folders: dict[str, list[bytes]]) -> None:
    for folder, msgs in folders.items():
        rig.od.base.seed(rig.u.name, folder, msgs)


def tag(n: int, rig: Rig, size: int = 0) -> bytes:
    return msg(n, body=f"{rig.u.name} " + "x" * size)


# 1. signing in -------------------------------------------------------------------------------------

def test_auth_device_flow_stores_tokens_and_status_never_shows_them(make_rig):
    rig = make_rig()
    rig.configure()
    r = rig.ok("auth", ACCOUNT, "--status")
    assert "stored: False" in r.stdout
    rig.sign_in()
    assert rig.auth.counts["device"] == 1 and rig.auth.counts["urn:ietf:params:oauth:grant-type:device_code"] == 3
    # the store: 0600 in a 0700 directory, holding a refresh token the server still takes
    assert stat.S_IMODE(rig.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(rig.token_file.parent.stat().st_mode) == 0o700
    data = rig.stored()
    assert data["refresh_token"] in rig.auth.valid_refresh_tokens()
    assert data["access_token"] in rig.auth.issued
    text = rig.ok("auth", ACCOUNT, "--status").stdout
    assert "stored: True" in text and "scopes: mail, offline_access" in text and str(rig.token_file) in text
    st = json.loads(rig.ok("auth", ACCOUNT, "--status", "--json").stdout)
    assert st["stored"] is True and st["scopes"] == ["mail", "offline_access"] and st["store"] == str(rig.token_file)
    assert abs(time.time() + 3600 - _iso(st["access_expires_at"])) < 60
    for text in rig.seen:
        assert data["access_token"] not in text and data["refresh_token"] not in text
        assert rig.token_file.read_text() not in text
    rig.sweep(db=False)


def _iso(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()


def test_auth_loopback_flow_with_the_test_as_the_browser(make_rig):
    rig = make_rig()
    rig.configure()
    p = rig.popen("auth", ACCOUNT, "--no-browser")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while not any(URL.search(line) for line in lines):
        assert time.monotonic() < deadline and p.poll() is None, lines
        time.sleep(0.01)
    url = next(URL.search(line).group(0) for line in lines if URL.search(line))
    assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    # the browser: the provider's page redirects to mailsync's listener, which says it is done
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as page:
        assert b"mailsync received the sign-in answer" in page.read()
    out = p.stdout.read()
    assert p.wait(timeout=20) == 0, lines
    reader.join(5)
    rig.seen += [out, "".join(lines)]
    assert out.startswith(f"mailsync: {ACCOUNT}: authorized; tokens stored"), out
    assert rig.auth.counts["authorization_code"] == 1
    assert rig.stored()["refresh_token"] in rig.auth.valid_refresh_tokens()
    assert json.loads(rig.ok("auth", ACCOUNT, "--status", "--json").stdout)["stored"] is True
    rig.sweep(db=False)


# 2. every command with the stored refresh token ------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_backup_verify_check_over_each_mechanism(make_rig, mechanism):
    rig = make_rig()
    rig.configure(mechanism=mechanism)
    rig.sign_in()
    mail = {"INBOX": [tag(i, rig) for i in range(5)], "Archive/2024": [tag(10 + i, rig, 3000) for i in range(3)],
            "Sent": [tag(20, rig)]}
    seed(rig, mail)
    # the stored access token is spent: the run refreshes it first (and the rotated refresh token is saved)
    data = rig.stored()
    spend(rig)
    debug = ("--debug",) if mechanism == "xoauth2" else ()
    s = json.loads(rig.ok("sync", ACCOUNT, "--json", *debug).stdout)
    assert s["exit_code"] == 0 and s["totals"]["new"] == 9
    assert by_folder(rig.u.maildir) == {k: sorted(v) for k, v in mail.items()}
    assert rig.auth.counts["refresh_token"] == 1
    assert rig.stored()["refresh_token"] in rig.auth.valid_refresh_tokens()
    assert data["refresh_token"] not in rig.auth.valid_refresh_tokens()  # rotated
    logins = [ln for ln in oauth_logins(rig.od, rig.u.name) if "Login:" in ln]
    assert logins and all(f"method={mechanism.upper()}" in ln for ln in logins), logins
    # a second run: nothing new, no refresh (the access token is still good)
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["new"] == 0 and rig.auth.counts["refresh_token"] == 1
    v = json.loads(rig.ok("verify", ACCOUNT, "--json").stdout)
    assert v["ok"] is True, v
    rig.ok("verify", ACCOUNT)
    c = rig.ok("check", ACCOUNT).stdout
    assert f"login as {rig.u.name} (AUTHENTICATE {mechanism.upper()})" in c, c
    assert "login mechanisms offered (SASL): OAUTHBEARER, XOAUTH2" in c, c
    rig.sweep()


def test_two_way_sync_uploads_a_local_message(make_rig):
    rig = make_rig()
    rig.configure(extra='mode = "sync"')
    rig.sign_in()
    mail = {"INBOX": [tag(i, rig) for i in range(3)], "Projects": [tag(5, rig)]}
    seed(rig, mail)
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["new"] == 4 and by_folder(rig.u.maildir) == mail
    # a message written locally (as a mail client would) goes up; one appended on the server comes down
    mine = tag(30, rig, 500)
    (rig.u.maildir / ".Projects" / "new" / "1800000000.local1.host:2,").write_bytes(mine)
    theirs = tag(31, rig)
    rig.u.append("INBOX", [theirs])
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["uploaded"] == 1 and s["totals"]["new"] == 1, s["totals"]
    want = {"INBOX": sorted(mail["INBOX"] + [theirs]), "Projects": sorted([mail["Projects"][0], mine])}
    assert server_folders(rig.u) == want  # seen through the password instance
    assert by_folder(rig.u.maildir) == want
    rig.sweep()


@pytest.mark.parametrize("mechanism", [None, "xoauth2"], ids=["auto", "xoauth2"])
def test_pop3_download(make_rig, mechanism):
    rig = make_rig()
    rig.configure(protocol="pop3", mechanism=mechanism)
    rig.sign_in()
    mail = [tag(i, rig, 1000) for i in range(6)]
    seed(rig, {"INBOX": mail})
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["new"] == 6
    assert sorted(local_files(rig.u.maildir).values()) == sorted(mail)
    logins = [ln for ln in oauth_logins(rig.od, rig.u.name) if "pop3-login: Info: Login:" in ln]
    used = (mechanism or "oauthbearer").upper()  # auto: OAUTHBEARER first
    assert logins and all(f"method={used}" in ln for ln in logins), logins
    rig.ok("verify", ACCOUNT)
    c = rig.ok("check", ACCOUNT).stdout
    assert f"login as {rig.u.name} (AUTH {used})" in c, c
    rig.sweep()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_migrate_from_the_token_only_server_to_a_password_account(make_rig, mechanism):
    rig = make_rig()
    dst = MailUser.create(rig.od.base, rig.u.name + "d", rig.tmp / "dst")
    dst_table = (f'[accounts.dst]\nhost = "127.0.0.1"\nport = {rig.od.base.imaps_port}\nusername = "{dst.name}"\n'
                 f'password_env = "DST_PASSWORD"\nmaildir = "{dst.maildir}"\nca_file = "{rig.od.base.ca_file}"\n')
    rig.configure(more=dst_table, mechanism=mechanism)
    rig.sign_in()
    mail = {"INBOX": [tag(i, rig) for i in range(4)], "Archive": [tag(9, rig, 2000)]}
    seed(rig, mail)
    env = rig.env(DST_PASSWORD=dst.password)
    s = json.loads(rig.ok("migrate", ACCOUNT, "dst", "--json", env=env).stdout)
    assert s["totals"]["copied"] == 5 and s["totals"]["failed"] == 0, s
    assert server_folders(dst) == mail
    s = json.loads(rig.ok("migrate", ACCOUNT, "dst", "--json", env=env).stdout)
    assert s["totals"]["copied"] == 0 and s["totals"]["present"] == 5
    assert list(rig.state.glob("mailsync/migrate-*.db"))
    assert dst.password not in "".join(rig.seen)
    logins = [ln for ln in oauth_logins(rig.od, rig.u.name) if "imap-login: Info: Login:" in ln]
    assert logins and all(f"method={mechanism.upper()}" in ln for ln in logins), logins
    # and back: restore the migrated mail from a backup made over tokens into the token-only account
    rig.ok("sync", ACCOUNT)
    restored = {"INBOX": [tag(50 + i, rig) for i in range(3)]}
    src = rig.tmp / "restore-src"
    for i, data in enumerate(restored["INBOX"]):
        (src / "cur").mkdir(parents=True, exist_ok=True)
        (src / "new").mkdir(exist_ok=True)
        (src / "tmp").mkdir(exist_ok=True)
        (src / "cur" / f"17000000{i}.r{i}.host:2,S").write_bytes(data)
    s = json.loads(rig.ok("restore", ACCOUNT, "--from", str(src), "--json").stdout)
    assert s["totals"]["copied"] == 3, s
    assert sorted(server_folders(rig.u)["INBOX"]) == sorted(mail["INBOX"] + restored["INBOX"])
    rig.sweep()


# 3. token_command ---------------------------------------------------------------------------------

TOKEN_SCRIPT = """\
import base64, hashlib, hmac, json, sys, time
key, user, log, cache = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "cache"
try:
    cached = open(log).read().split()
except FileNotFoundError:
    cached = []
if cache and cached:  # as tools that keep a token until it expires do
    print(cached[-1])
    sys.exit(0)
def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
now = int(time.time())
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
body = b64(json.dumps({"sub": user, "iat": now, "exp": now + 600, "n": time.time_ns()}, separators=(",", ":")).encode())
sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
token = f"{head}.{body}.{sig}"
with open(log, "a") as f:
    f.write(token + "\\n")
print(token)
"""


def token_command(rig: Rig, user: str, cache: bool = False) -> list[str]:
    """A helper tool printing an access token for user: a new one each time, or (cache) the same one
    until it expires; each one logged for the sweep. The key is in its argv, as a tool's configuration
    would be; the token never is."""
    script = rig.private / "token.py"
    script.write_text(TOKEN_SCRIPT)
    return [sys.executable, str(script), rig.od.key.hex(), user, str(rig.issued_log), "cache" if cache else "new"]


def test_token_command_backup_and_pop3(make_rig):
    rig = make_rig(server=False)
    cmd = token_command(rig, rig.u.name)
    mail = [tag(i, rig, 700) for i in range(4)]
    seed(rig, {"INBOX": mail, "Notes": [tag(8, rig)]})
    rig.configure(token_command=cmd)
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["new"] == 5
    assert by_folder(rig.u.maildir) == {"INBOX": sorted(mail), "Notes": [tag(8, rig)]}
    pop_dir = rig.tmp / "pop"
    rig.configure(protocol="pop3", token_command=cmd, maildir=pop_dir)
    s = json.loads(rig.ok("sync", ACCOUNT, "--json").stdout)
    assert s["totals"]["new"] == 4 and sorted(local_files(pop_dir).values()) == sorted(mail)
    # mailsync stored nothing: the tool owns the tokens
    assert not rig.token_file.exists()
    assert "stored: False" in rig.ok("auth", ACCOUNT, "--status").stdout
    r = rig.run("auth", ACCOUNT)
    assert r.returncode == 2 and "gets its tokens from token_command" in one_line_error(r.stderr)
    assert len(rig.issued_log.read_text().split()) >= 2
    rig.sweep()


def test_compare_over_tokens(make_rig):
    """`mailsync compare` downloads one mailbox over IMAP and over POP3, both logging in with tokens."""
    rig = make_rig(server=False)
    cmd = token_command(rig, rig.u.name)
    mail = [tag(i, rig, 500) for i in range(3)]
    seed(rig, {"INBOX": mail})
    pop_table = (f'[accounts.pop]\nhost = "127.0.0.1"\nport = {rig.od.pop3s_port}\nprotocol = "pop3"\n'
                 f'username = "{rig.u.name}"\nmaildir = "{rig.tmp / "pop"}"\nca_file = "{rig.od.ca_file}"\n'
                 f'auth = "oauth2"\n[accounts.pop.oauth2]\ntoken_command = {json.dumps(cmd)}\n')
    rig.configure(token_command=cmd, more=pop_table)
    d = json.loads(rig.ok("compare", ACCOUNT, "pop", "--json").stdout)
    assert d["imap"]["messages"] == d["pop3"]["messages"] == len(mail), d
    assert d["only_in_imap_inbox"] == d["only_in_pop3"] == 0 and not d["same_message_different_bytes"], d
    rig.sweep(db=False)


# 4. a run longer than the access token lives, kicked mid-run ----------------------------------------

def test_tokens_expire_and_the_session_is_kicked_mid_run(make_rig):
    """A run longer than an access token lives, its session ended twice by the server: the run goes
    on from where it was, refreshing ahead of expiry, and never sends a token that has run out."""
    ttl = 5  # seconds an access token lives: refreshed when less than a third is left
    rig = make_rig(ttl=ttl)
    rig.configure(extra="connections = 1\nbatch_bytes = 65536\nretries = 5")
    rig.sign_in()
    spend(rig)  # the run starts with a refresh
    mail = {f"F{i}": [tag(1000 * i + j, rig, 8000) for j in range(250)] for i in range(5)}
    mail["INBOX"] = [tag(j, rig, 8000) for j in range(250)]
    seed(rig, mail)
    total = sum(len(v) for v in mail.values())
    kicks: list[int] = []
    p = rig.popen("sync", ACCOUNT, "--json")

    def kick(pause: float) -> None:
        """End the user's session (`doveadm kick`) in the middle of a folder; with pause, mailsync is
        first stopped that long (SIGSTOP: a suspended laptop, a stalled disk), so that the token it
        logged in with runs out before it goes on: however fast this machine, the run lasts longer
        than a token lives."""
        while p.poll() is None:
            if pause:
                p.send_signal(signal.SIGSTOP)
            try:
                said = rig.od.doveadm("kick", rig.u.name)
            except RuntimeError:  # between two sessions: the user has none
                if pause:
                    p.send_signal(signal.SIGCONT)
                time.sleep(0.005)
                continue
            assert said.startswith(f"{rig.u.name} kicked connections"), said
            kicks.append(len(local_files(rig.u.maildir)))
            time.sleep(pause)
            p.send_signal(signal.SIGCONT)
            return

    def kicker():
        # (in the middle of the 2nd and the 4th folder of 250 messages; 2/3 of 1,500 was the very
        # end of the 4th, where the kick could find the session logging out instead)
        for at, pause in ((total // 4, ttl + 0.5), (total * 3 // 5, 0)):
            while p.poll() is None and len(local_files(rig.u.maildir)) < at:
                time.sleep(0.01)
            kick(pause)

    t0 = time.monotonic()
    th = threading.Thread(target=kicker, daemon=True)
    th.start()
    out, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    th.join(5)
    rig.seen += [out, err]
    assert p.returncode == 0, err[-3000:]
    assert err == ""
    s = json.loads(out)
    assert len(kicks) == 2 and kicks[-1] < total, kicks
    log = oauth_logins(rig.od, rig.u.name)
    cut = [ln for ln in log if "Disconnected: Server shutting down" in ln]
    assert len(cut) == 2, cut  # both kicks ended a session in the middle of a folder
    assert s["totals"]["new"] == total and s["totals"]["failed_folders"] == 0
    got = Counter(local_files(rig.u.maildir).values())
    assert got == Counter(b for v in mail.values() for b in v)  # every message, exactly once
    refreshes = rig.auth.counts["refresh_token"]
    logins = [ln for ln in log if "imap-login: Info: Login:" in ln]
    print(f"run {took:.1f} s, {refreshes} refreshes, {len(logins)} logins, kicked at {kicks} of {total}")
    assert took > ttl and refreshes >= 2, (took, refreshes)
    assert rig.auth.valid_refresh_tokens() == {rig.stored()["refresh_token"]}  # every rotation saved
    # the client always refreshed ahead: no login was refused (none waited out an auth penalty)
    failed = [ln for ln in log if "auth failed" in ln or "Aborted login" in ln]
    assert not failed, failed
    rig.sweep()


# 5. the refresh token refused ------------------------------------------------------------------------

def test_invalid_grant_is_exit_12_and_one_line(make_rig):
    rig = make_rig()
    rig.configure()
    rig.sign_in()
    seed(rig, {"INBOX": [tag(1, rig)]})
    rig.auth.revoke()
    data = rig.stored()
    spend(rig)
    r = rig.run("sync", ACCOUNT)
    assert r.returncode == 12, r.stderr
    line = one_line_error(r.stderr)
    assert "invalid_grant" in line and f"run `mailsync auth {ACCOUNT}`" in line, line
    assert r.stdout == ""
    assert not local_files(rig.u.maildir)
    # with --debug (the log and a traceback): still 12, and the sweep checks that no token shows
    r = rig.run("sync", ACCOUNT, "--debug")
    assert r.returncode == 12
    # `mailsync check` says the same, as its login step
    r = rig.run("check", ACCOUNT)
    assert r.returncode == 12 and r.stderr == ""
    fail = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL ")]
    assert len(fail) == 1 and "invalid_grant" in fail[0] and f"run `mailsync auth {ACCOUNT}`" in fail[0], r.stdout
    assert rig.stored()["refresh_token"] == data["refresh_token"]  # nothing was overwritten
    rig.sweep()


def test_refresh_token_revoked_during_a_run_stops_it_with_12_and_one_line(make_rig):
    """The provider revokes the refresh token while a long run goes on: when the next connection
    needs a new access token, the run stops (exit 12, one line), instead of failing folder after
    folder with a line each; what it stored is whole, and after signing in again the next run
    finishes with every message exactly once."""
    ttl = 4
    rig = make_rig(ttl=ttl)
    rig.configure(extra="connections = 1\nbatch_bytes = 65536\nretries = 5")
    rig.sign_in()
    mail = {f"F{i}": [tag(1000 * i + j, rig, 8000) for j in range(120)] for i in range(1, 7)}
    mail["INBOX"] = [tag(j, rig, 8000) for j in range(120)]
    seed(rig, mail)
    total = sum(len(v) for v in mail.values())
    p = rig.popen("sync", ACCOUNT)

    def revoke_then_cut():
        while p.poll() is None and len(local_files(rig.u.maildir)) < total // 5:
            time.sleep(0.01)
        p.send_signal(signal.SIGSTOP)  # (so the token it holds runs out, however fast the machine)
        try:
            rig.auth.revoke()
            time.sleep(ttl + 0.5)
            try:
                rig.od.doveadm("kick", rig.u.name)
            except RuntimeError:
                pass  # between two sessions: the next one needs a new token anyway
        finally:
            p.send_signal(signal.SIGCONT)

    th = threading.Thread(target=revoke_then_cut, daemon=True)
    th.start()
    out, err = p.communicate(timeout=120)
    th.join(5)
    rig.seen += [out, err]
    assert p.returncode == 12, (p.returncode, err[-3000:])
    line = one_line_error(err)
    assert "invalid_grant" in line and f"run `mailsync auth {ACCOUNT}`" in line, line
    got = Counter(local_files(rig.u.maildir).values())
    want = Counter(b for v in mail.values() for b in v)
    assert 0 < sum(got.values()) < total and not got - want and max(got.values()) == 1, "stored mail not whole"
    rig.sign_in()
    rig.ok("sync", ACCOUNT)
    assert Counter(local_files(rig.u.maildir).values()) == want  # every message, exactly once
    rig.sweep()


# 6. refusals: last, each from its own loopback address (Dovecot's auth penalty) -----------------------

SITECUSTOMIZE = """\
import socket
_connect = socket.socket.connect
def connect(self, address):
    if self.family == socket.AF_INET and address[0] == "127.0.0.1" and self.getsockname()[1] == 0:
        self.bind(({source!r}, 0))
    return _connect(self, address)
socket.socket.connect = connect
"""


def from_source(rig: Rig, source: str, **extra: str) -> dict[str, str]:
    """An env whose mailsync connects from `source` (a sitecustomize binds its sockets there)."""
    d = rig.tmp / f"site-{source}"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE.format(source=source))
    return rig.env(PYTHONPATH=os.pathsep.join([str(d), str(ROOT)]), **extra)


@pytest.mark.parametrize("command", ["sync", "check"])
def test_a_refused_access_token_is_replaced_once_and_the_login_retried(make_rig, command):
    """The server refuses a stored access token that has time left (revoked, or signed with a key the
    provider has rotated away): the token is refreshed and the login tried once more, by a run and by
    `mailsync check` alike. With --debug, so the sweep covers the debug log of a refused SASL exchange."""
    rig = make_rig()
    rig.configure(mechanism="xoauth2")
    rig.sign_in()
    mail = [tag(i, rig) for i in range(3)]
    seed(rig, {"INBOX": mail})
    bad = make_jwt(rig.u.name, b"a key the server does not know", 3600)
    rig.issued_log.write_text(bad + "\n")
    data = rig.stored()
    data["access_token"] = bad
    rig.token_file.write_text(json.dumps(data))
    source = FAIL_SOURCES[22 if command == "sync" else 23]
    env = from_source(rig, source)
    if command == "sync":
        r = rig.ok("sync", ACCOUNT, "--json", "--debug", env=env)
        assert json.loads(r.stdout)["totals"]["new"] == 3
        assert sorted(local_files(rig.u.maildir).values()) == sorted(mail)
    else:
        out = rig.ok("check", ACCOUNT, "--debug", env=env).stdout
        assert "info the access token was refused ([AUTHENTICATIONFAILED] Authentication failed.); trying " \
               "once more with a new one" in out, out
        assert f"ok   login as {rig.u.name} (AUTHENTICATE XOAUTH2): Logged in" in out, out
        rig.ok("sync", ACCOUNT)  # (for the sweep: a state database)
    assert rig.auth.counts["refresh_token"] == 1 and rig.stored()["access_token"] not in (bad, data["access_token"])
    log = oauth_logins(rig.od, rig.u.name)
    if command == "sync":  # (check tries again on the same connection: Dovecot logs just its login)
        refused = [ln for ln in log if "auth failed" in ln]
        assert len(refused) == 1 and f"rip={source}," in refused[0], refused
    assert [ln for ln in log if "imap-login: Info: Login:" in ln and f"rip={source}," in ln]
    rig.sweep()


@pytest.mark.parametrize("cache", [False, True], ids=["new-token-each-time", "cached-token"])
def test_a_token_for_another_user_is_refused(make_rig, cache):
    """token_command prints a token for "bob": refused, exit 3, one line naming the token command. A tool
    that prints a new token each time gets one more try (as a refreshed token would); a tool that
    keeps printing the same token does not (the same token would only be refused again)."""
    rig = make_rig(server=False)
    seed(rig, {"INBOX": [tag(1, rig)]})
    rig.configure(token_command=token_command(rig, "bob", cache=cache), mechanism="xoauth2")
    source = FAIL_SOURCES[20 if cache else 24]
    r = rig.run("sync", ACCOUNT, env=from_source(rig, source))
    assert r.returncode == 3, r.stderr
    line = one_line_error(r.stderr)
    assert f"login as {rig.u.name} at 127.0.0.1:{rig.od.imaps_port} failed: [AUTHENTICATIONFAILED]" in line, line
    # the hint names the token command (`mailsync auth` has nothing to do for such an account)
    assert "token printed by token_command was refused" in line and "mailsync auth" not in line, line
    assert r.stdout == "" and not local_files(rig.u.maildir)
    refused = [ln for ln in oauth_logins(rig.od, rig.u.name) if "auth failed" in ln]
    assert len(refused) == (1 if cache else 2) and all(f"rip={source}," in ln for ln in refused), refused
    if cache:
        assert len(set(rig.issued_log.read_text().split())) == 1
        # `mailsync check` says why in OAuth2 terms (not "wrong username or password")
        r = rig.run("check", ACCOUNT, env=from_source(rig, FAIL_SOURCES[25]))
        assert r.returncode == 3 and r.stderr == "", r.stderr
        assert "access token was refused" not in r.stdout  # (no second try with the same token)
        lines = r.stdout.splitlines()
        assert lines[-2] == (f"FAIL login as {rig.u.name} at 127.0.0.1:{rig.od.imaps_port} failed: NO "
                             "[AUTHENTICATIONFAILED] Authentication failed."), lines[-2:]
        assert lines[-1] == ("  likely cause: the token is for another account or lacks consent for the IMAP scope, "
                             "or IMAP access is disabled for the mailbox; fix: check that token_command prints a "
                             f"token for {rig.u.name}; enable IMAP for the mailbox (docs/oauth2.md)"), lines[-1]
    rig.sweep(db=False)


def test_a_password_account_at_the_token_only_server_is_refused(make_rig):
    rig = make_rig(server=False)
    u = rig.u
    u.write_config(port=rig.od.imaps_port)  # password_env, the token instance's port and CA
    source = FAIL_SOURCES[21]
    r = rig.run("sync", "test", env=from_source(rig, source, MAILSYNC_TEST_PASSWORD=u.password))
    assert r.returncode == 3, r.stderr
    line = one_line_error(r.stderr)
    assert f"login as {u.name} at 127.0.0.1:{rig.od.imaps_port} failed: the server allows no password login" in line
    assert line.endswith("it takes OAuth2 tokens: set auth = \"oauth2\" (see docs/oauth2.md)"), line
    assert u.password not in r.stderr + r.stdout
    assert not local_files(rig.u.maildir)
    log = (rig.od.root / "dovecot.log").read_text(errors="replace").splitlines()
    assert [ln for ln in log if f"rip={source}," in ln]  # (from the other address, as intended)


# 7. watch ----------------------------------------------------------------------------------------------

def test_watch_logs_in_again_before_each_token_ends(make_rig):
    """A watch lives longer than its tokens (as on Microsoft, which ends a session when its token
    does): the listening connection logs in again, with a refreshed token, before each one ends, and
    push keeps working; no login is ever refused."""
    ttl = 4
    rig = make_rig(ttl=ttl)
    rig.configure(extra="poll_interval = 3600")
    rig.sign_in()
    p = rig.popen("watch", "--json")
    events: list[dict] = []
    threading.Thread(target=lambda: events.extend(json.loads(line) for line in p.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for e in events if e["event"] == "listening") < 3:  # two logins after the first
            assert p.poll() is None and time.monotonic() < deadline, events
            time.sleep(0.05)
        m = tag(1, rig)
        rig.u.append("INBOX", [m])
        while list(local_files(rig.u.maildir).values()) != [m]:
            assert p.poll() is None and time.monotonic() < deadline, events
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    rig.seen += [out, err]
    assert p.returncode == 0 and err == "", err
    assert not [e for e in events if e["event"] in ("disconnected", "error")], events
    assert [e["reconnected"] for e in events if e["event"] == "listening"][:3] == [False, True, True]
    assert rig.auth.counts["refresh_token"] >= 2
    log = oauth_logins(rig.od, rig.u.name)
    assert not [ln for ln in log if "auth failed" in ln or "Aborted login" in ln]
    rig.sweep()
