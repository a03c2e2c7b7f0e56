"""Small loopback endpoints for fault injection (never a stand-in for the real Dovecot):
a TCP proxy that cuts the connection, a server that never answers, a plaintext listener,
and a TLS listener with a certificate of our choosing."""

from __future__ import annotations

import datetime
import selectors
import socket
import ssl
import threading
from pathlib import Path


class _Listener:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.closing = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.conns.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closing.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Silent(_Listener):
    """Accepts and never says a word."""

    def handle(self, conn: socket.socket) -> None:
        self.closing.wait(60)


class Plaintext(_Listener):
    """An IMAP greeting in plaintext, as on port 143 (optionally without STARTTLS)."""

    def __init__(self, starttls: bool = True) -> None:
        self.caps = b"IMAP4rev1 STARTTLS" if starttls else b"IMAP4rev1 AUTH=PLAIN"
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b"* OK [CAPABILITY " + self.caps + b"] plaintext server ready\r\n")
            conn.settimeout(10)
            f = conn.makefile("rb")
            while not self.closing.is_set():
                line = f.readline(4096)
                if not line:
                    return
                tag, _, cmd = line.strip().partition(b" ")
                if cmd.upper().startswith(b"CAPABILITY"):
                    conn.sendall(b"* CAPABILITY " + self.caps + b"\r\n" + tag + b" OK done\r\n")
                elif cmd.upper().startswith(b"LOGOUT"):
                    conn.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    return
                else:
                    conn.sendall(tag + b" BAD not here\r\n")
        except OSError:
            pass


class TlsGreeter(_Listener):
    """Completes a TLS handshake with the given certificate, then greets like IMAP."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"* OK IMAP4rev1 ready\r\n")
                self.closing.wait(5)
        except (OSError, ssl.SSLError):
            pass


class CutProxy(_Listener):
    """Forwards to 127.0.0.1:target; the first `cut_connections` connections are cut once
    `cut_after` bytes have passed in `direction`: "down" (from the server, the default), "up"
    (from the client: its commands and uploads) or "both" (the two added up, in the order they
    pass). Exactly `cut_after` counted bytes are forwarded, then both sides are closed.
    direction="reply" lets the client's bytes through and cuts before the first byte the server
    sends once `cut_after` bytes have gone up: the server has done what it was asked (an APPEND
    whose literal ended past `cut_after` is stored), the client never hears the answer. Later
    connections pass untouched.

    `cuts` counts the cuts made; `cut_points` holds (connection number, bytes up, bytes down) as
    forwarded at each cut; `traffic` holds each connection's [bytes up, bytes down] so far, and
    `chunks` its ("up"|"down", size) reads in order (a pass with cut_connections=0 measures a run)."""

    DIRECTIONS = ("down", "up", "both", "reply")

    def __init__(self, target: int, cut_after: int, cut_connections: int = 1, direction: str = "down") -> None:
        if direction not in self.DIRECTIONS:
            raise ValueError(f"direction must be one of {self.DIRECTIONS}, not {direction!r}")
        self.target = target
        self.cut_after = cut_after
        self.cuts_left = cut_connections
        self.direction = direction
        self.cuts = 0
        self.cut_points: list[tuple[int, int, int]] = []
        self.traffic: list[list[int]] = []
        self.chunks: list[list[tuple[str, int]]] = []
        self._lock = threading.Lock()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            cut = self.cuts_left > 0
            self.cuts_left -= 1
            number = len(self.traffic)
            moved = [0, 0]  # bytes forwarded up, down
            self.traffic.append(moved)
            chunks: list[tuple[str, int]] = []
            self.chunks.append(chunks)
        try:
            up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            conn.close()
            return
        self.conns.append(up)
        done = threading.Event()   # either side ended: close both
        severed = threading.Event()  # the cut was made: nothing more passes either way
        limit = self.cut_after if cut else None

        def room(way: str) -> int | None:
            """Bytes from `way` that may still pass before the cut (None: no cut ahead)."""
            if limit is None:
                return None
            if self.direction == "reply":
                return 0 if way == "down" and moved[0] >= limit else None
            if self.direction not in (way, "both"):
                return None
            counted = {"up": moved[0], "down": moved[1], "both": moved[0] + moved[1]}[self.direction]
            return max(limit - counted, 0)

        def pump(src, dst, way: str):
            side = 0 if way == "up" else 1
            try:
                while not done.is_set():
                    data = src.recv(65536)
                    if not data:
                        break
                    with self._lock:  # the two pumps share the count: one decision at a time
                        if severed.is_set():
                            break
                        chunks.append((way, len(data)))
                        left = room(way)
                        last = left is not None and len(data) >= left
                        if last:
                            data = data[:left]
                            severed.set()
                        moved[side] += len(data)
                        if last:
                            self.cuts += 1
                            self.cut_points.append((number, moved[0], moved[1]))
                    dst.sendall(data)  # outside the lock: a slow reader must not stall the other way
                    if last:
                        break
            except OSError:
                pass
            finally:
                done.set()
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

        threading.Thread(target=pump, args=(conn, up, "up"), daemon=True).start()
        pump(up, conn, "down")


def make_cert(dirpath: Path, ca_cert: Path, ca_key: Path, name: str, *, hosts: list[str],
              expired: bool = False) -> tuple[Path, Path]:
    """A certificate signed by the test CA (optionally expired), via the cryptography package."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    cakey = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired \
        else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(cakey, hashes.SHA256()))
    cp, kp = dirpath / f"{name}.pem", dirpath / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


