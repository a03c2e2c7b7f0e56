"""Logging in: one path per protocol, shared by every command that talks to a server.

IMAP (`ImapSession`: sync, backup, mirror, verify, migrate, restore, compare) and POP3
(`Pop3Session`: sync, compare) log in through `log_in`; `mailsync check` calls the same steps one
by one, between its own diagnostic ones. The steps, in order:

  connect       TCP, then TLS (implicit, or STARTTLS/STLS when the account says so, required),
                with the verifying context of `tls_context`; errors -> `connect_errors`
  check_pin     the pinned certificate fingerprint, before anything secret is sent       (TLSError)
  capabilities  what the server offers (read again after STARTTLS/STLS, as RFC 3501 and 2595 ask)
  authenticate  the account's `Authenticator` chooses what to send (`Login` or a `Sasl` exchange)
                from those capabilities; this module sends it and maps the answer         (AuthError)

Secrets: an Authenticator holds the secret and lists every form of it that could come back
(`Authenticator.secrets`); whatever the server says during authentication, in errors and in the
imaplib debug log, has those forms masked. LOGIN and AUTHENTICATE lines are redacted in the debug
log by imapclient; SASL responses are logged by imaplib only as their size.

Adding a way of logging in (OAuth2's XOAUTH2 or OAUTHBEARER) is one Authenticator subclass, an
entry in KINDS and the config key that names it (`auth`); no caller changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import imaplib
import io
import os
import poplib
import socket
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar


def _imapclient_version_module() -> None:
    """Give imapclient its `version` module before it is imported. Its own asks importlib.metadata
    for the installed version, which loads importlib.metadata, zipfile and email and reads
    site-packages: 9 ms of the imports of a no-change run. The same version is read here from the
    name of imapclient's .dist-info directory, one listing of the directory it is installed in;
    if that does not find exactly one, imapclient's own module runs as usual."""
    import importlib.util
    import sys
    import types

    if "imapclient" in sys.modules:
        return
    spec = importlib.util.find_spec("imapclient")
    if spec is None or not spec.submodule_search_locations:
        return
    where = os.path.dirname(list(spec.submodule_search_locations)[0])
    try:
        found = [n[len("imapclient-"):-len(".dist-info")] for n in os.listdir(where)
                 if n.lower().startswith("imapclient-") and n.endswith(".dist-info")]
    except OSError:
        return
    parts = found[0].split(".") if len(found) == 1 else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return
    module = types.ModuleType("imapclient.version")
    module.version = found[0]
    module.version_info = (*map(int, parts), "final")
    sys.modules["imapclient.version"] = module


_imapclient_version_module()

from imapclient import IMAPClient  # noqa: E402
from imapclient import imap4 as imapclient_imap4  # noqa: E402
from imapclient import tls as imapclient_tls  # noqa: E402

from mailsync.errors import (  # noqa: E402
    AuthError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    MailsyncError,
    ServerError,
    TLSError,
)

if TYPE_CHECKING:
    from mailsync.config import Account

MASK = "********"


def _where(acc: Account) -> str:
    return f"{acc.host}:{acc.port}"


# -- TLS -------------------------------------------------------------------------------------------


