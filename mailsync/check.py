"""`mailsync check`: walk through a connection step by step and say where and why it fails.

Steps, in order; the first failing step ends the check with its exit code (mailsync.errors):
  1. DNS          host name -> addresses                         (5)
  2. TCP          connect, time taken; --ports probes 143/110/993/995 first (info only)  (5)
  3. TLS          handshake verified as mailsync does it (ca_file, system store or a pin);
                  on failure: plaintext port? expired? wrong name? unknown CA?   (4; 5 on no answer)
  4. certificate  subject, issuer, names, expiry, SHA-256 fingerprint
  5. greeting     "* OK" / "+OK", then CAPABILITY / CAPA                     (6)
  6. login        only with a username and a password                        (3)
  7. latency      a few NOOPs (min/median), then LOGOUT / QUIT               (6)

Steps 1-4 and the greeting are check's own (to tell where and why a connection fails); then the
connection is handed to imaplib/poplib, and the capabilities and the login are login.py's steps,
run exactly as every other command runs them.

Every line goes through `emit` with a 5-character prefix: "ok   ", "FAIL ", "warn ", "info ".
A FAIL line is followed by one "  likely cause: ...; fix: ..." line. The password is sent to the
server and nowhere else: it is never printed, stored on the target, or put into an exception.
"""

from __future__ import annotations

import imaplib
import ipaddress
import poplib
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, NoReturn

from imapclient import IMAPClient

from mailsync import login
from mailsync.config import DEFAULT_PORTS, PROTOCOLS, Account
from mailsync.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    MailsyncError,
    ServerError,
    TLSError,
)
from mailsync.login import fingerprint_hex, pretty_fingerprint

DEFAULT_TIMEOUT = 20.0          # for `mailsync check HOST[:PORT]` (an account has its own timeout)
PROBE_PORTS = ((143, "IMAP, plaintext/STARTTLS"), (110, "POP3, plaintext/STARTTLS"),
               (993, "IMAPS, implicit TLS"), (995, "POP3S, implicit TLS"))
NOOPS = 5
EXPIRY_WARN_DAYS = 14

# OpenSSL X509_V_ERR_* codes (SSLCertVerificationError.verify_code)
_NOT_YET_VALID, _EXPIRED = 9, 10
_SELF_SIGNED, _SELF_SIGNED_IN_CHAIN = 18, 19
_UNKNOWN_ISSUER = (2, 20, 21)
_NAME_MISMATCH = (62, 63, 64)   # host name, e-mail, IP address mismatch


@dataclass
class CheckTarget:
    host: str
    port: int
    protocol: str = "imap"              # "imap" | "pop3"
    username: str | None = None
    ca_file: Path | None = None
    fingerprint: str | None = None      # normalised upper-case hex, as config.py stores it
    timeout: float = DEFAULT_TIMEOUT
    account: Account | None = field(default=None, compare=False, repr=False)  # where it came from (its auth)

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def target_from_account(acc) -> CheckTarget:
    return CheckTarget(host=acc.host, port=acc.port, protocol=acc.protocol, username=acc.username,
                       ca_file=acc.ca_file, fingerprint=acc.fingerprint, timeout=acc.timeout, account=acc)


def _account(t: CheckTarget) -> Account:
    """The target as the account login.py's steps take (no maildir, no password source)."""
    if t.account is not None:
        return t.account
    return Account(name="check", host=t.host, username=t.username or "", maildir=Path(), protocol=t.protocol,
                   port=t.port, ca_file=t.ca_file, fingerprint=t.fingerprint, timeout=t.timeout)


