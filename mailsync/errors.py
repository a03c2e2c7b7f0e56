"""One exception tree; every error a user can meet carries a one-line message and an exit code.

Exit codes (documented in docs/exit-codes.md):
  0  success
  1  internal error (a bug: please report it, run with --debug for the traceback)
  2  usage or configuration error
  3  authentication failed
  4  TLS / certificate problem
  5  cannot connect (refused, unreachable, timed out, DNS)
  6  connection lost or server error during the run (what was saved is kept)
  7  another run holds the lock
  8  local storage error (disk full, permission denied, unreadable state)
  9  some folders failed, the others were synced
  10 the deletion guard stopped a folder (run with --force if the deletions are right)
  11 verify: the backup is incomplete or damaged (the report names each message)
"""

from __future__ import annotations


class MailsyncError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(MailsyncError):
    exit_code = 2


class AuthError(MailsyncError):
    exit_code = 3


class TLSError(MailsyncError):
    exit_code = 4


class ConnectError(MailsyncError):
    exit_code = 5


class ConnectionLost(MailsyncError):
    """The server hung up, timed out or answered something we cannot use, mid-run."""

    exit_code = 6


class ServerError(ConnectionLost):
    """The server refused a command (NO/BAD) for one folder."""


class LockedError(MailsyncError):
    exit_code = 7


class StorageError(MailsyncError):
    exit_code = 8


class PartialFailure(MailsyncError):
    exit_code = 9


class SafetyAbort(MailsyncError):
    """The deletion guard stopped a folder: nothing was changed in it."""

    exit_code = 10
