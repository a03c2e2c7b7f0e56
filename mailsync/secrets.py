"""Password sources. The password is returned to the caller and never logged or stored.
(getpass, shlex and subprocess are imported by the sources that use them: a password_env
account's start-up does not pay for them.)"""

from __future__ import annotations

import os
import sys

from mailsync.config import Account
from mailsync.errors import ConfigError


def password(acc: Account) -> str:
    """The account's password; "" for an OAuth2 account (its logins take tokens, see oauth2.py)."""
    if getattr(acc, "auth", "password") == "oauth2":
        return ""
    where = f"[accounts.{acc.name}]"
    if acc.password_command is not None:
        return run_command(acc.password_command, f"{where} password_command", "the password")
    if acc.password_env is not None:
        value = os.environ.get(acc.password_env)
        if not value:
            raise ConfigError(f"{where} password_env: environment variable {acc.password_env} is not set")
        return value
    if acc.password is not None:
        return acc.password
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"Password for {acc.username} at {acc.host}: ")
    raise ConfigError(f"{where} has no password source",
                      hint="set password_command or password_env (no terminal to prompt on)")


def run_command(cmd: str | list[str], where: str, what: str) -> str:
    """Run a secret-printing command from the config (no shell: a string is split like a shell
    line; a list is the argv), and return the first line it prints. Its output is never shown;
    every failure is a ConfigError naming `where` (the account and the key)."""
    import shlex
    import subprocess

    try:
        argv = cmd if isinstance(cmd, list) else shlex.split(cmd)
    except ValueError as exc:
        raise ConfigError(f"{where} cannot be parsed: {exc}") from None
    if not argv:
        raise ConfigError(f"{where} is empty")
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise ConfigError(f"{where}: program '{argv[0]}' not found",
                          hint="give the full path, or a list like [\"sh\", \"-c\", \"...\"] for a shell") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot run '{argv[0]}': {exc.strerror}",
                          hint="check the path and that the file is executable") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{where} did not finish within 120 seconds") from None
    if r.returncode != 0:
        err = r.stderr.decode("utf-8", "replace").strip().splitlines()
        tail = f": {err[-1][:200]}" if err else ""
        raise ConfigError(f"{where} failed with exit code {r.returncode}{tail}")
    out = r.stdout.decode("utf-8", "replace").splitlines()
    if not out or not out[0]:
        raise ConfigError(f"{where} printed nothing", hint=f"it must print {what} on its first line")
    return out[0]
