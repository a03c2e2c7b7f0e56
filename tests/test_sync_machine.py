"""Model-based tests of the real engine: hypothesis state machines drive `engine.run` (the real
FolderJob: gather, plan, apply; the real Maildir code; the real SQLite state) against the
in-memory IMAP server of tests/memimap.py, with a Maildir changed between runs the way a mail
client and a delivery agent change one.

tests/test_sync_model.py checks the planner with its own apply; here the apply is the engine's.
Messages are told apart by a token in their Subject (every body is the same text); a copy is
the same message whatever its line ends (identity.canonical). After every sync: both sides
hold the same messages, each once; what the model says must survive did, what was deleted on
one side since the last sync is gone from both (unless the conflict policy keeps it), flags
agree and are the per-flag merge, and a second run right away changes nothing. Mirror mode:
the Maildir follows the server, the server is never changed, local-only files are left alone.

The server is a model: it never replaces the tests against the real Dovecot.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from mailsync import engine
from mailsync.config import Account
from mailsync.errors import SafetyAbort
from mailsync.identity import canonical, crlf
from mailsync.model import FolderResult, Outcome
from mailsync.plan import CONFLICT_POLICIES
from tests.memimap import MemoryServer, MemorySession

SYSTEM = ("\\Seen", "\\Flagged", "\\Answered")
KEYWORDS = ("$Label1", "$Junk")
ALL = SYSTEM + KEYWORDS
# the Maildir info letters, written out here (not taken from mailsync.model): the test's own
# reading of a file name. D and T are never set by a rule; they show up if the engine sets them.
LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
FROM_LETTER = {v: k for k, v in LETTERS.items()}
NO_LIMIT = 10**6
F = frozenset

any_flags = st.frozensets(st.sampled_from(ALL))
# (condstore, qresync, uidplus); QRESYNC implies CONDSTORE
CAPS = [(c, q, u) for c, q in ((False, False), (True, False), (True, True)) for u in (True, False)]

_TOKEN = re.compile(rb"^Subject: message (\d+)\r?$", re.MULTILINE)


def message(n: int, with_mid: bool) -> bytes:
    """Message n as a delivery agent writes it to a Maildir (LF line ends). The body is the same
    for every message: only the headers tell them apart."""
    head = [f"From: sender{n % 3}@example.com", "To: me@example.com", f"Subject: message {n}",
            "Date: Mon, 2 Nov 2026 10:00:00 +0000"]
    if with_mid:
        head.append(f"Message-ID: <m{n}.machine@example.com>")
    return ("\n".join(head) + "\n\nHello,\nthe same text in every message.\n").encode()


def token_of(data: bytes) -> int:
    m = _TOKEN.search(data)
    assert m is not None, f"a message without its token: {data[:200]!r}"
    return int(m.group(1))


def show(flags) -> str:
    return "{" + " ".join(sorted(flags)) + "}"


# --------------------------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    """One account (INBOX only) on a MemoryServer and a Maildir; the edits of both sides.
    Subclasses add the run (sync or mirror) and its checks."""

    mode = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mailsync-machine-", dir=_fast_tmp()))
        self.root = self.tmp / "mail"
        for sub in ("cur", "new", "tmp"):
            (self.root / sub).mkdir(parents=True, mode=0o700)
        self.server = MemoryServer()
        self.ids = itertools.count(1)
        self.mids: dict[int, bool] = {}  # token -> whether it has a Message-ID
        self.caps = (True, True, True)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @initialize(caps=st.sampled_from(CAPS), server=st.lists(st.tuples(any_flags, st.booleans()), max_size=3),
                local=st.lists(st.tuples(any_flags, st.booleans()), max_size=2))
    def start(self, caps, server, local) -> None:
        """The server's capabilities; a few messages on each side, then a first run (so the
        rules on messages known to both sides apply from the first step)."""
        self.caps = caps
        event(f"{self.mode}: condstore={caps[0]} qresync={caps[1]} uidplus={caps[2]}")
        for flags, with_mid in server:
            self.server.deliver("INBOX", message(self.new_token(with_mid), with_mid), flags)
        for flags, with_mid in local:
            self.local_deliver(self.new_token(with_mid), flags)
        self.first_run()

    def first_run(self) -> None:
        raise NotImplementedError

    # -- the two sides as they are --------------------------------------------------------

    @property
    def inbox(self):
        return self.server.folders["INBOX"]

    def server_view(self) -> dict[int, list[frozenset[str]]]:
        """token -> flags (system flags and keywords) of each server copy."""
        out: dict[int, list[frozenset[str]]] = {}
        for m in self.inbox.messages.values():
            t = token_of(m.data)
            assert m.data == crlf(m.data), f"message {t} stored on the server with bare LFs"
            assert canonical(m.data) == canonical(message(t, self.mids[t])), f"message {t} changed on the server"
            out.setdefault(t, []).append(m.flags | m.keywords)
        return out

    def keyword_names(self) -> dict[str, str]:
        """letter -> keyword, from the folder's dovecot-keywords ("N name" lines, N = 0..25)."""
        out = {}
        try:
            text = (self.root / "dovecot-keywords").read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            num, _, name = line.partition(" ")
            if num.isdigit() and int(num) < 26 and name:
                out[chr(97 + int(num))] = name
        return out

    def files(self) -> dict[str, tuple[str, str]]:
        """key -> (subdir, file name) of every message file in new/ and cur/."""
        out = {}
        for sub in ("new", "cur"):
            for name in os.listdir(self.root / sub):
                key = name.partition(":2,")[0]
                assert key not in out, f"two files for key {key}: {out[key]} and {sub}/{name}"
                out[key] = (sub, name)
        return out

    def file_flags(self, name: str, names: dict[str, str] | None = None) -> frozenset[str]:
        names = self.keyword_names() if names is None else names
        info = name.partition(":2,")[2]
        out = set()
        for c in info:
            if c in FROM_LETTER:
                out.add(FROM_LETTER[c])
            elif c in names:
                out.add(names[c])
            else:
                out.add(f"letter {c}")  # the engine never writes a letter we do not know
        return F(out)

    def local_view(self) -> dict[int, list[frozenset[str]]]:
        """token -> flags of each local copy (the file's letters, keywords via dovecot-keywords)."""
        names = self.keyword_names()
        out: dict[int, list[frozenset[str]]] = {}
        for sub, name in self.files().values():
            data = (self.root / sub / name).read_bytes()
            t = token_of(data)
            assert canonical(data) == canonical(message(t, self.mids[t])), f"message {t} changed in {sub}/{name}"
            out.setdefault(t, []).append(self.file_flags(name, names))
        return out

    def snapshot(self):
        """Everything a run may change: the server's messages and counters, the file names and
        the keyword letters."""
        f = self.inbox
        srv = {u: (m.data, m.flags, m.keywords) for u, m in f.messages.items()}
        kw = (self.root / "dovecot-keywords").read_text() if (self.root / "dovecot-keywords").exists() else ""
        return srv, f.uidnext, f.modseq, f.uidvalidity, sorted(self.files().values()), kw

    # -- running the engine -----------------------------------------------------------------

    def account(self, policy: str = "server", max_delete: int = NO_LIMIT) -> Account:
        return Account(name="machine", host="memory", username="me", maildir=self.root, mode=self.mode,
                       connections=1, retries=0, max_delete=max_delete, conflict=policy)

    def run_engine(self, acc: Account) -> tuple[engine.RunResult, FolderResult]:
        c, q, u = self.caps
        result = engine.run(acc, "pw", mode=acc.mode,
                            connect=lambda: MemorySession(self.server, condstore=c, qresync=q, uidplus=u))
        assert [f.name for f in result.folders] == ["INBOX"], [(f.name, f.error) for f in result.folders]
        event(f"{self.mode} run: {result.folders[0].outcome.value}")
        return result, result.folders[0]

    def second_run_changes_nothing(self, acc: Account) -> None:
        before = self.snapshot()
        result, res = self.run_engine(acc)
        assert result.exit_code == 0, f"second run failed: {res.outcome} {res.error}"
        counters = {"new": res.new, "refetched": res.refetched, "uploaded": res.uploaded,
                    "flags_changed": res.flags_changed, "flags_pushed": res.flags_pushed,
                    "deleted_local": res.deleted_local, "deleted_remote": res.deleted_remote,
                    "rebound": res.rebound, "conflicts": len(res.conflicts)}
        assert not any(counters.values()), f"a second run right away did something: {counters} {res.notices}"
        assert self.snapshot() == before, "a second run right away changed the server or the Maildir"

    # -- helpers for the rules ----------------------------------------------------------------

    def new_token(self, with_mid: bool) -> int:
        t = next(self.ids)
        self.mids[t] = with_mid
        return t

    def letter_for(self, keyword: str) -> str:
        """The keyword's letter, given a free one in dovecot-keywords first if it has none (what
        Dovecot, as the local mail client's server, does)."""
        names = self.keyword_names()
        for c, name in names.items():
            if name == keyword:
                return c
        free = next(i for i in range(26) if chr(97 + i) not in names)
        names[chr(97 + free)] = keyword
        text = "".join(f"{ord(c) - 97} {n}\n" for c, n in sorted(names.items()))
        tmp = self.root / ".dovecot-keywords.client"
        tmp.write_text(text)
        os.replace(tmp, self.root / "dovecot-keywords")
        return chr(97 + free)

    def info_for(self, flags: frozenset[str], old_info: str = "") -> str:
        names = self.keyword_names()
        keep = {c for c in old_info if c not in FROM_LETTER and c not in names}  # letters we do not know
        letters = {LETTERS[f] for f in flags if f in LETTERS} | {self.letter_for(f) for f in flags if f in KEYWORDS}
        return "".join(sorted(letters | keep))

    def local_deliver(self, t: int, flags: frozenset[str]) -> None:
        """A delivery agent (no flags: tmp/ then new/) or a mail client saving a copy (flags: cur/)."""
        key = f"{1700000000 + t}.M{t}P4242Q{t}.client"
        tmp = self.root / "tmp" / key
        tmp.write_bytes(message(t, self.mids[t]))
        if flags:
            os.rename(tmp, self.root / "cur" / f"{key}:2,{self.info_for(flags)}")
        else:
            os.rename(tmp, self.root / "new" / key)

    def set_local_flags(self, key: str, flags: frozenset[str]) -> None:
        """What a mail client does: a file in new/ goes to cur/; the info letters are renamed."""
        sub, name = self.files()[key]
        info = name.partition(":2,")[2]
        os.rename(self.root / sub / name, self.root / "cur" / f"{key}:2,{self.info_for(flags, info)}")

    def key_of_token(self) -> dict[int, str]:
        """token -> key of its file (of one of them, were there two: the checks catch that)."""
        out = {}
        for key, (sub, name) in sorted(self.files().items()):
            out.setdefault(token_of((self.root / sub / name).read_bytes()), key)
        return out

    def uid_of_token(self) -> dict[int, int]:
        out = {}
        for u, m in sorted(self.inbox.messages.items()):
            out.setdefault(token_of(m.data), u)
        return out

    # -- edits on the server (another client) -------------------------------------------------

    @rule(flags=any_flags, with_mid=st.booleans())
    def server_deliver(self, flags, with_mid) -> None:
        t = self.new_token(with_mid)
        self.server.deliver("INBOX", message(t, with_mid), flags)

    # Messages are picked by token, never by UID or file name: the engine's file names (time,
    # pid, random) and the order it uploads in differ between runs of the same example, and
    # hypothesis must draw the same choices when it replays one.

    @precondition(lambda self: self.inbox.messages)
    @rule(data=st.data(), flag=st.sampled_from(ALL), add=st.booleans())
    def server_flag(self, data, flag, add) -> None:
        uids = self.uid_of_token()
        uid = uids[data.draw(st.sampled_from(sorted(uids)), label="token")]
        m = self.inbox.messages[uid]
        now = m.flags | m.keywords
        self.server.set_flags("INBOX", uid, now | {flag} if add else now - {flag})

    @precondition(lambda self: self.inbox.messages)
    @rule(data=st.data())
    def server_expunge(self, data) -> None:
        uids = self.uid_of_token()
        self.server.expunge("INBOX", [uids[data.draw(st.sampled_from(sorted(uids)), label="token")]])

    # -- time ---------------------------------------------------------------------------------

    @rule()
    def time_passes(self) -> None:
        """The Maildir was last changed a while ago: cur/ and new/ get an mtime 10 s back, as if
        the clock had moved on. A run then trusts their inode:mtime stamp (a change within the
        settle window is not trusted, folderjob.local_stamp), so the next run may skip the folder
        without listing it (FolderJob.quick_skip): the path of most real runs. (Setting the mtime
        back, not faking the clock: a change made later still gets a new mtime.)"""
        back = time.time_ns() - 10 * 10**9
        for sub in ("cur", "new"):
            os.utime(self.root / sub, ns=(back, back))

    # -- edits in the Maildir (a mail client, a delivery agent) ---------------------------------

    @rule(flags=any_flags, with_mid=st.booleans())
    def local_new(self, flags, with_mid) -> None:
        self.local_deliver(self.new_token(with_mid), flags)

    @rule(server_flags=any_flags, local_flags=any_flags, with_mid=st.booleans())
    def deliver_both_sides(self, server_flags, local_flags, with_mid) -> None:
        """The same message lands on both sides (a copy saved locally and delivered to the
        server): CRLF there, LF here. After a sync it must exist once on each side."""
        t = self.new_token(with_mid)
        self.server.deliver("INBOX", message(t, with_mid), server_flags)
        self.local_deliver(t, local_flags)

    @precondition(lambda self: self.files())
    @rule(data=st.data(), flag=st.sampled_from(ALL), add=st.booleans())
    def local_flag(self, data, flag, add) -> None:
        keys = self.key_of_token()
        key = keys[data.draw(st.sampled_from(sorted(keys)), label="token")]
        now = self.file_flags(self.files()[key][1])
        self.set_local_flags(key, now | {flag} if add else now - {flag})

    @precondition(lambda self: os.listdir(self.root / "new"))
    @rule(data=st.data())
    def local_new_to_cur(self, data) -> None:
        """A mail reader saw the message: new/ -> cur/, flags unchanged."""
        keys = {t: k for t, k in self.key_of_token().items() if self.files()[k][0] == "new"}
        key = keys[data.draw(st.sampled_from(sorted(keys)), label="token")]
        name = self.files()[key][1]
        os.rename(self.root / "new" / name, self.root / "cur" / f"{key}:2,{name.partition(':2,')[2]}")

    @precondition(lambda self: self.files())
    @rule(data=st.data())
    def local_delete(self, data) -> None:
        keys = self.key_of_token()
        key = keys[data.draw(st.sampled_from(sorted(keys)), label="token")]
        os.unlink(self.root.joinpath(*self.files()[key]))


