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
import errno
import hashlib
import itertools
import os
import random
import re
import socket
import struct
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
SCAN_TRIES = 3     # listings of new/ and cur/ while a mail reader changes them (see scan)
RENAME_TRIES = 50  # a file a mail reader renames again and again is looked for this often

_libc = None
try:
    # the C library the interpreter runs on, by the process's own symbols: no ctypes.util.find_library,
    # which runs ldconfig (6 ms of every run's start)
    _libc = ctypes.CDLL(None, use_errno=True)
    _syncfs = _libc.syncfs
except (OSError, AttributeError):
    _syncfs = None


def _hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


HOST = _hostname()


class _Unique:
    """The process id and random bits of new_key, without two system calls per message: the
    pid is read once (again in a forked child), the R part comes from a generator seeded from
    the OS (again in a forked child, so parent and child never draw the same bits)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.rand = random.Random(os.urandom(16))


_unique = _Unique()
os.register_at_fork(after_in_child=_unique.__init__)


def new_key() -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    u = _unique
    return f"{sec}.M{usec}P{u.pid}Q{next(_counter)}R{u.rand.getrandbits(32):08x}.{HOST}"


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
    """One folder-name component (already split on the server's separator) -> a safe dir name.

    maildir++ and flat join the components with '.', so a '.' inside one is escaped (%2E)."""
    if name == "":
        return "%-"
    text = name if utf8_names else utf7.encode(name)
    if layout in ("maildir++", "flat"):
        return _escape(text, "./")
    text = _escape(text, "/")
    if text.startswith("."):
        text = "%2E" + text[1:]
    if text.lower() in SUBDIRS:  # also on case-insensitive file systems
        text = f"%{ord(text[0]):02X}{text[1:]}"
    return text


def folder_path(root: Path, parts: list[str], layout: str, utf8_names: bool) -> Path:
    """Server folder (its name split into components) -> its Maildir directory under root.

    maildir++: INBOX is root, Archive/2020 is root/.Archive.2020 (Dovecot, Courier, mbsync).
    fs: INBOX is root, Archive/2020 is root/Archive/2020 (mbsync's SubFolders Verbatim).
    flat: every folder, INBOX included, in its own directory directly under root, named by its
    components joined with '.' and no leading dot: root/INBOX, root/Archive.2020 (OfflineIMAP's
    default Maildir layout, mbsync's `Flatten .`). A '.' never starts such a name (components
    escape '.'), so it is never hidden nor one of mailsync's own .mailsync.* files; a name that
    would be cur, new or tmp (any case) has its first letter escaped, as in fs."""
    is_inbox = len(parts) == 1 and parts[0].upper() == "INBOX"
    if layout == "flat":
        if is_inbox:
            return root / "INBOX"
        name = ".".join(disk_component(p, layout, utf8_names) for p in parts)
        if name.lower() in SUBDIRS:  # also on case-insensitive file systems
            name = f"%{ord(name[0]):02X}{name[1:]}"
        return root / name
    if is_inbox:
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

    def __init__(self, folder: Path | str, hashed: bool = True) -> None:
        self.key = new_key()
        # a str, not a Path: pathlib interns every name it parses, and a backup of a large
        # folder would keep a process-wide table of 100,000 file names
        self.path = f"{folder}/tmp/{self.key}"
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
            fd, self.fd = self.fd, -1  # (never closed twice: see DirWatch.close)
            os.close(fd)
        except OSError as exc:
            self.discard()
            raise storage_error(exc, f"cannot write {self.path}") from None

    def discard(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1  # (never closed twice: see DirWatch.close)
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


# ----------------------------------------------------------------------------- one folder

class MaildirFolder:
    def __init__(self, path: Path, *, maildirfolder: bool = False) -> None:
        self.path = path
        self._dir = str(path)
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
        """key -> (subdir, file name) for every message file in new/ and cur/ (cur wins).

        A mail reader (mutt, notmuch) may rename files meanwhile. new/ is listed before cur/, so a
        file moved from new/ to cur/ is found at least once; and as readdir() need not return a
        file renamed while it lists a directory (which a run would read as a local deletion), the
        listing is repeated while cur/ or new/ changed under it, keeping what any listing found.
        A file found here may still be renamed or deleted before it is used: retag, load and
        remove find it again by its key (locate)."""
        found: dict[str, tuple[str, str]] = {}
        for _ in range(SCAN_TRIES):
            before = self._dir_stamps()
            found.update(self.listing())
            if self._dir_stamps() == before:
                break
        return found

    def _entries(self):
        """(key, subdir, file name) of every message file, new/ first, as the directories are read."""
        for sub in ("new", "cur"):
            try:
                with os.scandir(f"{self._dir}/{sub}") as it:
                    for entry in it:
                        if not entry.name.startswith("."):
                            yield split_name(entry.name)[0], sub, entry.name
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise storage_error(exc, f"cannot read {self.path / sub}") from None

    def listing(self) -> dict[str, tuple[str, str]]:
        """One listing of new/ then cur/: key -> (subdir, file name), cur wins."""
        return {key: (sub, name) for key, sub, name in self._entries()}

    def holds_just(self, expected: dict[str, tuple[str, str]]) -> bool:
        """new/ and cur/ hold exactly `expected` (key -> (subdir, file name)): listing() ==
        expected, compared as the directories are read, without building the listing (a large
        folder's would be as big as `expected`). A message with two files counts as different."""
        seen = 0
        for key, sub, name in self._entries():
            if expected.get(key) != (sub, name):
                return False
            seen += 1
        return seen == len(expected)

    def _dir_stamps(self) -> tuple:
        out = []
        for sub in ("new", "cur"):
            try:
                st = os.stat(self.path / sub)
                out.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def locate(self, key: str, hint: tuple[str, str] | None = None) -> tuple[str, str] | None:
        """Where the file of message `key` is now: hint while it is there, else found by its key
        (the name before ":2,") in new/ and cur/ (cur wins): a mail reader renamed it (its flags)
        or moved it from new/ to cur/; it is the same message. None: it is gone (deleted)."""
        if hint is not None and os.path.lexists(self.path / hint[0] / hint[1]):
            return hint
        found = None
        for _ in range(SCAN_TRIES):
            before = self._dir_stamps()
            found = None
            for sub in ("new", "cur"):
                try:
                    with os.scandir(self.path / sub) as it:
                        for entry in it:
                            if not entry.name.startswith(".") and split_name(entry.name)[0] == key:
                                found = (sub, entry.name)
                                break
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise storage_error(exc, f"cannot read {self.path / sub}") from None
            if found is not None or self._dir_stamps() == before:
                break
        return found

    def place(self, key: str, flags: frozenset[str], keywords=()) -> tuple[str, str] | None:
        """Where the file of a message whose recorded flags are these is, found without listing a
        directory: the name publish and retag give it (the letters of its flags, keyword letters
        from dovecot-keywords), in new/ or cur/ by \\Seen, or in the other one (a mail reader moves
        unread mail to cur/ without a flag). None if it is not there (then locate() looks)."""
        letters = "".join(chr(97 + self.kw.index[k]) for k in keywords if k in self.kw.index)
        name = join_name(key, info_letters(flags, letters))
        for sub in (("cur", "new") if "\\Seen" in flags else ("new", "cur")):
            if os.path.lexists(self.path / sub / name):
                return sub, name
        return None

    def staged_left(self) -> bool:
        """tmp/ holds a file of ours: a delivery a killed run left (recover() finishes or removes it)."""
        return any(_OUR_TMP.match(n) for n in self.tmp_keys())

    def tmp_keys(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.path / "tmp") if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    # -- delivery -----------------------------------------------------------------------

    def open_staged(self, size: int = 0) -> StagedFile:
        """A new file in tmp/ to stream a message into (see StagedFile)."""
        return StagedFile(self._dir)

    def stage(self, data: bytes, mtime: float | None) -> str:
        """Write a whole message held in memory to tmp/; returns its key."""
        f = StagedFile(self._dir, hashed=False)
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
                    fd = os.open(f"{self._dir}/tmp/{key}", os.O_RDONLY)
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
        src = f"{self._dir}/tmp/{key}"  # (str paths: see StagedFile)
        dst = f"{self._dir}/{sub}/{name}"
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

    def retag(self, key: str, where: tuple[str, str], flags: frozenset[str],
              keywords=()) -> tuple[str, str] | None:
        """Rename a message file so its info and new/cur place match flags; keeps unknown letters.
        Returns where the file is now, or None if it is gone.

        where is where this run found the file. A mail reader may have renamed it since (its
        flags, or new/ -> cur/): it is found again by its key, and this run's change (the flags
        it adds and removes, against where's letters) is applied on top of the letters the file
        has now, so the reader's change is kept (and seen as a local change by the next run).
        A file deleted meanwhile stays deleted (None): a local deletion for the next run. Never
        replaces a file (link, then unlink the old name); the caller makes it durable
        (sync_dirs) before the state records the new flags."""
        keywords = frozenset(keywords)
        was_fl, was_kw = self.flags_of(where[1])
        add_fl, del_fl = flags - was_fl, was_fl - flags
        add_kw, del_kw = keywords - was_kw, was_kw - keywords
        sub, name = where
        for _ in range(RENAME_TRIES):
            _, info = split_name(name)
            now_fl, now_kw = self.flags_of(name)
            fl, kw = (now_fl | add_fl) - del_fl, (now_kw | add_kw) - del_kw
            want_sub = "cur" if "\\Seen" in fl else "new"
            want = join_name(key, self._info(fl, kw, info or ""))
            if (sub, name) == (want_sub, want):
                return sub, name
            src = self.path / sub / name
            dst = self.path / want_sub / want
            try:
                os.link(src, dst)
            except FileExistsError:
                # that name is this message already (keys are unique): a run killed between link
                # and unlink, or a mail reader that gave it these letters
                try:
                    os.unlink(src)
                except FileNotFoundError:
                    pass  # renamed meanwhile: found again below
                except OSError as exc:
                    raise storage_error(exc, f"cannot rename {src}") from None
                else:
                    return want_sub, want
            except FileNotFoundError:
                pass  # renamed or deleted by a mail reader since it was found: found again below
            except OSError as exc:
                raise storage_error(exc, f"cannot rename {src}") from None
            else:
                try:
                    os.unlink(src)
                    return want_sub, want
                except FileNotFoundError:
                    # a mail reader renamed it between the link and the unlink: the reader's new
                    # name holds the message too, so our link is an extra name: drop it and merge
                    # again from where the reader put it. Only while another name holds it: if
                    # ours is its only name now, it is kept (never lose mail)
                    try:
                        if os.lstat(dst).st_nlink > 1:
                            os.unlink(dst)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        raise storage_error(exc, f"cannot remove {dst}") from None
                except OSError as exc:
                    raise storage_error(exc, f"cannot rename {src}") from None
            now = self.locate(key)
            if now is None:
                return None
            sub, name = now
        raise StorageError(f"cannot rename {self.path / sub / name}: another program keeps renaming it",
                           hint="run again when the mail reader is idle; nothing was lost")

    def load(self, key: str, where: tuple[str, str]) -> tuple[bytes, os.stat_result, tuple[str, str]] | None:
        """(bytes, stat, where it is) of a message file found by a scan, found again by its key if
        a mail reader renamed it meanwhile; None if it was deleted meanwhile (a local deletion
        for the next run). Other errors raise OSError."""
        for _ in range(RENAME_TRIES):
            try:
                with open(self.path / where[0] / where[1], "rb") as f:
                    return f.read(), os.fstat(f.fileno()), where
            except FileNotFoundError:
                now = self.locate(key)
                if now is None:
                    return None
                where = now
        raise FileNotFoundError(errno.ENOENT, "another program keeps renaming it", str(self.path / where[0] / where[1]))

    def read(self, where: tuple[str, str]) -> bytes:
        """A message file's bytes (see load); FileNotFoundError if it was deleted meanwhile."""
        got = self.load(split_name(where[1])[0], where)
        if got is None:
            raise FileNotFoundError(errno.ENOENT, "deleted meanwhile", str(self.path / where[0] / where[1]))
        return got[0]

    def remove(self, key: str, where: tuple[str, str]) -> tuple[str, str] | None:
        """Unlink a message file found by a scan, found again by its key if a mail reader renamed
        it meanwhile. Returns the name removed, None if it was gone already."""
        for _ in range(RENAME_TRIES):
            try:
                os.unlink(self.path / where[0] / where[1])
                return where
            except FileNotFoundError:
                now = self.locate(key)
                if now is None:
                    return None
                where = now
            except OSError as exc:
                raise storage_error(exc, f"cannot remove {self.path / where[0] / where[1]}") from None
        raise StorageError(f"cannot remove {self.path / where[0] / where[1]}: another program keeps renaming it",
                           hint="run again when the mail reader is idle; nothing was lost")

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


# ----------------------------------------------------------------------------- watching new/ and cur/

_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_ONLYDIR, _IN_NONBLOCK, _IN_CLOEXEC = 0x01000000, os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class DirWatch:
    """The names added to and removed from a folder's new/ and cur/ while it watches (Linux
    inotify), by anyone: this run and mail readers alike. The flag-change fast path changes a few
    files without listing the folder; comparing these events with its own changes tells whether
    anything else changed meanwhile, which the directories' mtime cannot (this run's own renames
    move it too). `ok` is False where inotify is missing or out of instances: no fast path."""

    def __init__(self, path: Path) -> None:
        self.fd = -1
        self.subs: dict[int, str] = {}
        if _libc is None or not hasattr(_libc, "inotify_init1"):
            return
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return
        self.fd = fd
        for sub in ("new", "cur"):
            wd = _libc.inotify_add_watch(fd, os.fsencode(path / sub), _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM
                                         | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
            if wd < 0:
                self.close()
                return
            self.subs[wd] = sub

    @property
    def ok(self) -> bool:
        return self.fd >= 0

    def changes(self) -> dict[tuple[str, str], int] | None:
        """(subdir, name) -> names added minus removed since the watch began (zeros left out), or
        None if that is unknown: the queue overflowed, or new/ or cur/ itself was moved or removed."""
        if self.fd < 0:
            return None
        net: dict[tuple[str, str], int] = {}
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                return None
            if not buf:
                break
            at = 0
            while at + _EVENT.size <= len(buf):
                wd, mask, _cookie, size = _EVENT.unpack_from(buf, at)
                name = os.fsdecode(buf[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0"))
                at += _EVENT.size + size
                if mask & (_IN_Q_OVERFLOW | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED) or wd not in self.subs:
                    return None
                if name.startswith("."):
                    continue  # not a message file (scan skips them too)
                where = (self.subs[wd], name)
                net[where] = net.get(where, 0) + (1 if mask & (_IN_CREATE | _IN_MOVED_TO) else -1)
        return {k: v for k, v in net.items() if v}

    def close(self) -> None:
        # forgotten before it is closed: a KeyboardInterrupt (Ctrl-C, or watch's SIGTERM) between
        # the two must leave it unclosed, never closed twice (by then the number may be another
        # file's, such as the state database's)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    __del__ = close  # a run that failed before reading its events
