"""The command line: parse, load config, call the library, draw progress, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from mailsync import __version__, crashpoint
from mailsync import config as config_mod
from mailsync.errors import ConfigError, ConnectionLost, MailsyncError, PartialFailure, SafetyAbort
from mailsync.model import human_size

app = typer.Typer(add_completion=False, no_args_is_help=True, invoke_without_command=True, pretty_exceptions_enable=False,
                  help="Keep a local Maildir in step with your mail servers.")

_opts: dict = {}


def _show(text) -> str:
    """Server-chosen text (a folder name, an error quoting one) made safe for one terminal line:
    control characters (C0, DEL, C1), line and paragraph separators, bidi controls and lone
    surrogates are shown escaped (\\x1b, \\u2028, \\ud834), never written raw."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == " " else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                    else f"\\U{ord(c):08x}") for c in s)


def _json(obj) -> str:
    """JSON for stdout: UTF-8 as it is, except that control characters a server put in a name are
    written as \\u escapes, and a lone surrogate (invalid UTF-7 from the server) makes it ASCII."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, indent=2, ensure_ascii=True)
    if text.isprintable() or all(c.isprintable() or c in " \n" for c in text):
        return text
    # other control characters (C1, separators, bidi) only occur inside strings: \u escapes there
    return "".join(c if c.isprintable() or c in " \n" else json.dumps(c)[1:-1] for c in text)


_INTERRUPTED = "mailsync: interrupted"
_said: dict = {}


def _by_ctrl_c(exc: BaseException | None) -> bool:
    """exc is a KeyboardInterrupt, or an error raised while one was unwinding (a clean-up that
    failed because Ctrl-C cut short what it cleans up, e.g. a ROLLBACK after the COMMIT it
    expected had already happened): either way the run was interrupted."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


def _say_interrupted(text: str) -> None:
    if not _said.get("interrupted"):
        _said["interrupted"] = True
        typer.echo(text, err=True)


def _fail(exc: BaseException, debug: bool) -> None:
    if isinstance(exc, MailsyncError):
        if debug:
            traceback.print_exc()
        typer.echo(f"mailsync: error: {_show(exc)}", err=True)
        raise typer.Exit(exc.exit_code)
    if debug:
        traceback.print_exc()
    typer.echo(f"mailsync: internal error: {type(exc).__name__}: {exc} "
               "(please report it; run with --debug for details)", err=True)
    raise typer.Exit(1)


