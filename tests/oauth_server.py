"""An OAuth2 authorization server for the tests: stdlib http.server on 127.0.0.1 (a free port), in a
thread. It approves every sign-in at once and is scriptable:

  /authorize  GET: checks client_id, a loopback redirect_uri and a PKCE S256 code_challenge, then
              302 to redirect_uri?code=..&state=.. (or ?error=access_denied when `deny` is set)
  /token      POST: grant_type authorization_code (code_verifier checked), refresh_token (each
              refresh returns a new refresh token and invalidates the old one, unless rotate=False),
              and the device code grant
  /device     POST: device_code, user_code, verification_uri, interval

Device polls answer `authorization_pending` `device_pending` times, then `slow_down`
`device_slow_down` times, then `device_outcome` ("approve", "access_denied" or "expired_token").
Access tokens are HS256 JWTs {"sub": user, "exp": now+ttl, "iat": now, "jti": random} signed with `key` (the
Dovecot that accepts bearer tokens checks them with the same key: see make_jwt/verify_jwt).
`counts` counts requests per endpoint and grant; `paths` keeps every request line's path+query.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(user: str, key: bytes, ttl: float, **claims) -> str:
    """An HS256 JWT {"sub": user, "iat": now, "exp": now+ttl, **claims} (a claim given as None is left
    out); the same signature as tests/oauth_dovecot.make_jwt."""
    now = int(time.time())
    body_claims = {k: v for k, v in {"sub": user, "iat": now, "exp": int(now + ttl), **claims}.items()
                   if v is not None}
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64url(json.dumps(body_claims, separators=(",", ":")).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def verify_jwt(key: bytes, token: str, now: float | None = None) -> dict:
    """The claims of an HS256 JWT signed with key and not expired; ValueError otherwise."""
    try:
        head, body, sig = token.split(".")
    except ValueError:
        raise ValueError("not a JWT") from None
    want = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    if json.loads(_unb64(head)).get("alg") != "HS256" or not hmac.compare_digest(want, _unb64(sig)):
        raise ValueError("bad signature")
    claims = json.loads(_unb64(body))
    if claims.get("exp", 0) <= (time.time() if now is None else now):
        raise ValueError("expired")
    return claims


class AuthServer:
    def __init__(self, key: bytes, user: str, *, client_id: str = "mailsync-test", client_secret: str | None = None,
                 ttl: float = 3600, rotate: bool = True, device_pending: int = 2, device_slow_down: int = 1,
                 device_interval: int = 0, device_outcome: str = "approve", refresh_delay: float = 0.0) -> None:
        self.key, self.user = key, user
        self.client_id, self.client_secret = client_id, client_secret
        self.ttl, self.rotate = ttl, rotate
        self.device_pending, self.device_slow_down = device_pending, device_slow_down
        self.device_interval, self.device_outcome = device_interval, device_outcome
        self.refresh_delay = refresh_delay  # seconds each refresh takes (to widen races)
        self.deny = False                   # /authorize answers error=access_denied
        self.counts: Counter[str] = Counter()
        self.paths: list[str] = []
        self.issued: list[str] = []         # every access and refresh token handed out
        self._codes: dict[str, dict] = {}
        self._refresh: dict[str, str] = {}  # valid refresh token -> scope
        self._devices: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # -- life cycle
    def start(self) -> Self:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner._handle(self, "GET")

            def do_POST(self):
                owner._handle(self, "POST")

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    authorize_url = property(lambda self: self.url + "/authorize")
    token_url = property(lambda self: self.url + "/token")
    device_url = property(lambda self: self.url + "/device")

    # -- scripting
    def revoke(self, refresh_token: str | None = None) -> None:
        """Invalidate one refresh token, or all: their next use answers invalid_grant."""
        with self._lock:
            if refresh_token is None:
                self._refresh.clear()
            else:
                self._refresh.pop(refresh_token, None)

    def valid_refresh_tokens(self) -> set[str]:
        with self._lock:
            return set(self._refresh)

    # -- requests
    def _handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        self.paths.append(req.path)
        parts = urllib.parse.urlsplit(req.path)
        if method == "GET" and parts.path == "/authorize":
            return self._authorize(req, _form(parts.query))
        if method == "POST" and parts.path in ("/token", "/device"):
            length = int(req.headers.get("Content-Length") or 0)
            form = _form(req.rfile.read(length).decode())
            if form.get("client_id") != self.client_id:
                return _json(req, 400, error="unauthorized_client", error_description="unknown client_id")
            if self.client_secret is not None and form.get("client_secret") != self.client_secret:
                return _json(req, 401, error="invalid_client", error_description="AADSTS7000218: The request "
                             "body must contain the following parameter: 'client_assertion' or 'client_secret'.")
            return (self._token if parts.path == "/token" else self._device)(req, form)
        return _text(req, 404, "not found")

    def _authorize(self, req, q: dict) -> None:
        self.counts["authorize"] += 1
        redirect = urllib.parse.urlsplit(q.get("redirect_uri", ""))
        if q.get("client_id") != self.client_id:
            return _text(req, 400, "unknown client_id")
        if redirect.scheme != "http" or redirect.hostname not in ("127.0.0.1", "localhost", "::1"):
            return _text(req, 400, "redirect_uri must be a loopback http:// URL")
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" \
                or len(q.get("code_challenge", "")) != 43:
            return _text(req, 400, "response_type=code with a PKCE S256 code_challenge is required")
        if self.deny:
            answer = {"error": "access_denied", "error_description": "the user declined"}
        else:
            code = secrets.token_urlsafe(24)
            with self._lock:
                self._codes[code] = {"redirect_uri": q["redirect_uri"], "challenge": q["code_challenge"],
                                     "scope": q.get("scope", "")}
            answer = {"code": code}
        if "state" in q:
            answer["state"] = q["state"]
        req.send_response(302)
        req.send_header("Location", q["redirect_uri"] + "?" + urllib.parse.urlencode(answer))
        req.send_header("Content-Length", "0")
        req.end_headers()

    def _token(self, req, form: dict) -> None:
        grant = form.get("grant_type", "")
        self.counts[grant] += 1
        if grant == "authorization_code":
            with self._lock:
                code = self._codes.pop(form.get("code", ""), None)
            if code is None or code["redirect_uri"] != form.get("redirect_uri") \
                    or b64url(hashlib.sha256(form.get("code_verifier", "").encode()).digest()) != code["challenge"]:
                return _json(req, 400, error="invalid_grant", error_description="bad code, redirect_uri or verifier")
            return _json(req, 200, **self._mint(code["scope"]))
        if grant == "refresh_token":
            time.sleep(self.refresh_delay)
            old = form.get("refresh_token", "")
            with self._lock:
                scope = self._refresh.get(old)
                if scope is not None and self.rotate:
                    del self._refresh[old]
            if scope is None:
                return _json(req, 400, error="invalid_grant", error_description="AADSTS70008: The provided "
                             "authorization code or refresh token has expired due to inactivity.")
            answer = self._mint(scope)
            if not self.rotate:
                del answer["refresh_token"]  # as Google does: the old one stays valid
            return _json(req, 200, **answer)
        if grant == DEVICE_GRANT:
            with self._lock:
                dev = self._devices.get(form.get("device_code", ""))
                if dev is None:
                    return _json(req, 400, error="invalid_grant", error_description="unknown device_code")
                dev["polls"].append(time.monotonic())
                if dev["pending"] > 0:
                    dev["pending"] -= 1
                    return _json(req, 400, error="authorization_pending")
                if dev["slow"] > 0:
                    dev["slow"] -= 1
                    return _json(req, 400, error="slow_down")
            if self.device_outcome != "approve":
                return _json(req, 400, error=self.device_outcome, error_description="as scripted")
            return _json(req, 200, **self._mint(dev["scope"]))
        return _json(req, 400, error="unsupported_grant_type")

    def _device(self, req, form: dict) -> None:
        self.counts["device"] += 1
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._devices[code] = {"pending": self.device_pending, "slow": self.device_slow_down,
                                   "scope": form.get("scope", ""), "polls": [time.monotonic()]}
        _json(req, 200, device_code=code, user_code="WDJB-MJHT", verification_uri=self.url + "/activate",
              expires_in=600, interval=self.device_interval)

    def device_polls(self) -> list[list[float]]:
        """Per device authorization: when it was asked for, then when each poll came."""
        with self._lock:
            return [list(d["polls"]) for d in self._devices.values()]

    def _mint(self, scope: str) -> dict:
        access = make_jwt(self.user, self.key, self.ttl, jti=secrets.token_hex(8))
        refresh = secrets.token_urlsafe(32)
        with self._lock:
            self._refresh[refresh] = scope
            self.issued += [access, refresh]
        return {"access_token": access, "token_type": "Bearer", "expires_in": int(self.ttl),
                "refresh_token": refresh, "scope": scope}


def _form(text: str) -> dict:
    return {k: v[0] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}


def _json(req, code: int, **body) -> None:
    data = json.dumps(body).encode()
    req.send_response(code)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.send_header("Cache-Control", "no-store")
    req.end_headers()
    req.wfile.write(data)


def _text(req, code: int, text: str) -> None:
    data = text.encode()
    req.send_response(code)
    req.send_header("Content-Type", "text/plain")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)
