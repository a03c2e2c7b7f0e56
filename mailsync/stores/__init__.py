"""The store layer: one narrow interface (base.Store, base.Folder) over every place mail lives.

MemoryStore (tests), MaildirStore, ImapStore and Pop3Store are thin adapters over the existing
maildir, imap and pop3 modules; tests/test_stores.py holds the contract all of them pass.
The stores are imported lazily: `from mailsync.stores.imap import ImapStore`.
"""

from mailsync.stores.base import (
    CHUNK,
    Caps,
    Entry,
    Folder,
    NoSuchFolder,
    Refused,
    Snapshot,
    Store,
)

__all__ = ["CHUNK", "Caps", "Entry", "Folder", "NoSuchFolder", "Refused", "Snapshot", "Store"]
