"""[templates.NAME]: account tables with {column} placeholders, filled from a jobs file's rows
(mailsync fleet). Loaded only when a config has templates or a command fills one."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
import string
from dataclasses import dataclass
from pathlib import Path

from mailsync.config import Account, Config, _account, _check_keys
from mailsync.errors import ConfigError

# ----------------------------------------------------------------------------- templates
#
# [templates.NAME] takes the keys of [accounts.NAME]; its strings may hold {column} placeholders,
# filled from a row of a `mailsync fleet` jobs file (docs/fleet.md). `{{` and `}}` are literal
# braces. A placeholder is a plain name: no attributes, indexes, conversions or format specs.

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+=-]*\Z")  # kept as is in an account name
# keys whose value is checked against a set or a pattern: with a placeholder, only a row's value
# can be checked (the stand-in "x" would fail where the real value may pass)
_VALUE_CHECKED = {"protocol", "mode", "layout", "conflict", "create", "auth", "fingerprint",
                  "provider", "flow", "mechanism", "authorize_url", "token_url", "device_url"}
_PATH_KEYS = ("maildir", "ca_file")  # a value filled in here may not hold '/' (or be '.' or '..')
_COMMAND_KEYS = ("password_command", "client_secret_command", "token_command")


@dataclass(frozen=True)
class Template:
    name: str
    section: dict            # the TOML table as written (placeholders unfilled)
    fields: tuple[str, ...]  # the placeholder names it uses, sorted
    source: Path

    def account_name(self, values: dict[str, str]) -> str:
        """The name of the account filled from values: "TEMPLATE-VALUE" (the values of the
        placeholders it uses, in the order of their names, joined by '-'). Unique per distinct
        set of values and safe as a file name (it names the migration state file). A value with
        other characters than letters, digits and ._@+=- (or, with several placeholders, a '-'
        that would make the join ambiguous) is written with those replaced by '_' and the name
        gets "~" and 8 hex digits of a hash of the exact values; so does a name over 100
        characters (shortened)."""
        if not self.fields:
            return self.name
        parts = [values[f] for f in self.fields]
        plain = all(_SAFE_VALUE.match(p) for p in parts) and (len(parts) == 1 or not any("-" in p for p in parts))
        name = f"{self.name}-" + "-".join(re.sub(r"[^A-Za-z0-9._@+=-]", "_", p) for p in parts)
        if not plain or len(name) > 100:
            digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8]
            name = f"{name[:90]}~{digest}"
        return name


def _placeholders(where: str, key: str, text: str) -> list[str]:
    """The placeholder names in text; a ConfigError for anything but plain {name} ones."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{where}: '{key}': {exc} in {text!r}", hint="write a literal brace as {{ or }}") from None
    names = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not _FIELD.match(name) or spec or conversion:
            raise ConfigError(f"{where}: '{key}': placeholder {{{name}{'!' + conversion if conversion else ''}"
                              f"{':' + spec if spec else ''}}} is not a plain column name",
                              hint="use {column} with a column name of the jobs file (letters, digits, _ and -)")
        names.append(name)
    return names


def _walk(sec: dict, fn, key: str = ""):
    """sec with fn(key, string) applied to every string in it (in lists and sub-tables too; the
    key is the one of the table entry the string belongs to). A command given as one string is
    split into its argv first, so a value filled in stays one argument whatever it holds."""
    def one(k: str, v, in_list: bool = False):
        if isinstance(v, str):
            if k in _COMMAND_KEYS and not in_list:
                try:
                    argv = shlex.split(v)
                except ValueError as exc:
                    raise ConfigError(f"'{k}' cannot be parsed: {exc}") from None
                return [fn(k, a) for a in argv]
            return fn(k, v)
        if isinstance(v, list):
            return [one(k, x, True) for x in v]
        if isinstance(v, dict):
            return {kk: one(kk, vv) for kk, vv in v.items()}
        return v
    return {k: one(k, v) for k, v in sec.items()}


def check_template(name: str, sec, path: Path, warnings: list[str]) -> Template:
    """Check a template as far as it can be without a row's values: the name, the keys and the
    types, the placeholders; then, with each placeholder filled by a stand-in, every check an
    account gets (unless a placeholder sits in a key whose value only a row can tell)."""
    where = f"{path}: [templates.{name}]"
    if not _TEMPLATE_NAME.match(name):
        raise ConfigError(f"{where}: a template name may hold letters, digits, '.', '_' and '-' only",
                          hint="it starts the names of the accounts filled from it, which name files")
    if not isinstance(sec, dict):
        raise ConfigError(f"{where} must be a table")
    _check_keys(where, sec)
    fields: set[str] = set()
    value_checked = False

    def scan(key: str, text: str) -> str:
        nonlocal value_checked
        names = _placeholders(where, key, text)
        if names and key == "password":
            raise ConfigError(f"{where}: 'password' may not hold a placeholder",
                              hint="a jobs file holds no secrets: use password_command, e.g. "
                                   "\"vault read -field=pw mail/{user}\"")
        fields.update(names)
        value_checked = value_checked or bool(names and key in _VALUE_CHECKED)
        return "x" if names else text

    try:
        stand_in = _walk(sec, scan)
    except ConfigError as exc:
        if exc.message.startswith(str(path)):
            raise
        raise ConfigError(f"{where}: {exc.message}") from None
    if not value_checked:
        _account(name, stand_in, path, warnings, where=where)
    return Template(name=name, section=sec, fields=tuple(sorted(fields)), source=path)


class _Values(dict):
    def __init__(self, values: dict[str, str], where: str) -> None:
        super().__init__(values)
        self.where = where

    def __missing__(self, key: str):
        raise ConfigError(f"{self.where}: no value for {{{key}}}",
                          hint=f"add a column '{key}' to the jobs file and fill it in this row")


def fill_template(cfg: Config, name: str, values: dict[str, str]) -> Account:
    """The account made from [templates.NAME] with its placeholders filled from values (a jobs
    file row: column -> text); named by Template.account_name. It is checked like any account.
    A value may not hold control characters; one filled into maildir or ca_file may not hold '/'
    or be '.' or '..' (the template decides the directory, a row only names its last parts)."""
    try:
        tpl = cfg.templates[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(cfg.templates), n=1)
        raise ConfigError(f"unknown template '{name}'", hint=f"did you mean '{close[0]}'?" if close else
                          f"templates in {cfg.path}: {', '.join(sorted(cfg.templates)) or 'none'}") from None
    where = f"{tpl.source}: [templates.{name}]"
    vals = _Values(values, where)
    for f in tpl.fields:
        v = vals[f]
        if v == "":
            raise ConfigError(f"{where}: the value for {{{f}}} is empty", hint=f"fill the column '{f}' in this row")
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ConfigError(f"{where}: the value for {{{f}}} holds a control character: {v!r}")

    def fill(key: str, text: str) -> str:
        if key in _PATH_KEYS:
            for f in _placeholders(where, key, text):
                if "/" in vals[f] or vals[f] in (".", ".."):
                    raise ConfigError(f"{where}: '{key}': the value for {{{f}}} may not hold '/' or be "
                                      f"'.' or '..': {vals[f]!r}")
        return text.format_map(vals)

    sec = _walk(tpl.section, fill)
    return _account(tpl.account_name(values), sec, tpl.source, [], where=where)
