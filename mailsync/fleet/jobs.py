"""The jobs file: CSV with a header row, one job a row (docs/fleet.md).

Columns: `command` (backup, sync, migrate, verify), `account`, `destination` (migrate only), and
any others: the values of the templates' {column} placeholders. `account` and `destination` name
an [accounts.NAME] or a [templates.NAME] of the config. Blank rows and rows whose first cell
starts with '#' are skipped.

read_jobs() checks every row (filling its templates the way a worker will) before anything runs
and raises one JobsError that lists every bad row by line number. A Job holds names and template
values only, never a secret: a worker re-reads the config and resolves (and logs in to) the
accounts itself.
"""

from __future__ import annotations

import csv
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from mailsync.config import Account, Config, fill_template
from mailsync.errors import ConfigError

COMMANDS = ("backup", "sync", "migrate", "verify")
STANDARD = ("command", "account", "destination")


class JobsError(ConfigError):
    """Bad rows in a jobs file: problems is [(line, text)] (line 1 is the header); str() has one
    line per problem."""

    def __init__(self, path: Path, problems: list[tuple[int, str]], header_line: int = 1) -> None:
        self.path, self.problems = path, problems
        n = len({line for line, _ in problems if line != header_line})
        what = [f"{n} bad row{'s' if n != 1 else ''}"] if n else []
        if any(line == header_line for line, _ in problems):
            what.append("a bad header")
        head = f"{path}: {' and '.join(what)}; nothing was run"
        super().__init__("\n".join([head] + [f"{path}, line {line}: {text}" for line, text in problems]))


@dataclass(frozen=True)
class Job:
    line: int                        # in the jobs file (the header is line 1)
    command: str                     # backup | sync | migrate | verify
    account: str                     # as written: an account or a template name
    destination: str | None          # migrate: the same; None otherwise
    values: dict[str, str] = field(default_factory=dict, hash=False)  # the columns its templates use
    # the accounts it resolves to (a filled template's own name), as read_jobs found them; a
    # worker whose config makes other names refuses the job ("" / None: not checked)
    account_name: str = ""
    destination_name: str | None = None

    def to_dict(self) -> dict:
        """A plain JSON-able dict (what a backend sends to a worker)."""
        return {"line": self.line, "command": self.command, "account": self.account,
                "destination": self.destination, "values": dict(self.values),
                "account_name": self.account_name, "destination_name": self.destination_name}

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        try:
            values = {str(k): str(v) for k, v in (d.get("values") or {}).items()}
            return cls(line=int(d.get("line", 0)), command=str(d["command"]), account=str(d["account"]),
                       destination=d.get("destination") or None, values=values,
                       account_name=str(d.get("account_name") or ""), destination_name=d.get("destination_name") or None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"not a job: {d!r} ({exc})") from None

    @property
    def label(self) -> str:
        dst = self.destination_name or self.destination
        return f"line {self.line}: {self.command} {self.account_name or self.account}" + (f" -> {dst}" if dst else "")


def resolve(cfg: Config, name: str, values: dict[str, str]) -> Account:
    """The account `name` stands for: [accounts.NAME], or [templates.NAME] filled from values."""
    if name in cfg.accounts:
        return cfg.accounts[name]
    if name in cfg.templates:
        return fill_template(cfg, name, values)
    known = list(cfg.accounts) + list(cfg.templates)
    close = difflib.get_close_matches(name, known, n=1)
    raise ConfigError(f"unknown account or template '{name}'",
                      hint=f"did you mean '{close[0]}'?" if close else f"none such in {cfg.path}")


def accounts_of(cfg: Config, job: Job) -> tuple[Account, Account | None]:
    """The job's account (and destination), resolved from the config as it is now."""
    acc = resolve(cfg, job.account, job.values)
    dst = resolve(cfg, job.destination, job.values) if job.destination else None
    for want, got in ((job.account_name, acc), (job.destination_name, dst)):
        if got is not None and want and got.name != want:
            raise ConfigError(f"the job names account '{want}', the config now makes it '{got.name}'",
                              hint="the config changed since the jobs were read; run the jobs file again")
    return acc, dst


def check(command: str, acc: Account, dst: Account | None) -> None:
    """What the single commands refuse before they start (cli.py), refused here too."""
    if command == "migrate":
        for a in (acc, dst):
            if a is not None and a.protocol != "imap":
                raise ConfigError(f"migrate needs IMAP accounts; '{a.name}' uses {a.protocol}")
        if dst is not None and acc.name == dst.name:
            raise ConfigError(f"migrate from '{acc.name}' to itself")
    elif command == "sync" and acc.protocol == "pop3" and acc.mode != "backup":
        raise ConfigError(f"'{acc.name}' is a POP3 account: POP3 is download-only, mode '{acc.mode}' needs IMAP")