def target_from_hostport(text: str, protocol: str, *, timeout: float = DEFAULT_TIMEOUT) -> CheckTarget:
    """'host', 'host:port', '[v6addr]:port', '[v6addr]' or a bare IPv6 address; default port by protocol."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'", hint=f"use one of {', '.join(PROTOCOLS)}")
    s = text.strip()
    port_text: str | None = None
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"cannot read '{text}' as HOST[:PORT]", hint="write IPv6 addresses as [::1]:993")
        port_text = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port_text = s.split(":")
    else:
        host = s   # a name, an IPv4 address or a bare IPv6 address (several colons)
    if not host or any(c.isspace() or c in "/@[]" for c in host):
        raise ConfigError(f"cannot read '{text}' as HOST[:PORT]", hint="for example imap.example.com:993")
    if port_text is None:
        port = DEFAULT_PORTS[protocol]
    elif port_text.isdigit() and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise ConfigError(f"'{text}': the port must be a number from 1 to 65535, not '{port_text}'")
    return CheckTarget(host=host, port=port, protocol=protocol, timeout=timeout)


# -- output -------------------------------------------------------------------------------


class _Fail(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Out:
    def __init__(self, emit: Callable[[str], object]) -> None:
        self._emit = emit

    def _say(self, prefix: str, text: str) -> None:
        self._emit(prefix + text)

    def ok(self, text: str) -> None:
        self._say("ok   ", text)

    def warn(self, text: str) -> None:
        self._say("warn ", text)

    def info(self, text: str) -> None:
        self._say("info ", text)

    def fail(self, code: int, text: str, cause: str, fix: str) -> _Fail:
        self._say("FAIL ", text)
        self._say("  likely cause: ", f"{cause}; fix: {fix}")
        return _Fail(code)


def _server_text(data: bytes, limit: int = 160, secret: str | None = None) -> str:
    """Printable, one-line, bounded: the server chooses these bytes. A server that echoes the
    command it got (some do, in BAD answers) would echo the password: that is masked."""
    text = data.decode("utf-8", "replace")
    if secret:
        for form in (secret, secret.replace("\\", "\\\\").replace('"', '\\"')):
            text = text.replace(form, "***")
    text = "".join(c if c.isprintable() else "?" for c in text.strip())
    return text if len(text) <= limit else text[:limit] + "..."


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


# -- run --------------------------------------------------------------------------------------


def run_check(target: CheckTarget, password: str | None, *, ports: bool = False,
              emit: Callable[[str], object] = print) -> int:
    """Run the steps; one line per finding through emit; the exit code of the first failure, or 0."""
    out = _Out(emit)
    check = _Check(target, out)
    try:
        check.run(password, ports)
    except _Fail as f:
        return f.code
    finally:
        check.close()
    return 0


class _Check:
    def __init__(self, t: CheckTarget, out: _Out) -> None:
        self.t = t
        self.out = out
        self.acc = _account(t)   # what login.py's steps take
        self.tls: ssl.SSLSocket | None = None

    def close(self) -> None:
        if self.tls is not None:
            try:
                self.tls.close()
            except OSError:
                pass

    def run(self, password: str | None, ports: bool) -> None:
        t = self.t
        addrs = self.dns()
        if ports:
            self.probe_ports(addrs[0])
        raw, addr = self.tcp(addrs)
        self.tls = self.handshake(raw, addr)
        self.certificate(self.tls)
        conn = _Conn(self.tls, t.timeout)
        proto = (_Imap if t.protocol == "imap" else _Pop3)(conn, t, self.out, self.acc)
        proto.greeting()
        proto.capabilities()
        logged_in = False
        oauth = t.account is not None and t.account.auth == "oauth2"
        self.out.info("login mechanisms offered (SASL): " + (", ".join(sorted(proto.caps.sasl)) or "none"))
        if t.username and (password or oauth):
            proto.login(t.username, password or "")
            logged_in = True
        elif t.username:
            self.out.info(f"login not tried: no password given for {t.username}")
        else:
            self.out.info("login not tried: no username given")
        proto.latency(logged_in)
        proto.logout()
        self.out.ok("all checks passed" + ("" if logged_in else " (without login)"))

    # 1. DNS ------------------------------------------------------------------------------

    def dns(self) -> list[tuple]:
        t = self.t
        box: dict = {}

        def lookup() -> None:
            try:
                box["v"] = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                box["e"] = exc

        th = threading.Thread(target=lookup, daemon=True)
        th.start()
        th.join(t.timeout)
        if th.is_alive():
            raise self.out.fail(ConnectError.exit_code,
                                f"DNS: no answer for '{t.host}' within {t.timeout:g} s",
                                "the DNS server does not answer (no network, VPN or resolver problem)",
                                "check your network and DNS settings, then the host name")
        if "e" in box:
            exc = box["e"]
            why = getattr(exc, "strerror", None) or str(exc)
            raise self.out.fail(ConnectError.exit_code, f"DNS: cannot resolve '{t.host}' ({why})",
                                "a typo in the host name, a name that does not exist, or no DNS",
                                "check the host name (the provider documents it, e.g. imap.example.com)")
        infos, seen = [], set()
        for info in box["v"]:
            if info[4][0] not in seen:
                seen.add(info[4][0])
                infos.append(info)
        shown = ", ".join(i[4][0] for i in infos[:6]) + (" ..." if len(infos) > 6 else "")
        if _is_ip(t.host):
            self.out.ok(f"DNS: {t.host} is an IP address, no lookup needed")
        else:
            self.out.ok(f"DNS: {t.host} resolves to {shown}")
        return infos

    # 2. TCP --------------------------------------------------------------------------------

    def probe_ports(self, info: tuple) -> None:
        wait = min(self.t.timeout, 3.0)

        def probe(port: int) -> str:
            try:
                with socket.socket(info[0], info[1], info[2]) as s:
                    s.settimeout(wait)
                    s.connect((info[4][0], port) + tuple(info[4][2:]))
                return "open"
            except ConnectionRefusedError:
                return "closed (refused)"
            except TimeoutError:
                return f"closed (no answer within {wait:g} s: filtered?)"
            except OSError as exc:
                return f"closed ({exc.strerror or exc})"

        with ThreadPoolExecutor(max_workers=len(PROBE_PORTS)) as pool:
            results = list(pool.map(probe, [p for p, _ in PROBE_PORTS]))
        for (port, what), res in zip(PROBE_PORTS, results):
            self.out.info(f"port {port} ({what}): {res}")

    def connect(self, info: tuple, timeout: float) -> socket.socket:
        s = socket.socket(info[0], info[1], info[2])
        try:
            s.settimeout(timeout)
            s.connect(info[4])
        except BaseException:
            s.close()
            raise
        return s

    def tcp(self, infos: list[tuple]) -> tuple[socket.socket, tuple]:
        t = self.t
        errors: list[tuple[str, OSError]] = []
        for info in infos:
            addr = _addr_text(info[4][0], t.port)
            start = time.perf_counter()
            try:
                s = self.connect(info, t.timeout)
            except OSError as exc:
                errors.append((addr, exc))
                continue
            for where, exc in errors:   # an earlier address failed, a later one worked
                self.out.warn(f"TCP connect to {where} failed ({_os_reason(exc, t.timeout)}), "
                              "trying the next address")
            self.out.ok(f"TCP connect to {addr} in {_ms(time.perf_counter() - start)}")
            return s, info
        where, exc = errors[-1]
        why = "; ".join(f"{w}: {_os_reason(e, t.timeout)}" for w, e in errors) if len(errors) > 1 \
            else _os_reason(exc, t.timeout)
        code = ConnectError.exit_code
        if all(isinstance(e, ConnectionRefusedError) for _, e in errors):
            raise self.out.fail(code, f"TCP connect to {t.where}: {why}",
                                f"nothing listens on port {t.port}: wrong port, or the server is down",
                                "check the port (IMAPS is 993, POP3S 995) and that the server runs; "
                                "--ports probes the usual ports")
        if any(isinstance(e, TimeoutError) for _, e in errors):
            raise self.out.fail(code, f"TCP connect to {t.where}: {why}",
                                "a firewall drops the connection, or it is the wrong host",
                                "check host and port, your network/VPN and firewall; "
                                "raise timeout if the server is just slow")
        raise self.out.fail(code, f"TCP connect to {t.where}: {why}",
                            "no route to the server (network down, VPN, or an address this network cannot reach)",
                            "check your network connection, then the host name")

    # 3. TLS ---------------------------------------------------------------------------------

    def context(self) -> ssl.SSLContext:
        t = self.t
        # the very function mailsync uses, so the check verifies exactly as a sync does
        try:
            return login.tls_context(self.acc)
        except ConfigError:
            raise self.out.fail(ConfigError.exit_code, f"TLS: cannot load ca_file {t.ca_file}",
                                "the file is missing, unreadable or not a PEM certificate",
                                "point ca_file to the CA certificate in PEM form "
                                "(-----BEGIN CERTIFICATE-----)") from None

    def handshake(self, raw: socket.socket, info: tuple) -> ssl.SSLSocket:
        t = self.t
        try:
            ctx = self.context()
        except _Fail:
            raw.close()
            raise
        start = time.perf_counter()
        try:
            tls = ctx.wrap_socket(raw, server_hostname=t.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            self.certificate_refused(exc, info)
        except TimeoutError:
            raw.close()
            raise self.out.fail(ConnectError.exit_code,
                                f"TLS handshake with {t.where}: no answer within {t.timeout:g} s",
                                "the server accepted the connection but never answered TLS: wrong port "
                                "(a service that waits for the client), or a proxy/firewall in the way",
                                "check the port (IMAPS 993, POP3S 995); "
                                "raise timeout for very slow servers") from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            self.handshake_failed(exc, info)
        took = time.perf_counter() - start
        how = []
        if t.ca_file is not None:
            how.append(f"certificate verified with ca_file {t.ca_file}")
        elif not t.fingerprint:
            how.append("certificate verified with the system CA store")
        if t.fingerprint:
            how.append("pinned fingerprint checked below")
        self.out.ok(f"TLS handshake in {_ms(took)}: {tls.version()}, {tls.cipher()[0]}; {', '.join(how)}")
        return tls

    def handshake_failed(self, exc: BaseException, info: tuple) -> NoReturn:
        t = self.t
        reason = str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
        code = TLSError.exit_code
        up = reason.upper()
        # a TLS alert or version refusal: the server does speak TLS, no need to look for plaintext
        if "VERSION" in up and "WRONG" not in up or "UNSUPPORTED_PROTOCOL" in up or "NO_PROTOCOLS" in up:
            raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason})",
                                "the server offers only TLS older than 1.2, which mailsync refuses",
                                "ask the server admin to enable TLS 1.2 or 1.3")
        if "HANDSHAKE_FAILURE" in up or "NO_SHARED_CIPHER" in up or "INSUFFICIENT_SECURITY" in up:
            raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason})",
                                "no cipher or key type in common (a very old or very strict server)",
                                "ask the server admin; check that the port is IMAPS/POP3S")
        if "ALERT" in up:
            raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason})",
                                "the server rejected the handshake",
                                "check the port (IMAPS 993, POP3S 995); if it is right, ask the server admin")
        first = self.peek_plaintext(info)
        what = _plaintext_kind(first)
        if what:
            raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason}): "
                                      f"the server greets in plaintext: {_server_text(first, 80)!r}",
                                f"this is a plaintext port (143/110), {what}",
                                "use 993 (IMAPS) or 995 (POP3S): mailsync needs implicit TLS "
                                "and does not use STARTTLS")
        if first:
            raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason}); without TLS the "
                                      f"server says {_server_text(first, 80)!r}",
                                "this port runs another service, not IMAPS/POP3S",
                                "check the port (IMAPS 993, POP3S 995)")
        raise self.out.fail(code, f"TLS handshake with {t.where} failed ({reason})",
                            "not a TLS port, or the server closed the connection during the handshake",
                            "check the port (IMAPS 993, POP3S 995); if it is right, ask the server admin")

    def peek_plaintext(self, info: tuple) -> bytes:
        """The first bytes the server sends without TLS (IMAP/POP3/SMTP greet first), or b''."""
        try:
            with self.connect(info, min(self.t.timeout, 5.0)) as s:
                data = b""
                while b"\n" not in data and len(data) < 512:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                return data
        except OSError:
            return b""

    def fetch_certificate(self, info: tuple) -> bytes | None:
        """The server's certificate, fetched without verification (to explain why it was refused)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with self.connect(info, self.t.timeout) as raw, \
                    ctx.wrap_socket(raw, server_hostname=self.t.host) as s:
                return s.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return None

    def certificate_refused(self, exc: ssl.SSLCertVerificationError, info: tuple) -> NoReturn:
        t = self.t
        code = TLSError.exit_code
        why = exc.verify_message or str(exc)
        der = self.fetch_certificate(info)
        cert = _Cert.from_der(der) if der else None
        if cert:
            self.out.info(f"the certificate {t.where} shows (fetched without verification):")
            cert.show(self.out, t.host)
        pin = 'fingerprint = "sha256:' + (pretty_fingerprint(cert.fingerprint) if cert else "...") + '"'
        head = f"TLS: certificate of {t.where} not accepted ({why})"
        vc = exc.verify_code
        if vc == _EXPIRED:
            when = f" on {cert.not_after:%Y-%m-%d}" if cert and cert.not_after else ""
            raise self.out.fail(code, head, f"the certificate expired{when}",
                                "the server admin must renew it (also check this computer's clock: "
                                f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC); until then, only if you have "
                                f"checked the fingerprint with the provider, you can pin it: {pin}")
        if vc == _NOT_YET_VALID:
            when = f" (valid from {cert.not_before:%Y-%m-%d %H:%M} UTC)" if cert and cert.not_before else ""
            raise self.out.fail(code, head, f"the certificate is not valid yet{when}",
                                f"check this computer's clock and time zone "
                                f"(now {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
        if vc in _NAME_MISMATCH:
            names = cert.names if cert else []
            if names:
                fix = (f"use a host name the certificate lists: {', '.join(names)} "
                       f"(e.g. host = \"{_example_host(names)}\")")
            else:
                fix = "use the host name the provider documents"
            raise self.out.fail(code, head, f"the certificate is not issued for '{t.host}'"
                                + (f" but for {', '.join(names)}" if names else ""),
                                fix + f"; if this is the right server under another name, pin it: {pin}")
        if vc in (_SELF_SIGNED, _SELF_SIGNED_IN_CHAIN) + _UNKNOWN_ISSUER:
            self_signed = vc == _SELF_SIGNED or (cert is not None and cert.self_signed)
            if self_signed:
                cause = "the certificate is self-signed"
            else:
                issuer = f" ({cert.issuer})" if cert else ""
                cause = f"the certificate's issuer{issuer} is a CA this computer does not trust"
            if t.ca_file is not None:
                cause += f" and it is not the CA in ca_file {t.ca_file}"
                ca_fix = "set ca_file to the certificate of the CA that issued it"
            elif self_signed:
                ca_fix = "get the certificate from the server admin and set ca_file = \"/path/to/cert.pem\""
            else:
                ca_fix = "set ca_file = \"/path/to/ca.pem\" (the issuing CA's certificate, from the admin)"
            raise self.out.fail(code, head, cause,
                                f"{ca_fix}, or, if you trust this certificate (compare the fingerprint "
                                f"with the provider first), pin it: {pin}")
        raise self.out.fail(code, head, f"the certificate failed verification: {why}",
                            f"ask the server admin; if you trust this certificate, pin it: {pin}")

    # 4. certificate --------------------------------------------------------------------------

    def certificate(self, tls: ssl.SSLSocket) -> None:
        t = self.t
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise self.out.fail(TLSError.exit_code, f"TLS: {t.where} showed no certificate",
                                "a broken or anonymous TLS server", "ask the server admin")
        cert = _Cert.from_der(der)
        try:
            login.check_pin(self.acc, tls)   # the pin check every login makes
        except TLSError:
            cert.show(self.out, t.host)
            raise self.out.fail(TLSError.exit_code,
                                f"TLS: certificate of {t.where} does not match the pinned fingerprint: server shows "
                                f"SHA-256 {pretty_fingerprint(cert.fingerprint)}, pinned "
                                f"{pretty_fingerprint(t.fingerprint)}",
                                "the certificate was renewed or replaced, or someone intercepts the connection",
                                "confirm the new fingerprint with the provider, then set "
                                f'fingerprint = "sha256:{pretty_fingerprint(cert.fingerprint)}"') from None
        if t.fingerprint:
            self.out.ok("certificate matches the pinned fingerprint")
        cert.show(self.out, t.host, verified=True)


# -- certificates ---------------------------------------------------------------------------------

_NAME_KEYS = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
              "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress",
              "domainComponent": "DC"}


