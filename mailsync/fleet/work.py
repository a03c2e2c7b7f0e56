"""One job, run in this process: run_job(). Any backend's worker calls it (the local process
pool now, a Celery task later): it takes the config file's path and a job as a plain dict, and
returns a plain, JSON-able result dict. The secrets stay on the worker: the config is read here,
the accounts resolved and their password commands run here.

A failed attempt is retried by its cause (next_wait, a pure function):

- auth: the server refused the login (AuthError, exit 3; OAuth2's ReauthRequired, exit 12): never;
- config: a broken config or password source (ConfigError, exit 2): never;
- throttle: the server says to slow down (a ServerError or ConnectionLost whose text matches
  THROTTLE_TEXT, or a run whose failed folders say so): after the wait it suggests (default 60 s,
  at most 15 min), up to THROTTLE_RETRIES times;
- network: ConnectError (5), ConnectionLost (6), or a run whose failed folders all lost their
  connection (exit 6): after 5, 10, 20 ... s (at most 5 min), up to `retries` times;
- anything else: never.

A retry runs the whole command again; every command resumes where it stopped (nothing is
downloaded or copied twice).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable

from mailsync.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ConnectionLost,
    MailsyncError,
    ServerError,
)
from mailsync.fleet.jobs import Job, accounts_of, check

AUTH, CONFIG, THROTTLE, NETWORK, OTHER = "auth", "config", "throttle", "network", "other"
THROTTLE_TEXT = re.compile(r"THROTTLED|Suggested Backoff Time|try again|too many|rate[ -]?limit", re.IGNORECASE)
_SUGGESTED = re.compile(r"(?:suggested\s+backoff\s+time|backoff|retry[\s-]*after)\s*[:=]?\s*(\d+(?:\.\d+)?)\s*"
                        r"(milliseconds?|ms|seconds?|secs?|s|minutes?|mins?)?\b", re.IGNORECASE)
THROTTLE_DEFAULT = 60.0
THROTTLE_CAP = 15 * 60.0
THROTTLE_RETRIES = 10
NETWORK_FIRST = 5.0
NETWORK_CAP = 5 * 60.0
MAX_ERRORS = 100  # folder errors kept in a result's details

# outcome of a job (the report's `outcome` column; docs/fleet.md)
OK, PARTIAL, INCOMPLETE, INTERRUPTED, FAILED = "ok", "partial", "incomplete", "interrupted", "failed"
NOT_RUN = "not-run"  # the report's row of a job that never started (Ctrl-C before its turn)
Progress = Callable[[str, dict], None]


def next_wait(cause: str, text: str, attempt: int, *, retries: int = 3) -> float | None:
    """Seconds to wait before trying again after failure number `attempt` (1, 2, ...) of this
    cause, or None: do not try again. text: the error, for the wait a throttling server asks for."""
    if cause == THROTTLE:
        if attempt > THROTTLE_RETRIES:
            return None
        m = _SUGGESTED.search(text or "")
        if not m:
            return THROTTLE_DEFAULT
        n, unit = float(m.group(1)), (m.group(2) or "s").lower()
        if unit == "ms" or unit.startswith("milli"):
            n /= 1000
        elif unit.startswith("min"):
            n *= 60
        return max(1.0, min(n, THROTTLE_CAP))
    if cause == NETWORK:
        if attempt > retries:
            return None
        return min(NETWORK_FIRST * 2 ** (attempt - 1), NETWORK_CAP)
    return None


def cause_of(exc: BaseException) -> str:
    """Why an attempt failed, for next_wait."""
    if isinstance(exc, AuthError):
        return AUTH
    if isinstance(exc, ConfigError):
        return CONFIG
    if isinstance(exc, (ServerError, ConnectionLost)) and THROTTLE_TEXT.search(str(exc)):
        return THROTTLE
    if isinstance(exc, (ConnectError, ConnectionLost)):
        return NETWORK
    return OTHER


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _one_line(text: str, limit: int = 500) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def blank_result(job: dict) -> dict:
    """A result with nothing done yet (also the row of a job that never ran)."""
    return {"line": job.get("line"), "account": job.get("account_name") or job.get("account"),
            "command": job.get("command"), "destination": job.get("destination_name") or job.get("destination"),
            "outcome": NOT_RUN, "exit_code": None, "messages": 0, "bytes": 0, "folders": 0, "seconds": 0.0,
            "attempts": 0, "worker": "", "error": ""}


def failed_result(job: dict, error: str, *, exit_code: int = 1, outcome: str = FAILED) -> dict:
    """The result of a job whose worker could not report one (it died, or the backend failed)."""
    return {**blank_result(job), "outcome": outcome, "exit_code": exit_code, "error": _one_line(error)}


class _Ran:
    """What one attempt did (a run that went through, maybe in part). details: the command's own
    totals, and every failed folder's error (at most MAX_ERRORS) as `errors`."""

    def __init__(self, exit_code: int, messages: int, bytes_: int, folders: int, errors: list[str],
                 details: dict) -> None:
        self.exit_code, self.messages, self.bytes, self.folders = exit_code, messages, bytes_, folders
        self.errors = [_one_line(e) for e in errors]
        self.details = {**details, "errors": self.errors[:MAX_ERRORS]}

    @property
    def cause(self) -> str:
        if self.exit_code == 0:
            return ""
        if any(THROTTLE_TEXT.search(e) for e in self.errors):
            return THROTTLE
        if self.exit_code == ConnectionLost.exit_code:  # every failed folder lost its connection
            return NETWORK
        return OTHER

    @property
    def error(self) -> str:
        if not self.errors:
            return ""
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        return self.errors[0] + more