def _cell(text: str) -> str:
    return text if text.isprintable() else repr(text)


def read_jobs(path: Path | str, cfg: Config) -> list[Job]:
    """Every job of the jobs file at path, checked against cfg; a JobsError listing every bad row."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = _rows(fh)
    except FileNotFoundError:
        raise ConfigError(f"jobs file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read jobs file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except csv.Error as exc:
        raise ConfigError(f"{path}: not a valid CSV file: {exc}") from None
    if not rows:
        raise ConfigError(f"{path} is empty", hint="the first row names the columns: command,account,destination,...")
    header_line, header = rows[0]
    problems: list[tuple[int, str]] = []
    names = [h.strip() for h in header]
    for col in ("command", "account"):
        if col not in names:
            problems.append((header_line, f"no column '{col}' (the header is {','.join(names)})"))
    dupes = sorted({n for n in names if names.count(n) > 1})
    for n in dupes:
        problems.append((header_line, f"column '{n}' appears twice"))
    if "" in names:
        problems.append((header_line, f"column {names.index('') + 1} has no name"))
    if problems:
        raise JobsError(path, problems, header_line)
    # a column a template needs and the file lacks: said once, not on every row
    missing_cols: dict[str, set[str]] = {}
    for t in cfg.templates.values():
        for f in t.fields:
            if f not in names:
                missing_cols.setdefault(t.name, set()).add(f)
    told: set[str] = set()

    jobs: list[Job] = []
    seen: dict[tuple, int] = {}
    maildirs: dict[str, tuple[str, int]] = {}
    for line, cells in rows[1:]:
        bad: list[str] = []
        if len(cells) != len(names):
            problems.append((line, f"{len(cells)} cells, the header has {len(names)}"))
            continue
        row = {n: c.strip() for n, c in zip(names, cells)}
        command = row.get("command", "").lower()
        account = row.get("account", "")
        destination = row.get("destination", "") or None
        if command not in COMMANDS:
            bad.append(f"unknown command {_cell(row.get('command', ''))!r}; use one of {', '.join(COMMANDS)}"
                       if command else f"no command; use one of {', '.join(COMMANDS)}")
        if command == "migrate" and not destination:
            bad.append("migrate needs a destination")
        if command in COMMANDS and command != "migrate" and destination:
            bad.append(f"a destination is for migrate only, not {command}")
        if not account:
            bad.append("no account")
        used = [n for n in (account, destination) if n]
        for n in used:
            if n in missing_cols:
                if n not in told:  # once, on the first row that uses the template
                    told.add(n)
                    cols = ", ".join(sorted(missing_cols[n]))
                    s = "s" if len(missing_cols[n]) > 1 else ""
                    problems.append((header_line, f"template '{n}' uses column{s} {cols}, which the jobs file lacks"))
                bad.append(f"template '{n}' cannot be filled (see the header)")
        if bad:
            problems.append((line, "; ".join(bad)))
            continue
        fields = sorted({f for n in used if n in cfg.templates for f in cfg.templates[n].fields})
        values = {f: row[f] for f in fields}
        try:
            acc = resolve(cfg, account, values)
            dst = resolve(cfg, destination, values) if destination else None
            for a, n in ((acc, account), (dst, destination)):
                if a is not None and n in cfg.templates and a.name in cfg.accounts:
                    raise ConfigError(f"template '{n}' makes account '{a.name}', which is also an [accounts.{a.name}]",
                                      hint="rename the account or the template")
            check(command, acc, dst)
        except ConfigError as exc:
            problems.append((line, _cell(str(exc))))
            continue
        if command != "migrate":  # one Maildir, one account (its state would mix theirs)
            where = os.path.abspath(acc.maildir)
            other, other_line = maildirs.setdefault(where, (acc.name, line))
            if other != acc.name:
                why = f"'{acc.name}' keeps its Maildir in {where}, as '{other}' does (line {other_line})"
                problems.append((line, f"{why}; give each account its own maildir"))
                continue
        key = (command, acc.name, dst.name if dst else None)
        if key in seen:
            what = f"{command} {acc.name}" + (f" -> {dst.name}" if dst else "")
            problems.append((line, f"the same job as line {seen[key]} ({what})"))
            continue
        seen[key] = line
        jobs.append(Job(line=line, command=command, account=account, destination=destination, values=values,
                        account_name=acc.name, destination_name=dst.name if dst else None))
    if problems:
        raise JobsError(path, sorted(problems), header_line)
    if not jobs:
        raise ConfigError(f"{path} holds no jobs", hint="add rows below the header: command,account,...")
    return jobs


def _rows(fh) -> list[tuple[int, list[str]]]:
    """(first line number, cells) of every row that is not blank or a '#' comment."""
    out = []
    reader = csv.reader(fh, strict=True)
    end = 0
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        out.append((start, cells))
    return out
