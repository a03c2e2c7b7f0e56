"""A Maildir tree as a store, over maildir.MaildirFolder, folder_path and local_folders.

Ids are the files' unique keys (the name before ":2,"); flags are the info letters and, for
keywords, the folder's dovecot-keywords file. Bytes are kept exactly as given (no CRLF), append
is MaildirFolder's crash-safe stage / sync / publish, delete unlinks. A mail reader may rename
files meanwhile: each file is found again by its key, as MaildirFolder does everywhere. A
message's date is its file's modification time (what append sets from `when`).
Maildir has no UIDVALIDITY nor modification sequences: every snapshot is a full scan.

Beside the '/'-path names of the store interface, listing() and open_listed() name folders by
their components (local_folders: a component may hold a '/', written %2F on disk, when the
server had another separator), and listing() also returns the directories whose names are no
folder name, for a caller that reports them.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from mailsync.errors import StorageError
from mailsync.localfolders import local_folders
from mailsync.maildir import RENAME_TRIES, MaildirFolder, folder_path, storage_error
from mailsync.model import normalise_flags
from mailsync.stores.base import (
    Caps,
    Entry,
    NoSuchFolder,
    Snapshot,
    file_chunks,
    inbox_first,
    require,
)

Parts = tuple[str, ...]

CAPS = Caps(flags=True, keywords=True, write=True, delete=True, modseq=False, uidplus=True, crlf=False)


class MaildirStore:
    def __init__(self, root: Path, layout: str = "maildir++", utf8_names: bool = False) -> None:
        self.root, self.layout, self.utf8_names = Path(root), layout, utf8_names
        self.caps = CAPS

    def listing(self) -> tuple[dict[Parts, Path], list[Path]]:
        """(folder name's components -> directory, directories whose names are no folder name)."""
        return local_folders(self.root, self.layout, self.utf8_names)

    def folders(self) -> list[str]:
        """A folder with a '/' inside a component has no '/'-path: it is left out (as in ImapStore)."""
        found, _bad = self.listing()
        return inbox_first("/".join(parts) for parts in found if not any("/" in p for p in parts))

    def _maildir(self, parts: Parts) -> MaildirFolder:
        path = folder_path(self.root, list(parts), self.layout, self.utf8_names)
        return MaildirFolder(path, maildirfolder=path != self.root and self.layout == "maildir++")

    def open(self, name: str, writable: bool) -> MaildirStoreFolder:
        return self.open_listed(tuple(name.split("/")), writable)

    def open_listed(self, parts: Parts, writable: bool) -> MaildirStoreFolder:
        """The folder named by its components, as listing() names it."""
        mf = self._maildir(parts)
        if not any((mf.path / sub).is_dir() for sub in ("cur", "new")):
            raise NoSuchFolder(f"no Maildir folder {'/'.join(parts)!r} at {mf.path}")
        return MaildirStoreFolder(mf, self.caps if writable else self.caps.read_only())

    def create(self, name: str) -> None:
        self._maildir(tuple(name.split("/"))).ensure()

    def close(self) -> None:
        pass


class MaildirStoreFolder:
    def __init__(self, mf: MaildirFolder, caps: Caps) -> None:
        self.mf, self.caps, self.where = mf, caps, f"Maildir {mf.path}"
        self.seen: dict[str, tuple[str, str]] = {}  # key -> where, as the last full scan found it

    def _flags(self, name: str) -> frozenset[str]:
        system, keywords = self.mf.flags_of(name)
        return system | keywords

    def _at(self, key: str, where: tuple[str, str], fn):
        """fn(path of the file) and where the file is, found again by its key if a mail reader
        renamed it meanwhile; (None, None) if it is gone."""
        for _ in range(RENAME_TRIES):
            try:
                return fn(self.mf.path / where[0] / where[1]), where
            except FileNotFoundError:
                where = self.mf.locate(key)
                if where is None:
                    return None, None
            except OSError as exc:
                raise storage_error(exc, f"cannot read {self.mf.path / where[0] / where[1]}") from None
        raise StorageError(f"cannot read {self.mf.path / where[0] / where[1]}: another program keeps renaming it")

    def snapshot(self, since: object = None) -> Snapshot:
        """Always a full scan; the cursor is only the time it began."""
        began = time.time()
        entries = {}
        self.seen = self.mf.scan()
        for key, where in self.seen.items():
            st, where = self._at(key, where, os.stat)
            if st is not None:
                entries[key] = Entry(key, st.st_size, self._flags(where[1]))
        return Snapshot(None, entries, began)

    def fetch(self, ids):
        """Each file where the last scan saw it (a fetch of a few ids at a time costs no scan of
        the folder each), else where it is now (_at)."""
        ids = list(ids)
        if any(key not in self.seen for key in ids):
            self.seen = self.mf.scan()
        for key in ids:
            if key not in self.seen:
                continue
            try:
                f, where = self._at(key, self.seen[key], lambda p: open(p, "rb"))  # noqa: SIM115 - closed by its chunks
            except StorageError as exc:  # this file only: the others are still read
                yield key, _raise(exc), self._flags(self.seen[key][1]), None
                continue
            if f is not None:
                mtime = datetime.fromtimestamp(os.fstat(f.fileno()).st_mtime, UTC)
                yield key, self._chunks(f, where), self._flags(where[1]), mtime

    def _chunks(self, f, where: tuple[str, str]):
        try:
            yield from file_chunks(f)
        except OSError as exc:
            raise storage_error(exc, f"cannot read {self.mf.path / where[0] / where[1]}") from None

    def path_of(self, key: str) -> Path:
        """The message's file as it is named now (for messages that name it); key if it is gone."""
        where = self.mf.locate(key, self.seen.get(key))
        return self.mf.path / where[0] / where[1] if where else self.mf.path / key

    def append(self, data: bytes, flags, when=None) -> str:
        require(self.caps, self.where, "append", "write")
        system, keywords = normalise_flags(flags)
        self.mf.ensure()
        key = self.mf.stage(data, when.timestamp() if when else None)
        self.mf.sync([key])
        self.mf.publish(key, system, keywords)
        self.mf.sync_dirs()
        return key

    def set_flags(self, changes: dict, unchanged_since: object = None) -> set:
        require(self.caps, self.where, "change flags", "write", "flags")
        if unchanged_since is not None:
            require(self.caps, self.where, "change flags conditionally", "modseq")
        found = self.mf.scan()
        refused = {key for key in changes if key not in found}
        for key in changes.keys() - refused:
            system, keywords = normalise_flags(changes[key])
            if self.mf.retag(key, found[key], system, keywords) is None:
                refused.add(key)
        self.mf.sync_dirs()
        return refused

    def delete(self, ids) -> set:
        require(self.caps, self.where, "delete", "delete")
        found = self.mf.scan()
        gone = {key for key in ids if key in found and self.mf.remove(key, found[key]) is not None}
        self.mf.sync_dirs()
        return gone


def _raise(exc: Exception):
    """Chunks that raise exc when read."""
    raise exc
    yield b""  # a generator: nothing is raised before it is read
