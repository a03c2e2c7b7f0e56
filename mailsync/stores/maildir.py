"""A Maildir tree as a store, over maildir.MaildirFolder, folder_path and local_folders.

Ids are the files' unique keys (the name before ":2,"); flags are the info letters and, for
keywords, the folder's dovecot-keywords file. Bytes are kept exactly as given (no CRLF), append
is MaildirFolder's crash-safe stage / sync / publish, delete unlinks. A mail reader may rename
files meanwhile: each file is found again by its key, as MaildirFolder does everywhere.
Maildir has no UIDVALIDITY nor modification sequences: every snapshot is a full scan.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mailsync.errors import StorageError
from mailsync.localfolders import local_folders
from mailsync.maildir import RENAME_TRIES, MaildirFolder, folder_path, storage_error
from mailsync.model import normalise_flags
from mailsync.stores.base import Caps, Entry, NoSuchFolder, Snapshot, file_chunks, inbox_first, require

CAPS = Caps(flags=True, keywords=True, write=True, delete=True, modseq=False, uidplus=True, crlf=False)


class MaildirStore:
    def __init__(self, root: Path, layout: str = "maildir++", utf8_names: bool = False) -> None:
        self.root, self.layout, self.utf8_names = Path(root), layout, utf8_names
        self.caps = CAPS

    def folders(self) -> list[str]:
        found, _bad = local_folders(self.root, self.layout, self.utf8_names)
        return inbox_first("/".join(parts) for parts in found)

    def _maildir(self, name: str) -> MaildirFolder:
        path = folder_path(self.root, name.split("/"), self.layout, self.utf8_names)
        return MaildirFolder(path, maildirfolder=path != self.root and self.layout == "maildir++")

    def open(self, name: str, writable: bool) -> MaildirStoreFolder:
        mf = self._maildir(name)
        if not any((mf.path / sub).is_dir() for sub in ("cur", "new")):
            raise NoSuchFolder(f"no Maildir folder {name!r} at {mf.path}")
        return MaildirStoreFolder(mf, self.caps if writable else self.caps.read_only())

    def create(self, name: str) -> None:
        self._maildir(name).ensure()

    def close(self) -> None:
        pass


class MaildirStoreFolder:
    def __init__(self, mf: MaildirFolder, caps: Caps) -> None:
        self.mf, self.caps, self.where = mf, caps, f"Maildir {mf.path}"

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
        for key, where in self.mf.scan().items():
            st, where = self._at(key, where, os.stat)
            if st is not None:
                entries[key] = Entry(key, st.st_size, self._flags(where[1]))
        return Snapshot(None, entries, began)

    def fetch(self, ids):
        found = self.mf.scan()
        for key in ids:
            if key in found:
                f, where = self._at(key, found[key], lambda p: open(p, "rb"))
                if f is not None:
                    yield key, file_chunks(f), self._flags(where[1])

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
