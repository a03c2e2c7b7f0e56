"""The command line: parse, load config, call the library, draw progress, map errors to exit codes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from mailsync import __version__
from mailsync import config as config_mod
from mailsync.command import (  # noqa: F401 - the parts without typer (_line: watch.py; _worst: tests)
    Errors,
    _Bars,
    _json,
    _line,
    _show,
    _worst,
    fast_path,
    load,
    run_command,
    sync_command,
)
from mailsync.errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, invoke_without_command=True, pretty_exceptions_enable=False,
                  help="Keep a local Maildir in step with your mail servers.")

_opts: dict = {}


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
    sync_command(account, all_accounts, mode, dry_run, force, quiet, as_json, config or _opts.get("config"),
                 debug or _opts.get("debug", False))


class _Errors(Errors):
    """`with _Errors(debug):` around a command's work: errors become one line and an exit code
    (typer.Exit)."""

    exit_with = typer.Exit


def _load(config: Optional[Path]):
    return load(config or _opts.get("config"))


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
    return set(re.findall(r"^\s*\[accounts\.([^\]]+)\]", text, re.MULTILINE))


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


def main() -> None:
    """The `mailsync` command (see mailsync.command): the hot shapes of `sync` without typer,
    everything else through it."""
    fast = fast_path(sys.argv[1:])
    if fast is not None:
        run_command(lambda: sync_command(**fast))

    def typer_app() -> None:
        _keep_only_the_command(sys.argv[1:])
        app()  # ends with SystemExit
    run_command(typer_app)


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


if __name__ == "__main__":
    main()