def _attempt(command: str, acc, dst, progress: Progress, login_only: bool) -> _Ran:
    from mailsync import secrets
    pw = secrets.password(acc)
    dpw = secrets.password(dst) if dst is not None else None
    if login_only:
        return _login(acc, pw, dst, dpw)
    if command in ("backup", "sync"):
        from mailsync import engine
        mode = "backup" if command == "backup" else acc.mode
        if acc.protocol == "pop3":
            from mailsync import pop3
            r = pop3.download(acc, pw, progress=progress)
        else:
            r = engine.run(acc, pw, mode=mode, progress=progress)
        fs = r.folders
        return _Ran(r.exit_code, sum(f.new + f.refetched + f.uploaded for f in fs), sum(f.bytes for f in fs),
                    len(fs), [f"{f.name}: {f.error}" for f in r.failed], r.to_json()["totals"])
    if command == "migrate":
        from mailsync import transfer
        t = transfer.migrate(acc, dst, pw, dpw, progress=progress)
        errors = [f"{f.name}: {e}" for f in t.folders for e in f.errors]
        return _Ran(t.exit_code, t.total("copied"), t.total("bytes"), len(t.folders), errors, t.to_json()["totals"])
    if command == "verify":
        from mailsync import verify
        v = verify.verify(acc, pw, progress=progress)
        totals = v.to_json()["totals"]
        errors = [f"{f.name}: {f.error or f'{f.problems} problems'}" for f in v.folders if not f.ok]
        return _Ran(v.exit_code, totals["server_messages"], 0, len(v.folders), errors, totals)
    raise ConfigError(f"unknown command '{command}'")


def _login(acc, pw: str, dst, dpw) -> _Ran:
    """--check-logins: log in to the job's account(s) and out again; nothing else."""
    for a, p in ((acc, pw), (dst, dpw)):
        if a is None:
            continue
        if a.protocol == "pop3":
            from mailsync.pop3 import Pop3Session
            Pop3Session(a, p).close(commit=False)
        else:
            from mailsync.imap import ImapSession
            ImapSession(a, p).close()
    return _Ran(0, 0, 0, 0, [], {"logins": 2 if dst is not None else 1})


def _outcome(code: int, cause: str, raised: bool) -> str:
    if code == 0:
        return OK
    if code == 130:
        return INTERRUPTED
    if code == 11:                 # verify: the backup is incomplete or damaged (or there is none)
        return INCOMPLETE
    if cause in (AUTH, CONFIG):
        return cause
    if not raised:                 # the run went through, in part (exit 6, 9, 10)
        return PARTIAL
    if code == 7:
        return "locked"
    return {THROTTLE: "throttled", NETWORK: NETWORK}.get(cause, FAILED)


def run_job(config_path: str, job: dict, *, retries: int = 3, login_only: bool = False,
            attempt_hook: Callable[[int, dict], None] | None = None, sleep: Callable[[float], None] = time.sleep,
            progress: Progress | None = None) -> dict:
    """Run one job (a Job.to_dict()) in this process, with retries by cause; return its result:
    account, command, destination, outcome, exit_code (that of the single command), messages,
    bytes, folders, seconds, attempts, worker, error (the last one, one line), details (the
    command's own totals), line.

    attempt_hook(attempt, job) is called at the start of every attempt, inside it: what it raises
    counts as that attempt's failure (tests inject faults so). sleep waits between attempts.
    progress(event, data) gets the library's progress events, and ("retry", {cause, wait, error,
    attempt}) before a wait. A Ctrl-C (KeyboardInterrupt) ends the job: outcome "interrupted",
    exit code 130; the commands stop at the end of their current batch."""
    t0 = time.monotonic()
    progress = progress or (lambda event, data: None)
    result = blank_result(job)
    result.update(worker=worker_id(), details={})
    failures: dict[str, int] = {}
    code, cause, raised, error = 1, OTHER, True, ""
    try:
        try:
            j = Job.from_dict(job)
            from mailsync import config as config_mod
            cfg = config_mod.load(config_path)
            acc, dst = accounts_of(cfg, j)
            result.update(account=acc.name, destination=dst.name if dst is not None else None)
            check(j.command, acc, dst)
        except ConfigError as exc:
            code, cause, error = exc.exit_code, CONFIG, str(exc)
        else:
            while True:
                result["attempts"] += 1
                try:
                    if attempt_hook is not None:
                        attempt_hook(result["attempts"], job)
                    ran = _attempt(j.command, acc, dst, progress, login_only)
                except MailsyncError as exc:
                    code, cause, raised, error = exc.exit_code, cause_of(exc), True, str(exc)
                except Exception as exc:  # noqa: BLE001 - a bug: reported as the single command would
                    code, cause, raised = 1, OTHER, True
                    error = f"internal error: {type(exc).__name__}: {exc} (please report it)"
                else:
                    code, cause, raised, error = ran.exit_code, ran.cause, False, ran.error
                    result.update(messages=result["messages"] + ran.messages, bytes=result["bytes"] + ran.bytes,
                                  folders=ran.folders, details=ran.details)
                if code == 0:
                    error = ""
                    break
                failures[cause] = failures.get(cause, 0) + 1
                wait = next_wait(cause, error, failures[cause], retries=retries)
                if wait is None:
                    break
                progress("retry", {"cause": cause, "wait": wait, "error": _one_line(error),
                                   "attempt": result["attempts"]})
                sleep(wait)
    except KeyboardInterrupt:
        code, cause, raised, error = 130, OTHER, True, ""
    result.update(outcome=_outcome(code, cause, raised), exit_code=code, error=_one_line(error),
                  seconds=round(time.monotonic() - t0, 3))
    return result