@app.callback(invoke_without_command=True)
def main_options(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file (default: $MAILSYNC_CONFIG or "
                                          "$XDG_CONFIG_HOME/mailsync/config.toml)."),
    debug: bool = typer.Option(False, "--debug", help="Log what happens, show tracebacks (never passwords)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(f"mailsync {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    _opts["config"] = config
    _opts["debug"] = debug


class _Bars:
    """tqdm bars (messages and bytes) when stderr is a terminal."""

    def __init__(self) -> None:
        from tqdm import tqdm
        self.msgs = tqdm(total=0, unit="msg", desc="messages", position=0, leave=False, file=sys.stderr)
        self.bytes = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="bytes",
                          position=1, leave=False, file=sys.stderr)

    def __call__(self, event: str, data: dict) -> None:
        if event == "folder_start":
            self.msgs.total += data["messages"]
            self.bytes.total += data["bytes"]
            self.msgs.set_description(_show(data["folder"])[:30])
            self.msgs.refresh()
            self.bytes.refresh()
        elif event == "message":
            self.msgs.update(1)
            self.bytes.update(data["bytes"])
        elif event == "retry":
            self.msgs.write(f"{_show(data['folder'])}: {_show(data['error'])}; retrying in {data['delay']} s")
        elif event == "folder_done":
            f = data["result"]
            if f.failed:
                self.msgs.write(f"{_show(f.name)}: failed: {_show(f.error)}")
            elif f.new or f.refetched or f.flags_changed or f.gone:
                self.msgs.write(f"{_show(f.name)}: {f.new + f.refetched} new ({human_size(f.bytes)}), "
                                f"{f.flags_changed} flags changed, {f.gone} gone, {f.seconds:.1f} s")

    def close(self) -> None:
        self.msgs.close()
        self.bytes.close()


# exit codes of a whole-account stop rank before those of a run that got through in part
_PARTIAL = (ConnectionLost.exit_code, PartialFailure.exit_code, SafetyAbort.exit_code)


def _worst(codes: list[int]) -> int:
    """The exit code of several accounts: the first of those that stopped an account as a whole
    (1-5, 7, 8), else the first of those that got through in part (6, 9, 10), else 0."""
    stops = [c for c in codes if c and c not in _PARTIAL]
    partial = [c for c in codes if c in _PARTIAL]
    return (stops or partial or [0])[0]


@app.command()
def sync(
    account: Optional[str] = typer.Argument(None, help="Account name from the config (none, or --all: every account)."),
    all_accounts: bool = typer.Option(False, "--all", "-a", help="Every account of the config, one after another."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Override the account's mode: backup, sync or mirror."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Print what would be done; change nothing."),
    force: bool = typer.Option(False, "--force", help="Go ahead even when the deletion guard trips."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing unless something fails (for cron)."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Sync ACCOUNT (or every account): back up (mode backup) or sync both ways (mode sync) every
    selected folder."""
    debug = debug or _opts.get("debug", False)
    interrupted = "mailsync: interrupted; what was saved is kept, run again to continue"
    # the summary too: a Ctrl-C while it is printed is an interruption like any other
    with _Errors(debug, interrupted):
        if debug:
            logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        if account and all_accounts:
            raise ConfigError("name an account or give --all, not both",
                              hint=f"mailsync sync {account}, or mailsync sync --all")
        cfg = _load(config)
        if account:
            code, summary = _sync_account(cfg, account, mode, dry_run, force, quiet, as_json, debug, prefix="")
            if as_json:
                typer.echo(_json(summary))
            raise typer.Exit(code)
        if not cfg.accounts:
            raise ConfigError(f"{cfg.path} has no accounts", hint="add an [accounts.NAME] table")
        codes, summaries = [], []
        for name in cfg.accounts:
            code, summary = _sync_account(cfg, name, mode, dry_run, force, quiet, as_json, debug,
                                          prefix=f"{_show(name)}: ")
            codes.append(code)
            if summary is not None:
                summaries.append(summary)
        code = _worst(codes)
        if as_json:
            typer.echo(_json({"exit_code": code, "accounts": summaries}))
        failed = [n for n, c in zip(cfg.accounts, codes) if c]
        if failed and not as_json:
            typer.echo(f"mailsync: {len(failed)} of {len(codes)} accounts had errors ({', '.join(map(_show, failed))}); "
                       "everything else was saved", err=True)
    raise typer.Exit(code)


def _sync_account(cfg, account: str, mode, dry_run, force, quiet, as_json, debug, prefix: str):
    """One account's run, its lines printed (each error line starts with prefix). Returns its exit
    code and its --json summary (None when it stopped before running: that is in its error line;
    with one account, errors raise as usual)."""
    try:
        acc = cfg.account(account)
        mode = mode or acc.mode
        if mode not in ("backup", "sync", "mirror"):
            raise ConfigError(f"unknown mode '{mode}'", hint='use "backup", "sync" or "mirror"')
        if dry_run and mode != "sync":
            raise ConfigError("--dry-run shows what a two-way sync would change; it needs mode sync",
                              hint="a backup never changes the server; run it, or add --mode sync")
        if acc.protocol == "pop3" and mode != "backup":
            raise ConfigError(f"[accounts.{acc.name}] POP3 is download-only: mode '{mode}' needs IMAP",
                              hint='use mode = "backup" for a POP3 account')
        from mailsync import engine, secrets
        pw = secrets.password(acc)
        bars = _Bars() if (sys.stderr.isatty() and not quiet and not as_json) else None
        try:
            from mailsync.folderjob import Options
            if acc.protocol == "pop3":
                from mailsync import pop3
                result = pop3.download(acc, pw, progress=bars or engine._quiet)
            else:
                result = engine.run(acc, pw, mode=mode, progress=bars or engine._quiet,
                                    opts=Options(dry_run=dry_run, force=force))
        finally:
            if bars:
                bars.close()
    except Exception as exc:  # noqa: BLE001 - one account of several: its error is its line and code
        if not prefix:
            raise
        if debug:
            traceback.print_exc()
        if isinstance(exc, MailsyncError):
            typer.echo(f"mailsync: error: {prefix}{_show(exc)}", err=True)
            return exc.exit_code, None
        typer.echo(f"mailsync: internal error: {prefix}{type(exc).__name__}: {exc} "
                   "(please report it; run with --debug for details)", err=True)
        return 1, None

    failed = result.failed
    if dry_run and not as_json:
        typer.echo(_dry_run_text(result))
    for f in result.folders:
        for c in f.conflicts:
            typer.echo(f"mailsync: conflict: {prefix}{_show(f.name)}: {_show(c)}", err=True)
        for n in f.notices:  # notices go to stderr even with --quiet: cron mails them
            typer.echo(f"mailsync: notice: {prefix}{_show(f.name)}: {_show(n)}", err=True)
    for f in failed:
        typer.echo(f"mailsync: error: {prefix}{_show(f.name)}: {_show(f.error)}", err=True)
    if not quiet and not as_json and not dry_run:
        typer.echo(_line(result))
    if failed and not as_json:
        typer.echo(f"mailsync: {prefix}{len(failed)} of {len(result.folders)} folders failed; "
                   "everything else was saved, run again to retry", err=True)
    crashpoint.pause("summary")
    return result.exit_code, result.to_json()


class _Errors:
    """`with _Errors(debug):` around a command's work: errors become one line and an exit code."""

    def __init__(self, debug: bool, interrupted: str = _INTERRUPTED) -> None:
        self.debug, self.interrupted = debug, interrupted

    def __enter__(self) -> "_Errors":
        return self

    def __exit__(self, et, exc, tb) -> bool:
        if exc is None or isinstance(exc, (typer.Exit, SystemExit)):
            return False
        if _by_ctrl_c(exc):
            _say_interrupted(self.interrupted)
            raise typer.Exit(130) from None
        if isinstance(exc, Exception):
            _fail(exc, self.debug)
        return False


def _load(config: Optional[Path]):
    cfg = config_mod.load(config or _opts.get("config"))
    for w in cfg.warnings:
        typer.echo(f"mailsync: warning: {w}", err=True)
    return cfg


def _setup(config: Optional[Path], debug: bool):
    debug = debug or _opts.get("debug", False)
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return debug


@app.command()
def compare(
    imap_account: str = typer.Argument(..., help="An IMAP account of the mailbox."),
    pop3_account: str = typer.Argument(..., help="A POP3 account of the same mailbox."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    keep: Optional[Path] = typer.Option(None, "--keep", help="Keep both downloads in this directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Download one mailbox over IMAP and over POP3 (into temporary Maildirs) and compare."""
    debug = _setup(config, debug)
    with _Errors(debug):
        cfg = _load(config)
        ia, pa = cfg.account(imap_account), cfg.account(pop3_account)
        from mailsync import compare as cmp
        from mailsync import secrets
        d = cmp.compare(ia, pa, secrets.password(ia), secrets.password(pa), keep=keep)
    typer.echo(_json(d) if as_json else cmp.table(d))


@app.command()
def check(
    target: str = typer.Argument(..., help="An account name from the config, or HOST[:PORT]."),
    pop3: bool = typer.Option(False, "--pop3", help="With HOST[:PORT]: check POP3S (default IMAPS)."),
    ports: bool = typer.Option(False, "--ports", help="Also probe TCP 143, 110, 993 and 995."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Diagnose a connection step by step: DNS, TCP, TLS, certificate, greeting, login, latency."""
    debug = _setup(config, debug)
    from mailsync import check as chk
    with _Errors(debug):
        cfg = None
        try:
            cfg = _load(config)
        except ConfigError:
            if target in _maybe_accounts(config):
                raise
        bare = ":" not in target and "." not in target and target != "localhost"
        if cfg is not None and bare and target not in cfg.accounts:
            cfg.account(target)  # an account name with a typo: say so (with a suggestion)
        if cfg is not None and target in cfg.accounts:
            acc = cfg.account(target)
            if acc.starttls:
                raise ConfigError(f"[accounts.{acc.name}] check covers implicit TLS (993/995); this account "
                                  "uses starttls", hint="check the server's implicit-TLS port with "
                                  f"`mailsync check {acc.host}:{993 if acc.protocol == 'imap' else 995}`")
            from mailsync import secrets
            t = chk.target_from_account(acc)
            password = secrets.password(acc)
        else:
            t = chk.target_from_hostport(target, "pop3" if pop3 else "imap")
            password = None
        code = chk.run_check(t, password, ports=ports, emit=typer.echo)
    raise typer.Exit(code)


@app.command()
def auth(
    account: str = typer.Argument(..., help="An account with auth = \"oauth2\"."),
    flow: Optional[str] = typer.Option(None, "--flow", help="loopback (browser), device or paste "
                                       "(default: the account's flow)."),
    status: bool = typer.Option(False, "--status", help="Show whether a token is stored and when it expires "
                                "(never the token)."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the URL; do not open a browser."),
    as_json: bool = typer.Option(False, "--json", help="With --status: print it as JSON."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Get the OAuth2 tokens of an account (once, and again if the provider revokes them)."""
    debug = _setup(config, debug)
    with _Errors(debug):
        cfg = _load(config)
        acc = cfg.account(account)
        if acc.auth != "oauth2" or acc.oauth2 is None:
            raise ConfigError(f"[accounts.{acc.name}] logs in with a password; auth is for auth = \"oauth2\"",
                              hint="see docs/oauth2.md to switch the account to OAuth2")
        if flow is not None and flow not in config_mod.OAUTH2_FLOWS:
            raise ConfigError(f"--flow {flow!r}: use one of {', '.join(config_mod.OAUTH2_FLOWS)}")
        from mailsync import oauth2
        if status:
            st = oauth2.status(acc)
            if as_json:
                typer.echo(_json(st))
            else:
                for key, value in st.items():
                    typer.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
            return
        if acc.oauth2.token_command is not None:
            raise ConfigError(f"[accounts.{acc.name}] gets its tokens from token_command; nothing to authorize",
                              hint="run the token command's own login, or remove token_command")
        oauth2.authorize(acc, flow, out=lambda line: typer.echo(line, err=True), open_browser=not no_browser)
        typer.echo(f"mailsync: {acc.name}: authorized; tokens stored ({oauth2.status(acc).get('store', '')})")


@app.command()
def watch(
    accounts: list[str] = typer.Argument(None, help="Accounts to keep in step (default: every account)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors and notices, not one line per sync."),
    as_json: bool = typer.Option(False, "--json", help="One line of JSON per sync and per event, on stdout."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Stay running and sync when mail changes: IMAP IDLE on each account's watch_folders, a full
    sync every poll_interval (POP3 accounts: a download), local changes pushed in mode sync.
    SIGTERM or Ctrl-C ends it cleanly."""
    debug = _setup(config, debug)
    with _Errors(debug, "mailsync: watch stopped; what was saved is kept"):
        cfg = _load(config)
        names = list(accounts or cfg.accounts)
        if not names:
            raise ConfigError(f"{cfg.path} has no accounts", hint="add an [accounts.NAME] table")
        accs = [cfg.account(n) for n in names]
        from mailsync import watch as watch_mod
        code = watch_mod.run(accs, out=typer.echo, quiet=quiet, as_json=as_json, debug=debug)
    raise typer.Exit(code)


def _maybe_accounts(config: Optional[Path]) -> set[str]:
    """Account names a config file that failed to load seems to name (to report its error)."""
    import re
    try:
        text = config_mod.default_path().read_text() if config is None else Path(config).read_text()
    except OSError:
        return set()
    return set(re.findall(r"^\s*\[accounts\.([^\]]+)\]", text, re.M))


@app.command()
def verify(
    account: str = typer.Argument(..., help="The IMAP or POP3 account whose backup to check."),
    deep: bool = typer.Option(False, "--deep", help="Re-fetch and hash every message on the server."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing when the backup is intact."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Prove a backup: counts, missing and extra files, corrupted files, flag differences."""
    debug = _setup(config, debug)
    with _Errors(debug):
        cfg = _load(config)
        acc = cfg.account(account)
        from mailsync import secrets
        from mailsync import verify as ver
        report = ver.verify(acc, secrets.password(acc), deep=deep)
    if as_json:
        typer.echo(_json(report.to_json()))
    elif not (quiet and report.ok):
        typer.echo(report.text())
    raise typer.Exit(report.exit_code)


def _transfer_out(report, as_json: bool, quiet: bool) -> None:
    if as_json:
        typer.echo(_json(report.to_json()))
    for f in report.folders:
        for e in f.errors:
            typer.echo(f"mailsync: error: {_show(f.name)}: {_show(e)}", err=True)
    if not as_json and not quiet:
        typer.echo(report.line())
    if report.exit_code:
        raise typer.Exit(report.exit_code)


@app.command()
def migrate(
    src: str = typer.Argument(..., help="Source account (IMAP)."),
    dst: str = typer.Argument(..., help="Destination account (IMAP)."),
    delete: bool = typer.Option(False, "--delete", help="Also delete from DST what is gone from SRC (guarded)."),
    force: bool = typer.Option(False, "--force", help="Go ahead even when the deletion guard trips."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing unless something fails."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Copy every folder and message of SRC to DST, resumable and without duplicates."""
    debug = _setup(config, debug)
    with _Errors(debug, "mailsync: interrupted; run again to continue, nothing is copied twice"):
        cfg = _load(config)
        sa, da = cfg.account(src), cfg.account(dst)
        for a in (sa, da):
            if a.protocol != "imap":
                raise ConfigError(f"[accounts.{a.name}] migrate needs IMAP accounts")
        from mailsync import secrets, transfer
        bars = _Bars() if (sys.stderr.isatty() and not quiet and not as_json) else None
        try:
            report = transfer.migrate(sa, da, secrets.password(sa), secrets.password(da), delete=delete,
                                      force=force, progress=bars or (lambda e, d: None))
        finally:
            if bars:
                bars.close()
    _transfer_out(report, as_json, quiet)


@app.command()
def restore(
    account: str = typer.Argument(..., help="Account to upload to (IMAP)."),
    source: Path = typer.Option(..., "--from", help="The Maildir to upload (a backup, or any Maildir)."),
    layout: Optional[str] = typer.Option(None, "--layout", help="maildir++, fs or flat (default: detected)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing unless something fails."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Upload a Maildir to ACCOUNT: folders, flags, dates; resumable and without duplicates."""
    debug = _setup(config, debug)
    with _Errors(debug, "mailsync: interrupted; run again to continue, nothing is uploaded twice"):
        if layout not in (None, "maildir++", "fs", "flat"):
            raise ConfigError(f"--layout must be maildir++, fs or flat, not {layout!r}")
        cfg = _load(config)
        acc = cfg.account(account)
        if acc.protocol != "imap":
            raise ConfigError(f"[accounts.{acc.name}] restore needs an IMAP account")
        from mailsync import secrets, transfer
        bars = _Bars() if (sys.stderr.isatty() and not quiet and not as_json) else None
        try:
            report = transfer.restore(acc, secrets.password(acc), source.expanduser(), layout=layout,
                                      progress=bars or (lambda e, d: None))
        finally:
            if bars:
                bars.close()
    _transfer_out(report, as_json, quiet)


fleet_app = typer.Typer(no_args_is_help=True, help="Run many jobs (backup, sync, migrate, verify) from a jobs file.")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("run")
def fleet_run(
    jobs: Path = typer.Argument(..., help="The jobs file (CSV: command,account,destination,... see docs/fleet.md)."),
    processes: int = typer.Option(4, "--processes", "-p", help="Jobs at once (worker processes)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a report: FILE.csv or FILE.json."),
    retries: int = typer.Option(3, "--retries", help="Retries of a job after a network failure (0-10)."),
    check_logins: bool = typer.Option(False, "--check-logins", help="Only log in to each job's accounts "
                                      "and out again; copy nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress; print only what failed."),
    broker: Optional[str] = typer.Option(None, "--broker", help="Run the jobs on Celery workers over this Redis "
                                         "(redis://HOST:6379/0; needs mailsync[fleet]; see docs/fleet.md)."),
    max_per_host: int = typer.Option(10, "--max-connections-per-host", help="With --broker: IMAP connections "
                                     "to one host at once, over all workers."),
    broker_wait: float = typer.Option(120.0, "--broker-wait", help="With --broker: seconds to wait for a lost "
                                      "broker before giving up on the jobs in flight."),
    resend_delay: float = typer.Option(30.0, "--resend-delay", help="With --broker: after Redis lost its data, "
                                       "send the unfinished jobs again after this many seconds (>= the workers' "
                                       "--lock-ttl)."),
    max_bytes_per_host: int = typer.Option(0, "--max-bytes-per-second-per-host", help="With --broker: message "
                                           "bytes per second to and from one host, over all workers (0: no limit)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Check every row of JOBS, then run the jobs in parallel (one per account at a time); exit 9
    if any job failed."""
    debug = _setup(config, debug)
    with _Errors(debug, "mailsync: interrupted; run the jobs file again to continue"):
        cfg = _load(config)
        from mailsync.fleet import run as fleet
        code = fleet.run(cfg, jobs, processes=processes, report=report, retries=retries, quiet=quiet,
                         check_logins=check_logins, debug=debug, out=typer.echo,
                         err=lambda line: typer.echo(_show(line), err=True), broker=broker,
                         max_per_host=max_per_host, broker_wait=broker_wait, resend_delay=resend_delay,
                         max_bytes_per_host=max_bytes_per_host)
    raise typer.Exit(code)


@fleet_app.command("worker")
def fleet_worker(
    broker: str = typer.Option(..., "--broker", help="The Redis to take jobs from (redis://HOST:6379/0)."),
    concurrency: int = typer.Option(4, "--concurrency", help="Jobs at once on this worker (pool processes)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Config file on this worker (default: "
                                          "the path each job names, as on the machine that ran `fleet run`)."),
    visibility_timeout: float = typer.Option(100.0, "--visibility-timeout", help="Seconds before an unacknowledged "
                                             "job is handed out again (a worker died)."),
    lock_ttl: float = typer.Option(30.0, "--lock-ttl", help="Seconds an account lock outlives its last "
                                   "heartbeat (every TTL/3)."),
    soft_time_limit: int = typer.Option(24 * 3600, "--soft-time-limit", help="Seconds a job may run."),
    time_limit: int = typer.Option(24 * 3600 + 600, "--time-limit", help="Seconds before a job's process is killed."),
    restore_interval: float = typer.Option(10.0, "--restore-interval", help="How often (s) to look for jobs "
                                           "to hand out again."),
    retry_countdown: float = typer.Option(10.0, "--retry-countdown", help="Seconds before a job whose account "
                                          "is busy is tried again."),
    loglevel: str = typer.Option("WARNING", "--loglevel", help="Celery's log level."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """Run fleet jobs sent by `fleet run --broker` until stopped (Ctrl-C ends the running jobs first)."""
    debug = _setup(config, debug)
    with _Errors(debug, "mailsync: worker stopped"):
        if not 1 <= concurrency <= 64:
            raise ConfigError(f"--concurrency {concurrency}: give 1 to 64")
        if not 0 < soft_time_limit < time_limit:
            raise ConfigError("give 0 < --soft-time-limit < --time-limit")
        from mailsync.fleet import celery_app
        path = config or _opts.get("config")
        settings = celery_app.Settings(visibility_timeout=visibility_timeout, lock_ttl=lock_ttl,
                                       soft_time_limit=soft_time_limit, time_limit=time_limit,
                                       restore_interval=restore_interval, retry_countdown=retry_countdown,
                                       config=str(Path(path).expanduser().resolve()) if path else None)
        celery_app.worker(broker, concurrency=concurrency, settings=settings, loglevel=loglevel.upper())


@fleet_app.command("status")
def fleet_status(
    broker: str = typer.Option(..., "--broker", help="The Redis the fleet runs on."),
    run_id: Optional[str] = typer.Option(None, "--run", help="A run's id (default: the latest)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Log and show tracebacks."),
) -> None:
    """One line per job of the latest `fleet run --broker` (or --run ID): state, messages, bytes,
    attempt, worker, last update."""
    debug = _setup(None, debug)
    with _Errors(debug):
        from mailsync.fleet import celery_backend
        rid, rows = celery_backend.status(broker, run_id)
        if as_json:
            typer.echo(_json({"run": rid, "jobs": rows}))
        elif not rid:
            typer.echo("no fleet runs on this broker")
        else:
            typer.echo(f"run {rid}: {len(rows)} jobs")
            for row in rows:
                typer.echo(_show(celery_backend.status_line(row)))


def _line(r) -> str:
    fs = r.folders
    new = sum(f.new for f in fs)
    parts = [f"{r.account}: {len(fs)} folders", f"{new} new ({human_size(sum(f.bytes for f in fs))})",
             f"{sum(f.flags_changed for f in fs)} flags changed",
             f"{sum(f.gone_from_server for f in fs)} gone from server"]
    if any(f.uploaded or f.flags_pushed or f.deleted_local or f.deleted_remote for f in fs):
        parts.append(f"{sum(f.uploaded for f in fs)} uploaded, {sum(f.flags_pushed for f in fs)} flags pushed, "
                     f"{sum(f.deleted_local for f in fs)} deleted locally, "
                     f"{sum(f.deleted_remote for f in fs)} deleted on server")
    if r.created:
        parts.append(f"{len(r.created)} folder{'s' if len(r.created) != 1 else ''} created on server")
    if any(f.refetched for f in fs):
        parts.append(f"{sum(f.refetched for f in fs)} restored")
    if any(f.renumbered for f in fs):
        parts.append(f"{sum(f.renumbered for f in fs)} renumbered by the server (matched again)")
    if any(f.rebound - f.renumbered for f in fs):
        parts.append(f"{sum(f.rebound - f.renumbered for f in fs)} re-matched")
    parts.append(f"{r.seconds:.1f} s")
    return ", ".join(parts)


def _dry_run_text(r) -> str:
    lines = [f"{r.account}: dry run, nothing was changed"]
    for name in r.created:
        lines.append(f"  create folder on server: {_show(name)}")
    for f in r.folders:
        p = f.plan
        if f.failed:
            lines.append(f"  {_show(f.name)}: {_show(f.error)}")
        if p is None or getattr(p, "empty", True):
            continue
        lines.append(f"  {_show(f.name)}:")
        for label, items in (("download from server", p.fetch), ("upload to server", p.upload),
                             ("download again (removed locally, changed on server)", p.refetch),
                             ("upload again (expunged on server, changed locally)", p.reupload),
                             ("delete locally (expunged on server)", p.delete_local),
                             ("delete on server (removed locally)", p.delete_remote)):
            if items:
                lines.append(f"    {label}: {len(items)}  [{_short(items)}]")
        if p.push:
            lines.append(f"    set flags on server: {len(p.push)}  [" + ", ".join(
                f"UID {u} " + " ".join([f"+{x}" for x in sorted(a)] + [f"-{x}" for x in sorted(rm)])
                for u, a, rm in p.push[:5]) + (" ..." if len(p.push) > 5 else "") + "]")
        if p.pull:
            lines.append(f"    set flags locally: {len(p.pull)}")
        if p.pair:
            lines.append(f"    match to local files (the same message, nothing transferred): {len(p.pair)}  ["
                         + _short([f"UID {u} = {k}" for u, k in p.pair]) + "]")
    return "\n".join(lines)


def _short(items) -> str:
    shown = ", ".join(str(i) for i in list(items)[:8])
    return shown + (" ..." if len(items) > 8 else "")


def main() -> None:
    """The `mailsync` command. A Ctrl-C at any moment after start-up ends it with exit 130 and
    one `interrupted` line, never a traceback, also when it lands outside a command's own
    handling (while the command line is read, while click unwinds; typer makes those a silent
    exit 130). Once the exit code is decided Ctrl-C is ignored: while the interpreter shuts down
    it restores the default SIGINT action, and a Ctrl-C then would end a run that completed by
    the signal (status -2, nothing printed)."""
    try:
        try:
            _keep_only_the_command(sys.argv[1:])
            app()  # ends with SystemExit
        finally:
            _ignore_ctrl_c()
            crashpoint.pause("decided")
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == 130:
            _exit_interrupted()
        raise


def _keep_only_the_command(args: list[str]) -> None:
    """Typer builds a click command for every registered command on each start (a few ms for each,
    more for the fleet group): a run that names its command (`mailsync sync work`) gets only that
    one built. Without a command (`mailsync`, `mailsync --help`) every command stays, for the help."""
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c"):
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        break
    else:
        return
    from typer.main import get_command_name

    word = args[i]
    commands = [c for c in app.registered_commands if (c.name or get_command_name(c.callback.__name__)) == word]
    groups = [g for g in app.registered_groups if g.name == word]
    if commands or groups:  # (an unknown word: all stay, and click says which commands there are)
        app.registered_commands[:] = commands
        app.registered_groups[:] = groups


def _ignore_ctrl_c() -> None:
    """From here on Ctrl-C is ignored: the outcome is decided (a Ctrl-C still pending is raised
    by the change itself, before it is made; it is dropped)."""
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return
        except KeyboardInterrupt:
            continue
        except ValueError:  # not the main thread: not ours to change
            return


def _exit_interrupted() -> None:
    """Say `interrupted` (once) and exit 130 at once, not through the interpreter's own exit:
    a KeyboardInterrupt that passed through code made by exec() or eval() of a string on its
    way (dataclasses and namedtuple make their methods so while a module is imported) leaves
    a mark in CPython that makes `python -m mailsync` end by SIGINT (status -2) at exit, however
    the interrupt was handled. Everything is closed by now; the output is flushed here."""
    _say_interrupted(_INTERRUPTED)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":
    main()
