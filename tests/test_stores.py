"""The store contract (after vdirsyncer's tests/storage): StoreContract runs against every store.

A subclass provides the fixture `store` (a Store whose INBOX exists) and may override `seeded`
(the store with MESSAGES in its INBOX, put there from outside where the store cannot write).
Nothing is skipped for a missing capability: where a store lacks one, the test asserts that the
store refuses the operation (Refused) and changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from mailsync.config import parse
from mailsync.errors import ServerError, StorageError
from mailsync.maildir import MaildirFolder, folder_path
from mailsync.stores.base import CHUNK, NoSuchFolder, Refused
from mailsync.stores.imap import ImapStore
from mailsync.stores.maildir import MaildirStore
from mailsync.stores.memory import MemoryStore
from mailsync.stores.pop3 import Pop3Store
from tests.helpers import msg

MESSAGES = [msg(1), msg(2, body="line\r\n.starts with a dot\r\n..two dots"), msg(3, body="x" * (CHUNK + 5000))]
LF = b"From: a@example.com\nSubject: bare LF\n\nline one\nline two\n"
WHEN = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


def read(folder, ids) -> dict:
    """id -> (bytes, flags) through fetch, checking that bodies come as chunks of bytes and dates
    as timezone-aware datetimes or None."""
    return {i: (data, flags) for i, (data, flags, _when) in read_dated(folder, ids).items()}


def read_dated(folder, ids) -> dict:
    """id -> (bytes, flags, date) through fetch."""
    out = {}
    for i, body, flags, when in folder.fetch(ids):
        parts = list(body)
        assert all(isinstance(p, bytes) and len(p) <= CHUNK for p in parts)
        assert when is None or (isinstance(when, datetime) and when.utcoffset() is not None), when
        out[i] = (b"".join(parts), flags, when)
    return out


def add(folder, data, flags=frozenset()):
    """append, and the new id: the one append returned (where caps.uidplus) or the new one."""
    before = folder.snapshot().ids
    new = folder.append(data, frozenset(flags), WHEN)
    after = folder.snapshot().ids
    if folder.caps.uidplus:
        assert new is not None and after - before == {new}
    (found,) = after - before
    return found if new is None else new


class StoreContract:
    @pytest.fixture
    def seeded(self, store):
        f = store.open("INBOX", True)
        for m in MESSAGES:
            f.append(m, frozenset(), None)
        return store

    def test_folders_inbox_first_and_created(self, store):
        if not store.caps.write:
            with pytest.raises(Refused):
                store.create("Archive")
            assert store.folders() == ["INBOX"]
            return
        store.create("Zeta")
        store.create("Archive/2024")
        store.create("Zeta")  # exists already: nothing happens
        names = store.folders()
        assert names[0] == "INBOX" and {"Zeta", "Archive/2024"} <= set(names)
        assert store.open("Archive/2024", True).snapshot().ids == frozenset()

    def test_missing_folder(self, store):
        with pytest.raises(NoSuchFolder):
            store.open("No/Such", False)

    def test_listing_and_exact_bytes(self, seeded):
        f = seeded.open("INBOX", False)
        snap = f.snapshot()
        assert len(snap.ids) == len(MESSAGES) and set(snap.entries) == snap.ids
        got = read(f, snap.ids)
        assert sorted(b for b, _ in got.values()) == sorted(MESSAGES)
        assert {i: len(b) for i, (b, _) in got.items()} == {i: e.size for i, e in snap.entries.items()}
        assert {i: fl for i, (_, fl) in got.items()} == {i: e.flags for i, e in snap.entries.items()}

    def test_ids_are_stable(self, seeded):
        f = seeded.open("INBOX", seeded.caps.write)
        first, second = f.snapshot(), f.snapshot()
        assert first.ids == second.ids and first.entries == second.entries and first.validity == second.validity
        bodies = read(f, first.ids)
        if f.caps.write:
            some = min(first.ids, key=str)
            f.set_flags({some: frozenset({"\\Seen"})})
            add(f, msg(9))
        third = seeded.open("INBOX", False).snapshot()
        assert first.ids <= third.ids and third.validity == first.validity
        assert {i: b for i, (b, _) in read(f, first.ids).items()} == {i: b for i, (b, _) in bodies.items()}

    def test_append(self, store):
        if not store.caps.write:
            with pytest.raises(Refused):
                store.open("INBOX", True)
            f = store.open("INBOX", False)
            with pytest.raises(Refused):
                f.append(MESSAGES[0], frozenset(), None)
            return
        f = store.open("INBOX", True)
        flags = {"\\Seen", "\\Flagged"} | ({"$Work"} if f.caps.keywords else set())
        i = add(f, MESSAGES[0], flags)
        j = add(f, LF)
        snap = f.snapshot()
        assert snap.entries[i].size == len(MESSAGES[0]) and snap.entries[i].flags == flags
        lf_as_stored = LF.replace(b"\n", b"\r\n") if f.caps.crlf else LF
        assert snap.entries[j].size == len(lf_as_stored) and snap.entries[j].flags == frozenset()
        assert read(f, [i, j]) == {i: (MESSAGES[0], flags), j: (lf_as_stored, frozenset())}
        # the date given to append comes back with the body (IMAP INTERNALDATE, a file's mtime)
        assert {k: when for k, (_, _, when) in read_dated(f, [i, j]).items()} == {i: WHEN, j: WHEN}

    def test_set_flags(self, seeded):
        f = seeded.open("INBOX", seeded.caps.write)
        a, b, _c = sorted(f.snapshot().ids, key=str)
        if not (f.caps.write and f.caps.flags):
            with pytest.raises(Refused):
                f.set_flags({a: frozenset({"\\Seen"})})
            assert f.snapshot().entries[a].flags == frozenset()
            return
        kw = {"$Label1", "work"} if f.caps.keywords else set()
        assert f.set_flags({a: frozenset({"\\Seen", "\\Answered"} | kw), b: frozenset({"\\Draft"})}) == set()
        snap = f.snapshot()
        assert snap.entries[a].flags == {"\\Seen", "\\Answered"} | kw and snap.entries[b].flags == {"\\Draft"}
        assert f.set_flags({a: frozenset({"\\Flagged"})}) == set()
        assert f.snapshot().entries[a].flags == {"\\Flagged"}
        assert read(f, [a])[a][1] == {"\\Flagged"}

    def test_conditional_set_flags(self, seeded):
        f = seeded.open("INBOX", seeded.caps.write)
        snap = f.snapshot()
        a, b, _c = sorted(snap.ids, key=str)
        if not (f.caps.write and f.caps.flags and f.caps.modseq):
            with pytest.raises(Refused):
                f.set_flags({a: frozenset({"\\Seen"})}, unchanged_since=snap.cursor)
            assert f.snapshot().entries[a].flags == frozenset()
            return
        f.set_flags({a: frozenset({"\\Flagged"})})  # a change after the snapshot: the condition fails
        assert f.set_flags({a: frozenset({"\\Seen"}), b: frozenset({"\\Seen"})}, unchanged_since=snap.cursor) == {a}
        now = f.snapshot().entries
        assert now[a].flags == {"\\Flagged"} and now[b].flags == {"\\Seen"}

    def test_incremental_snapshot(self, seeded):
        f = seeded.open("INBOX", seeded.caps.write)
        first = f.snapshot()
        again = f.snapshot(since=first.cursor)
        assert first.cursor is not None and again.cursor is not None
        assert again.ids == first.ids and set(again.entries) <= again.ids
        if not f.caps.write:
            return
        a, b, c = sorted(first.ids, key=str)
        f.set_flags({a: frozenset({"\\Seen"})})
        f.delete([b])
        new = add(f, msg(10))
        later = f.snapshot(since=first.cursor)
        assert later.ids == first.ids - {b} | {new}
        assert later.entries[a].flags == {"\\Seen"} and later.entries[new].size == len(msg(10))
        if f.caps.modseq:  # really incremental: what did not change is not read again
            assert later.entries.keys() == {a, new}
        assert {i: e for i, e in later.entries.items() if i != a} == \
               {i: e for i, e in f.snapshot().entries.items() if i in later.entries and i != a}

    def test_delete(self, seeded):
        f = seeded.open("INBOX", seeded.caps.write)
        a, b, c = sorted(f.snapshot().ids, key=str)
        if not f.caps.delete:
            with pytest.raises(Refused):
                f.delete([a])
            assert f.snapshot().ids == {a, b, c}
            return
        assert f.delete([a, c]) == {a, c}
        assert f.snapshot().ids == {b}
        assert f.delete([a]) == set()
        assert read(f, [a, b, c]).keys() == {b}

    def test_read_only_folder_refuses_writes(self, seeded):
        f = seeded.open("INBOX", False)
        assert not (f.caps.write or f.caps.delete)
        before = f.snapshot()
        some = next(iter(before.ids))
        for write in (lambda: f.append(MESSAGES[0], frozenset(), None),
                      lambda: f.set_flags({some: frozenset({"\\Seen"})}),
                      lambda: f.delete([some])):
            with pytest.raises(Refused, match="read-only|no flags"):
                write()
        assert f.snapshot().entries == before.entries


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self):
        return MemoryStore()

    def test_caps(self, store):
        assert all(vars(store.caps).values())


class TestMaildirStore(StoreContract):
    layout = "maildir++"

    @pytest.fixture
    def store(self, tmp_path):
        s = MaildirStore(tmp_path / "mail", self.layout)
        s.create("INBOX")
        return s

    def test_on_disk(self, store):
        """Maildir's own formats: info letters, dovecot-keywords, bytes as given."""
        f = store.open("INBOX", True)
        key = f.append(LF, frozenset({"\\Seen", "\\Flagged", "$Work"}), WHEN)
        (path,) = (store.root / "cur").iterdir()
        assert path.name == f"{key}:2,FSa" and path.read_bytes() == LF and path.stat().st_mtime == WHEN.timestamp()
        assert (store.root / "dovecot-keywords").read_text() == "0 $Work\n"
        assert not store.caps.crlf and not store.caps.modseq


    def test_an_unreadable_file_does_not_end_a_fetch(self, seeded):
        """Its chunks raise StorageError; the messages after it still come."""
        f = seeded.open("INBOX", False)
        a, b, c = sorted(f.snapshot().ids)
        path = f.path_of(b)
        want = {k: f.path_of(k).read_bytes() for k in (a, c)}
        path.unlink()
        path.mkdir()  # open() fails with EISDIR (a file without permission would do, but not as root)
        got = {}
        for key, body, _flags, _when in f.fetch([a, b, c]):
            try:
                got[key] = b"".join(body)
            except StorageError as exc:
                got[key] = str(exc)
        assert got == {**want, b: f"cannot read {path}: Is a directory"}

    def test_a_component_holding_a_slash(self, store):
        """A folder from a server with another separator ("a/b" under "."): listing() and
        open_listed() name it by its components; it has no '/'-path, so folders() leaves it out
        and open() of the path it would have is another folder."""
        parts = ("Lists", "a/b")
        path = folder_path(store.root, list(parts), store.layout, store.utf8_names)
        MaildirFolder(path).ensure()
        found, bad = store.listing()
        assert found[parts] == path and bad == []
        assert "Lists/a/b" not in store.folders()
        with pytest.raises(NoSuchFolder):
            store.open("Lists/a/b", False)
        key = add(store.open_listed(parts, True), MESSAGES[0])
        f = store.open_listed(parts, False)
        assert f.snapshot().ids == {key} and read(f, [key]) == {key: (MESSAGES[0], frozenset())}
        assert f.path_of(key).parent.parent == path


