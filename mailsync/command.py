"""The command line without typer: `mailsync sync` on its hot path, and what every command shares.

The command most often run, `mailsync sync ACCOUNT` (from cron, every few minutes), is read here
without typer and click: importing them takes longer than a sync in which nothing changed. Only
exactly these shapes are (any order after `sync`; each option at most once, values as separate
words):

    mailsync [--config FILE | -c FILE] [--debug] sync ACCOUNT|--all|-a
             [--quiet|-q] [--json] [--dry-run|-n] [--force] [--debug] [--config FILE|-c FILE] [--mode MODE]

Everything else (other commands, --help, --version, `--opt=value`, grouped short flags, a value
that starts with "-", anything unknown or repeated) goes to the typer command line in mailsync.cli,
which runs the same code (`sync_command`) for `sync`: output, errors and exit codes are the same
either way.

This module also holds the parts of the command line that need no typer (error lines, exit codes,
the summary), shared by both. A Ctrl-C while Python imports the command line (before it can
handle it) ends with the same one line and exit 130, not a traceback."""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

try:
    import signal
    import traceback

    from mailsync import crashpoint
    from mailsync.errors import (
        ConfigError,
        ConnectionLost,
        MailsyncError,
        PartialFailure,
        SafetyAbort,
    )
    from mailsync.model import human_size
except KeyboardInterrupt:
    sys.stderr.write("mailsync: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


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
    import json

    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, indent=2, ensure_ascii=True)
    if text.isprintable() or all(c.isprintable() or c in " \n" for c in text):
        return text
    # other control characters (C1, separators, bidi) only occur inside strings: \u escapes there
    return "".join(c if c.isprintable() or c in " \n" else json.dumps(c)[1:-1] for c in text)


def echo(message: str = "", err: bool = False) -> None:
    """click.echo (typer.echo) of one line, without importing click when it is not needed: a
    plain write and flush where click would do just that (no escape sequence to strip, a UTF-8
    stream), else click.echo itself."""
    stream = sys.stderr if err else sys.stdout
    if stream is None:
        return
    if "\x1b" in message or (getattr(stream, "encoding", "") or "").lower().replace("-", "") != "utf8":
        import click

        click.echo(message, err=err)
        return
    stream.write(message + "\n")
    stream.flush()


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
        echo(text, err=True)


def _is_exit(exc: BaseException) -> bool:
    """A SystemExit, or click's (typer's) Exit: a decided exit code, not an error."""
    if isinstance(exc, SystemExit):
        return True
    click_exceptions = sys.modules.get("click.exceptions")
    return click_exceptions is not None and isinstance(exc, click_exceptions.Exit)


class Errors:
    """`with Errors(debug):` around a command's work: errors become one line and an exit code,
    raised as exit_with(code) (SystemExit here; mailsync.cli's commands raise typer.Exit)."""

    exit_with: type[BaseException] = SystemExit

    def __init__(self, debug: bool, interrupted: str = _INTERRUPTED) -> None:
        self.debug, self.interrupted = debug, interrupted

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et, exc, tb) -> bool:
        if exc is None or _is_exit(exc):
            return False
        if _by_ctrl_c(exc):
            _say_interrupted(self.interrupted)
            raise self.exit_with(130) from None
        if isinstance(exc, Exception):
            self.fail(exc)
        return False

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, MailsyncError):
            if self.debug:
                traceback.print_exc()
            echo(f"mailsync: error: {_show(exc)}", err=True)
            raise self.exit_with(exc.exit_code)
        if self.debug:
            traceback.print_exc()
        echo(f"mailsync: internal error: {type(exc).__name__}: {exc} "
             "(please report it; run with --debug for details)", err=True)
        raise self.exit_with(1)


def _debug_log() -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)


def load(config):
    """The config (FILE, or the default one), its warnings printed."""
    from mailsync import config as config_mod

    cfg = config_mod.load(config)
    for w in cfg.warnings:
        echo(f"mailsync: warning: {w}", err=True)
    return cfg


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


def sync_command(account, all_accounts: bool, mode, dry_run: bool, force: bool, quiet: bool, as_json: bool,
                 config, debug: bool) -> None:
    """`mailsync sync`, its options read (config: the file the command line named, or None;
    debug: --debug given anywhere). Ends with SystemExit(exit code)."""
    interrupted = "mailsync: interrupted; what was saved is kept, run again to continue"
    # the summary too: a Ctrl-C while it is printed is an interruption like any other
    with Errors(debug, interrupted):
        if debug:
            _debug_log()
        if account and all_accounts:
            raise ConfigError("name an account or give --all, not both",
                              hint=f"mailsync sync {account}, or mailsync sync --all")
        cfg = load(config)
        if account:
            code, summary = _sync_account(cfg, account, mode, dry_run, force, quiet, as_json, debug, prefix="")
            if as_json:
                echo(_json(summary))
            raise SystemExit(code)
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
            echo(_json({"exit_code": code, "accounts": summaries}))
        failed = [n for n, c in zip(cfg.accounts, codes) if c]
        if failed and not as_json:
            echo(f"mailsync: {len(failed)} of {len(codes)} accounts had errors ({', '.join(map(_show, failed))}); "
                 "everything else was saved", err=True)
    raise SystemExit(code)


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
    except Exception as exc:  # one account of several: its error is its line and code
        if not prefix:
            raise
        if debug:
            traceback.print_exc()
        if isinstance(exc, MailsyncError):
            echo(f"mailsync: error: {prefix}{_show(exc)}", err=True)
            return exc.exit_code, None
        echo(f"mailsync: internal error: {prefix}{type(exc).__name__}: {exc} "
             "(please report it; run with --debug for details)", err=True)
        return 1, None

    failed = result.failed
    if dry_run and not as_json:
        echo(_dry_run_text(result))
    for f in result.folders:
        for c in f.conflicts:
            echo(f"mailsync: conflict: {prefix}{_show(f.name)}: {_show(c)}", err=True)
        for n in f.notices:  # notices go to stderr even with --quiet: cron mails them
            echo(f"mailsync: notice: {prefix}{_show(f.name)}: {_show(n)}", err=True)
    for f in failed:
        echo(f"mailsync: error: {prefix}{_show(f.name)}: {_show(f.error)}", err=True)
    if not quiet and not as_json and not dry_run:
        echo(_line(result))
    if failed and not as_json:
        echo(f"mailsync: {prefix}{len(failed)} of {len(result.folders)} folders failed; "
             "everything else was saved, run again to retry", err=True)
    crashpoint.pause("summary")
    return result.exit_code, result.to_json()


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