# --------------------------------------------------------------------------------------------
# two-way sync


class SyncMachine(EngineMachine):
    mode = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.base: dict[int, frozenset[str]] = {}  # token -> flags both sides agreed on at the last sync

    def first_run(self) -> None:
        self.sync_and_check("server", NO_LIMIT)

    def synced(self) -> list[int]:
        """Tokens in the base, once on each side now."""
        s, loc = self.server_view(), self.local_view()
        return sorted(t for t in self.base if len(s.get(t, ())) == 1 and len(loc.get(t, ())) == 1)

    # ---- the same message changed on both sides (composites, made likely) ----

    @precondition(lambda self: self.synced())
    @rule(data=st.data(), flags=st.lists(st.sampled_from(ALL), min_size=2, max_size=2, unique=True),
          same=st.booleans())
    def both_change_flags(self, data, flags, same) -> None:
        """A different flag toggled on each side, or (same) one flag toggled on both."""
        t = data.draw(st.sampled_from(self.synced()), label="token")
        a, b = (flags[0], flags[0]) if same else flags
        uid, key = self.uid_of_token()[t], self.key_of_token()[t]
        m = self.inbox.messages[uid]
        self.server.set_flags("INBOX", uid, (m.flags | m.keywords) ^ {a})
        now = self.file_flags(self.files()[key][1])
        self.set_local_flags(key, now ^ {b})

    @precondition(lambda self: self.synced())
    @rule(data=st.data(), flag=st.sampled_from(ALL), server_side=st.booleans())
    def delete_one_side_change_other(self, data, flag, server_side) -> None:
        t = data.draw(st.sampled_from(self.synced()), label="token")
        uid, key = self.uid_of_token()[t], self.key_of_token()[t]
        if server_side:  # expunged on the server, a flag toggled locally
            self.server.expunge("INBOX", [uid])
            now = self.file_flags(self.files()[key][1])
            self.set_local_flags(key, now ^ {flag})
        else:            # removed locally, a flag toggled on the server
            os.unlink(self.root.joinpath(*self.files()[key]))
            m = self.inbox.messages[uid]
            self.server.set_flags("INBOX", uid, (m.flags | m.keywords) ^ {flag})

    @rule(caps=st.sampled_from(CAPS))
    def server_changes_capabilities(self, caps) -> None:
        """The server is reconfigured (or replaced by one with the same folders and UIDs)."""
        self.caps = caps

    # ---- sync ----

    def expectations(self, policy: str):
        """From the two sides and the base before a sync: token -> the flags it must have after
        (None: gone), and what the run must count (FolderResult's counters)."""
        srv, loc = self.server_view(), self.local_view()
        want: dict[int, frozenset[str] | None] = {}
        count = dict.fromkeys(("new", "refetched", "uploaded", "rebound", "flags_changed", "deleted_local",
                               "deleted_remote", "conflicts"), 0)
        for t in set(self.base) | set(srv) | set(loc):
            assert len(srv.get(t, ())) <= 1 and len(loc.get(t, ())) <= 1, f"message {t} twice before the sync"
            s = srv[t][0] if t in srv else None
            lo = loc[t][0] if t in loc else None
            if t not in self.base:   # new on one side, or on both (one message: both sides' flags)
                want[t] = (s or F()) | (lo or F())
                if s is not None and lo is not None:
                    event("the same new message on both sides")
                    count["rebound"] += 1
                else:
                    count["new" if s is not None else "uploaded"] += 1
                continue
            b = self.base[t]
            if s is not None and lo is not None:  # per flag: whichever side moved it wins
                sd, ld = s ^ b, lo ^ b
                if sd and ld:
                    event("flags changed on both sides")
                want[t] = b ^ (sd | ld)
                count["flags_changed"] += want[t] != b
            elif s is not None:      # removed locally: kept (downloaded again) if changed on the server
                keep = s != b and policy != "local"
                count["conflicts"] += s != b
                count["refetched" if keep else "deleted_remote"] += 1
                want[t] = s if keep else None
            elif lo is not None:     # expunged on the server: kept (uploaded again) if changed here
                keep = lo != b and policy != "server"
                count["conflicts"] += lo != b
                count["uploaded" if keep else "deleted_local"] += 1
                want[t] = lo if keep else None
            else:
                want[t] = None
            if s is None or lo is None:
                event(f"deleted on one side ({policy}{', conflict' if (s or lo or b) != b else ''})")
        return want, count

    @rule(policy=st.sampled_from(CONFLICT_POLICIES), max_delete=st.one_of(st.just(NO_LIMIT), st.integers(0, 2)))
    def sync(self, policy, max_delete) -> None:
        self.sync_and_check(policy, max_delete)

    def sync_and_check(self, policy: str, max_delete: int) -> None:
        want, count = self.expectations(policy)
        before = self.snapshot()
        acc = self.account(policy, max_delete)
        result, res = self.run_engine(acc)
        n = count["deleted_local"] + count["deleted_remote"]
        if n > max_delete:
            # the deletion guard: the folder fails as GUARDED and nothing at all was changed
            event("deletion guard tripped")
            assert result.exit_code == SafetyAbort.exit_code and res.outcome is Outcome.GUARDED, (
                f"{n} deletions, max_delete {max_delete}: {res.outcome} {res.error}")
            assert self.snapshot() == before, "the guard tripped but something was changed"
            return
        assert result.exit_code == 0, f"sync failed: {res.outcome} {res.error}"

        srv, loc = self.server_view(), self.local_view()
        # each message once on each side
        dup = {t: len(v) for t, v in srv.items() if len(v) > 1} | {t: -len(v) for t, v in loc.items() if len(v) > 1}
        assert not dup, f"messages stored more than once (token: copies, negative = local): {dup}"
        # the same messages on both sides, and just those the model says
        present = {t for t, fl in want.items() if fl is not None}
        assert set(srv) == set(loc), (f"only on the server: {sorted(set(srv) - set(loc))}, "
                                      f"only local: {sorted(set(loc) - set(srv))}")
        lost = present - set(srv)
        assert not lost, f"messages lost (policy {policy}): {sorted(lost)}"
        kept = set(srv) - present
        assert not kept, f"messages that should be gone (policy {policy}): {sorted(kept)}"
        # flags: the same on both sides, and what the merge says
        for t in sorted(present):
            s, lo = srv[t][0], loc[t][0]
            assert s == lo, f"message {t}: server {show(s)} local {show(lo)}"
            assert s == want[t], f"message {t}: flags {show(s)}, expected {show(want[t])} (policy {policy})"
        # what the run says it did: each message moved once, no more
        got = {k: getattr(res, k) for k in count if k != "conflicts"} | {"conflicts": len(res.conflicts)}
        assert got == count, f"the run counted {got}, expected {count}"
        self.base = {t: srv[t][0] for t in srv}
        self.second_run_changes_nothing(acc)


