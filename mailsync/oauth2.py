"""OAuth2 access tokens for IMAP/POP3 logins (Microsoft 365, Outlook.com, Gmail, any RFC 6749 server).

Imported only by accounts with auth = "oauth2". Three parts:

  authorize()    `mailsync auth ACCOUNT`: a sign-in flow (loopback with PKCE, RFC 8252; device
                 code, RFC 8628; or paste the redirected URL back), then the tokens are stored
  TokenStore     the refresh and access tokens of one account: a 0600 JSON file under
                 $XDG_STATE_HOME/mailsync/tokens (written atomically under an flock), or the
                 system keyring when MAILSYNC_TOKEN_STORE=keyring and `keyring` is installed
  TokenSource    a valid access token for each login: token_command's output, else the stored
                 token while it has more than the margin left, else a refresh (a rotated refresh
                 token is saved at once). One per account per process (token_source); thread-safe,
                 and the refresh runs under the store's file lock so processes never race a rotation.

Secrets: tokens, codes and the client secret travel only in POST bodies (the authorization code
comes back in the redirect URL, as the protocol has it); messages, logs and reprs never hold them.
Endpoints must be https:// (http:// only to a loopback address), checked before connecting.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import http.server
import json
import logging
import os
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailsync.config import Account, endpoint_ok
from mailsync.errors import AuthError, ConfigError, ConnectError, StorageError, TLSError
from mailsync.maildir import make_dirs, storage_error
from mailsync.secrets import run_command

log = logging.getLogger("mailsync.oauth2")

MARGIN = 300.0          # refresh this long before expiry (at most a third of the lifetime)
UNKNOWN_TTL = 300.0     # a token whose expiry we cannot learn is assumed to live this long
FLOW_TIMEOUT = 300.0    # loopback: wait this long for the browser
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
KEYRING_SERVICE = "mailsync"


class ReauthRequired(AuthError):
    """The refresh token was refused (invalid_grant: revoked or expired): run `mailsync auth ACCOUNT`.
    Exit code 12, as docs/exit-codes.md has it (11 is verify's "backup incomplete")."""

    exit_code = 12


class OAuthError(AuthError):
    """The token endpoint or a sign-in flow failed; the message names the provider's error code."""


# -- endpoints ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoints:
    authorize_url: str | None
    token_url: str | None
    device_url: str | None
    scopes: tuple[str, ...]
    extra: tuple[tuple[str, str], ...] = ()  # more parameters for the authorization request


def endpoints(acc: Account) -> Endpoints:
    """The provider's defaults for acc.protocol, with the configured values taking precedence."""
    o = _conf(acc)
    auth = token = device = None
    scopes: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()
    if o.provider == "microsoft":
        base = f"https://login.microsoftonline.com/{urllib.parse.quote(o.tenant, safe='')}/oauth2/v2.0/"
        auth, token, device = base + "authorize", base + "token", base + "devicecode"
        what = "POP" if acc.protocol == "pop3" else "IMAP"
        scopes = (f"https://outlook.office.com/{what}.AccessAsUser.All", "offline_access")
    elif o.provider == "google":
        auth, token = "https://accounts.google.com/o/oauth2/v2/auth", "https://oauth2.googleapis.com/token"
        scopes = ("https://mail.google.com/",)
        extra = (("access_type", "offline"), ("prompt", "consent"))  # or no refresh token
    return Endpoints(o.authorize_url or auth, o.token_url or token, o.device_url or device,
                     tuple(o.scopes) if o.scopes else scopes, extra)


def _conf(acc: Account):
    if acc.oauth2 is None:
        raise ConfigError(f"[accounts.{acc.name}] has no [oauth2] table", hint='set auth = "oauth2" and add it')
    return acc.oauth2


def _who(acc: Account) -> str:
    o = _conf(acc)
    return {"microsoft": "Microsoft", "google": "Google"}.get(o.provider) or \
        (urllib.parse.urlsplit(o.token_url or "").hostname or "the OAuth2 server")


# -- HTTP --------------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):  # a token endpoint answers; it does not send us on
        return None


def _post(url: str | None, fields: dict, timeout: float, what: str) -> dict:
    """POST a form; the JSON object answered (an `error` member is the caller's to judge)."""
    if not url:
        raise ConfigError(f"no {what} URL is configured", hint="set it in the [oauth2] table (see docs/oauth2.md)")
    parts = urllib.parse.urlsplit(url)
    if not endpoint_ok(url):
        raise ConfigError(f"refusing {what} URL {parts.scheme}://{parts.hostname}: it must be https:// "
                          "(http:// only to 127.0.0.1, ::1 or localhost)")
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    handlers: list = [urllib.request.HTTPSHandler(context=ctx), _NoRedirect()]
    if parts.scheme == "http":
        handlers.append(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    req = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST", headers={
        "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "mailsync"})
    host = parts.hostname
    log.debug("POST %s (%s)", f"{parts.scheme}://{host}{parts.path}", fields.get("grant_type", what))
    try:
        with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as r:
            status, body = r.status, r.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 20)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise TLSError(f"the certificate of {host} was not accepted ({reason.verify_message})",
                           hint="mailsync checks it against the system's CA store") from None
        raise ConnectError(f"cannot reach the {what} endpoint {host}: {reason}",
                           hint="check the network (and https_proxy, if you need a proxy)") from None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and (status == 200 or isinstance(data.get("error"), str)):
        return data
    raise OAuthError(f"the {what} endpoint {host} answered HTTP {status} without an OAuth2 answer",
                     hint="check the URL in the [oauth2] table")


_HINTS = {
    "invalid_client": "check client_id, and client_secret_command if the app has a secret",
    "unauthorized_client": "the app registration does not allow this flow or account type (Microsoft: "
                           "'Allow public client flows'; check tenant)",
    "invalid_scope": "check scopes: the app must be allowed to ask for them",
    "invalid_request": "check the app's redirect URIs (http://127.0.0.1 for loopback and paste)",
    "access_denied": "the sign-in was refused or cancelled; run `mailsync auth` again",
}


def _refused(who: str, doing: str, answer: dict) -> OAuthError:
    err = str(answer.get("error"))[:80]
    desc = str(answer.get("error_description") or "").strip().splitlines()
    text = f"{who} refused the {doing}: {err}" + (f": {desc[0][:300]}" if desc else "")
    return OAuthError(text, hint=_HINTS.get(err, "see docs/oauth2.md"))


# -- commands (client_secret_command, token_command): run as password_command is -----------------

def _run(acc: Account, key: str, cmd: str | list[str]) -> str:
    return run_command(cmd, f"[accounts.{acc.name}.oauth2] {key}", "the value").strip()


def _client_fields(acc: Account) -> dict:
    o = _conf(acc)
    fields = {"client_id": o.client_id}
    if o.client_secret_command is not None:
        fields["client_secret"] = _run(acc, "client_secret_command", o.client_secret_command)
    return fields


# -- token records -----------------------------------------------------------------------------

def _jwt_claims(token: str) -> dict:
    """A JWT's claims, unverified (only to learn its expiry); {} for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _lifetime(token: str, expires_in, now: float) -> tuple[float, bool]:
    """(seconds the token lives from now, whether that is known)."""
    if _number(expires_in, -1.0) >= 0:
        return _number(expires_in, 0.0), True
    exp = _jwt_claims(token).get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return max(exp - now, 0.0), True
    return UNKNOWN_TTL, False


def _record(answer: dict, now: float, previous: dict | None = None) -> dict:
    """What is stored after a token answer (a refresh that names no new refresh token keeps the old)."""
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise OAuthError("the token endpoint answered without an access_token")
    ttl, known = _lifetime(token, answer.get("expires_in"), now)
    prev = previous or {}
    rec = {"access_token": token, "obtained_at": now, "expires_at": now + ttl, "lifetime": ttl, "known": known,
           "scope": answer.get("scope") or prev.get("scope") or ""}
    refresh = answer.get("refresh_token") or prev.get("refresh_token")
    if refresh:
        rec["refresh_token"] = refresh
    return rec


def _usable(rec: dict | None, now: float) -> bool:
    """The access token has more than the margin left: min(300 s, a third of its lifetime)."""
    if not rec or not rec.get("access_token") or not isinstance(rec.get("expires_at"), int | float):
        return False
    margin = min(MARGIN, float(rec.get("lifetime") or 0) / 3)
    return now < rec["expires_at"] - margin


# -- the store ---------------------------------------------------------------------------------

def _keyring():
    choice = os.environ.get("MAILSYNC_TOKEN_STORE") or "file"
    if choice == "file":
        return None
    if choice != "keyring":
        raise ConfigError(f"MAILSYNC_TOKEN_STORE is {choice!r}; allowed: file, keyring")
    try:
        import keyring
    except ImportError:
        raise ConfigError("MAILSYNC_TOKEN_STORE=keyring, but the keyring package is not installed",
                          hint="install it (pip install keyring), or unset MAILSYNC_TOKEN_STORE for a 0600 file") from None
    return keyring


class TokenStore:
    """The tokens of one account: $XDG_STATE_HOME/mailsync/tokens/<account>.json (0600, dir 0700), or
    the keyring. save() writes atomically; lock() is an flock (<account>.lock) that nests in-process."""

    def __init__(self, acc: Account) -> None:
        self.name = acc.name
        base = os.environ.get("XDG_STATE_HOME", "")
        if not os.path.isabs(base):  # the XDG spec: a relative path is ignored
            base = os.path.join(os.path.expanduser("~"), ".local", "state")
        self.dir = Path(base) / "mailsync" / "tokens"
        safe = urllib.parse.quote(acc.name, safe="")
        self.path = self.dir / f"{safe}.json"
        self.lock_path = self.dir / f"{safe}.lock"
        self._keyring = _keyring()
        self._mutex = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @property
    def where(self) -> str:
        return "keyring" if self._keyring else str(self.path)

    def __repr__(self) -> str:
        return f"TokenStore({self.name!r}, {self.where!r})"

    def _make_dir(self) -> None:
        make_dirs(self.dir.parent)
        make_dirs(self.dir)
        with contextlib.suppress(OSError):
            if self.dir.stat().st_mode & 0o077:
                os.chmod(self.dir, 0o700)

    @contextlib.contextmanager
    def lock(self):
        with self._mutex:
            if self._depth == 0:
                self._make_dir()
                fd = -1
                try:
                    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(fd, fcntl.LOCK_EX)  # another process refreshing this account: wait for it
                except OSError as exc:
                    if fd >= 0:
                        os.close(fd)
                    raise storage_error(exc, f"cannot lock {self.lock_path}") from None
                self._fd = fd
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fd, self._fd = self._fd, None  # (never closed twice: see maildir.DirWatch.close)
                    os.close(fd)

    def load(self) -> dict | None:
        if self._keyring:
            try:
                text = self._keyring.get_password(KEYRING_SERVICE, self.name)
            except Exception as exc:  # noqa: BLE001 (keyring backends raise their own kinds)
                raise StorageError(f"cannot read the tokens of '{self.name}' from the keyring ({type(exc).__name__})",
                                   hint="check that the keyring is unlocked") from None
        else:
            try:
                text = self.path.read_text("utf-8")
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise storage_error(exc, f"cannot read {self.path}") from None
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise StorageError(f"the stored tokens of '{self.name}' ({self.where}) cannot be read",
                               hint=f"run `mailsync auth {self.name}` to sign in again")
        return data

    def save(self, data: dict) -> None:
        text = json.dumps(data, sort_keys=True)
        with self.lock():
            if self._keyring:
                try:
                    self._keyring.set_password(KEYRING_SERVICE, self.name, text)
                except Exception as exc:  # noqa: BLE001
                    raise StorageError(f"cannot store the tokens of '{self.name}' in the keyring "
                                       f"({type(exc).__name__})", hint="check that the keyring is unlocked") from None
                return
            tmp = self.dir / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise storage_error(exc, f"cannot write {self.path}") from None


# -- the source of access tokens ---------------------------------------------------------------

class TokenSource:
    """A valid access token for each login of one account; shared by its connections."""

    def __init__(self, acc: Account) -> None:
        self.acc = acc
        self.store = TokenStore(acc)
        self.clock: Callable[[], float] = time.time  # tests move time on
        self._lock = threading.Lock()
        self._rec: dict | None = None     # access_token, expires_at, lifetime, known
        self._refused: str | None = None  # the token the server refused: never handed out again

    def __repr__(self) -> str:
        return f"TokenSource({self.acc.name!r})"

    def token(self) -> str:
        with self._lock:
            now = self.clock()
            if not _usable(self._rec, now):
                o = _conf(self.acc)
                if o.token_command is not None:
                    tok = _run(self.acc, "token_command", o.token_command)
                    ttl, known = _lifetime(tok, None, now)
                    self._rec = {"access_token": tok, "expires_at": now + ttl, "lifetime": ttl, "known": known}
                else:
                    self._rec = self._stored_or_refreshed(now)
                self._refused = None
            return self._rec["access_token"]

    def expired(self, token: str | None = None) -> None:
        """The server refused the token (or ended the session for it): the next token() gets a new
        one. Given the refused token, a newer one another connection already got is kept."""
        with self._lock:
            if self._rec and (token is None or token == self._rec["access_token"]):
                self._refused = self._rec["access_token"]
                self._rec = None

    def expires_in(self) -> float | None:
        """Seconds the current access token has left; None before the first token() or if unknown."""
        with self._lock:
            if not self._rec or not self._rec.get("known"):
                return None
            return self._rec["expires_at"] - self.clock()

    def _stored_or_refreshed(self, now: float) -> dict:
        name = self.acc.name
        with self.store.lock():  # another process may be refreshing: it then has stored the result
            data = self.store.load()
            if data and data.get("access_token") != self._refused and _usable(data, now):
                return _memo(data)
            if not data or not data.get("refresh_token"):
                raise ReauthRequired(f"no OAuth2 refresh token is stored for account '{name}': "
                                     f"run `mailsync auth {name}`", hint="it signs in once and stores the tokens")
            ep = endpoints(self.acc)
            fields = {"grant_type": "refresh_token", "refresh_token": data["refresh_token"], **_client_fields(self.acc)}
            if ep.scopes and _conf(self.acc).provider != "google":  # Microsoft requires it, Google needs none
                fields["scope"] = " ".join(ep.scopes)
            answer = _post(ep.token_url, fields, self.acc.timeout, "token")
            if answer.get("error") in ("invalid_grant", "interaction_required"):
                desc = str(answer.get("error_description") or "").strip().splitlines()
                raise ReauthRequired(f"{_who(self.acc)} refused the refresh token of account '{name}' ({answer['error']}"
                                     + (f": {desc[0][:200]}" if desc else "") + f"): run `mailsync auth {name}`",
                                     hint="it was revoked or has expired (a password change, an admin, long disuse)")
            if "error" in answer:
                raise _refused(_who(self.acc), "token refresh", answer)
            rec = _record(answer, self.clock(), data)
            self.store.save(rec)  # at once: a rotated refresh token is the only one that works now
            rotated = answer.get("refresh_token") not in (None, data["refresh_token"])
            log.info("oauth2: %s: access token refreshed (lives %d s)%s", name, rec["lifetime"],
                     "; refresh token rotated" if rotated else "")
            return _memo(rec)


def _memo(rec: dict) -> dict:
    """What a TokenSource keeps in memory: the access token and its expiry, not the refresh token."""
    return {k: rec.get(k) for k in ("access_token", "expires_at", "lifetime")} | {"known": rec.get("known", True)}


_sources: dict[tuple[str, str], TokenSource] = {}
_sources_lock = threading.Lock()


def token_source(acc: Account) -> TokenSource:
    """The one TokenSource of acc in this process."""
    key = (acc.name, TokenStore(acc).where)
    with _sources_lock:
        src = _sources.get(key)
        if src is None or src.acc.oauth2 != acc.oauth2:
            src = _sources[key] = TokenSource(acc)
        return src


# -- sign-in flows -----------------------------------------------------------------------------

def authorize(acc: Account, flow: str | None, out: Callable[[str], None], open_browser: bool = True,
              read_line: Callable[[], str] = input, *, sleep: Callable[[float], None] = time.sleep,
              timeout: float = FLOW_TIMEOUT) -> None:
    """`mailsync auth ACCOUNT`: run a sign-in flow and store the tokens. `sleep` paces device polls."""
    o = _conf(acc)
    flow = flow or o.flow
    ep = endpoints(acc)
    if flow == "device":
        answer = _device_flow(acc, ep, out, sleep)
    elif flow in ("loopback", "paste"):
        answer = _code_flow(acc, ep, flow, out, open_browser, read_line, timeout)
    else:
        raise ConfigError(f"unknown OAuth2 flow {flow!r}; use loopback, device or paste")
    if "error" in answer:
        raise _refused(_who(acc), "sign-in", answer)
    rec = _record(answer, time.time())
    if "refresh_token" not in rec:
        out(f"mailsync: {_who(acc)} issued no refresh token: `mailsync auth {acc.name}` will be needed again "
            "when the access token expires (Microsoft: add the offline_access scope)")
    TokenStore(acc).save(rec)
    with _sources_lock:  # a source of this process must not keep handing out the old token
        for key in [k for k in _sources if k[0] == acc.name]:
            del _sources[key]
    log.info("oauth2: %s: signed in (%s flow), tokens stored", acc.name, flow)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _code_flow(acc, ep: Endpoints, flow: str, out, open_browser: bool, read_line, timeout: float) -> dict:
    """Authorization code with PKCE (S256); the answer comes to a one-shot loopback listener or is pasted."""
    o = _conf(acc)
    if not ep.authorize_url:
        raise ConfigError(f"[accounts.{acc.name}.oauth2] has no authorize_url", hint='set it, or use flow = "device"')
    if not endpoint_ok(ep.authorize_url):
        raise ConfigError(f"refusing authorize URL {ep.authorize_url}: it must be https://")
    verifier = _b64(secrets.token_bytes(32))
    state = secrets.token_urlsafe(16)
    server = _listener() if flow == "loopback" else None
    port = server.server_address[1] if server else _free_port()
    redirect = f"http://127.0.0.1:{port}/"
    params = {"response_type": "code", "client_id": o.client_id, "redirect_uri": redirect,
              **({"scope": " ".join(ep.scopes)} if ep.scopes else {}), "state": state, "login_hint": acc.username,
              "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256",
              **dict(ep.extra)}
    url = ep.authorize_url + ("&" if "?" in ep.authorize_url else "?") + urllib.parse.urlencode(params)
    if server is None:
        out(f"Open this URL in a browser and sign in as {acc.username}:\n\n  {url}\n")
        out(f"The browser then goes to a page that does not load ({redirect}?code=...). "
            "Paste that page's full address here:")
        text = read_line().strip()
        query = urllib.parse.urlsplit(text).query if "?" in text else text
        got = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
    else:
        try:
            out(f"Sign in as {acc.username} in the browser; if none opens, open this URL:\n\n  {url}\n")
            if open_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                 or sys.platform in ("darwin", "win32")):
                with contextlib.suppress(Exception):
                    webbrowser.open(url)
            got = _wait(server, timeout)
        finally:
            server.server_close()
    if "error" in got:
        raise _refused(_who(acc), "sign-in", got)
    if "state" not in got:
        raise OAuthError("the sign-in answer holds no state", hint=f"paste the full address, starting {redirect}")
    if not secrets.compare_digest(got["state"].encode(), state.encode()):
        raise OAuthError("the sign-in answer does not belong to this sign-in (its state differs)",
                         hint=f"a stale browser tab or a forged redirect; run `mailsync auth {acc.name}` again")
    if not got.get("code"):
        raise OAuthError("the sign-in answer holds no authorization code", hint="paste the full address")
    fields = {"grant_type": "authorization_code", "code": got["code"], "redirect_uri": redirect,
              "code_verifier": verifier, **_client_fields(acc)}
    return _post(ep.token_url, fields, acc.timeout, "token")


def _listener() -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # a browser's idle pre-connection must not hold the listener

        def do_GET(self):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if "code" not in query and "error" not in query:
                self.send_error(404)
                return
            self.server.answer = {k: v[0] for k, v in query.items()}
            body = b"mailsync received the sign-in answer; you can close this tab and return to the terminal.\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the request line holds the code: never logged
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.answer = None
    server.timeout = 0.5
    return server


def _wait(server: http.server.HTTPServer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while server.answer is None:
        if time.monotonic() > deadline:
            raise OAuthError(f"no sign-in answer came from the browser within {timeout:.0f} seconds",
                             hint="run again; without a browser here use --flow paste or --flow device")
        server.handle_request()
    return server.answer


def _device_flow(acc, ep: Endpoints, out, sleep) -> dict:
    """RFC 8628: show the user code, then poll the token endpoint at the interval asked for."""
    if _conf(acc).provider == "google":
        raise OAuthError("Google does not allow the device flow for mail (the https://mail.google.com/ scope)",
                         hint='use flow = "loopback" (a browser on this machine) or "paste"')
    fields = _client_fields(acc)
    start = _post(ep.device_url, {**fields, **({"scope": " ".join(ep.scopes)} if ep.scopes else {})}, acc.timeout,
                  "device authorization")
    if "error" in start:
        raise _refused(_who(acc), "device authorization", start)
    device_code, user_code = start.get("device_code"), start.get("user_code")
    uri = start.get("verification_uri") or start.get("verification_url")  # Google's older name
    if not (device_code and user_code and uri):
        raise OAuthError("the device authorization answer lacks device_code, user_code or verification_uri")
    out(f"To sign in as {acc.username}, open {uri} and enter the code {user_code}")
    interval, lifetime = _number(start.get("interval"), 5.0), _number(start.get("expires_in"), 900.0)
    deadline = time.monotonic() + lifetime
    while True:
        sleep(interval)
        answer = _post(ep.token_url, {"grant_type": DEVICE_GRANT, "device_code": device_code, **fields},
                       acc.timeout, "token")
        err = answer.get("error")
        if err in ("authorization_pending", "slow_down") and time.monotonic() < deadline:
            if err == "slow_down":
                interval += 5  # RFC 8628 3.5
            continue
        if err in ("expired_token", "authorization_pending", "slow_down"):
            raise OAuthError(f"the code {user_code} expired before the sign-in was finished",
                             hint=f"run `mailsync auth {acc.name}` again and sign in within the time shown")
        if err == "access_denied":
            raise OAuthError("the sign-in was refused (access_denied)",
                             hint="sign in with the mail account's user and accept the permissions asked for")
        if err:
            raise _refused(_who(acc), "device sign-in", answer)
        return answer


def _number(value, default: float) -> float:
    try:
        return max(float(value), 0.0)
    except (TypeError, ValueError):
        return default


def status(acc: Account) -> dict:
    """What is stored for acc, never a token: stored, access_expires_at (ISO 8601), scopes, store."""
    store = TokenStore(acc)
    data = store.load() or {}
    exp = data.get("expires_at")
    when = datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds") \
        if isinstance(exp, int | float) and data.get("known", True) else None
    return {"stored": bool(data.get("refresh_token") or data.get("access_token")), "access_expires_at": when,
            "scopes": str(data.get("scope") or "").split(), "store": store.where}
