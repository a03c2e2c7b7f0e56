"""The local side: Maildir folders, crash-safe delivery, flag renames, folder layouts.

Delivery is two-phase so that a kill -9 at any point leaves every message exactly once:
  stage()   write tmp/<key> (0600), set mtime          -- invisible to mail readers
  sync()    make the staged files durable, as a group  -- one syncfs (or fsync each)
  (caller commits the state rows that name the keys)
  publish() link tmp/<key> -> new|cur/<key>:2,<flags>, unlink tmp, fsync the directories
A state row whose file is still in tmp/ is published on the next run; a tmp file no state row
names is removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import os
import re
import secrets
import socket
import time
from pathlib import Path

from mailsync import utf7
from mailsync.errors import StorageError
from mailsync.fetch import BodyWriter
from mailsync.model import flags_from_letters, info_letters, join_name, split_name

DIR_MODE = 0o700
FILE_MODE = 0o600
SUBDIRS = ("cur", "new", "tmp")
_counter = itertools.count(1)
_OUR_TMP = re.compile(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]+\.")
STALE_TMP_SECONDS = 36 * 3600  # the Maildir convention for leftovers of other programs

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _syncfs = _libc.syncfs
except (OSError, AttributeError):
    _syncfs = None


def _hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


HOST = _hostname()


def new_key() -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{HOST}"


def storage_error(exc: OSError, what: str) -> StorageError:
    hint = {
        errno.ENOSPC: "free some disk space and run again; nothing was lost",
        errno.EDQUOT: "raise the quota or free space and run again; nothing was lost",
        errno.EACCES: "check the directory's owner and permissions",
        errno.EPERM: "check the directory's owner and permissions",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno, "")
    return StorageError(f"{what}: {exc.strerror or exc}", hint=hint)


# ----------------------------------------------------------------------------- names on disk

def _escape(text: str, unsafe: str) -> str:
    out = []
    for ch in text:
        if ch in unsafe or ch == "%" or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def disk_component(name: str, layout: str, utf8_names: bool) -> str:
    """One folder-name component (already split on the server's separator) -> a safe dir name."""
    if name == "":
        return "%-"
    text = name if utf8_names else utf7.encode(name)
    if layout == "maildir++":
        return _escape(text, "./")
    text = _escape(text, "/")
    if text.startswith("."):
        text = "%2E" + text[1:]
    if text.lower() in SUBDIRS:  # also on case-insensitive file systems
        text = f"%{ord(text[0]):02X}{text[1:]}"
    return text


def folder_path(root: Path, parts: list[str], layout: str, utf8_names: bool) -> Path:
    """Server folder (its name split into components) -> its Maildir directory under root."""
    if len(parts) == 1 and parts[0].upper() == "INBOX":
        return root
    comps = [disk_component(p, layout, utf8_names) for p in parts]
    if layout == "maildir++":
        if comps[0].lower() == "mailsync":  # .mailsync.db, .mailsync.lock are ours (any case)
            comps[0] = f"%{ord(comps[0][0]):02X}{comps[0][1:]}"
        return root / ("." + ".".join(comps))
    return root.joinpath(*comps)


def make_dirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every directory we create (no chmod race)."""
    try:
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, f"cannot create {path}") from None


# ----------------------------------------------------------------------------- keywords

KEYWORDS_FILE = "dovecot-keywords"


class KeywordMap:
    """IMAP keywords <-> Maildir info letters a-z, in Dovecot's format: the folder's
    `dovecot-keywords` file holds lines "N keyword", N = 0..25 standing for letter a+N."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / KEYWORDS_FILE
        self.names: dict[int, str] = {}
        try:
            for line in self.path.read_text("utf-8", "replace").splitlines():
                num, _, name = line.partition(" ")
                if num.isdigit() and 0 <= int(num) < 26 and name:
                    self.names[int(num)] = name
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"cannot read {self.path}") from None
        self.index = {v: k for k, v in self.names.items()}

    def keywords(self, letters: str) -> frozenset[str]:
        return frozenset(self.names[ord(c) - 97] for c in letters if "a" <= c <= "z" and ord(c) - 97 in self.names)

    def known_letter(self, c: str) -> bool:
        return "a" <= c <= "z" and ord(c) - 97 in self.names

    def letters(self, keywords) -> str:
        """Letters for keywords, giving new keywords free letters (saved atomically). Keywords
        beyond the 26 letters stay in the state only."""
        new = [k for k in sorted(keywords) if k not in self.index]
        if new:
            for k in new:
                free = next((i for i in range(26) if i not in self.names), None)
                if free is None:
                    break
                self.names[free] = k
                self.index[k] = free
            self._save()
        return "".join(chr(97 + self.index[k]) for k in keywords if k in self.index)

    def representable(self, keywords) -> frozenset[str]:
        return frozenset(k for k in keywords if k in self.index)

    def _save(self) -> None:
        tmp = self.path.with_name(f".{KEYWORDS_FILE}.{os.getpid()}.tmp")
        text = "".join(f"{i} {n}\n" for i, n in sorted(self.names.items()))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise storage_error(exc, f"cannot write {self.path}") from None