def fingerprint_hex(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest().upper()


def pretty_fingerprint(hexfp: str) -> str:
    return ":".join(hexfp[i:i + 2] for i in range(0, len(hexfp), 2))


def tls_context(acc: Account) -> ssl.SSLContext:
    """The one TLS context every connection that logs in uses: the system CAs or ca_file, the host
    name checked, TLS 1.2 at least; with a pin and no ca_file the pin replaces the CA check.

    Loading the system CAs takes about 20 ms (OpenSSL reads the whole bundle): a context is made
    once and used by every connection of the process that needs the same one (same ca_file, same
    file contents by size and mtime, same SSL_CERT_FILE/SSL_CERT_DIR), for at most
    CONTEXT_REUSE seconds (a long-running `watch` sees a renewed CA store). Nobody changes a
    context once made; each connection still checks its host name and pin."""
    key = _context_key(acc)
    now = time.monotonic()
    with _contexts_lock:
        made = _contexts.get(key)
        if made is not None and now - made[0] < CONTEXT_REUSE:
            return made[1]
    ctx = _new_tls_context(acc)
    with _contexts_lock:
        _contexts[key] = (now, ctx)
    return ctx


CONTEXT_REUSE = 300.0  # seconds
_contexts: dict[tuple, tuple[float, ssl.SSLContext]] = {}
_contexts_lock = threading.Lock()


def _context_key(acc: Account) -> tuple:
    stamp = None
    if acc.ca_file is not None:
        try:
            st = os.stat(acc.ca_file)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = "unreadable"
    pin_only = bool(acc.fingerprint) and acc.ca_file is None
    return (str(acc.ca_file) if acc.ca_file is not None else None, stamp, pin_only,
            os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


def _new_tls_context(acc: Account) -> ssl.SSLContext:
    if acc.ca_file is not None:
        try:
            ctx = ssl.create_default_context(cafile=str(acc.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[accounts.{acc.name}] ca_file {acc.ca_file}: cannot load: {exc}") from None
    else:
        ctx = ssl.create_default_context()
    if acc.fingerprint and acc.ca_file is None:
        # a pin replaces the CA check (self-signed servers); the pin is checked after the handshake
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_pin(acc: Account, sock) -> None:
    """The account's pinned fingerprint against the certificate the TLS socket shows (nothing to
    do without a pin). Called right after the handshake, before anything secret is sent."""
    if not acc.fingerprint:
        return
    der = sock.getpeercert(binary_form=True)
    got = fingerprint_hex(der) if der else ""
    if got != acc.fingerprint:
        raise TLSError(f"certificate of {_where(acc)} does not match the pinned fingerprint; "
                       f"server shows SHA-256 {pretty_fingerprint(got) or 'no certificate'}",
                       hint="if the server's certificate was renewed, update fingerprint")


def peer_fingerprint(host: str, port: int, timeout: float) -> str | None:
    """The SHA-256 fingerprint of whatever certificate the server shows (for error messages)."""
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=min(timeout, 10)) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)
        return fingerprint_hex(der) if der else None
    except (OSError, ssl.SSLError):
        return None


def connect_errors(acc: Account, exc: BaseException) -> MailsyncError:
    """Translate an exception raised while connecting to acc into a one-line mailsync error."""
    where = _where(acc)
    if isinstance(exc, MailsyncError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        fp = peer_fingerprint(acc.host, acc.port, acc.timeout)
        why = exc.verify_message or str(exc)
        shown = f"SHA-256 {pretty_fingerprint(fp)}" if fp else "fingerprint unavailable"
        pin = f'fingerprint = "sha256:{pretty_fingerprint(fp)}"' if fp else "fingerprint = \"sha256:...\""
        return TLSError(f"certificate of {where} not accepted ({why}); {shown}",
                        hint=f"if you trust it, add {pin} to [accounts.{acc.name}], or set ca_file")
    if isinstance(exc, ssl.SSLEOFError) or "UNEXPECTED_EOF" in str(exc):
        return ConnectError(f"{where} closed the connection during the TLS handshake",
                            hint="the server may be overloaded or limiting connections; try again later")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or str(exc)
        hint = "is this a plaintext port? IMAPS is usually 993, POP3S 995"
        if "VERSION" in str(reason).upper() and "WRONG" not in str(reason).upper():
            hint = "the server offers only TLS older than 1.2"
        return TLSError(f"TLS handshake with {where} failed ({reason})", hint=hint)
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve host '{acc.host}'", hint="check host in the config and your DNS")
    usual = "POP3S is usually 995" if acc.protocol == "pop3" else "IMAPS is usually 993"
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"connection to {where} refused",
                            hint=f"check host and port ({usual}) and that the server runs")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return ConnectError(f"connection to {where} timed out after {acc.timeout:g} s",
                            hint="check host, port and firewall; raise timeout for slow servers")
    if isinstance(exc, OSError):
        return ConnectError(f"cannot connect to {where}: {exc.strerror or exc}",
                            hint="check host, port and your network")
    if isinstance(exc, imaplib.IMAP4.error) and not isinstance(exc, imaplib.IMAP4.abort):
        return ConnectError(f"{where} did not greet like an IMAP server",
                            hint=f"is this the right port? {usual} (the POP3S port answers with +OK)")
    if isinstance(exc, (imaplib.IMAP4.abort, EOFError)):
        return ConnectionLost(f"{where} closed the connection: {exc}",
                              hint=f"is this the right port? {usual}")
    return ConnectError(f"cannot connect to {where}: {exc}")


def lost_during_login(acc: Account, exc: BaseException) -> MailsyncError:
    """The connection failed between the TLS handshake and the end of the login."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return ConnectError(f"{_where(acc)} did not answer within {acc.timeout:g} s",
                            hint="check the server, or raise timeout for slow servers")
    return ConnectionLost(f"connection to {_where(acc)} lost during login: {_text(exc)}",
                          hint="run again; check port and server")


# -- capabilities ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a server says it offers: `listed` as it listed them (IMAP CAPABILITY tokens, POP3 CAPA
    lines), `names` upper-cased (POP3: each line's first word), `sasl` the SASL mechanisms (IMAP
    AUTH=..., POP3 SASL ...). `"X" in caps` asks for a name."""

    listed: tuple[str, ...] = ()
    names: frozenset[str] = frozenset()
    sasl: frozenset[str] = frozenset()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self.names

    @classmethod
    def imap(cls, caps: Iterable[str | bytes]) -> Capabilities:
        listed = tuple((c.decode("ascii", "replace") if isinstance(c, bytes) else str(c)).upper() for c in caps)
        return cls(listed, frozenset(listed), frozenset(c[5:] for c in listed if c.startswith("AUTH=")))

    @classmethod
    def pop3(cls, lines: Iterable[str]) -> Capabilities:
        listed = tuple(line.strip() for line in lines if line.strip())
        words = [line.split() for line in listed]
        return cls(listed, frozenset(w[0].upper() for w in words),
                   frozenset(m.upper() for w in words if w[0].upper() == "SASL" for m in w[1:]))


# -- authenticators --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    """The protocol's own password commands: IMAP LOGIN, POP3 USER and PASS."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Sasl:
    """A SASL exchange (IMAP AUTHENTICATE, POP3 AUTH). respond(challenge) -> response, both raw
    bytes (the base64 on the wire is done here); its first call gets the server's first challenge
    (empty for client-first mechanisms)."""

    mechanism: str
    respond: Callable[[bytes], bytes] = field(repr=False)

    @classmethod
    def client_first(cls, mechanism: str, message: bytes, after: bytes = b"") -> Sasl:
        """A mechanism that says everything in its first message (PLAIN, XOAUTH2, OAUTHBEARER);
        any further challenge (XOAUTH2 and OAUTHBEARER report an error that way) gets `after`:
        empty for XOAUTH2, %x01 for OAUTHBEARER (RFC 7628 3.2.3). The message is never sent twice."""
        sent: list[bool] = []

        def respond(_challenge: bytes) -> bytes:
            if sent:
                return after
            sent.append(True)
            return message
        return cls(mechanism.upper(), respond)


class Unusable(Exception):
    """An Authenticator cannot log in to this server (no mechanism it can use), or cannot send
    this credential at all: error is the mailsync error it becomes (AuthError or ConfigError)."""

    def __init__(self, reason: str, *, hint: str = "", error: type[MailsyncError] = AuthError) -> None:
        super().__init__(reason)
        self.reason, self.hint, self.error = reason, hint, error


class Authenticator(ABC):
    """How an account proves who it is. A subclass chooses, from the server's capabilities, what
    to send: `Login` (the protocol's password commands) or a `Sasl` exchange, or raises Unusable;
    `imap_authenticate` and `pop3_authenticate` send it. It holds the secret and never shows it."""

    kind: ClassVar[str] = ""

    def __init__(self, username: str, secret: str) -> None:
        self.username = username
        self._secret = secret

    def __repr__(self) -> str:  # never the secret
        return f"{type(self).__name__}(username={self.username!r})"

    @abstractmethod
    def imap(self, caps: Capabilities) -> Login | Sasl:
        ...

    @abstractmethod
    def pop3(self, caps: Capabilities) -> Login | Sasl:
        ...

    def secrets(self) -> tuple[str, ...]:
        """Every form of the secret that must never be shown (masked in what the server says)."""
        return (self._secret,) if self._secret else ()

    def refused_hint(self, protocol: str) -> str:
        """The hint of the AuthError raised when the server refuses this credential."""
        if protocol == "pop3":
            return ("check username and password (an app password, or POP access enabled at the provider, "
                    "may be needed)")
        return "check username and password (an app password may be needed)"


def _quotable(s: str) -> bool:
    """Fits an IMAP quoted string: printable 7-bit ASCII (no CR, LF, NUL or 8-bit)."""
    return all(32 <= ord(c) < 127 for c in s)


class PasswordAuth(Authenticator):
    """A password. IMAP: LOGIN, or AUTHENTICATE PLAIN (UTF-8) where LOGIN cannot be used: the
    server advertises LOGINDISABLED, or the username or password does not fit LOGIN's quoted
    strings (non-ASCII, CR, LF). POP3: USER and PASS (UTF-8)."""

    kind = "password"

    def imap(self, caps: Capabilities) -> Login | Sasl:
        disabled = "LOGINDISABLED" in caps
        if not disabled and _quotable(self.username) and _quotable(self._secret):
            return Login(self.username, self._secret)
        if disabled and "PLAIN" not in caps.sasl:
            oauth = caps.sasl & {"XOAUTH2", "OAUTHBEARER"}
            raise Unusable("the server allows no password login here (it advertises LOGINDISABLED and "
                           "no AUTH=PLAIN)", hint='it takes OAuth2 tokens: set auth = "oauth2" (see docs/oauth2.md)'
                           if oauth else "ask the provider how to enable IMAP access")
        if "\0" in self.username + self._secret:
            raise Unusable("the username or password contains a NUL character, which no login can send",
                           hint="check the password source", error=ConfigError)
        return Sasl.client_first("PLAIN", b"\0" + self.username.encode() + b"\0" + self._secret.encode())

    def pop3(self, caps: Capabilities) -> Login | Sasl:
        if any(c in self.username + self._secret for c in "\r\n\0"):
            raise Unusable("the username or password contains a line break, which POP3 cannot send",
                           hint="remove the line break (a copy-and-paste error?)", error=ConfigError)
        return Login(self.username, self._secret)


class OAuth2Auth(Authenticator):
    """An OAuth2 access token, by SASL: XOAUTH2 (Google, Microsoft) or OAUTHBEARER (RFC 7628),
    `mechanism = "auto"` taking what the server advertises (OAUTHBEARER first, the standard).
    The token comes from oauth2.token_source (refreshed ahead of expiry), fetched when the
    connection logs in; a failure challenge is answered as the mechanism requires (an empty line
    for XOAUTH2, %x01 for OAUTHBEARER), never with the token again. POP3 sends AUTH in two steps
    (command, "+", response), which Office 365 requires."""

    kind = "oauth2"
    MECHANISMS = ("OAUTHBEARER", "XOAUTH2")

    def __init__(self, acc: Account) -> None:
        from mailsync import oauth2  # only for accounts that use it

        self.source = oauth2.token_source(acc)
        super().__init__(acc.username, self.source.token())
        self.host, self.port = acc.host, acc.port
        self.name = acc.name
        self.mechanism = (acc.oauth2.mechanism if acc.oauth2 else "auto").upper()
        self.from_command = acc.oauth2 is not None and acc.oauth2.token_command is not None
        self.expires_in = self.source.expires_in()

    def _step(self, offered: frozenset[str], protocol: str) -> Sasl:
        usable = [m for m in self.MECHANISMS if m in offered and self.mechanism in ("AUTO", m)]
        if not usable:
            want = "XOAUTH2 or OAUTHBEARER" if self.mechanism == "AUTO" else self.mechanism
            shown = ", ".join(sorted(offered)) or "none"
            raise Unusable(f"the server offers no {want} login over {protocol.upper()} (it offers: {shown})",
                           hint="check host and port, and that the provider allows OAuth2 for "
                                f"{protocol.upper()}" + ("" if self.mechanism == "AUTO" else
                                                         '; or set mechanism = "auto"'))
        mech, user, token = usable[0], self.username, self._secret
        if mech == "XOAUTH2":
            return Sasl.client_first(mech, f"user={user}\x01auth=Bearer {token}\x01\x01".encode())
        gs2 = "n,a=" + user.replace("=", "=3D").replace(",", "=2C") + ","
        message = f"{gs2}\x01host={self.host}\x01port={self.port}\x01auth=Bearer {token}\x01\x01"
        return Sasl.client_first(mech, message.encode(), after=b"\x01")

    def imap(self, caps: Capabilities) -> Login | Sasl:
        return self._step(caps.sasl, "imap")

    def pop3(self, caps: Capabilities) -> Login | Sasl:
        return self._step(caps.sasl, "pop3")

    def refused(self) -> None:
        """The server refused the token: the next login gets a new one (unless another connection
        already got a newer one)."""
        self.source.expired(self._secret)

    def refused_hint(self, protocol: str) -> str:
        if self.from_command:  # `mailsync auth` has nothing to do for such an account: it says so
            return (f"the access token printed by token_command was refused; check that the command gives a "
                    f"token for {self.username} with the {protocol.upper()} scope")
        return (f"the access token was refused; if this persists run `mailsync auth {self.name}` (wrong "
                "account or missing consent for the mail scope?)")


KINDS: dict[str, type[Authenticator]] = {PasswordAuth.kind: PasswordAuth, OAuth2Auth.kind: OAuth2Auth}


def authenticator(acc: Account, secret: str) -> Authenticator:
    """The Authenticator for acc, by its `auth` setting ("password", the default, or "oauth2");
    secret is what secrets.password(acc) returned (nothing for oauth2: tokens come from oauth2.py)."""
    kind = getattr(acc, "auth", None) or PasswordAuth.kind
    cls = KINDS.get(kind)
    if cls is None:
        raise ConfigError(f"[accounts.{acc.name}] unknown auth '{kind}'", hint=f"use one of {', '.join(KINDS)}")
    if cls is OAuth2Auth:
        return OAuth2Auth(acc)
    return cls(acc.username, secret)


class _Mask:
    """Replaces every form of the secrets in text: as given, as an IMAP quoted string, as the
    base64 SASL responses sent, and each of those as it shows in a bytes repr (imaplib's log)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.forms: set[str] = set()
        for s in secrets:
            self.add(s)
            self.add(s.replace("\\", "\\\\").replace('"', '\\"'))

    def add(self, form: str) -> None:
        if form:
            self.forms.add(form)
            self.forms.add(repr(form.encode("utf-8"))[2:-1])

    def __call__(self, text: str) -> str:
        for form in sorted(self.forms, key=len, reverse=True):
            text = text.replace(form, MASK)
        return text


@dataclass(frozen=True)
class Accepted:
    """The server took the credential: how it was sent, and what the server said (masked)."""

    mechanism: str            # "LOGIN", "AUTHENTICATE PLAIN", "USER/PASS", "AUTH PLAIN", ...
    said: str


@dataclass(frozen=True)
class Refusal:
    """The server refused the credential: its word for no ("NO"/"BAD" for IMAP, "-ERR" for POP3)
    and the rest of its answer, masked. Carried by the AuthError as `.refusal` (mailsync check
    shows the two apart)."""

    status: str
    said: str
    mechanism: str


def _refused(message: str, hint: str, refusal: Refusal) -> AuthError:
    err = AuthError(message, hint=hint)
    err.refusal = refusal  # type: ignore[attr-defined]
    return err


def _unusable(acc: Account, auth: Authenticator, exc: Unusable) -> MailsyncError:
    if exc.error is ConfigError:
        return ConfigError(f"[accounts.{acc.name}] {exc.reason}", hint=exc.hint)
    return exc.error(f"login as {auth.username} at {_where(acc)} failed: {exc.reason}", hint=exc.hint)


# -- IMAP ------------------------------------------------------------------------------------------


def imap_connect(acc: Account) -> IMAPClient:
    """Connect and secure: implicit TLS, or the plaintext port and STARTTLS (required: a server
    that does not offer it is refused, never used in plaintext); the pin checked. imaplib reads
    CAPABILITY on connecting and again after STARTTLS (`imap_capabilities` gives it)."""
    client = None
    try:
        client = _Client(acc.host, port=acc.port, ssl=not acc.starttls,
                         ssl_context=None if acc.starttls else tls_context(acc), timeout=acc.timeout)
        if acc.starttls:
            if "STARTTLS" not in imap_capabilities(client):
                raise TLSError(f"{_where(acc)} does not offer STARTTLS; refusing to log in without TLS",
                               hint="use the server's implicit-TLS port (993) without starttls, or ask the "
                                    "provider to enable TLS")
            client.starttls(ssl_context=tls_context(acc))
        check_pin(acc, client.socket())
    except BaseException as exc:
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise connect_errors(acc, exc) from None
    return client


class _GreetingCapabilities(imaplib.IMAP4):
    """imaplib sends CAPABILITY right after the greeting, also when the greeting listed them
    already (`* OK [CAPABILITY ...]`, RFC 3501 7.1; Dovecot, Gmail and Outlook do): those are
    used instead, one round trip fewer for each connection. Only the greeting's: after STARTTLS
    (`_tls_established`) imaplib asks again, as RFC 3501 requires."""

    def _get_capabilities(self) -> None:
        listed = None if self._tls_established else self.untagged_responses.pop("CAPABILITY", None)
        if not listed or not isinstance(listed[-1], bytes):
            super()._get_capabilities()
            return
        self.capabilities = tuple(str(listed[-1], self._encoding).upper().split())


class _TLS(_GreetingCapabilities, imapclient_tls.IMAP4_TLS):
    pass


class _Plain(_GreetingCapabilities, imapclient_imap4.IMAP4WithTimeout):
    pass


class _Client(IMAPClient):
    """IMAPClient whose imaplib connection takes the capabilities from the greeting."""

    def _create_IMAP4(self):
        connect_timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _TLS(self.host, self.port, self.ssl_context, connect_timeout)
        return _Plain(self.host, self.port, connect_timeout)


def imap_attach(acc: Account, sock: socket.socket, pending: bytes = b"",
                deadline: Deadline | None = None) -> IMAPClient:
    """An IMAPClient over a TLS connection opened (and verified) by the caller: `mailsync check`
    opens its own, step by step, to say where it fails. pending: bytes already read from it (the
    greeting), read again first; deadline: see Deadline. imaplib reads the greeting and
    CAPABILITY; what it raises is passed on untranslated (check explains it in its own words)."""
    sock.settimeout(acc.timeout)
    return _AttachedClient(acc, _Resumed(sock, pending, deadline))


def imap_capabilities(client: IMAPClient) -> Capabilities:
    """The capabilities before login: those imaplib read on connecting, or again after STARTTLS."""
    return Capabilities.imap(client._imap.capabilities)


def imap_authenticate(acc: Account, client: IMAPClient, caps: Capabilities, auth: Authenticator) -> Accepted:
    """Log in with what auth chooses for these capabilities: LOGIN or AUTHENTICATE. A refusal is
    an AuthError (exit 3) with a `.refusal`; a connection that fails, ConnectionLost or ConnectError.
    Nothing raised or logged holds the secret."""
    imap = client._imap
    where = _where(acc)
    if imap.state != "NONAUTH":
        raise AuthError(f"login as {auth.username} at {where} failed: the server logged the connection in "
                        "already (PREAUTH), as a user of its choosing",
                        hint="mailsync logs in only as the configured user; ask the server admin")
    try:
        step = auth.imap(caps)
    except Unusable as exc:
        raise _unusable(acc, auth, exc) from None
    mask = _Mask(auth.secrets())
    logged = imap._mesg
    imap._mesg = lambda text, *a: logged(mask(str(text)), *a)   # the debug log of what the server says
    try:
        if isinstance(step, Login):
            mechanism = "LOGIN"
            typ, said = _imap_command(imap, "LOGIN", _quoted(step.username), _quoted(step.password))
        else:
            mechanism = f"AUTHENTICATE {step.mechanism}"
            imap.literal = _SaslAnswers(step.respond, mask).answer   # imaplib calls it on each "+"
            typ, said = _imap_command(imap, "AUTHENTICATE", step.mechanism)
    except imaplib.IMAP4.abort as exc:  # a BYE, or the connection closed
        raise ConnectionLost(f"{where} closed the connection during login: {mask(_text(exc))}",
                             hint="run again; if it persists the server may limit connections") from None
    except (OSError, EOFError) as exc:
        raise lost_during_login(acc, exc) from None
    except imaplib.IMAP4.error as exc:  # an answer imaplib cannot read
        raise AuthError(f"login as {auth.username} at {where} failed: {mask(_text(exc))}",
                        hint=auth.refused_hint("imap")) from None
    finally:
        imap.literal = None
        imap._mesg = logged
    said = mask(said)
    if typ != "OK":
        shown = said if typ == "NO" else f"{typ} {said}"
        raise _refused(f"login as {auth.username} at {where} failed: {shown}", auth.refused_hint("imap"),
                       Refusal(typ, said, mechanism))
    imap.state = "AUTH"
    return Accepted(mechanism, said)


def imap_capabilities_after_login(acc: Account, client: IMAPClient) -> Capabilities:
    """The capabilities once logged in (servers list more): those the login answer carried, or
    CAPABILITY asked again."""
    try:
        return Capabilities.imap(client.capabilities())
    except (OSError, EOFError, imaplib.IMAP4.abort) as exc:
        raise lost_during_login(acc, exc) from None
    except imaplib.IMAP4.error as exc:
        raise ServerError(f"{_where(acc)} refused a command: {_text(exc)}") from None


def _quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_command(imap: imaplib.IMAP4, name: str, *args: str) -> tuple[str, str]:
    """Send a command, return (status, text of the tagged answer). Unlike imaplib's own commands
    a BAD is returned, not raised with the answer (which may echo the secret) in its message."""
    imap._check_bye()
    tag = imap._command(name, *args)
    typ, data = imap._get_tagged_response(tag)
    imap._check_bye()
    last = data[-1] if data else b""
    text = last.decode("utf-8", "replace") if isinstance(last, bytes) else str(last or "")
    return typ, text.strip()


class _SaslAnswers:
    """imaplib's literal callback for AUTHENTICATE (a bound method, as imaplib wants): decodes each
    challenge, encodes each response, and adds what it sends to the mask."""

    def __init__(self, respond: Callable[[bytes], bytes], mask: _Mask) -> None:
        self.respond, self.mask = respond, mask

    def answer(self, challenge: bytes) -> bytes:
        return _sasl_answer(self.respond, challenge, self.mask)


def _sasl_answer(respond: Callable[[bytes], bytes], challenge: bytes, mask: _Mask) -> bytes:
    try:
        decoded = base64.b64decode(challenge.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"*"  # not base64: cancel the exchange (the server then answers BAD/-ERR)
    out = base64.b64encode(respond(decoded))
    mask.add(out.decode("ascii"))
    return out


class _AttachedClient(IMAPClient):
    def __init__(self, acc: Account, conn: _Resumed) -> None:
        self._attached = conn
        super().__init__(acc.host, port=acc.port, ssl=True, timeout=acc.timeout)

    def _create_IMAP4(self):
        return _AttachedIMAP4(self._attached, self.host, self.port)


class _AttachedIMAP4(imaplib.IMAP4):
    def __init__(self, conn: _Resumed, host: str, port: int) -> None:
        self._attached = conn
        super().__init__(host, port)

    def _create_socket(self, timeout=None):
        return self._attached


class Deadline:
    """One deadline for a whole answer, not one timeout per read (the libraries' way, which a
    server sending a byte now and then can stretch without end): `mailsync check` starts one
    before each command on an attached connection."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at: float | None = None

    def start(self) -> None:
        self.at = time.monotonic() + self.seconds

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left


class _Resumed:
    """A connection opened elsewhere, for imaplib or poplib to take over: what was already read
    from it is read again first (their makefile() reader), everything else is the socket's."""

    def __init__(self, sock: socket.socket, pending: bytes, deadline: Deadline | None = None) -> None:
        self._sock, self._pending, self._deadline = sock, pending, deadline

    def makefile(self, mode: str = "rb", *_a, **_kw):
        return io.BufferedReader(_Replay(self._sock, self._pending, self._deadline))

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _Replay(io.RawIOBase):
    def __init__(self, sock: socket.socket, pending: bytes, deadline: Deadline | None) -> None:
        self._sock, self._pending, self._deadline = sock, bytearray(pending), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pending:
            n = min(len(b), len(self._pending))
            b[:n] = self._pending[:n]
            del self._pending[:n]
            return n
        left = self._deadline.left() if self._deadline else None
        if left is not None:
            self._sock.settimeout(left)
        return self._sock.recv_into(b)


def imap_login(acc: Account, credential: str | Authenticator) -> LoggedIn:
    """Connect (TLS or STARTTLS, pin), read CAPABILITY, authenticate, read CAPABILITY again."""
    auth = credential if isinstance(credential, Authenticator) else authenticator(acc, credential)
    client = imap_connect(acc)
    try:
        done = imap_authenticate(acc, client, imap_capabilities(client), auth)
        return LoggedIn(client, imap_capabilities_after_login(acc, client), done.mechanism, done.said)
    except BaseException:
        close_imap(client)
        raise


def close_imap(client: IMAPClient) -> None:
    with contextlib.suppress(Exception):
        client.logout()
    with contextlib.suppress(Exception):
        client.shutdown()


# -- POP3 ------------------------------------------------------------------------------------------


def pop3_connect(acc: Account) -> poplib.POP3:
    """Connect and secure: POP3S, or the plaintext port and STLS (required); the pin checked."""
    where = _where(acc)
    pop = None
    try:
        if acc.starttls:
            pop = poplib.POP3(acc.host, acc.port, timeout=acc.timeout)
            try:
                offered = pop.capa()
            except poplib.error_proto:
                offered = {}
            if "STLS" not in offered:
                raise TLSError(f"{where} does not offer STLS; refusing to log in without TLS",
                               hint="use the server's implicit-TLS port (995) without starttls, or ask the "
                                    "provider to enable TLS")
            pop.stls(context=tls_context(acc))
        else:
            pop = poplib.POP3_SSL(acc.host, acc.port, context=tls_context(acc), timeout=acc.timeout)
        check_pin(acc, pop.sock)
    except BaseException as exc:
        if pop is not None:
            with contextlib.suppress(Exception):
                pop.sock.close()
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, poplib.error_proto):
            exc = ConnectError(f"{where} did not greet like a POP3 server: {_text(exc)}",
                               hint="is this a POP3S port? POP3S is usually 995 (the IMAPS port answers * OK)")
        raise connect_errors(acc, exc) from None
    return pop


def pop3_attach(acc: Account, sock: socket.socket, pending: bytes = b"",
                deadline: Deadline | None = None) -> poplib.POP3:
    """A poplib.POP3 over a TLS connection opened by the caller (see imap_attach); poplib reads
    the greeting from pending. What it raises is passed on untranslated."""
    sock.settimeout(acc.timeout)
    return _AttachedPOP3(_Resumed(sock, pending, deadline), acc.host, acc.port, acc.timeout)


class _AttachedPOP3(poplib.POP3):
    def __init__(self, conn: _Resumed, host: str, port: int, timeout: float) -> None:
        self._attached = conn
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout):
        return self._attached


