"""Sync state in SQLite (WAL) at <maildir>/.mailsync.db, plus the per-account run lock.

The state is the truth about identity (UID <-> file key); file names only carry flags.
Every change is committed only after the files it describes are durable.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from mailsync.errors import LockedError, StorageError
from mailsync.model import Record, decode_flags, encode_flags

DB_NAME = ".mailsync.db"
LOCK_NAME = ".mailsync.lock"

# Each entry upgrades the schema by one version; never edit one that has shipped.
MIGRATIONS: list[str] = [
    # 1
    """
    CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,          -- the server's name, UTF-8
        path TEXT NOT NULL,                 -- directory relative to the Maildir root
        uidvalidity INTEGER,
        uidnext INTEGER,
        highestmodseq INTEGER,
        messages INTEGER,
        synced_at REAL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        uidvalidity INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        key TEXT NOT NULL,                  -- the file's unique name part (before ':2,')
        flags TEXT NOT NULL DEFAULT '',     -- system flags as last synced, space separated
        keywords TEXT NOT NULL DEFAULT '',
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        message_id TEXT NOT NULL DEFAULT '',
        internaldate REAL,
        on_server INTEGER NOT NULL DEFAULT 1,
        UNIQUE (folder_id, uidvalidity, uid)
    );
    CREATE INDEX messages_key ON messages(folder_id, key);
    CREATE INDEX messages_hash ON messages(sha256);
    """,
    # 2: two-way sync journals uploads, so a kill after APPEND never uploads twice
    """
    CREATE TABLE uploads (
        folder_id INTEGER NOT NULL REFERENCES folders(id),
        key TEXT NOT NULL,
        uidnext INTEGER NOT NULL,           -- the server's UIDNEXT before the APPEND
        size INTEGER NOT NULL,              -- bytes as uploaded (CRLF)
        message_id TEXT NOT NULL DEFAULT '',
        sha256 TEXT NOT NULL,
        PRIMARY KEY (folder_id, key)
    );
    """,
    # 3: POP3 downloads, identified by UIDL (or a header hash where the server has no UIDL)
    """
    CREATE TABLE pop3 (
        uidl TEXT PRIMARY KEY,
        key TEXT NOT NULL,                  -- the file's unique name part in the Maildir's INBOX
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        message_id TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL,           -- when it was stored (delete_after_days counts from here)
        on_server INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX pop3_hash ON pop3(sha256);
    """,
    # 4: what cur/ and new/ looked like (inode and mtime) when last found in step with the state
    """
    ALTER TABLE folders ADD COLUMN local_stamp TEXT;
    """,
    # 5: an upload that puts back a message the server expunged (conflict = local or union) names
    # the UID it replaces, so a run killed after the APPEND forgets that UID instead of uploading again
    """
    ALTER TABLE uploads ADD COLUMN replaces INTEGER;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _fix(path: Path, exc: OSError | sqlite3.Error) -> str:
    """How to fix a file mailsync cannot create or write (the state file, the lock file)."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.EROFS:
        return f"the file system of {path.parent} is read-only; make it writable, then run again"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some disk space and run again; nothing was lost"
    return (f"check the owner and permissions of {path.parent} and the files in it (the user running mailsync "
            "must be able to write them), then run again; nothing was lost")


def _cannot_write(exc: sqlite3.Error) -> bool:
    """SQLite could not write the file or create its -wal/-shm files next to it (permissions, a
    read-only file system), as opposed to a damaged file."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    text = str(exc).lower()
    return code in (3, 8, 14) or "readonly" in text or "unable to open" in text  # PERM, READONLY, CANTOPEN


def _row_record(row) -> Record:
    return Record(uid=row["uid"], key=row["key"], flags=decode_flags(row["flags"]),
                  keywords=frozenset(row["keywords"].split("\x1f")) if row["keywords"] else frozenset(),
                  size=row["size"], sha256=row["sha256"], message_id=row["message_id"],
                  on_server=bool(row["on_server"]))


def _records(rows) -> dict[int, Record]:
    """Records from (uid, key, flags, keywords, size, sha256, message_id, on_server) rows."""
    flag_sets: dict[str, frozenset[str]] = {}   # few distinct flag and keyword sets: decode each once
    kw_sets: dict[str, frozenset[str]] = {}
    out = {}
    for uid, key, flags, keywords, size, sha, mid, on_server in rows:
        fl = flag_sets.get(flags)
        if fl is None:
            fl = flag_sets[flags] = decode_flags(flags)
        kw = kw_sets.get(keywords)
        if kw is None:
            kw = kw_sets[keywords] = frozenset(keywords.split("\x1f")) if keywords else frozenset()
        out[uid] = Record(uid, key, fl, kw, size, sha, mid, bool(on_server))
    return out


def _kw(keywords: frozenset[str]) -> str:
    return "\x1f".join(sorted(keywords))


class State:
    def __init__(self, root: Path) -> None:
        self.path = root / DB_NAME
        self._lock = threading.RLock()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if _cannot_write(exc):
                raise StorageError(f"cannot write state file {self.path}: {exc}", hint=_fix(self.path, exc)) from None
            raise StorageError(f"state file {self.path} is unreadable: {exc}",
                               hint="move it aside and run again: files already in the Maildir are matched by content "
                                    "and not stored twice") from None
        except OSError as exc:
            raise StorageError(f"cannot open state file {self.path}: {exc.strerror}",
                               hint=_fix(self.path, exc)) from None

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"state file {self.path} is from a newer mailsync (schema {version})",
                               hint="upgrade mailsync")
        for v in range(version, SCHEMA_VERSION):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={v + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # (a Ctrl-C may land after the COMMIT)
                    self.db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- folders ----------------------------------------------------------------------

    def folder(self, name: str, path: str) -> sqlite3.Row:
        with self._lock:
            row = self.db.execute("SELECT * FROM folders WHERE name=?", (name,)).fetchone()
            if row is None:
                self.db.execute("INSERT INTO folders(name, path) VALUES (?, ?)", (name, path))
                row = self.db.execute("SELECT * FROM folders WHERE name=?", (name,)).fetchone()
            elif row["path"] != path:
                self.db.execute("UPDATE folders SET path=? WHERE id=?", (path, row["id"]))
                row = self.db.execute("SELECT * FROM folders WHERE name=?", (name,)).fetchone()
            return row

    def folder_row(self, name: str) -> sqlite3.Row | None:
        with self._lock:
            return self.db.execute("SELECT * FROM folders WHERE name=?", (name,)).fetchone()

    def set_local_stamp(self, fid: int, stamp: str | None) -> None:
        with self._lock:
            self.db.execute("UPDATE folders SET local_stamp=? WHERE id=?", (stamp, fid))

    def folders(self) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute("SELECT * FROM folders ORDER BY name").fetchall()

    def save_folder(self, fid: int, *, uidvalidity: int, uidnext: int, highestmodseq: int | None,
                    messages: int, local_stamp: str | None = None) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE folders SET uidvalidity=?, uidnext=?, highestmodseq=?, messages=?, synced_at=?, "
                "local_stamp=? WHERE id=?",
                (uidvalidity, uidnext, highestmodseq, messages, time.time(), local_stamp, fid))

    # -- messages ---------------------------------------------------------------------

    def records(self, fid: int, uidvalidity: int) -> dict[int, Record]:
        with self._lock:
            cur = self.db.execute("SELECT uid, key, flags, keywords, size, sha256, message_id, on_server "
                                  "FROM messages WHERE folder_id=? AND uidvalidity=?", (fid, uidvalidity))
            cur.row_factory = None  # plain tuples: this runs over every message of a folder
            rows = cur.fetchall()
        return _records(rows)

    def records_of(self, fid: int, uidvalidity: int, uids) -> dict[int, Record]:
        """The records of some UIDs only (those the server reports changed, new or expunged: the
        flag-change fast path), looked up by the (folder, uidvalidity, uid) index in chunks."""
        uids = sorted(uids)
        rows = []
        with self._lock:
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                cur = self.db.execute("SELECT uid, key, flags, keywords, size, sha256, message_id, on_server "
                                      "FROM messages WHERE folder_id=? AND uidvalidity=? AND uid IN "
                                      f"({','.join('?' * len(chunk))})", (fid, uidvalidity, *chunk))
                cur.row_factory = None
                rows += cur.fetchall()
        return _records(rows)

    def count_on_server(self, fid: int, uidvalidity: int, below_uid: int) -> int:
        """How many records below a UID are still on the server (counted in SQLite, not loaded)."""
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM messages WHERE folder_id=? AND uidvalidity=? AND uid<?"
                                   " AND on_server=1", (fid, uidvalidity, below_uid)).fetchone()[0]

    def off_server_records(self, fid: int, uidvalidity: int) -> list[tuple[int, Record]]:
        """(row id, record) of a folder's messages not (or no longer) known on the server: those of
        an older UIDVALIDITY and those marked gone. Candidates for re-matching."""
        with self._lock:
            rows = self.db.execute("SELECT * FROM messages WHERE folder_id=? AND (uidvalidity<>? OR on_server=0)",
                                   (fid, uidvalidity)).fetchall()
        return [(r["id"], _row_record(r)) for r in rows]

    def keys(self, fid: int, *, uidvalidity: int | None = None, on_server: bool | None = None) -> set[str]:
        sql, args = "SELECT key FROM messages WHERE folder_id=?", [fid]
        if uidvalidity is not None:
            sql += " AND uidvalidity=?"
            args.append(uidvalidity)
        if on_server is not None:
            sql += " AND on_server=?"
            args.append(int(on_server))
        with self._lock:
            return {r[0] for r in self.db.execute(sql, args)}

    def flags_by_key(self, fid: int) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
        with self._lock:
            return {r[0]: (decode_flags(r[1]), frozenset(r[2].split("\x1f")) if r[2] else frozenset()) for r in
                    self.db.execute("SELECT key, flags, keywords FROM messages WHERE folder_id=?", (fid,))}

    def transaction(self):
        return _Tx(self)

    # statements used inside a transaction (caller holds it via `with state.transaction():`)
    def add(self, fid: int, uidvalidity: int, rec: Record, internaldate: float | None) -> None:
        self.db.execute(
            "INSERT INTO messages(folder_id, uidvalidity, uid, key, flags, keywords, size, sha256, message_id,"
            " internaldate, on_server) VALUES (?,?,?,?,?,?,?,?,?,?,1)"
            " ON CONFLICT(folder_id, uidvalidity, uid) DO UPDATE SET key=excluded.key, flags=excluded.flags,"
            " keywords=excluded.keywords, size=excluded.size, sha256=excluded.sha256,"
            " message_id=excluded.message_id, internaldate=excluded.internaldate, on_server=1",
            (fid, uidvalidity, rec.uid, rec.key, encode_flags(rec.flags), _kw(rec.keywords), rec.size,
             rec.sha256, rec.message_id, internaldate))

    def set_flags(self, fid: int, uidvalidity: int, uid: int, flags: frozenset[str], keywords: frozenset[str]) -> None:
        self.db.execute("UPDATE messages SET flags=?, keywords=? WHERE folder_id=? AND uidvalidity=? AND uid=?",
                        (encode_flags(flags), _kw(keywords), fid, uidvalidity, uid))

    def set_on_server(self, fid: int, uidvalidity: int, uids, on: bool) -> None:
        self.db.executemany("UPDATE messages SET on_server=? WHERE folder_id=? AND uidvalidity=? AND uid=?",
                            [(int(on), fid, uidvalidity, uid) for uid in uids])

    def rebind(self, row_id: int, uidvalidity: int, uid: int, flags: frozenset[str], keywords: frozenset[str]) -> None:
        """Give a record from an older UIDVALIDITY its new UID (same file, no download)."""
        self.db.execute("UPDATE messages SET uidvalidity=?, uid=?, flags=?, keywords=?, on_server=1 WHERE id=?",
                        (uidvalidity, uid, encode_flags(flags), _kw(keywords), row_id))

    def forget_folder(self, fid: int) -> None:
        self.db.execute("DELETE FROM messages WHERE folder_id=?", (fid,))
        self.db.execute("DELETE FROM uploads WHERE folder_id=?", (fid,))
        self.db.execute("UPDATE folders SET uidvalidity=NULL, uidnext=NULL, highestmodseq=NULL, messages=NULL"
                        " WHERE id=?", (fid,))

    def folder_synced(self, name: str):
        with self._lock:
            row = self.db.execute("SELECT uidvalidity FROM folders WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def forget_key(self, fid: int, key: str) -> None:
        self.db.execute("DELETE FROM messages WHERE folder_id=? AND key=?", (fid, key))

    def forget(self, fid: int, uidvalidity: int, uids) -> None:
        self.db.executemany("DELETE FROM messages WHERE folder_id=? AND uidvalidity=? AND uid=?",
                            [(fid, uidvalidity, u) for u in uids])

    def journal_upload(self, fid: int, key: str, uidnext: int, size: int, message_id: str, sha256: str,
                       replaces: int | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO uploads(folder_id, key, uidnext, size, message_id, sha256, replaces)"
                        " VALUES (?,?,?,?,?,?,?)", (fid, key, uidnext, size, message_id, sha256, replaces))

    def clear_upload(self, fid: int, key: str) -> None:
        self.db.execute("DELETE FROM uploads WHERE folder_id=? AND key=?", (fid, key))

    def pending_uploads(self, fid: int) -> list[tuple[str, int, int, str, str, int | None]]:
        """(key, uidnext, size, message_id, sha256, replaced uid or None) of journaled uploads."""
        with self._lock:
            return [tuple(r) for r in self.db.execute(
                "SELECT key, uidnext, size, message_id, sha256, replaces FROM uploads WHERE folder_id=?", (fid,))]

    def pop3_records(self) -> dict[str, sqlite3.Row]:
        with self._lock:
            return {r["uidl"]: r for r in self.db.execute("SELECT * FROM pop3")}

    def pop3_add(self, uidl: str, key: str, size: int, sha256: str, message_id: str, now: float) -> None:
        self.db.execute("INSERT INTO pop3(uidl, key, size, sha256, message_id, first_seen) VALUES (?,?,?,?,?,?)"
                        " ON CONFLICT(uidl) DO UPDATE SET key=excluded.key, size=excluded.size,"
                        " sha256=excluded.sha256, on_server=1", (uidl, key, size, sha256, message_id, now))

    def pop3_rebind(self, old: str, new: str) -> None:
        self.db.execute("UPDATE pop3 SET uidl=?, on_server=1 WHERE uidl=?", (new, old))

    def pop3_gone(self, uidls) -> None:
        self.db.executemany("UPDATE pop3 SET on_server=0 WHERE uidl=?", [(u,) for u in uidls])

    def mark_old_gone(self, fid: int, uidvalidity: int) -> None:
        self.db.execute("UPDATE messages SET on_server=0 WHERE folder_id=? AND uidvalidity<>?", (fid, uidvalidity))


class _Tx:
    def __init__(self, state: State) -> None:
        self.state = state

    def __enter__(self) -> State:
        self.state._lock.acquire()
        try:
            self.state.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.state._lock.release()
            raise
        return self.state

    def __exit__(self, et, ev, tb) -> None:
        db = self.state.db
        try:
            if et is None:
                try:
                    db.execute("COMMIT")
                    return
                except sqlite3.Error as exc:
                    ev = exc
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(ev, sqlite3.Error):
                full = "full" in str(ev).lower()
                raise StorageError(f"cannot write state {self.state.path}: {ev}",
                                   hint="free disk space and run again; nothing was lost" if full
                                   else "check the disk and the file's permissions") from None
        finally:
            self.state._lock.release()


class RunLock:
    """<maildir>/.mailsync.lock held with flock: the kernel frees it if the process dies."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create lock file {self.path}: {exc.strerror}",
                               hint=_fix(self.path, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(fd, 32).decode().strip() or "?"
            except OSError:
                pid = "?"
            os.close(fd)
            raise LockedError(f"another mailsync run (pid {pid}) is working on {self.path.parent}",
                              hint="wait for it to finish; a lock left by a killed run frees itself") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None  # (never closed twice: see maildir.DirWatch.close)
            os.close(fd)
