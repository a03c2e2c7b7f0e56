"""Test helpers: mail users on the test Dovecot, seeding, running the real CLI."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from imapclient import IMAPClient

from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MailUser:
    server: Dovecot
    name: str
    password: str
    tmp: Path

    @classmethod
    def create(cls, server: Dovecot, name: str, tmp: Path) -> "MailUser":
        password = f"pw-{name}-S3cret!"
        tmp.mkdir(parents=True, exist_ok=True)
        server.add_user(name, password)
        u = cls(server, name, password, tmp)
        u.write_config()
        return u

    # -- config and CLI -----------------------------------------------------------------

    @property
    def maildir(self) -> Path:
        return self.tmp / "backup"

    @property
    def config(self) -> Path:
        return self.tmp / "config.toml"

    def write_config(self, extra: str = "", port: int | None = None, account: str = "test",
                     maildir: Path | None = None, ca: bool = True) -> Path:
        lines = [
            f"[accounts.{account}]",
            'host = "127.0.0.1"',
            f"port = {port or self.server.imaps_port}",
            f'username = "{self.name}"',
            'password_env = "MAILSYNC_TEST_PASSWORD"',
            f'maildir = "{maildir or self.maildir}"',
        ]
        if ca:
            lines.append(f'ca_file = "{self.server.ca_file}"')
        self.config.write_text("\n".join(lines) + "\n" + extra + "\n")
        return self.config

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MAILSYNC_CRASH_AT", None)
        env["MAILSYNC_TEST_PASSWORD"] = self.password
        env.update(extra)
        return env

    def run(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailsync", "--config", str(self.config), *args],
                              env=env or self.env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(self.config), *args],
                                env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)

    # -- the server side ----------------------------------------------------------------

    def imap(self) -> IMAPClient:
        ctx = ssl.create_default_context(cafile=str(self.server.ca_file))
        c = IMAPClient("127.0.0.1", port=self.server.imaps_port, ssl=True, ssl_context=ctx, timeout=30)
        c.login(self.name, self.password)
        return c

    def append(self, folder: str, messages: list[bytes], flags=(), create: bool = True) -> list[int]:
        c = self.imap()
        try:
            if create and folder.upper() != "INBOX" and not c.folder_exists(folder):
                c.create_folder(folder)
            uids = []
            for m in messages:
                r = c.append(folder, m, flags=flags)
                uids.append(int(r.split(b"]")[0].split()[-1]))
            return uids
        finally:
            c.logout()

    def server_messages(self) -> dict[str, dict[int, tuple[bytes, frozenset]]]:
        """folder -> uid -> (exact bytes from FETCH BODY.PEEK[], flags) for the whole account."""
        c = self.imap()
        out = {}
        try:
            for flags, _d, name in c.list_folders():
                if {f.lower() for f in flags} & {b"\\noselect", b"\\nonexistent"}:
                    continue
                c.select_folder(name, readonly=True)
                uids = c.search("ALL")
                data = c.fetch(uids, [b"BODY.PEEK[]", b"FLAGS"]) if uids else {}
                out[name] = {uid: (d[b"BODY[]"], frozenset(f.decode() for f in d[b"FLAGS"] if f != b"\\Recent"))
                             for uid, d in data.items()}
        finally:
            c.logout()
        return out


def local_files(root: Path) -> dict[Path, bytes]:
    """Every message file under a Maildir tree: path -> bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.basename(dirpath) in ("cur", "new"):
            for f in filenames:
                p = Path(dirpath) / f
                out[p] = p.read_bytes()
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def msg(n: int, body: str = "hello", subject: str | None = None, extra: str = "") -> bytes:
    subject = subject or f"message {n}"
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <m{n}.{os.getpid()}@example.com>\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n{extra}"
            f"\r\n{body} {n}\r\n").encode()