def pop3_capabilities(acc: Account, pop: poplib.POP3) -> Capabilities:
    """CAPA (RFC 2449); a server without it has none listed."""
    try:
        _, lines, _ = pop._longcmd("CAPA")
    except poplib.error_proto as exc:
        if _hung_up(exc):
            raise ConnectionLost(f"{_where(acc)} closed the connection during login",
                                 hint="run again; if it persists the server may limit connections") from None
        return Capabilities()
    except (OSError, EOFError) as exc:
        raise lost_during_login(acc, exc) from None
    return Capabilities.pop3(line.decode("ascii", "replace") for line in lines)


def pop3_authenticate(acc: Account, pop: poplib.POP3, caps: Capabilities, auth: Authenticator) -> Accepted:
    """Log in with what auth chooses: USER and PASS, or AUTH (SASL, RFC 5034). A refusal is
    an AuthError (exit 3) with a `.refusal`; nothing raised holds the secret."""
    where = _where(acc)
    try:
        step = auth.pop3(caps)
    except Unusable as exc:
        raise _unusable(acc, auth, exc) from None
    mask = _Mask(auth.secrets())
    try:
        if isinstance(step, Login):
            mechanism = "USER/PASS"
            pop.user(step.username)
            resp = pop.pass_(step.password)
        else:
            mechanism = f"AUTH {step.mechanism}"
            resp = _pop3_sasl(pop, step, mask)
    except poplib.error_proto as exc:
        if _hung_up(exc):
            raise ConnectionLost(f"{where} closed the connection during login",
                                 hint="run again; if it persists the server may limit connections") from None
        text = mask(_text(exc))
        status, _, rest = text.partition(" ") if text.startswith("-ERR") else ("", "", text)
        raise _refused(f"login as {auth.username} at {where} failed: {text}", auth.refused_hint("pop3"),
                       Refusal(status, rest, mechanism)) from None
    except (OSError, EOFError) as exc:
        raise lost_during_login(acc, exc) from None
    said = resp.decode("utf-8", "replace") if isinstance(resp, bytes) else str(resp)
    return Accepted(mechanism, mask(said.partition(" ")[2].strip()))


