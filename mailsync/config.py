"""TOML configuration -> frozen dataclasses. Every error names the file and the key."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
import stat
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mailsync.errors import ConfigError

PROTOCOLS = ("imap", "pop3")
MODES = ("backup", "sync", "mirror")
LAYOUTS = ("maildir++", "fs", "flat")
DEFAULT_PORTS = {"imap": 993, "pop3": 995}
STARTTLS_PORTS = {"imap": 143, "pop3": 110}


@dataclass(frozen=True)
class Account:
    name: str
    host: str
    username: str
    maildir: Path
    protocol: str = "imap"
    port: int = 993
    password_command: str | list[str] | None = None
    password_env: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    fingerprint: str | None = None  # normalised: upper-case hex without separators
    mode: str = "backup"
    folders: tuple[str, ...] = ("*",)
    layout: str = "maildir++"
    utf8_names: bool = False
    timeout: float = 60.0
    connections: int = 3
    batch_bytes: int = 8 * 1024 * 1024
    retries: int = 3
    conflict: str = "server"
    max_delete: int | None = None  # None: 10% of a folder (at least 5), never all of it
    create: str = "both"
    delete_after_days: float | None = None  # POP3: DELE what is safely stored and this old
    max_message_size: int | None = None     # skip (with a notice) anything bigger
    starttls: bool = False                  # plaintext port, then STARTTLS (required)
    folder_map: dict | None = None          # migrate: source folder -> destination folder
    max_bytes_per_second: int | None = None  # migrate/restore: upload rate limit
    auth: str = "password"                   # "password" | "oauth2"
    oauth2: OAuth2 | None = None             # [accounts.NAME.oauth2], with auth = "oauth2"
    source: Path | None = None  # the config file it came from

    def __repr__(self) -> str:  # never show secrets, even by accident
        return f"Account(name={self.name!r}, host={self.host!r}, port={self.port}, protocol={self.protocol!r})"


@dataclass(frozen=True)
class OAuth2:
    """[accounts.NAME.oauth2]: how to get access tokens. None of these is a secret (the client
    secret comes from a command; tokens live in the token store, see oauth2.py)."""

    provider: str = "custom"                 # "microsoft" | "google" | "custom"
    client_id: str = ""
    client_secret_command: str | list[str] | None = None
    tenant: str = "common"                   # microsoft: common | organizations | consumers | a tenant id
    flow: str = "loopback"                   # "loopback" | "device" | "paste"
    mechanism: str = "auto"                  # "auto" | "xoauth2" | "oauthbearer"
    scopes: tuple[str, ...] | None = None    # None: the provider's defaults for the protocol
    authorize_url: str | None = None
    token_url: str | None = None
    device_url: str | None = None
    token_command: str | list[str] | None = None  # prints an access token; instead of all the above


OAUTH2_PROVIDERS = ("microsoft", "google", "custom")
OAUTH2_FLOWS = ("loopback", "device", "paste")
OAUTH2_MECHANISMS = ("auto", "xoauth2", "oauthbearer")
_OAUTH2_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "provider": ((str,), '"microsoft", "google" or "custom"'),
    "client_id": ((str,), "a string"),
    "client_secret_command": ((str, list), "a command (string or list of strings)"),
    "tenant": ((str,), '"common", "organizations", "consumers" or a tenant id'),
    "flow": ((str,), '"loopback", "device" or "paste"'),
    "mechanism": ((str,), '"auto", "xoauth2" or "oauthbearer"'),
    "scopes": ((list,), "a list of scope strings"),
    "authorize_url": ((str,), "an https:// URL"),
    "token_url": ((str,), "an https:// URL"),
    "device_url": ((str,), "an https:// URL"),
    "token_command": ((str, list), "a command (string or list of strings)"),
}


@dataclass(frozen=True)
class Config:
    path: Path
    accounts: dict[str, Account]
    warnings: tuple[str, ...] = ()
    templates: dict[str, Template] = field(default_factory=dict)  # [templates.NAME], see fill_template

    def account(self, name: str) -> Account:
        try:
            return self.accounts[name]
        except KeyError:
            known = ", ".join(sorted(self.accounts)) or "none"
            close = difflib.get_close_matches(name, list(self.accounts), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"accounts in {self.path}: {known}"
            raise ConfigError(f"unknown account '{name}'", hint=hint) from None


# key -> (types accepted, description for error messages)
_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "host": ((str,), "a host name"),
    "port": ((int,), "a port number"),
    "protocol": ((str,), '"imap" or "pop3"'),
    "username": ((str,), "a string"),
    "password_command": ((str, list), "a command (string or list of strings)"),
    "password_env": ((str,), "an environment variable name"),
    "password": ((str,), "a string"),
    "ca_file": ((str,), "a file path"),
    "fingerprint": ((str,), '"sha256:AB:CD:..."'),
    "maildir": ((str,), "a directory path"),
    "mode": ((str,), '"backup", "sync" or "mirror"'),
    "folders": ((list,), 'a list of patterns like ["*", "!Trash"]'),
    "layout": ((str,), '"maildir++", "fs" or "flat"'),
    "utf8_names": ((bool,), "true or false"),
    "timeout": ((int, float), "seconds"),
    "connections": ((int,), "a number of connections (1-16)"),
    "batch_bytes": ((int,), "a number of bytes"),
    "retries": ((int,), "a number of retries (0-10)"),
    "conflict": ((str,), '"server", "local" or "union"'),
    "max_delete": ((int,), "a number of messages"),
    "create": ((str,), '"both", "server", "local" or "none"'),
    "delete_after_days": ((int, float), "a number of days"),
    "max_message_size": ((int,), "a number of bytes"),
    "folder_map": ((dict,), 'a table like { "Sent Items" = "Sent" }'),
    "starttls": ((bool,), "true or false"),
    "max_bytes_per_second": ((int,), "a number of bytes per second"),
    "auth": ((str,), '"password" or "oauth2"'),
    "oauth2": ((dict,), "a table [accounts.NAME.oauth2]"),
}


def default_path() -> Path:
    env = os.environ.get("MAILSYNC_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mailsync" / "config.toml"


def load(path: Path | str | None = None) -> Config:
    p = Path(path).expanduser() if path else default_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found",
                          hint="create it (see examples/config.toml) or pass --config FILE") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse(data, p)


def parse(data: dict, path: Path) -> Config:
    unknown = set(data) - {"accounts", "templates"}
    if unknown:
        key = min(unknown)
        raise ConfigError(f"{path}: unknown top-level key '{key}'",
                          hint="accounts go in [accounts.NAME] tables, templates in [templates.NAME]")
    accounts_raw = data.get("accounts", {})
    if not isinstance(accounts_raw, dict):
        raise ConfigError(f"{path}: 'accounts' must be a table of [accounts.NAME] sections")
    templates_raw = data.get("templates", {})
    if not isinstance(templates_raw, dict):
        raise ConfigError(f"{path}: 'templates' must be a table of [templates.NAME] sections")
    both = sorted(set(accounts_raw) & set(templates_raw))
    if both:
        raise ConfigError(f"{path}: '{both[0]}' is both an [accounts.{both[0]}] and a [templates.{both[0]}]",
                          hint="accounts and templates share one namespace; rename one of them")
    warnings: list[str] = []
    accounts = {name: _account(name, section, path, warnings) for name, section in accounts_raw.items()}
    templates = {name: _template(name, section, path, warnings) for name, section in templates_raw.items()}
    return Config(path=path, accounts=accounts, warnings=tuple(warnings), templates=templates)


def _check_keys(where: str, sec: dict) -> None:
    """Every key of an [accounts.NAME] (or [templates.NAME]) table known, every value of its type."""
    for key, value in sec.items():
        if key not in _KEYS:
            close = difflib.get_close_matches(key, list(_KEYS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see docs/configuration.md for the keys"
            raise ConfigError(f"{where}: unknown key '{key}'", hint=hint)
        types, desc = _KEYS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ConfigError(f"{where}: '{key}' must be {desc}, not {type(value).__name__} {value!r}"
                              if key not in ("password",) else f"{where}: 'password' must be a string")


def _account(name: str, sec, path: Path, warnings: list[str], where: str | None = None) -> Account:
    """where: how errors name the table (default "PATH: [accounts.NAME]"; a filled template's
    errors name the template)."""
    where = where or f"{path}: [accounts.{name}]"
    if not isinstance(sec, dict):
        raise ConfigError(f"{where} must be a table")
    _check_keys(where, sec)

    def need(key: str) -> str:
        v = sec.get(key)
        if v is None or v == "":
            raise ConfigError(f"{where}: missing key '{key}'", hint=f"add {key} = \"...\"")
        return v

    def choice(key: str, allowed: tuple[str, ...], default: str) -> str:
        v = sec.get(key, default)
        if v not in allowed:
            raise ConfigError(f"{where}: '{key}' is {v!r}; allowed: {', '.join(allowed)}")
        return v

    protocol = choice("protocol", PROTOCOLS, "imap")
    starttls = sec.get("starttls", False)
    port = sec.get("port", (STARTTLS_PORTS if starttls else DEFAULT_PORTS)[protocol])
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: 'port' must be between 1 and 65535, not {port}")
    layout = choice("layout", LAYOUTS, "maildir++")
    mode = choice("mode", MODES, "backup")

    folders = tuple(sec.get("folders", ["*"]))
    for pat in folders:
        if not isinstance(pat, str) or pat in ("", "!"):
            raise ConfigError(f"{where}: 'folders' entries must be non-empty patterns, not {pat!r}")

    pw_cmd = sec.get("password_command")
    if isinstance(pw_cmd, list) and (not pw_cmd or not all(isinstance(a, str) for a in pw_cmd)):
        raise ConfigError(f"{where}: 'password_command' list must hold strings")
    sources = [k for k in ("password_command", "password_env", "password") if k in sec]
    if len(sources) > 1:
        raise ConfigError(f"{where}: give only one of {', '.join(sources)}")
    if "password" in sec:
        try:
            mode_bits = path.stat().st_mode
        except OSError:
            mode_bits = 0
        if mode_bits & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{path} holds a password and is readable by others: run chmod 600 {path} "
                            "or use password_command")

    fingerprint = sec.get("fingerprint")
    if fingerprint is not None:
        fp = fingerprint.strip()
        if fp.lower().startswith("sha256:"):
            fp = fp[7:]
        fp = fp.replace(":", "").upper()
        if not re.fullmatch(r"[0-9A-F]{64}", fp):
            raise ConfigError(f"{where}: 'fingerprint' must be a SHA-256 fingerprint like \"sha256:AB:CD:...\" "
                              "(64 hex digits)")
        fingerprint = fp

    ca_file = sec.get("ca_file")
    ca_path = Path(ca_file).expanduser() if ca_file else None
    if ca_path is not None and not ca_path.is_absolute():
        ca_path = (path.parent / ca_path)

    maildir = Path(need("maildir")).expanduser()
    if not maildir.is_absolute():
        maildir = path.parent / maildir

    timeout = sec.get("timeout", 60)
    if not 1 <= timeout <= 3600:
        raise ConfigError(f"{where}: 'timeout' must be between 1 and 3600 seconds")
    connections = sec.get("connections", 3)
    if not 1 <= connections <= 16:
        raise ConfigError(f"{where}: 'connections' must be between 1 and 16")
    batch_bytes = sec.get("batch_bytes", 8 * 1024 * 1024)
    if not 64 * 1024 <= batch_bytes <= 1024 * 1024 * 1024:
        raise ConfigError(f"{where}: 'batch_bytes' must be between 65536 and 1073741824")
    retries = sec.get("retries", 3)
    if not 0 <= retries <= 10:
        raise ConfigError(f"{where}: 'retries' must be between 0 and 10")

    conflict = choice("conflict", ("server", "local", "union"), "server")
    create = choice("create", ("both", "server", "local", "none"), "both")
    max_delete = sec.get("max_delete")
    if max_delete is not None and max_delete < 0:
        raise ConfigError(f"{where}: 'max_delete' must be 0 or more")

    dad = sec.get("delete_after_days")
    if dad is not None and not 0 <= dad <= 100000:
        raise ConfigError(f"{where}: 'delete_after_days' must be 0 or more days")
    if dad is not None and protocol != "pop3":
        raise ConfigError(f"{where}: 'delete_after_days' applies to protocol = \"pop3\" only")
    mms = sec.get("max_message_size")
    if mms is not None and mms < 1:
        raise ConfigError(f"{where}: 'max_message_size' must be a positive number of bytes")

    fmap = sec.get("folder_map")
    if fmap is not None and not all(isinstance(k, str) and isinstance(v, str) and v for k, v in fmap.items()):
        raise ConfigError(f"{where}: 'folder_map' must map folder names to folder names")
    mbps = sec.get("max_bytes_per_second")
    if mbps is not None and mbps < 1024:
        raise ConfigError(f"{where}: 'max_bytes_per_second' must be at least 1024")

    auth = choice("auth", ("password", "oauth2"), "password")
    oauth2 = _oauth2(where, sec.get("oauth2"), auth, sources)

    return Account(
        name=name,
        host=need("host"),
        username=need("username"),
        maildir=maildir,
        protocol=protocol,
        port=port,
        password_command=pw_cmd,
        password_env=sec.get("password_env"),
        password=sec.get("password"),
        ca_file=ca_path,
        fingerprint=fingerprint,
        mode=mode,
        folders=folders,
        layout=layout,
        utf8_names=sec.get("utf8_names", layout == "fs"),
        timeout=float(timeout),
        connections=connections,
        batch_bytes=batch_bytes,
        retries=retries,
        conflict=conflict,
        max_delete=max_delete,
        create=create,
        delete_after_days=float(dad) if dad is not None else None,
        max_message_size=mms,
        starttls=starttls,
        folder_map=dict(fmap) if fmap else None,
        max_bytes_per_second=mbps,
        auth=auth,
        oauth2=oauth2,
        source=path,
    )


def _oauth2(where: str, sec: dict | None, auth: str, password_keys: list[str]) -> OAuth2 | None:
    """The [accounts.NAME.oauth2] table, checked; None for a password account."""
    if auth != "oauth2":
        if sec is not None:
            raise ConfigError(f"{where}: an [oauth2] table is given but auth is \"{auth}\"",
                              hint='set auth = "oauth2", or remove the table')
        return None
    where = f"{where[:-1]}.oauth2]"
    if password_keys:
        raise ConfigError(f"{where[:-8]}]: auth = \"oauth2\" takes no {password_keys[0]}",
                          hint="remove it: the login uses access tokens only")
    if sec is None:
        raise ConfigError(f"{where} is missing", hint="add it with at least provider and client_id, or token_command "
                          "(see docs/oauth2.md)")
    for key, value in sec.items():
        if key not in _OAUTH2_KEYS:
            close = difflib.get_close_matches(key, list(_OAUTH2_KEYS), n=1)
            raise ConfigError(f"{where}: unknown key '{key}'",
                              hint=f"did you mean '{close[0]}'?" if close else "see docs/oauth2.md for the keys")
        types, desc = _OAUTH2_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{where}: '{key}' must be {desc}, not {type(value).__name__} {value!r}")
    for key, allowed in (("provider", OAUTH2_PROVIDERS), ("flow", OAUTH2_FLOWS), ("mechanism", OAUTH2_MECHANISMS)):
        if key in sec and sec[key] not in allowed:
            raise ConfigError(f"{where}: '{key}' is {sec[key]!r}; allowed: {', '.join(allowed)}")
    for key in ("client_secret_command", "token_command"):
        v = sec.get(key)
        if isinstance(v, list) and (not v or not all(isinstance(a, str) for a in v)):
            raise ConfigError(f"{where}: '{key}' list must hold strings")
    scopes = sec.get("scopes")
    if scopes is not None and (not scopes or not all(isinstance(x, str) and x for x in scopes)):
        raise ConfigError(f"{where}: 'scopes' must be a list of scope strings")
    provider = sec.get("provider", "custom")
    if "token_command" not in sec:
        if not sec.get("client_id"):
            raise ConfigError(f"{where}: missing key 'client_id'",
                              hint="register an app with the provider (docs/oauth2.md), or give token_command")
        if provider == "custom" and not sec.get("token_url"):
            raise ConfigError(f"{where}: provider \"custom\" needs token_url (and authorize_url or device_url)")
    for key in ("authorize_url", "token_url", "device_url"):
        url = sec.get(key)
        if url is not None and not endpoint_ok(url):
            raise ConfigError(f"{where}: '{key}' must be an https:// URL (http:// only for 127.0.0.1, ::1 or "
                              f"localhost), not {url!r}")
    return OAuth2(provider=provider, client_id=sec.get("client_id", ""),
                  client_secret_command=sec.get("client_secret_command"), tenant=sec.get("tenant", "common"),
                  flow=sec.get("flow", "loopback"), mechanism=sec.get("mechanism", "auto"),
                  scopes=tuple(scopes) if scopes else None, authorize_url=sec.get("authorize_url"),
                  token_url=sec.get("token_url"), device_url=sec.get("device_url"),
                  token_command=sec.get("token_command"))


def endpoint_ok(url: str) -> bool:
    """HTTPS, or plain HTTP to a loopback address (tests, a local proxy)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


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


def _template(name: str, sec, path: Path, warnings: list[str]) -> Template:
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
