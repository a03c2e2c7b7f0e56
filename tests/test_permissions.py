"""Permission denied and a read-only file system: exit 8 with one line naming the path and what to
do, no traceback, nothing half written, the state not ahead of the files; after the permissions
are fixed the next run completes with every message exactly once.

Root is not stopped by file permissions, so the failing run is started where they apply: as a
normal user directly; as root in a new user namespace that does not map root (`unshare -U`: the
files' owner is no longer privileged there), or, where no user namespace can be made, as
`nobody` (`setpriv`, on files given to nobody). MAILSYNC_TEST_PRIVDROP=setpriv forces the last.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, MailUser, msg
from tests.test_kill_sweep import as_backup, local_state, server_state, state_not_ahead, tmp_files, visible_ok

NOBODY = 65534


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


class Unprivileged:
    """A command prefix under which file permissions apply to mailsync."""

    def __init__(self) -> None:
        self.uid = None
        forced = os.environ.get("MAILSYNC_TEST_PRIVDROP")
        if os.geteuid() != 0:
            self.prefix: list[str] = []
        elif forced != "setpriv" and _works(["unshare", "-U", "true"]):
            self.prefix = ["unshare", "-U"]
        else:
            self.prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            if not _works([*self.prefix, sys.executable, "-c", "import mailsync.cli"]):
                pytest.skip("running as root with neither a user namespace (unshare -U) nor a Python and "
                            "checkout that nobody can read (setpriv): file permissions cannot be made to apply")
            self.uid = NOBODY

    def own(self, path: Path) -> None:
        """Give a tree to the user the run is started as (setpriv only)."""
        if self.uid is None:
            return
        for dirpath, dirs, files in os.walk(path):
            os.chown(dirpath, self.uid, self.uid)
            for f in files:
                os.chown(os.path.join(dirpath, f), self.uid, self.uid)


def mailsync(u: MailUser, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "mailsync", "--config", str(u.config), "sync", "test"],
                          env=u.env(), capture_output=True, text=True, timeout=120, cwd=ROOT)


def error_line(r, path: str) -> str:
    assert r.returncode == 8, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("mailsync: error")]
    assert len(lines) == 1, r.stderr
    assert path in lines[0], (path, lines[0])
    return lines[0]


def says_how_to_fix(line: str) -> bool:
    _, sep, hint = line.partition("; ")
    return bool(sep) and "move it aside" not in line and bool(
        re.search(r"owner|permission|writable|read-only|chmod|chown", hint, re.I))


# name -> (the path to take away (relative to the Maildir), its mode; what the error line names)
SCENARIOS = {
    "maildir, first run": ("", 0o500, ".mailsync.lock"),
    "maildir": ("", 0o500, ".mailsync.db"),
    "state file": (".mailsync.db", 0o400, ".mailsync.db"),
    "INBOX tmp/": ("tmp", 0o500, "tmp/"),
    "INBOX new/": ("new", 0o500, "new"),
    "Work tmp/": (".Work/tmp", 0o500, ".Work/tmp/"),
}


def test_permission_denied_then_fixed(user):
    unpriv = Unprivileged()
    user.server.seed(user.name, "INBOX", [msg(i, "p" * 3000) for i in range(10)])
    user.server.seed(user.name, "Work", [msg(100 + i, "p" * 3000) for i in range(5)])
    base = Path(tempfile.mkdtemp(prefix="mailsync-perm-"))  # not under pytest's 0700 tmp: nobody needs in
    base.chmod(0o755)
    try:
        first = MailUser(user.server, user.name, user.password, base / "first")
        first.tmp.mkdir()
        first.write_config("connections = 1")
        r = mailsync(first)
        assert r.returncode == 0, r.stderr
        # new mail in both folders: every run below has something to store
        user.append("INBOX", [msg(50, "q" * 3000), msg(51, "q" * 3000)])
        user.append("Work", [msg(150, "q" * 3000), msg(151, "q" * 3000)])
        server = user.server_messages()
        want = server_state(user)
        allowed = {h for items in want.values() for h, _ in items}
        for i, (name, (rel, mode, named)) in enumerate(SCENARIOS.items()):
            u = MailUser(user.server, user.name, user.password, base / f"s{i}")
            u.tmp.mkdir()
            u.write_config("connections = 1")
            if name.endswith("first run"):
                u.maildir.mkdir()
            else:
                shutil.copytree(first.maildir, u.maildir)
            unpriv.own(u.tmp)
            target = u.maildir / rel
            old = target.stat().st_mode & 0o777
            target.chmod(mode)
            try:
                r = mailsync(u, unpriv.prefix)
            finally:
                target.chmod(old)
            line = error_line(r, str(u.maildir / named.rstrip("/")))
            assert "Permission denied" in line or "readonly" in line, f"{name}: {line}"
            assert says_how_to_fix(line), f"{name}: no fix named: {line}"
            visible_ok(u.maildir, allowed, name)
            if (u.maildir / ".mailsync.db").exists():
                state_not_ahead(u.maildir, server)
            # permissions fixed: the next run completes, every message once
            r = mailsync(u)
            assert r.returncode == 0, (name, r.stderr)
            assert tmp_files(u.maildir) == 0, name
            assert local_state(u.maildir) == as_backup(want, u.maildir), name
    finally:
        for dirpath, dirs, _files in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), 0o700)
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_file_system_then_writable(user, tmp_path):
    """The Maildir on a read-only bind mount in a private user and mount namespace (`unshare -Urm`,
    as tests/test_disk.py): EROFS whoever runs it."""
    if not _works(["unshare", "-Urm", "true"]):
        pytest.skip("no user and mount namespaces (unshare -Urm) here")
    user.server.seed(user.name, "INBOX", [msg(i, "r" * 3000) for i in range(6)])
    assert mailsync(user).returncode == 0
    user.append("INBOX", [msg(60), msg(61)])
    m = user.maildir
    script = (f'mount --bind "{m}" "{m}" && mount -o remount,bind,ro "{m}" && '
              f'exec {sys.executable} -m mailsync --config "{user.config}" sync test')
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=user.env(), capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    line = error_line(r, str(m))
    assert "Read-only file system" in line or "readonly" in line, line
    visible_ok(m, {h for items in server_state(user).values() for h, _ in items}, "read-only")
    r = mailsync(user)
    assert r.returncode == 0, r.stderr
    assert tmp_files(m) == 0
    assert local_state(m) == as_backup(server_state(user), m)
    assert says_how_to_fix(line), line