def _pop3_sasl(pop: poplib.POP3, step: Sasl, mask: _Mask) -> bytes:
    pop._putcmd(f"AUTH {step.mechanism}")
    while True:
        line, _ = pop._getline()
        if line.startswith(b"+OK"):
            return line
        if line == b"+" or line.startswith(b"+ "):
            pop._putline(_sasl_answer(step.respond, line[1:], mask))
            continue
        raise poplib.error_proto(line)


def _hung_up(exc: poplib.error_proto) -> bool:
    """poplib's own report of a connection the server closed (not something the server said)."""
    return _text(exc) == "-ERR EOF"


def pop3_login(acc: Account, credential: str | Authenticator) -> LoggedIn:
    """Connect (POP3S or STLS, pin), read CAPA, authenticate."""
    auth = credential if isinstance(credential, Authenticator) else authenticator(acc, credential)
    pop = pop3_connect(acc)
    try:
        caps = pop3_capabilities(acc, pop)
        done = pop3_authenticate(acc, pop, caps, auth)
    except BaseException:
        with contextlib.suppress(Exception):
            pop.sock.close()
        raise
    return LoggedIn(pop, caps, done.mechanism, done.said)


# -- both ------------------------------------------------------------------------------------------


@dataclass
class LoggedIn:
    """A logged-in connection: the library's client (IMAPClient or poplib.POP3), the capabilities
    it has now, how the credential was sent, and the server's answer."""

    client: IMAPClient | poplib.POP3
    caps: Capabilities
    mechanism: str
    said: str
    auth: Authenticator | None = field(default=None, repr=False)  # (log_in sets it)

    @property
    def valid_for(self) -> float | None:
        """Seconds the login's OAuth2 token has left when it was sent; None without a token."""
        return getattr(self.auth, "expires_in", None)


