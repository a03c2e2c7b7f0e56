"""TOML configuration -> frozen dataclasses. Every error names the file and the key."""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mailsync.errors import ConfigError

if TYPE_CHECKING:
    from mailsync import templates

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
    max_bytes_per_second: int | None = None  # message bytes per second, downloads and uploads (ratelimit.py)
    auth: str = "password"                   # "password" | "oauth2"
    oauth2: OAuth2 | None = None             # [accounts.NAME.oauth2], with auth = "oauth2"
    watch_folders: tuple[str, ...] = ("INBOX",)  # watch: folders kept in IDLE, one connection each
    poll_interval: float = 300.0             # watch: seconds between full syncs (and POP3 polls)
    idle_renew: float = 1500.0               # watch: seconds before IDLE is ended and begun again
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
    templates: dict[str, templates.Template] = field(default_factory=dict)  # [templates.NAME]: templates.py

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
    "watch_folders": ((list,), 'a list of folder names like ["INBOX", "Work"]'),
    "poll_interval": ((int, float), "seconds"),
    "idle_renew": ((int, float), "seconds"),
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
    templates = {}
    if templates_raw:
        from mailsync.templates import check_template  # (only configs with templates load it)

        templates = {name: check_template(name, section, path, warnings) for name, section in templates_raw.items()}
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

    watch_folders = sec.get("watch_folders", ["INBOX"])
    if not all(isinstance(f, str) and f for f in watch_folders) or len(watch_folders) > 16:
        raise ConfigError(f"{where}: 'watch_folders' must be a list of at most 16 folder names",
                          hint="each is kept in IDLE on a connection of its own; the others are polled")
    poll_interval = sec.get("poll_interval", 300)
    if not 1 <= poll_interval <= 86400:
        raise ConfigError(f"{where}: 'poll_interval' must be between 1 and 86400 seconds")
    idle_renew = sec.get("idle_renew", 1500)
    if not 1 <= idle_renew <= 1740:
        raise ConfigError(f"{where}: 'idle_renew' must be between 1 and 1740 seconds",
                          hint="servers may end an IDLE after 30 minutes (RFC 2177); the default is 1500")

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
        watch_folders=tuple(watch_folders),
        poll_interval=float(poll_interval),
        idle_renew=float(idle_renew),
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


def fill_template(cfg: Config, name: str, values: dict[str, str]) -> Account:
    """The account made from [templates.NAME] with its placeholders filled from values (see
    templates.fill_template; that module is loaded only by configs and commands that use templates)."""
    from mailsync.templates import fill_template as fill

    return fill(cfg, name, values)