class Pop3NoUidl(_Listener):
    """A minimal POP3S server without UIDL (for the one case Dovecot cannot be configured to):
    USER/PASS, STAT, LIST, TOP, RETR, DELE, QUIT over TLS."""

    def __init__(self, cert: Path, key: Path, messages: list[bytes], password: str = "pw") -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.messages = list(messages)
        self.password = password
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                f = s.makefile("rb")
                s.sendall(b"+OK test POP3 without UIDL\r\n")
                deleted: set[int] = set()
                while not self.closing.is_set():
                    line = f.readline(4096)
                    if not line:
                        return
                    cmd, _, arg = line.strip().decode().partition(" ")
                    cmd = cmd.upper()
                    if cmd == "USER":
                        s.sendall(b"+OK\r\n")
                    elif cmd == "PASS":
                        s.sendall(b"+OK\r\n" if arg == self.password else b"-ERR [AUTH] bad password\r\n")
                    elif cmd == "STAT":
                        s.sendall(b"+OK %d %d\r\n" % (len(self.messages), sum(map(len, self.messages))))
                    elif cmd == "LIST":
                        body = b"".join(b"%d %d\r\n" % (i + 1, len(m)) for i, m in enumerate(self.messages)
                                        if i + 1 not in deleted)
                        s.sendall(b"+OK\r\n" + body + b".\r\n")
                    elif cmd in ("RETR", "TOP"):
                        n = int(arg.split()[0])
                        m = self.messages[n - 1]
                        if cmd == "TOP":
                            m = m.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                        stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln)
                                           for ln in m.splitlines(keepends=True))
                        s.sendall(b"+OK\r\n" + stuffed + b".\r\n")
                    elif cmd == "DELE":
                        deleted.add(int(arg))
                        s.sendall(b"+OK\r\n")
                    elif cmd == "QUIT":
                        for n in sorted(deleted, reverse=True):
                            del self.messages[n - 1]
                        s.sendall(b"+OK bye\r\n")
                        return
                    else:
                        s.sendall(b"-ERR unknown command\r\n")
        except (OSError, ssl.SSLError, ValueError):
            pass


class ThrottleProxy(_Listener):
    """A provider that throttles, as Office 365 does: a TLS endpoint (the test CA's server
    certificate) forwarding to the real Dovecot's IMAPS port, which answers the first folder
    command (SELECT, EXAMINE or STATUS) of its first `throttled` connections itself with
    `NO [THROTTLED] Request is throttled. Suggested Backoff Time: N milliseconds`; everything
    else passes through. `refused` counts the answers it made up."""

    COMMANDS = (b"SELECT", b"EXAMINE", b"STATUS")

    def __init__(self, target: int, cert: Path, key: Path, *, throttled: int = 1, backoff_ms: int = 1500) -> None:
        self.target, self.throttled_left, self.backoff_ms = target, throttled, backoff_ms
        self.refused = 0
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self._lock = threading.Lock()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            throttle = self.throttled_left > 0
            self.throttled_left -= 1
        client_ctx = ssl.create_default_context()
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        try:
            down = self.ctx.wrap_socket(conn, server_side=True)
            up = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.target), timeout=10))
        except (OSError, ssl.SSLError):
            conn.close()
            return
        self.conns += [down, up]
        lock = threading.Lock()  # one writer at a time toward the client

        def to_client() -> None:
            try:
                while data := up.recv(65536):
                    with lock:
                        down.sendall(data)
            except OSError:
                pass
            finally:
                _close(down, up)

        threading.Thread(target=to_client, daemon=True).start()
        pending = b""
        try:
            while data := down.recv(65536):
                if not throttle:
                    up.sendall(data)
                    continue
                pending += data
                while b"\r\n" in pending and throttle:
                    line, pending = pending.split(b"\r\n", 1)
                    words = line.split(b" ", 2)
                    if len(words) > 1 and words[1].upper() in self.COMMANDS:
                        throttle = False
                        with self._lock:
                            self.refused += 1
                        with lock:
                            down.sendall(words[0] + b" NO [THROTTLED] Request is throttled. Suggested Backoff Time: "
                                         + str(self.backoff_ms).encode() + b" milliseconds\r\n")
                    else:
                        up.sendall(line + b"\r\n")
                if not throttle and pending:
                    up.sendall(pending)
                    pending = b""
        except OSError:
            pass
        finally:
            _close(down, up)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


class QuietCutProxy(_Listener):
    """Forwards to 127.0.0.1:target and cuts a connection on which nothing passed, either way, for
    `quiet` seconds: what a NAT box or a firewall does to a quiet connection (a long IDLE).
    `cuts` counts the connections it cut."""

    def __init__(self, target: int, quiet: float) -> None:
        self.target, self.quiet = target, quiet
        self.cuts = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            conn.close()
            return
        self.conns.append(up)
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, conn)
        try:
            while not self.closing.is_set():
                ready = sel.select(self.quiet)
                if not ready:
                    self.cuts += 1
                    break
                for key, _ in ready:
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            _close(conn, up)