def log_in(acc: Account, credential: str | Authenticator, *, protocol: str | None = None) -> LoggedIn:
    """The one way in: connect, secure, check the pin, read the capabilities and authenticate, for
    acc's protocol (or the one given). credential: the secret (its Authenticator is chosen by the
    account, `authenticator`) or an Authenticator. An OAuth2 token the server refuses is replaced
    once (refreshed) and the login tried again on a new connection (not when the token source has
    no other token to give: the same token would only be refused again)."""
    protocol = protocol or acc.protocol
    login = pop3_login if protocol == "pop3" else imap_login
    auth = credential if isinstance(credential, Authenticator) else authenticator(acc, credential)
    try:
        return dataclasses.replace(login(acc, auth), auth=auth)
    except AuthError as exc:
        if not isinstance(auth, OAuth2Auth) or getattr(exc, "refusal", None) is None:
            raise
        auth.refused()
        again = authenticator(acc, "")
        if again.secrets() == auth.secrets():
            raise  # no other token to offer (token_command printed the same one): the answer would be the same
    return dataclasses.replace(login(acc, again), auth=again)


def _text(exc: BaseException) -> str:
    s = exc.args[0] if exc.args else ""
    if isinstance(s, bytes):
        s = s.decode("utf-8", "replace")
    else:
        s = str(exc)
        if s.startswith(("b'", 'b"')):
            s = s[2:-1]
    return s.strip() or type(exc).__name__