# -- the fast path -----------------------------------------------------------------------------

_GLOBAL_VALUES = {"--config": "config", "-c": "config"}
_SYNC_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--json": "as_json", "--dry-run": "dry_run", "-n": "dry_run",
               "--force": "force", "--debug": "debug", "--all": "all_accounts", "-a": "all_accounts"}
_SYNC_VALUES = {"--config": "config", "-c": "config", "--mode": "mode"}


def fast_sync_args(args: list[str]) -> dict | None:
    """The arguments of sync_command when args is one of the shapes in this module's docstring,
    else None (typer reads them). A value must be a separate, non-empty word not starting with "-"
    (click would take such a word as the value; typer is left to)."""
    from pathlib import Path

    got: dict = {}
    i = 0
    seen: set[str] = set()

    def value(name: str) -> bool:
        if i + 1 >= len(args) or not args[i + 1] or args[i + 1].startswith("-") or name in seen:
            return False
        seen.add(name)
        got[name] = args[i + 1]
        return True

    # options of the command line as a whole, then `sync`
    root_config = None
    while i < len(args) and args[i] != "sync":
        a = args[i]
        if a in _GLOBAL_VALUES:
            if not value("root_config"):
                return None
            i += 2
        elif a == "--debug" and "root_debug" not in seen:
            seen.add("root_debug")
            i += 1
        else:
            return None
    if i >= len(args):
        return None
    root_config = got.pop("root_config", None)
    i += 1
    account = None
    while i < len(args):
        a = args[i]
        if a in _SYNC_FLAGS:
            name = _SYNC_FLAGS[a]
            if name in seen:
                return None
            seen.add(name)
            got[name] = True
            i += 1
        elif a in _SYNC_VALUES:
            if not value(_SYNC_VALUES[a]):
                return None
            i += 2
        elif a and not a.startswith("-") and account is None:
            account = a
            i += 1
        else:
            return None
    config = got.get("config") or root_config
    return {"account": account, "all_accounts": got.get("all_accounts", False), "mode": got.get("mode"),
            "dry_run": got.get("dry_run", False), "force": got.get("force", False),
            "quiet": got.get("quiet", False), "as_json": got.get("as_json", False),
            "config": Path(config) if config else None,
            "debug": got.get("debug", False) or "root_debug" in seen}


def fast_path(args: list[str]) -> dict | None:
    """sync_command's arguments if this command line takes the fast path, else None. Not when
    shell completion is asked for (click's _..._COMPLETE variable: typer's business)."""
    if "sync" not in args or any(k.endswith("_COMPLETE") for k in os.environ):
        return None
    return fast_sync_args(args)


def run_command(command) -> None:
    """Run command() (which ends with SystemExit) as the `mailsync` command does: a Ctrl-C at any
    moment ends it with exit 130 and one `interrupted` line, never a traceback. Once the exit
    code is decided Ctrl-C is ignored: while the interpreter shuts down it restores the default
    SIGINT action, and a Ctrl-C then would end a run that completed by the signal (status -2,
    nothing printed)."""
    try:
        try:
            command()  # ends with SystemExit
        finally:
            _ignore_ctrl_c()
            crashpoint.pause("decided")
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == 130:
            _exit_interrupted()
        raise
    except OSError as exc:
        import errno

        if exc.errno != errno.EPIPE:
            raise
        # stdout closed under us (`mailsync sync x --json | head -0`): as click does, exit 1
        sys.stdout, sys.stderr = _Pacified(sys.stdout), _Pacified(sys.stderr)
        raise SystemExit(1) from None


class _Pacified:
    """stdout after a broken pipe: flushing it at exit says nothing (as click's PacifyFlushWrapper)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


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
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


def run() -> None:
    """The `mailsync` command."""
    try:
        fast = fast_path(sys.argv[1:])
        if fast is None:
            from mailsync.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("mailsync: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    try:
        if fast is not None:
            run_command(lambda: sync_command(**fast))
        main()
    finally:
        # What is left is the interpreter's exit, whose last garbage collection walks every object
        # of every module loaded: 13 ms of a 110 ms no-change sync. Frozen, they are skipped.
        # Everything else still happens (atexit, logging's flush, files closed as modules are
        # cleared); only objects in reference cycles are not finalized, and the kernel closes
        # their descriptors.
        gc.freeze()
