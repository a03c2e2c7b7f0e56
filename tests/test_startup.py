"""Start-up of the command a user runs most (`mailsync sync ACCOUNT`, from cron): it loads only
what a sync uses (not typer and click, not the code of other commands), and it behaves exactly
as the full command line does (typer's) for every shape it reads itself."""

from __future__ import annotations

import imaplib
import json
import subprocess
import sys

import pytest

from mailsync import cli, config, imap, login
from mailsync import command as entry
from mailsync.config import Account
from mailsync.errors import TLSError
from tests.helpers import ROOT, msg

NOT_FOR_A_SYNC = ("typer", "click", "rich", "tqdm", "mailsync.cli", "mailsync.oauth2", "mailsync.pop3",
                  "mailsync.check", "mailsync.verify", "mailsync.transfer", "mailsync.compare", "mailsync.watch",
                  "mailsync.fleet", "celery", "urllib.request", "http.server", "getpass",
                  "concurrent.futures")


def run_cli(user, *args: str, typer_only: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The real command (`python -m mailsync --config CONFIG ARGS`), run as `python -m` runs it;
    returns its result and the modules it had imported when it ended. typer_only: every command
    line goes through typer (as before the fast path), to compare."""
    modules = user.tmp / "modules.json"
    code = ("import atexit, json, runpy, sys\n"
            f"atexit.register(lambda: open({str(modules)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
            f"sys.argv = ['mailsync', '--config', {str(user.config)!r}, *{list(args)!r}]\n")
    if typer_only:
        code += "import mailsync.cli as c\nc.fast_path = lambda args: None\nc.main()\n"
    else:
        code += "runpy.run_module('mailsync', run_name='__main__', alter_sys=True)\n"
    r = subprocess.run([sys.executable, "-c", code], env=user.env(), capture_output=True, text=True, timeout=120,
                       cwd=ROOT, check=False)
    return r, json.loads(modules.read_text()) if modules.exists() else []


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_a_no_change_sync_loads_only_what_it_uses(user):
    user.append("INBOX", [msg(1), msg(2)])
    first, _ = run_cli(user, "sync", "test", "--quiet")
    assert first.returncode == 0, first.stderr
    r, modules = run_cli(user, "sync", "test", "--quiet")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert "mailsync.engine" in modules  # (the list is real)
    assert [m for m in NOT_FOR_A_SYNC if loaded(modules, m)] == []


def test_other_commands_and_help_still_go_through_typer(user):
    r, modules = run_cli(user, "sync", "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout and "--quiet" in r.stdout
    assert loaded(modules, "typer")
    r, modules = run_cli(user, "verify", "test")
    assert loaded(modules, "typer") and "Traceback" not in r.stderr
    r, _ = run_cli(user, "--version")
    assert r.returncode == 0 and r.stdout.startswith("mailsync ")


@pytest.mark.parametrize("args", [
    ["sync", "test"],
    ["sync", "test", "--quiet"],
    ["sync", "--json", "test"],
    ["sync", "nope"],
    ["sync", "test", "--all"],
    ["sync", "test", "--mode", "bogus"],
    ["sync", "test", "--dry-run"],
    ["--debug", "sync", "nope", "-q"],
    ["sync", "--all", "-q"],
])
def test_the_fast_path_says_what_typer_says(user, args):
    """Output, error lines and exit codes are those of the typer command line, to the byte (but
    for the seconds a run took)."""
    user.append("INBOX", [msg(1)])
    assert run_cli(user, "sync", "test")[0].returncode == 0  # both runs below: nothing changed

    def norm(text: str) -> str:
        import re
        text = re.sub(r'"seconds": [0-9.]+', '"seconds": S', text)
        text = re.sub(r"\d+\.\d s$", "T s", text, flags=re.MULTILINE)
        return re.sub(r"^\S+ \S+ mailsync\.\S+ .*\n", "", text, flags=re.MULTILINE)  # --debug log lines

    fast, fast_modules = run_cli(user, *args)
    slow, slow_modules = run_cli(user, *args, typer_only=True)
    assert (fast.returncode, norm(fast.stdout), norm(fast.stderr)) == \
        (slow.returncode, norm(slow.stdout), norm(slow.stderr))
    assert not loaded(fast_modules, "typer") and loaded(slow_modules, "typer")
    assert "Traceback" not in fast.stderr + slow.stderr or "--debug" in args


def typer_reads(monkeypatch, args: list[str]) -> dict | None:
    """What typer hands sync_command for this command line (None: it does not get there)."""
    got: list[dict] = []
    names = ("account", "all_accounts", "mode", "dry_run", "force", "quiet", "as_json", "config", "debug")
    monkeypatch.setattr(cli, "sync_command", lambda *a: got.append(dict(zip(names, a, strict=True))))
    monkeypatch.setattr(cli, "_opts", {})
    try:
        cli.app(args, prog_name="mailsync", standalone_mode=False)
    except Exception:  # noqa: BLE001 - a usage error: typer does not run the command
        return None
    return got[0] if got else None


@pytest.mark.parametrize("args", [
    ["sync"],
    ["sync", "-q"],
    ["sync", "work"],
    ["sync", "work", "--quiet"],
    ["sync", "-q", "work"],
    ["--config", "a.toml", "sync", "work", "-q"],
    ["-c", "a.toml", "--debug", "sync", "work"],
    ["-c", "a.toml", "sync", "work", "-c", "b.toml"],
    ["sync", "--all", "--json"],
    ["sync", "-a", "-n", "--force", "--mode", "sync", "--debug"],
    ["sync", "sync"],
    ["--config", "sync", "sync", "x"],
    ["sync", "work", "--json", "--dry-run", "--mode", "mirror", "--config", "c.toml"],
])
def test_the_fast_path_reads_what_typer_reads(monkeypatch, args):
    fast = entry.fast_sync_args(args)
    assert fast is not None
    assert fast == typer_reads(monkeypatch, args)


@pytest.mark.parametrize("args", [
    [], ["--help"], ["sync", "--help"], ["sync", "work", "-h"], ["--version", "sync", "w"], ["verify", "work"],
    ["sync", "--config=a.toml", "work"], ["sync", "-qn", "work"], ["sync", "-q", "-q", "work"],
    ["sync", "a", "b"], ["sync", "--", "work"], ["sync", "work", "--mode"], ["sync", "work", "--config", "-q"],
    ["sync", "work", "--config", ""], ["--config", "a.toml"], ["--bogus", "sync", "work"], ["sync", "work", "--bogus"],
    ["check", "sync"], ["fleet", "run", "sync"],
])
def test_everything_else_goes_to_typer(args):
    assert entry.fast_sync_args(args) is None


def test_shell_completion_goes_to_typer(monkeypatch):
    monkeypatch.setenv("_MAILSYNC_COMPLETE", "bash_complete")
    assert entry.fast_path(["sync", "work"]) is None


def test_login_takes_the_capabilities_from_the_greeting(user, monkeypatch):
    """The greeting lists the capabilities (Dovecot's does): no CAPABILITY command before the
    login, one round trip fewer; those after the login are the server's full list."""
    sent: list[bytes] = []
    send = imaplib.IMAP4.send
    monkeypatch.setattr(imaplib.IMAP4, "send", lambda self, data: (sent.append(bytes(data)), send(self, data))[1])
    acc = config.load(user.config).account("test")
    s = imap.ImapSession(acc, user.password)
    try:
        assert s.qresync and {"IMAP4REV1", "QRESYNC", "UIDPLUS"} <= s.caps
        assert s.client._imap.capabilities and "IMAP4REV1" in s.client._imap.capabilities
    finally:
        s.close()
    commands = [line.split(b" ")[1].strip().upper() for line in sent if b" " in line]
    assert b"CAPABILITY" not in commands and b"LOGIN" in commands


def test_a_greeting_without_capabilities_asks(user, monkeypatch):
    """A server whose greeting lists none is asked with CAPABILITY, as before."""
    read = imaplib.IMAP4._get_line

    def no_codes(self):
        line = read(self)
        return line.split(b" [CAPABILITY", 1)[0] + b" ready." if line.startswith(b"* OK [CAPABILITY") else line
    monkeypatch.setattr(imaplib.IMAP4, "_get_line", no_codes)
    acc = config.load(user.config).account("test")
    got = login.log_in(acc, user.password)
    try:
        assert "IMAP4REV1" in got.caps and "QRESYNC" in got.caps
    finally:
        login.close_imap(got.client)


def acct(server, username: str, **kw) -> Account:
    kw.setdefault("ca_file", server.ca_file)
    return Account(name="t", host="127.0.0.1", port=server.imaps_port, username=username,
                   maildir=server.root / "unused", timeout=30, **kw)


def test_the_tls_context_is_made_once_and_still_verifies(user, tmp_path, monkeypatch):
    """Connections of one run share one TLS context (loading the system CAs takes ~20 ms); every
    connection still verifies the certificate against its own account's CAs, and the pin."""
    monkeypatch.setattr(login, "_contexts", {})
    ca = tmp_path / "ca.pem"
    ca.write_bytes(user.server.ca_file.read_bytes())
    acc = acct(user.server, user.name, ca_file=ca)
    first = login.tls_context(acc)
    assert login.tls_context(acc) is first
    login.close_imap(login.log_in(acc, user.password).client)
    # the system CAs do not know the test CA: refused, whatever was made before
    with pytest.raises(TLSError, match="not accepted"):
        login.log_in(acct(user.server, user.name, ca_file=None), user.password)
    with pytest.raises(TLSError, match="pinned fingerprint"):
        login.log_in(acct(user.server, user.name, ca_file=None, fingerprint="00" * 32), user.password)
    # the file changed: a new context
    ca.write_bytes(ca.read_bytes() + b"\n")
    assert login.tls_context(acc) is not first
    # and after CONTEXT_REUSE seconds
    monkeypatch.setattr(login, "CONTEXT_REUSE", 0.0)
    again = login.tls_context(acc)
    assert login.tls_context(acc) is not again
