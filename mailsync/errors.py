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
  12 OAuth2: the refresh token was refused (invalid_grant): run `mailsync auth ACCOUNT`

The tree (exit code of an error that stops the whole run in brackets):

  MailsyncError [1]
  ├── ConfigError [2]
  ├── AuthError [3]
  │   ├── oauth2.OAuthError     a token endpoint or sign-in flow said no (its error code shown)
  │   └── oauth2.ReauthRequired [12]  the refresh token was refused: a person must sign in again
  ├── TLSError [4]
  ├── ConnectError [5]
  ├── SessionError [6]          the server failed us after the run had started
  │   ├── ConnectionLost        hung up, timed out, reply cut short: retried, then "lost"
  │   └── ServerError           refused a command (NO/BAD): never retried, the folder fails
  │       └── fetch.ProtocolError   a reply we cannot read (the connection is out of step)
  ├── LockedError [7]
  ├── StorageError [8]
  ├── PartialFailure [9]        (only its exit code is used)
  ├── SafetyAbort [10]          the deletion guard stopped one folder
  └── verify.BackupIncomplete [11]

ConnectionLost and ServerError are siblings: neither catches the other, so an except chain may
list them in any order. Catch SessionError only where both really are handled alike (both end a
whole run with 6). Inside a run a folder's failure is not raised on but recorded as its
`model.Outcome` (LOST, REFUSED, GUARDED, ...), from which `engine.RunResult.exit_code` is derived.
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


class SessionError(MailsyncError):
    """The server failed us after the run had started: the connection was lost (ConnectionLost)
    or a command was refused (ServerError). Either one stopping the whole run exits with 6."""

    exit_code = 6


class ConnectionLost(SessionError):
    """The server hung up, timed out or cut a reply short, mid-run: worth retrying."""


class ServerError(SessionError):
    """The server refused a command (NO/BAD), or answered what we cannot read (ProtocolError):
    not a lost connection, and retrying will not help."""


class LockedError(MailsyncError):
    exit_code = 7


class StorageError(MailsyncError):
    exit_code = 8


class PartialFailure(MailsyncError):
    exit_code = 9


class SafetyAbort(MailsyncError):
    """The deletion guard stopped a folder: nothing was changed in it."""

    exit_code = 10