@dataclass
class _Cert:
    fingerprint: str                  # upper hex
    subject: str = "?"
    issuer: str = "?"
    common_names: tuple[str, ...] = ()
    sans: tuple[tuple[str, str], ...] = ()
    not_before: datetime | None = None
    not_after: datetime | None = None
    self_signed: bool = False

    @classmethod
    def from_der(cls, der: bytes) -> _Cert:
        c = cls(fingerprint=fingerprint_hex(der))
        d = _decode_der(der)
        if not d:
            return c
        c.subject, c.issuer = _dn(d.get("subject", ())), _dn(d.get("issuer", ()))
        c.self_signed = d.get("subject") == d.get("issuer")
        c.common_names = tuple(v for rdn in d.get("subject", ()) for k, v in rdn if k == "commonName")
        c.sans = tuple((k, v.strip()) for k, v in d.get("subjectAltName", ()))
        for attr, key in (("not_before", "notBefore"), ("not_after", "notAfter")):
            try:
                setattr(c, attr, datetime.fromtimestamp(ssl.cert_time_to_seconds(d[key]), UTC))
            except (KeyError, ValueError):
                pass
        return c

    @property
    def names(self) -> list[str]:
        """The names the certificate is valid for (SANs; the CN only when there are none)."""
        got = [v for k, v in self.sans if k in ("DNS", "IP Address")]
        return got or list(self.common_names)

    @property
    def days_left(self) -> int | None:
        if self.not_after is None:
            return None
        return int((self.not_after - datetime.now(UTC)).total_seconds() // 86400)

    def matches(self, host: str) -> bool | None:
        if not self.sans and not self.common_names:
            return None
        try:
            want = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            want = None
        for kind, value in self.sans:
            if want is not None and kind == "IP Address":
                try:
                    if ipaddress.ip_address(value) == want:
                        return True
                except ValueError:
                    pass
            elif want is None and kind == "DNS" and _dns_match(value, host):
                return True
        if not any(k == "DNS" for k, _ in self.sans) and want is None:
            return any(_dns_match(cn, host) for cn in self.common_names)
        return False

    def show(self, out: _Out, host: str, verified: bool = False) -> None:
        line = out.ok if verified else out.info
        line(f"certificate subject: {self.subject}")
        out.info(f"  issuer: {self.issuer}" + (" (self-signed)" if self.self_signed else ""))
        names = ", ".join(f"{'IP' if k == 'IP Address' else k}:{v}" for k, v in self.sans) or "none"
        out.info(f"  names (subjectAltName): {names}")
        if not verified and self.matches(host) is False:
            out.info(f"  '{host}' is not among these names")
        elif verified and self.matches(host) is False:
            out.warn(f"  '{host}' is not among these names (accepted because of the pinned fingerprint)")
        if self.not_before and self.not_after:
            left = self.days_left
            valid = f"valid {self.not_before:%Y-%m-%d} to {self.not_after:%Y-%m-%d %H:%M} UTC"
            if left is not None and left < 0:
                (out.warn if verified else out.info)(f"  {valid}: EXPIRED {-left} days ago")
            elif left is not None and left < EXPIRY_WARN_DAYS:
                out.warn(f"  {valid}: expires in {left} days; the server admin should renew it soon")
            else:
                (out.ok if verified else out.info)(f"  {valid} ({left} days left)")
        out.info(f"  SHA-256 fingerprint: {pretty_fingerprint(self.fingerprint)}")


def _decode_der(der: bytes) -> dict | None:
    """Decode a certificate into getpeercert()'s dict form without verifying it. Uses the ssl
    module's own decoder (private, but present since Python 2.7); None if unavailable."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".pem", prefix="mailsync-check-") as f:
            f.write(ssl.DER_cert_to_PEM_cert(der))
            f.flush()
            return decode(f.name)
    except (OSError, ValueError, ssl.SSLError):
        return None


def _dn(rdns) -> str:
    return ", ".join(f"{_NAME_KEYS.get(k, k)}={v}" for rdn in rdns for k, v in rdn) or "(empty)"


def _dns_match(pattern: str, host: str) -> bool:
    p, h = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if p.startswith("*."):
        return "." in h and h.split(".", 1)[1] == p[2:] and h.split(".", 1)[0] != ""
    return p == h


def _example_host(names: list[str]) -> str:
    for n in names:
        if not n.startswith("*."):
            return n
    return "mail." + names[0][2:]


# -- protocols ---------------------------------------------------------------------------------


class _Conn:
    """Line-oriented reads with a deadline per operation (so a trickling server cannot hang us),
    for the greeting; then the protocol library (imaplib, poplib) takes the connection over."""

    def __init__(self, sock: ssl.SSLSocket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.buf = b""

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def readline(self, deadline: float | None = None, limit: int = 1 << 20) -> bytes:
        deadline = deadline or time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise _Garbage(self.buf[:80])
            self._fill(deadline)
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def pending(self, line: bytes) -> bytes:
        """The line read last and whatever came after it: for the library to read again."""
        return line + b"\r\n" + self.buf


class _Garbage(Exception):
    pass


_LOST = (OSError, EOFError, ssl.SSLError, imaplib.IMAP4.abort)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError)


def _underlying(exc: BaseException) -> BaseException:
    """What a login.py error was translated from (raised `from None`, kept as its __context__)."""
    return (exc.__context__ or exc) if isinstance(exc, MailsyncError) else exc


def _exc_text(exc: BaseException) -> str:
    s = exc.args[0] if exc.args else ""
    if isinstance(s, bytes):
        return s.decode("utf-8", "replace").strip()
    return str(exc).strip() or type(exc).__name__


def _bare(message: str) -> str:
    """A login.py ConfigError's message without its "[accounts.NAME] " (check has no account)."""
    return message.split("] ", 1)[1] if message.startswith("[accounts.") and "] " in message else message


class _Proto:
    """The steps from the greeting on. The greeting is read here (to tell a wrong port from a
    wrong protocol); then imaplib or poplib takes the connection over through login.py, and the
    capabilities and the login are login.py's steps, exactly as every other command runs them."""

    name = ""
    other = ""

    def __init__(self, conn: _Conn, t: CheckTarget, out: _Out, acc: Account) -> None:
        self.conn, self.t, self.out, self.acc = conn, t, out, acc
        self.caps = login.Capabilities()
        self.greeted = b""                  # the greeting line, read again by the library
        self.deadline = login.Deadline(t.timeout)   # one per command, for the library's reads
        self.secret: str | None = None      # the password, once sent: masked in whatever the server says

    def text(self, data: bytes | str, limit: int = 160) -> str:
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        return _server_text(data, limit, self.secret)

    def lost(self, step: str, exc: BaseException) -> _Fail:
        t = self.t
        if _is_timeout(exc):
            return self.out.fail(ConnectionLost.exit_code, f"{step}: no answer from {t.where} within {t.timeout:g} s",
                                 "the server stalls (overloaded) or the network drops packets",
                                 "try again; raise timeout for a slow server")
        if isinstance(exc, _Garbage):
            return self.out.fail(ConnectionLost.exit_code, f"{step}: {t.where} sent no line breaks",
                                 f"the server accepted TLS but does not speak {self.name}: "
                                 "wrong protocol on this port?",
                                 "check the port (IMAPS 993, POP3S 995)")
        return self.out.fail(ConnectionLost.exit_code, f"{step}: connection to {t.where} lost ({_lost_reason(exc)})",
                             "the server closed the connection (it may limit connections, or crashed)",
                             "try again; if it persists, ask the server admin")

    def greeting(self) -> None:
        t = self.t
        code = ConnectionLost.exit_code
        try:
            line = self.conn.readline(limit=4096)
        except (_Garbage, *_LOST) as exc:
            if _is_timeout(exc) or isinstance(exc, _Garbage):
                what = (f"no greeting within {t.timeout:g} s" if _is_timeout(exc)
                        else "no greeting, only unreadable data")
                raise self.out.fail(code, f"greeting: {what} from {t.where}",
                                    f"the server accepted TLS but did not greet: wrong protocol on this port? "
                                    f"({self.name} servers greet at once)",
                                    "check the port (IMAPS 993, POP3S 995); an HTTPS port waits silently") from None
            raise self.out.fail(code, f"greeting: {t.where} closed the connection without greeting "
                                      f"({_lost_reason(exc)})",
                                "the server refuses this client (connection limit, blocklist) or is not "
                                f"{self.name}", "try again later; check the port") from None
        self.check_greeting(line)
        self.greeted = line

    def check_greeting(self, line: bytes) -> None:
        raise NotImplementedError

    def wrong_protocol(self, line: bytes) -> _Fail:
        t = self.t
        other_port = {"IMAP": 993, "POP3": 995}[self.other]
        flag = "drop --pop3" if self.other == "IMAP" else "use --pop3"
        return self.out.fail(ConnectionLost.exit_code,
                             f"greeting: {t.where} is a {self.other} server, not {self.name}: "
                             f"{_server_text(line, 80)!r}",
                             f"the port is for {self.other} (usually {other_port})",
                             f"set protocol = \"{self.other.lower()}\" (on the command line: {flag}), "
                             f"or use the {self.name} port ({DEFAULT_PORTS[self.name.lower()]})")

    def garbage(self, line: bytes) -> _Fail:
        return self.out.fail(ConnectionLost.exit_code,
                             f"greeting: {self.t.where} answered {_server_text(line, 80)!r}, "
                             f"not a {self.name} greeting",
                             "the server accepted TLS but did not greet: wrong protocol on this port?",
                             "check the port (IMAPS 993, POP3S 995)")

    def authenticate(self, authenticate, username: str, password: str, service: str, setting: str) -> None:
        """login.py's authentication step for this protocol (authenticate: login.imap_authenticate
        or login.pop3_authenticate), reported as one line."""
        self.secret = password
        auth = self.authenticator(password)
        self.deadline.start()
        try:
            try:
                done = authenticate(self.acc, self.client, self.caps, auth)
            except AuthError as exc:
                if not isinstance(auth, login.OAuth2Auth) or getattr(exc, "refusal", None) is None:
                    raise
                # as every other command does (login.log_in): the refused token is replaced once
                # (refreshed, or token_command run again) and the login tried again
                auth.refused()
                again = self.authenticator(password)
                if again.secrets() == auth.secrets():
                    raise  # no other token to offer: the answer would be the same
                self.out.info(f"the access token was refused ({self.text(exc.refusal.said)}); "
                              "trying once more with a new one")
                auth = again
                self.deadline.start()
                done = authenticate(self.acc, self.client, self.caps, auth)
        except MailsyncError as exc:
            if isinstance(auth, login.OAuth2Auth):  # not a password: say what an OAuth2 refusal means
                get = ("check that token_command prints a token for " + username if auth.from_command
                       else f"run `mailsync auth {auth.name}` and sign in as {username}")
                raise self.login_failed(exc, username,
                                        f"the token is for another account or lacks consent for the {service} scope, "
                                        f"or {service} access is disabled for the mailbox",
                                        f"{get}; enable {service} for the mailbox (docs/oauth2.md)") from None
            raise self.login_failed(exc, username,
                                    f"wrong username or password, or {service} access disabled at the provider "
                                    f"(some need an app password or {setting} in settings)",
                                    "check username and password with a mail client or webmail, create an app "
                                    f"password, enable {service} in the provider's settings") from None
        self.out.ok(f"login as {username} ({done.mechanism}): {self.text(done.said)}")

    def authenticator(self, password: str) -> login.Authenticator:
        try:
            return login.authenticator(self.acc, password)  # (OAuth2: gets a token, refreshed if need be)
        except MailsyncError as exc:
            raise self.out.fail(exc.exit_code, f"login: {_bare(exc.message)}",
                                "the OAuth2 access token could not be obtained", exc.hint or "see docs/oauth2.md") from None

    def login_failed(self, exc: MailsyncError, username: str, cause: str, fix: str) -> _Fail:
        """login.py's answer to a failed login, in check's words (FAIL line, cause, fix)."""
        if isinstance(exc, (ConnectError, ConnectionLost)):
            return self.lost("login", _underlying(exc))
        if isinstance(exc, ConfigError):
            return self.out.fail(ConfigError.exit_code, f"login: {_bare(exc.message)}", "a copy-and-paste error "
                                 "or a broken password source", exc.hint or "check the password")
        refusal = getattr(exc, "refusal", None)
        if refusal is None:  # no way in at all (LOGINDISABLED without AUTH=PLAIN, PREAUTH)
            return self.out.fail(AuthError.exit_code, exc.message,
                                 "the server does not allow password login (on this port)",
                                 exc.hint or "ask the provider how to enable access")
        if "[UNAVAILABLE]" in refusal.said.upper():
            cause, fix = "the server's login service is temporarily unavailable", "try again later"
        return self.out.fail(AuthError.exit_code, f"login as {username} at {self.t.where} failed: "
                             f"{refusal.status} {self.text(refusal.said)}".rstrip(), cause, fix)

    SEP = " "
    SHOWN: ClassVar[tuple[str, ...]] = ()
    MISSING: ClassVar[dict[str, tuple[str, str]]] = {}   # capability -> (warn|info, what its absence means)

    def show_caps(self, label: str, before_login: bool) -> None:
        self.out.ok(f"{label}: {self.text(self.SEP.join(self.caps.listed), 10_000) or '(none)'}")
        parts = [f"{name} {'yes' if name in self.caps else 'no'}" for name in self.SHOWN]
        note = " (before login; servers often list more after login)" if before_login else ""
        self.out.info(", ".join(parts) + note)
        if not before_login:
            for name, (level, why) in self.MISSING.items():
                if name not in self.caps:
                    (self.out.warn if level == "warn" else self.out.info)(why)


class _Imap(_Proto):
    name, other = "IMAP", "POP3"
    SHOWN = ("CONDSTORE", "QRESYNC", "UIDPLUS")
    MISSING: ClassVar[dict[str, tuple[str, str]]] = {
        "CONDSTORE": ("info", "no CONDSTORE: mailsync works, but fetches every message's flags on each run"),
        "QRESYNC": ("info", "no QRESYNC: mailsync lists all UIDs to find deletions (slower on big folders)"),
        "UIDPLUS": ("info", ("no UIDPLUS: mailsync finds uploaded messages by Message-ID and expunges only "
                             "when no other message is marked \\Deleted")),
    }
    client: IMAPClient

    def check_greeting(self, line: bytes) -> None:
        up = line[:12].upper()
        if up.startswith(b"* OK"):
            self.out.ok(f"greeting: {_server_text(line)}")
        elif up.startswith(b"* PREAUTH"):
            self.out.ok(f"greeting (already authenticated): {_server_text(line)}")
        elif up.startswith(b"* BYE"):
            raise self.out.fail(ConnectionLost.exit_code, f"greeting: {self.t.where} refuses: {_server_text(line)}",
                                "the server is busy, limits connections, or blocks this address",
                                "try again later; if it persists, ask the server admin")
        elif up.startswith((b"+OK", b"-ERR")):
            raise self.wrong_protocol(line)
        else:
            raise self.garbage(line)

    def not_imap(self, step: str, exc: BaseException) -> _Fail:
        return self.out.fail(ConnectionLost.exit_code, f"{step}: {self.text(_exc_text(exc))}",
                             "the server does not speak IMAP properly", "check the port; ask the server admin")

    def capabilities(self) -> None:
        self.deadline.start()
        try:   # imaplib reads the greeting again, then asks CAPABILITY
            self.client = login.imap_attach(self.acc, self.conn.sock, self.conn.pending(self.greeted),
                                            self.deadline)
        except _LOST as exc:
            raise self.lost("capabilities", exc) from None
        except imaplib.IMAP4.error as exc:
            raise self.not_imap("capabilities", exc) from None
        self.caps = login.imap_capabilities(self.client)
        self.show_caps("capabilities", before_login=True)

    def login(self, username: str, password: str) -> None:
        self.authenticate(login.imap_authenticate, username, password, "IMAP", "IMAP enabled")
        self.deadline.start()
        try:
            self.caps = login.imap_capabilities_after_login(self.acc, self.client)
        except (ConnectError, ConnectionLost) as exc:
            raise self.lost("capabilities after login", _underlying(exc)) from None
        except ServerError as exc:
            raise self.not_imap("capabilities after login", exc) from None
        self.show_caps("capabilities after login", before_login=False)

    def latency(self, logged_in: bool) -> None:
        times = []
        for _ in range(NOOPS):
            start = time.perf_counter()
            self.deadline.start()
            try:
                typ, data = self.client._imap.noop()
            except _LOST as exc:
                raise self.lost("latency", exc) from None
            except imaplib.IMAP4.error as exc:
                raise self.not_imap("latency: NOOP", exc) from None
            times.append(time.perf_counter() - start)
            if typ != "OK":
                raise self.out.fail(ConnectionLost.exit_code,
                                    f"latency: NOOP answered {typ} {self.text(data[-1] if data else b'')}",
                                    "the server does not speak IMAP properly", "ask the server admin")
        _show_latency(self.out, "NOOP", times)

    def logout(self) -> None:
        self.deadline.start()
        try:
            typ, data = self.client._imap.logout()
        except _LOST as exc:
            raise self.lost("logout", exc) from None
        except imaplib.IMAP4.error as exc:
            typ, data = "BAD", [_exc_text(exc)]
        if typ in ("OK", "BYE"):
            self.out.ok("logout")
        else:
            self.out.warn(f"logout answered {typ} {self.text(data[-1] if data else b'')}")


class _Pop3(_Proto):
    name, other = "POP3", "IMAP"
    SEP = ", "
    SHOWN = ("UIDL", "TOP", "USER")
    MISSING: ClassVar[dict[str, tuple[str, str]]] = {
        "UIDL": ("warn", ("no UIDL: the server cannot name messages across sessions, so mailsync "
                          "cannot tell which ones it already has"))}
    client: poplib.POP3

    def check_greeting(self, line: bytes) -> None:
        up = line[:6].upper()
        if up.startswith(b"+OK"):
            self.out.ok(f"greeting: {_server_text(line)}")
        elif up.startswith(b"-ERR"):
            raise self.out.fail(ConnectionLost.exit_code, f"greeting: {self.t.where} refuses: {_server_text(line)}",
                                "the server is busy, limits connections, or blocks this address",
                                "try again later; if it persists, ask the server admin")
        elif up.startswith(b"* "):
            raise self.wrong_protocol(line)
        else:
            raise self.garbage(line)

    def refused(self, step: str, exc: poplib.error_proto) -> _Fail:
        text = _exc_text(exc)
        if text == "-ERR EOF":   # poplib's word for a connection the server closed
            return self.lost(step, EOFError("the server closed the connection"))
        return self.out.fail(ConnectionLost.exit_code, f"{step} answered {self.text(text)}",
                             "the server does not speak POP3 properly", "check the port; ask the server admin")

    def capabilities(self) -> None:
        self.deadline.start()
        try:   # poplib reads the greeting again; then CAPA
            self.client = login.pop3_attach(self.acc, self.conn.sock, self.conn.pending(self.greeted),
                                            self.deadline)
            self.caps = login.pop3_capabilities(self.acc, self.client)
        except (ConnectError, ConnectionLost) as exc:
            raise self.lost("capabilities", _underlying(exc)) from None
        except _LOST as exc:
            raise self.lost("capabilities", exc) from None
        except poplib.error_proto as exc:
            raise self.refused("capabilities", exc) from None
        if not self.caps.listed:
            self.out.warn("the server does not answer CAPA: cannot tell whether it has UIDL")
            return
        self.show_caps("capabilities", before_login=False)

    def login(self, username: str, password: str) -> None:
        self.authenticate(login.pop3_authenticate, username, password, "POP3", "POP enabled")
        self.deadline.start()
        try:
            count, size = self.client.stat()
            self.out.info(f"mailbox: {count} messages, {size:,} bytes")
        except (poplib.error_proto, ValueError, IndexError):
            pass
        except _LOST as exc:
            raise self.lost("login", exc) from None

    def latency(self, logged_in: bool) -> None:
        # NOOP exists only after login (TRANSACTION state); before it, CAPA is the cheapest round trip
        cmd = "NOOP" if logged_in else "CAPA"
        times = []
        for _ in range(NOOPS):
            start = time.perf_counter()
            self.deadline.start()
            try:
                if logged_in:
                    self.client.noop()
                else:
                    self.client._longcmd("CAPA")
            except poplib.error_proto as exc:
                raise self.refused(f"latency: {cmd}", exc) from None
            except _LOST as exc:
                raise self.lost("latency", exc) from None
            times.append(time.perf_counter() - start)
        _show_latency(self.out, cmd, times)

    def logout(self) -> None:
        self.deadline.start()
        try:
            self.client.quit()
        except poplib.error_proto as exc:
            self.out.warn(f"QUIT answered {self.text(_exc_text(exc))}")
            return
        except _LOST as exc:
            raise self.lost("logout", exc) from None
        self.out.ok("logout")


def _show_latency(out: _Out, cmd: str, times: list[float]) -> None:
    med = statistics.median(times)
    line = f"round trip ({len(times)} x {cmd}): min {_ms(min(times))}, median {_ms(med)}"
    if med > 1.0:
        out.warn(line + ": slow; a sync of many small messages will take long")
    else:
        out.ok(line)


# -- helpers -------------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _addr_text(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _os_reason(exc: OSError, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if _is_timeout(exc):
        return f"no answer within {timeout:g} s (timed out)"
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def _lost_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(getattr(exc, "reason", None) or exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _plaintext_kind(first: bytes) -> str:
    up = first[:16].upper()
    if up.startswith((b"* OK", b"* PREAUTH", b"* BYE")):
        return "it greets like plaintext IMAP"
    if up.startswith((b"+OK", b"-ERR")):
        return "it greets like plaintext POP3"
    return ""


__all__ = ["CheckTarget", "run_check", "target_from_account", "target_from_hostport"]