class TestMaildirStoreFs(TestMaildirStore):
    layout = "fs"

    def test_on_disk(self, store):
        store.create("Archive/2024")
        assert (store.root / "Archive" / "2024" / "cur").is_dir()


def account(user, **extra):
    raw = {"host": "127.0.0.1", "port": user.server.imaps_port, "username": user.name,
           "maildir": str(user.maildir), "ca_file": str(user.server.ca_file), **extra}
    return parse({"accounts": {"t": raw}}, Path("/x.toml")).account("t")


class TestImapStore(StoreContract):
    @pytest.fixture
    def mail_user(self, user):
        return user

    @pytest.fixture
    def store(self, mail_user):
        s = ImapStore(account(mail_user), mail_user.password)
        yield s
        s.close()

    def test_caps(self, store):
        assert store.caps.modseq and store.caps.uidplus and store.caps.crlf

    def test_listing_and_open_listed_use_the_servers_names(self, store, mail_user):
        store.create("Archive/2024")
        listed = {f.name: f for f in store.listing()}
        name = "Archive" + (listed["INBOX"].delimiter or "/") + "2024"
        assert name in listed and listed[name].parts == ["Archive", "2024"]
        mail_user.append(name, MESSAGES[:1])
        f = store.open_listed(name, False)
        assert not f.caps.write and len(f.snapshot().ids) == 1
        with pytest.raises(ServerError):
            store.open_listed("No such folder", False)

    def test_sees_what_another_client_did(self, store, mail_user):
        uids = mail_user.append("INBOX", MESSAGES[:2], flags=[b"\\Seen", b"$Other"])
        f = store.open("INBOX", False)
        assert f.snapshot().ids == set(uids)
        server = mail_user.server_messages()["INBOX"]
        assert read(f, uids) == server


class TestImapStoreBasic(TestImapStore):
    """A server with IMAP4rev1 only: no CONDSTORE (modseq False), no UIDPLUS (append says no id)."""

    @pytest.fixture
    def mail_user(self, basic_user):
        return basic_user

    def test_caps(self, store):
        assert not store.caps.modseq and not store.caps.uidplus


class TestPop3Store(StoreContract):
    @pytest.fixture
    def store(self, user):
        s = Pop3Store(account(user, protocol="pop3", port=user.server.pop3s_port), user.password)
        yield s
        s.close()

    @pytest.fixture
    def seeded(self, user):
        user.server.seed(user.name, "INBOX", MESSAGES)
        s = Pop3Store(account(user, protocol="pop3", port=user.server.pop3s_port), user.password)
        yield s
        s.close()

    def test_caps(self, store):
        assert not any((store.caps.flags, store.caps.keywords, store.caps.write, store.caps.delete))