# --------------------------------------------------------------------------------------------
# mirror: the Maildir follows the server


class MirrorMachine(EngineMachine):
    mode = "mirror"

    def __init__(self) -> None:
        super().__init__()
        self.mirrored: dict[int, frozenset[str]] = {}  # token -> server flags at the last mirror run

    def first_run(self) -> None:
        self.mirror()

    def tokens_files(self) -> dict[int, list[tuple[str, str]]]:
        out: dict[int, list[tuple[str, str]]] = {}
        for sub, name in self.files().values():
            out.setdefault(token_of((self.root / sub / name).read_bytes()), []).append((sub, name))
        return out

    @rule()
    def mirror(self) -> None:
        files_before = self.tokens_files()
        loc_before = self.local_view()
        server_before = self.snapshot()[:4]
        srv = {t: v[0] for t, v in self.server_view().items()}
        # flags to change locally: of messages mirrored before and still on both sides, where the
        # server changed them or the Maildir did (put back); a message restored is not counted
        flags_changed = sum(1 for t, fl in self.mirrored.items() if t in srv and t in loc_before
                            and (srv[t] != fl or loc_before[t][0] != fl))
        acc = self.account()
        result, res = self.run_engine(acc)
        assert result.exit_code == 0, f"mirror failed: {res.outcome} {res.error}"
        assert self.snapshot()[:4] == server_before, "mirror changed the server"
        loc = self.local_view()
        files_after = self.tokens_files()
        for t, fl in srv.items():  # every server message once, with the server's flags
            assert len(loc.get(t, ())) == 1, f"message {t} is on the server and {len(loc.get(t, ()))} times locally"
            assert loc[t][0] == fl, f"message {t}: local {show(loc[t][0])}, server {show(fl)}"
        for t in set(files_before) | set(files_after):
            if t in srv:
                continue
            if t in self.mirrored:  # expunged on the server since the last run: gone here too
                assert t not in files_after, f"message {t} was expunged on the server but is kept locally"
            else:                   # never on the server: left alone, name and all
                assert files_after.get(t) == files_before.get(t), (
                    f"local-only message {t}: {files_before.get(t)} -> {files_after.get(t)}")
                event("a local-only file left alone")
        assert res.flags_changed == flags_changed, (
            f"the run counted {res.flags_changed} flag changes, expected {flags_changed}")
        self.mirrored = dict(srv)
        self.second_run_changes_nothing(acc)


def _fast_tmp() -> str | None:
    """A memory file system for the Maildirs where there is one: the engine syncs and fsyncs."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


# Runs are cheap (a few ms each, the Maildir on /dev/shm where there is one), and hypothesis
# tries short examples first: 40 examples let mutants of the engine through (a merge that drops
# the server's change, flags never pushed, local flag changes never put back by mirror), 150 do
# not; 300 take a few seconds. No "explain" phase: on a failure it replays the example some
# 1400 times (~50 s).
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
SyncMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None, phases=PHASES)
MirrorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None, phases=PHASES)
TestSyncMachine = SyncMachine.TestCase
TestMirrorMachine = MirrorMachine.TestCase