class StagedFile(BodyWriter):
    """A message being written into tmp/ piece by piece (a streamed FETCH body): hashed as it
    goes, with the start kept for the Message-ID. finish() closes it with its mtime set."""

    HEAD = 64 * 1024

    def __init__(self, folder: Path, hashed: bool = True) -> None:
        self.key = new_key()
        self.path = folder / "tmp" / self.key
        self.size = 0
        self._sha = hashlib.sha256() if hashed else None
        self.head = b""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            raise storage_error(exc, f"cannot write {self.path}") from None

    def write(self, data: bytes) -> None:
        if self._sha is not None:
            self._sha.update(data)
        if self._sha is not None and len(self.head) < self.HEAD:
            self.head += data[:self.HEAD - len(self.head)]
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            self.discard()
            raise storage_error(exc, f"cannot write {self.path}") from None
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def finish(self, mtime: float | None) -> None:
        try:
            if mtime is not None:
                os.utime(self.fd, (mtime, mtime))
            os.close(self.fd)
            self.fd = -1
        except OSError as exc:
            self.discard()
            raise storage_error(exc, f"cannot write {self.path}") from None

    def discard(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass


# ----------------------------------------------------------------------------- one folder

class MaildirFolder:
    def __init__(self, path: Path, *, maildirfolder: bool = False) -> None:
        self.path = path
        self.maildirfolder = maildirfolder
        self.kw = KeywordMap(path)

    def flags_of(self, name: str) -> tuple[frozenset[str], frozenset[str]]:
        """(system flags, keywords) a file name carries."""
        info = split_name(name)[1] or ""
        return flags_from_letters(info), self.kw.keywords(info)

    def _info(self, flags: frozenset[str], keywords, old_info: str = "") -> str:
        # keep letters we do not know; keyword letters we know are replaced by the current ones
        keep = "".join(c for c in old_info if not self.kw.known_letter(c))
        return info_letters(flags, keep + self.kw.letters(keywords))

    def ensure(self) -> None:
        old = os.umask(0o077)
        try:
            for sub in SUBDIRS:
                make_dirs(self.path / sub)
            if self.maildirfolder:
                marker = self.path / "maildirfolder"
                if not marker.exists():
                    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        except OSError as exc:
            raise storage_error(exc, f"cannot create {self.path}") from None
        finally:
            os.umask(old)

    def scan(self) -> dict[str, tuple[str, str]]:
        """key -> (subdir, file name) for every message file in new/ and cur/ (cur wins)."""
        found: dict[str, tuple[str, str]] = {}
        for sub in ("new", "cur"):
            try:
                with os.scandir(self.path / sub) as it:
                    for entry in it:
                        if entry.name.startswith("."):
                            continue
                        key, _ = split_name(entry.name)
                        found[key] = (sub, entry.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise storage_error(exc, f"cannot read {self.path / sub}") from None
        return found

    def tmp_keys(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.path / "tmp") if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    # -- delivery -----------------------------------------------------------------------

    def open_staged(self, size: int = 0) -> StagedFile:
        """A new file in tmp/ to stream a message into (see StagedFile)."""
        return StagedFile(self.path)

    def stage(self, data: bytes, mtime: float | None) -> str:
        """Write a whole message held in memory to tmp/; returns its key."""
        f = StagedFile(self.path, hashed=False)
        f.write(data)
        f.finish(mtime)
        return f.key

    def sync(self, keys: list[str]) -> None:
        """Make staged files durable, grouped: one syncfs() where the OS has it."""
        if not keys:
            return
        try:
            if _syncfs is not None:
                fd = os.open(self.path / "tmp", os.O_RDONLY)
                try:
                    if _syncfs(fd) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, os.strerror(e))
                finally:
                    os.close(fd)
            else:
                for key in keys:
                    fd = os.open(self.path / "tmp" / key, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except OSError as exc:
            raise storage_error(exc, f"cannot flush {self.path}") from None

    def publish(self, key: str, flags: frozenset[str], keywords=()) -> str:
        """tmp/<key> -> new|cur/<key>:2,<letters>. Never overwrites. Returns the file name."""
        sub = "cur" if "\\Seen" in flags else "new"
        name = join_name(key, self._info(flags, keywords))
        src = self.path / "tmp" / key
        dst = self.path / sub / name
        try:
            os.link(src, dst)
        except FileExistsError:
            pass  # published before a crash; the tmp copy is the same file
        except OSError as exc:
            raise storage_error(exc, f"cannot deliver into {self.path / sub}") from None
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"cannot remove {src}") from None
        return name

    def sync_dirs(self) -> None:
        try:
            for sub in ("new", "cur", "tmp"):
                fd = os.open(self.path / sub, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise storage_error(exc, f"cannot flush {self.path}") from None

    def discard(self, key: str) -> None:
        try:
            os.unlink(self.path / "tmp" / key)
        except FileNotFoundError:
            pass

    def retag(self, key: str, where: tuple[str, str], flags: frozenset[str], keywords=()) -> str:
        """Rename a message file so its info and new/cur place match flags; keeps unknown letters."""
        sub, name = where
        _, info = split_name(name)
        want_sub = "cur" if "\\Seen" in flags else "new"
        want = join_name(key, self._info(flags, keywords, info or ""))
        if (sub, name) == (want_sub, want):
            return want
        src = self.path / sub / name
        dst = self.path / want_sub / want
        try:
            os.link(src, dst)
            os.unlink(src)
        except FileExistsError:
            os.unlink(src)
        except OSError as exc:
            raise storage_error(exc, f"cannot rename {src}") from None
        return want

    def read(self, where: tuple[str, str]) -> bytes:
        with open(self.path / where[0] / where[1], "rb") as f:
            return f.read()

    def clean_tmp(self, keep: set[str]) -> int:
        """Remove our own tmp leftovers not named by the state, and anyone's older than 36 h."""
        removed = 0
        now = time.time()
        for name in self.tmp_keys() - keep:
            path = self.path / "tmp" / name
            try:
                if _OUR_TMP.match(name) or now - path.stat().st_mtime > STALE_TMP_SECONDS:
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
        return removed
