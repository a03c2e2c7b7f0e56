"""A throwaway Dovecot (IMAPS + POP3S) on 127.0.0.1 with a test CA, for tests and the demo.

Runs as the current user: no root needed (as root, mail is owned by the `dovecot` user,
since Dovecot refuses to access mail as uid 0).
"""

from __future__ import annotations

import base64
import os
import grp
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path) -> None:
    """A test CA plus certificates signed by it: good (127.0.0.1/localhost), wrong host, expired."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "3650", "-subj", "/CN=mailsync test CA", cwd=d)
    for name, san, days in (("server", "DNS:localhost,IP:127.0.0.1", "3650"),
                            ("wronghost", "DNS:wrong.example", "3650")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={san.split(',')[0].split(':')[1]}", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", days, "-extfile", f"{name}.ext", cwd=d)


@dataclass
class Dovecot:
    root: Path
    users: dict[str, str] = field(default_factory=lambda: {"alice": "alice-secret", "bob": "bob-secret"})
    cert: str = "server"
    extra_conf: str = ""
    imaps_port: int = 0
    pop3s_port: int = 0
    imap_port: int = 0   # plaintext, STARTTLS required before login
    pop3_port: int = 0
    extra_listeners: dict[str, int] = field(default_factory=dict)
    # OAuth2 only: accept just XOAUTH2/OAUTHBEARER with HS256 JWTs signed with this key (see oauth2_key_file)
    oauth2_key: bytes | None = None
    # serve the mail store of another instance: its root (homes are <mail_root>/home/<user>)
    mail_root: Path | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()  # Dovecot reads paths relative to its own cwd
        if self.mail_root is not None:
            self.mail_root = Path(self.mail_root).resolve()

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def ca_file(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def homes(self) -> Path:
        return (self.mail_root or self.root) / "home"

    @property
    def oauth2_key_file(self) -> Path:
        """Where Dovecot's local JWT validation finds the HS256 key: <azp>/<alg>/<kid>, base64."""
        return self.root / "oauth2-keys" / "default" / "HS256" / "default"

    def maildir(self, user: str) -> Path:
        return self.homes / user / "Maildir"

    def _ids(self) -> tuple[int, int, str, str]:
        if os.getuid() == 0:
            pw = pwd.getpwnam("dovecot")
            return pw.pw_uid, pw.pw_gid, "root", "root"
        pw = pwd.getpwuid(os.getuid())
        return pw.pw_uid, pw.pw_gid, pw.pw_name, grp.getgrgid(os.getgid()).gr_name

    def write_config(self) -> None:
        uid, gid, me, group = self._ids()
        self.imaps_port = self.imaps_port or free_port()
        self.pop3s_port = self.pop3s_port or free_port()
        self.imap_port = self.imap_port or free_port()
        self.pop3_port = self.pop3_port or free_port()
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            self.root.chmod(0o755)  # the auth and mail processes run as `dovecot`
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        if not self.ca_file.exists():
            make_ca(self.root / "ca")
        # one passwd file per user: Dovecot re-reads it by mtime, which misses quick appends
        (self.root / "passwd.d").mkdir(exist_ok=True)
        for u, p in self.users.items():
            (self.root / "passwd.d" / u).write_text(f"{u}:{{PLAIN}}{p}::::::\n")
        for u in self.users:
            home = self.homes / u
            (home / "Maildir").mkdir(parents=True, exist_ok=True)
            if os.getuid() == 0:
                for p in (home, home / "Maildir"):
                    os.chown(p, uid, gid)
        internal = "" if os.getuid() == 0 else f"""
default_internal_user = {me}
default_internal_group = {group}
default_login_user = {me}
service anvil {{
  chroot =
}}"""
        chroot = "" if os.getuid() == 0 else "  chroot =\n"
        auth = f"""auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.root}/passwd.d/%u
}}"""
        if self.oauth2_key is not None:
            auth = self._write_oauth2(uid, gid)
        extra = ""
        for name, port in self.extra_listeners.items():
            extra += f"  inet_listener {name} {{\n    address = 127.0.0.1\n    port = {port}\n    ssl = yes\n  }}\n"
        self.conf.write_text(f"""
protocols = imap pop3
listen = 127.0.0.1
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.root}/dovecot.log
info_log_path = {self.root}/dovecot.log
ssl = required
ssl_cert = <{self.root}/ca/{self.cert}.pem
ssl_key = <{self.root}/ca/{self.cert}.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
{auth}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.homes}/%u
}}
first_valid_uid = 1
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox "Sent Items" {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox "Deleted Items" {{
    special_use = \\Trash
  }}
  mailbox Drafts {{
    special_use = \\Drafts
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
}}
pop3_uidl_format = %08Xu%08Xv
{internal}
service imap-login {{
{chroot}  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
{extra}}}
service pop3-login {{
{chroot}  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
protocol imap {{
  mail_max_userip_connections = 50
}}
{self.extra_conf}
""")

    def _write_oauth2(self, uid: int, gid: int) -> str:
        """The key and oauth2.conf.ext for bearer-token-only logins; returns the auth settings."""
        keys = self.root / "oauth2-keys"
        self.oauth2_key_file.parent.mkdir(parents=True, exist_ok=True)
        self.oauth2_key_file.write_bytes(base64.b64encode(self.oauth2_key or b""))
        # read by the auth process, which runs as the internal user (`dovecot` as root)
        for p in (keys, keys / "default", self.oauth2_key_file.parent):
            p.chmod(0o700)
        self.oauth2_key_file.chmod(0o600)
        if os.getuid() == 0:
            for p in (keys, keys / "default", self.oauth2_key_file.parent, self.oauth2_key_file):
                os.chown(p, uid, gid)
        ext = self.root / "oauth2.conf.ext"
        ext.write_text(f"""introspection_mode = local
local_validation_key_dict = fs:posix:prefix={keys}/
username_attribute = sub
""")
        ext.chmod(0o644)
        return f"""auth_mechanisms = xoauth2 oauthbearer
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {ext}
}}"""

    def start(self) -> "Dovecot":
        self.write_config()
        # stderr to a file, not a pipe: the daemon's children inherit it and a pipe never closes
        with open(self.root / "dovecot.stderr", "wb") as err:
            r = subprocess.run([DOVECOT, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=err, timeout=30)
        if r.returncode != 0:
            log = self.root / "dovecot.log"
            tail = log.read_text()[-500:] if log.exists() else ""
            msg = (self.root / "dovecot.stderr").read_text()[-500:]
            raise RuntimeError(f"dovecot failed to start: {msg} {tail}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.imaps_port), timeout=1):
                    with socket.create_connection(("127.0.0.1", self.pop3s_port), timeout=1):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"dovecot did not start; see {self.root}/dovecot.log")

    def stop(self) -> None:
        pid_file = self.root / "run" / "master.pid"
        if not pid_file.exists():
            return
        subprocess.run([DOVECOT, "-c", str(self.conf), "stop"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def add_user(self, name: str, password: str) -> Path:
        (self.root / "passwd.d" / name).write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        home = self.maildir(name)
        home.mkdir(parents=True, exist_ok=True)
        self._own(home.parent, home)
        return home

    def _own(self, *paths: Path) -> None:
        if os.getuid() == 0:
            uid, gid, _, _ = self._ids()
            for p in paths:
                os.chown(p, uid, gid)

    def seed(self, user: str, folder: str, messages: list[bytes], flags: str = "", start: int = 0) -> None:
        """Write messages straight into the user's server Maildir (fast), then let Dovecot index them.

        folder uses '/' as separator; flags are Maildir letters (e.g. "S" or "FS")."""
        from mailsync.utf7 import encode
        root = self.maildir(user)
        path = root if folder.upper() == "INBOX" else root / ("." + ".".join(encode(p) for p in folder.split("/")))
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
            self._own(path, path / sub)
        sub = "cur" if flags else "new"
        for i, data in enumerate(messages, start):
            name = f"{1700000000 + i}.seed{i}_{len(data)}.test" + (f":2,{flags}" if flags else "")
            p = path / sub / name
            p.write_bytes(data)
            self._own(p)
        self.doveadm("force-resync", "-u", user, folder if folder.upper() != "INBOX" else "INBOX")

    def doveadm(self, *args: str) -> str:
        r = subprocess.run([DOVEADM, "-c", str(self.conf), *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout
