"""Pure unit tests: no server, no network. Each test checks something a user would notice."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import stat
import subprocess
import sys
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mailsync import utf7
from mailsync.config import _KEYS, parse
from mailsync.errors import ConfigError, LockedError
from mailsync.folders import map_paths, selected
from mailsync.imap import FolderInfo, message_id, seqset
from mailsync.maildir import SUBDIRS, disk_component, folder_path
from mailsync.model import (
    FLAG_LETTERS,
    LETTER_FLAGS,
    Record,
    ServerView,
    flags_from_letters,
    info_letters,
    join_name,
    normalise_flags,
    split_name,
)
from mailsync.plan import batches, plan_backup, rematch
from mailsync.state import DB_NAME, LOCK_NAME, MIGRATIONS, RunLock, State

ROOT = Path("/backup/mail")
CFG = Path("/x/config.toml")
LAYOUTS = ("maildir++", "fs")

# ============================================================================ 1. modified UTF-7

UTF7_VECTORS = [
    ("Entwürfe", "Entw&APw-rfe"),
    ("R&D", "R&-D"),
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 5.1.3
    ("&", "&-"),
    ("Sent Items", "Sent Items"),
]


@pytest.mark.parametrize("text, wire", UTF7_VECTORS)
def test_utf7_known_vectors_both_directions(text, wire):
    assert utf7.encode(text) == wire
    assert utf7.decode(wire) == text


@given(st.text())  # st.text() never yields surrogates
@example("📧 Mail & more ü-")
@example("\x00\x1f\x7f")
def test_utf7_round_trip_and_printable_ascii(s):
    wire = utf7.encode(s)
    assert all(0x20 <= ord(c) <= 0x7E for c in wire), wire
    assert utf7.decode(wire) == s


@pytest.mark.parametrize("bad", [
    "Entw&APw",        # unterminated '&'
    "&",               # unterminated '&'
    "&A*w-",           # '*' is not modified base64
    "&APw/-",          # '/' is ',' in modified base64
    "&AP==-",          # no padding in modified base64
    "&AGE-",           # 'a' in base64: printable ASCII must be literal (non-canonical)
    "&ACY-",           # '&' must be written '&-'
    "&APx-",           # non-zero padding bits: non-canonical spelling of 'ü'
    "&AP-",            # odd number of bytes: not UTF-16
    "&2D0-",           # lone high surrogate
    "Entwürfe",        # raw non-ASCII
    "tab\there",       # raw control character
])
def test_utf7_decode_rejects_invalid(bad):
    with pytest.raises(ValueError):
        utf7.decode(bad)


# ============================================================================ 2. folder names on disk

def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"


def _rel_parts(path: Path) -> tuple[str, ...]:
    return path.relative_to(ROOT).parts


def _is_root_inbox(parts: list[str]) -> bool:
    return len(parts) == 1 and parts[0].upper() == "INBOX"


folder_parts = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4)


@given(parts=folder_parts, layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
@example(parts=[".."], layout="fs", utf8=False)
@example(parts=["..", "..", "etc"], layout="maildir++", utf8=True)
@example(parts=["a/../../b"], layout="fs", utf8=True)
@example(parts=["cur"], layout="fs", utf8=False)
@example(parts=["x\x00y", "\n"], layout="fs", utf8=True)
@example(parts=["\x85\x9b"], layout="maildir++", utf8=True)
def test_folder_path_stays_inside_root_and_is_clean(parts, layout, utf8):
    path = folder_path(ROOT, parts, layout, utf8)
    assert path == ROOT or ROOT in path.parents
    assert Path(os.path.normpath(path)) == path  # nothing that '..' or '.' could collapse
    rel = _rel_parts(path)
    if _is_root_inbox(parts):
        assert rel == ()
        return
    assert len(rel) == (1 if layout == "maildir++" else len(parts))
    for comp in rel:
        assert comp not in ("", ".", "..")
        assert "/" not in comp
        assert not any(_is_control(c) for c in comp), repr(comp)
        if not utf8:
            assert all(0x20 <= ord(c) <= 0x7E for c in comp), repr(comp)
    if layout == "maildir++":
        assert rel[0].startswith(".")
    else:
        for comp in rel:
            assert comp not in SUBDIRS
            assert not comp.startswith(".")


# names built from the characters the escaping has to get right, so collisions are likely to be tried
_tricky = st.text(alphabet="a.b/%2E&-cur newtmpINBOXü\x01~", max_size=6)
_tricky_parts = st.lists(_tricky, min_size=1, max_size=3)


@settings(max_examples=300)
@given(a=_tricky_parts, b=_tricky_parts, layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
@example(a=["a.b"], b=["a", "b"], layout="maildir++", utf8=False)
@example(a=["cur"], b=["%63ur"], layout="fs", utf8=False)
@example(a=[".x"], b=["%2Ex"], layout="fs", utf8=True)
@example(a=["ü"], b=["&APw-"], layout="fs", utf8=False)
@example(a=[""], b=["%-"], layout="maildir++", utf8=False)
def test_folder_names_are_injective(a, b, layout, utf8):
    assume(a != b)
    assume(not (_is_root_inbox(a) and _is_root_inbox(b)))
    assert folder_path(ROOT, a, layout, utf8) != folder_path(ROOT, b, layout, utf8)


@settings(max_examples=200)
@given(names=st.lists(_tricky_parts, min_size=2, max_size=8, unique_by=tuple),
       layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
def test_many_folders_never_share_a_directory(names, layout, utf8):
    owners: dict[Path, set[tuple[str, ...]]] = {}
    for parts in names:
        who = ("INBOX",) if _is_root_inbox(parts) else tuple(parts)
        owners.setdefault(folder_path(ROOT, parts, layout, utf8), set()).add(who)
    for path, who in owners.items():
        assert len(who) == 1, f"{sorted(who)} all map to {path}"


@given(name=st.text(max_size=12), utf8=st.booleans())
@example(name="cur", utf8=False)
@example(name="new", utf8=True)
@example(name="tmp", utf8=True)
@example(name=".hidden", utf8=True)
@example(name=".", utf8=False)
@example(name="..", utf8=False)
def test_fs_layout_component_never_a_maildir_subdir_or_hidden(name, utf8):
    comp = disk_component(name, "fs", utf8)
    assert comp not in SUBDIRS
    assert not comp.startswith(".")
    assert comp and "/" not in comp and "\x00" not in comp


@pytest.mark.parametrize("parts, expected", [
    (["Entwürfe"], ".Entw&APw-rfe"),
    (["Archive", "2024 Q1"], ".Archive.2024 Q1"),
    (["a.b"], ".a%2Eb"),
])
def test_maildirpp_names(parts, expected):
    assert folder_path(ROOT, parts, "maildir++", False) == ROOT / expected


def test_fs_layout_names():
    assert folder_path(ROOT, ["Archive", "2024 Q1"], "fs", False) == ROOT / "Archive" / "2024 Q1"
    assert folder_path(ROOT, ["Entwürfe"], "fs", True) == ROOT / "Entwürfe"
    assert folder_path(ROOT, ["Entwürfe"], "fs", False) == ROOT / "Entw&APw-rfe"


@pytest.mark.parametrize("inbox", ["INBOX", "inbox", "Inbox", "iNbOx"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("utf8", [False, True])
def test_inbox_is_the_root_in_any_case(inbox, layout, utf8):
    assert folder_path(ROOT, [inbox], layout, utf8) == ROOT
    assert folder_path(ROOT, [inbox, "Sub"], layout, utf8) != ROOT


@given(parts=folder_parts, layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
@example(parts=["mailsync", "db"], layout="maildir++", utf8=False)
@example(parts=["mailsync", "lock"], layout="maildir++", utf8=True)
@example(parts=["mailsync", "db-wal"], layout="maildir++", utf8=False)
def test_folder_never_lands_on_mailsyncs_own_files(parts, layout, utf8):
    # a server folder "mailsync/db" must not be backed up into the state database's path
    path = folder_path(ROOT, parts, layout, utf8)
    own = {ROOT / DB_NAME, ROOT / LOCK_NAME, ROOT / (DB_NAME + "-wal"), ROOT / (DB_NAME + "-shm"),
           ROOT / (DB_NAME + "-journal")}
    assert path not in own
    for sub in SUBDIRS:
        assert path != ROOT / sub


# ============================================================================ 3. Maildir info and flags

flag_sets = st.frozensets(st.sampled_from(sorted(FLAG_LETTERS)))


def test_info_letters_known_values():
    assert info_letters(frozenset({"\\Seen", "\\Flagged", "\\Answered"})) == "FRS"
    assert info_letters(frozenset({"\\Seen", "\\Draft", "\\Deleted"})) == "DST"
    # Dovecot keyword letters (a-z) survive a flag change; 'S' without \Seen does not
    assert info_letters(frozenset({"\\Seen"}), extra="ba") == "Sab"
    assert info_letters(frozenset(), extra="SFa") == "a"
    assert info_letters(frozenset()) == ""


@given(flags=flag_sets, extra=st.text(alphabet="abcdzDFRSTxP", max_size=8))
def test_info_letters_sorted_unique_and_lossless(flags, extra):
    letters = info_letters(flags, extra)
    assert list(letters) == sorted(set(letters))
    assert flags_from_letters(letters) == flags
    assert set(letters) - set(LETTER_FLAGS) == set(extra) - set(LETTER_FLAGS)


keys = st.text(min_size=1, max_size=30).filter(lambda k: ":2," not in k)


@given(key=keys, flags=flag_sets, extra=st.text(alphabet="abcxyz", max_size=3))
@example(key="1700000000.M1P2Q3R4a.host", flags=frozenset({"\\Seen"}), extra="")
@example(key="a:2", flags=frozenset(), extra="")
@example(key="x!2,y", flags=frozenset({"\\Flagged"}), extra="a")
def test_split_join_round_trip(key, flags, extra):
    letters = info_letters(flags, extra)
    name = join_name(key, letters)
    assert split_name(name) == (key, letters)


def test_split_name_variants():
    assert split_name("123.M4P5.host:2,FS") == ("123.M4P5.host", "FS")
    assert split_name("123.M4P5.host!2,S") == ("123.M4P5.host", "S")
    assert split_name("123.M4P5.host;2,S") == ("123.M4P5.host", "S")
    assert split_name("123.M4P5.host:2,") == ("123.M4P5.host", "")
    assert split_name("123.M4P5.host") == ("123.M4P5.host", None)


def test_normalise_flags():
    system, kw = normalise_flags([b"\\Seen", "\\Recent", "\\recent", "\\FLAGGED", "\\answered",
                                  "\\Unknown", "$Junk", "NonJunk", b"$Label1", "work"])
    assert system == frozenset({"\\Seen", "\\Flagged", "\\Answered"})
    assert kw == frozenset({"$Junk", "NonJunk", "$Label1", "work"})
    assert normalise_flags([]) == (frozenset(), frozenset())
    assert normalise_flags(["\\Recent"]) == (frozenset(), frozenset())


# ============================================================================ 4. the planner

uid_st = st.integers(min_value=1, max_value=40)
sys_flags = st.frozensets(st.sampled_from(sorted(FLAG_LETTERS)), max_size=3)
kw_flags = st.frozensets(st.sampled_from(["$Junk", "$junk", "NonJunk", "Work"]), max_size=2)


@st.composite
def backup_scenario(draw):
    """A server folder, the state's records and the files on disk, plus what a gather saw."""
    server = draw(st.dictionaries(uid_st, st.tuples(sys_flags, kw_flags), max_size=15))
    known: dict[int, Record] = {}
    for uid in draw(st.sets(uid_st, max_size=15)):
        known[uid] = Record(uid=uid, key=f"key{uid}", flags=draw(sys_flags), keywords=draw(kw_flags),
                            size=draw(st.integers(0, 5000)), on_server=draw(st.booleans()))
    candidates = sorted({r.key for r in known.values()} | {"stray-a", "stray-b"})
    on_disk = draw(st.sets(st.sampled_from(candidates)))
    sizes = {uid: draw(st.integers(0, 5000)) for uid in server}
    return server, known, on_disk, sizes


def _gather(draw_bool, draw_subset, server, known, sizes) -> ServerView:
    """What the engine's gather step may report for this server and state."""
    differ = {u for u in server if u not in known or (known[u].flags, known[u].keywords) != server[u]}
    flags = {u: server[u] for u in differ | draw_subset(sorted(server))}
    # new: UIDs the state does not know; after a crash the state may know some of them already
    new = {u: sizes[u] for u in server if u not in known or draw_bool()}
    # present=None is only ever passed when the gather proved nothing was expunged, i.e. every
    # record on the server is still there and nothing marked gone came back
    provable = (all(u in server for u, r in known.items() if r.on_server)
                and not any(u in server for u, r in known.items() if not r.on_server))
    present = None if provable and draw_bool() else frozenset(server)
    return ServerView(flags=flags, new=new, present=present)


def _apply(plan, server, known, on_disk, sizes):
    """Simulate the engine applying a plan: downloads create records and files, nothing is deleted."""
    recs = dict(known)
    disk = set(on_disk)
    for uid, fl, kw in plan.set_flags:
        recs[uid] = replace(recs[uid], flags=fl, keywords=kw)
    for uid in plan.gone:
        recs[uid] = replace(recs[uid], on_server=False)
    for uid in plan.back:
        recs[uid] = replace(recs[uid], on_server=True)
    for uid in plan.fetch + plan.refetch:
        if uid not in server:
            continue  # the server returns no body: nothing is written
        key = f"fetched{uid}-{len(disk)}"
        disk.add(key)
        fl, kw = server[uid]
        recs[uid] = Record(uid=uid, key=key, flags=fl, keywords=kw, size=sizes[uid], on_server=True)
    return recs, disk


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=backup_scenario(), data=st.data())
def test_plan_backup_converges_and_never_loses_mail(scenario, data):
    server, known, on_disk, sizes = scenario
    draw_bool = lambda: data.draw(st.booleans())  # noqa: E731
    draw_subset = lambda xs: data.draw(st.sets(st.sampled_from(xs))) if xs else set()  # noqa: E731

    view = _gather(draw_bool, draw_subset, server, known, sizes)
    plan = plan_backup(view, known, on_disk)

    # nothing known is downloaded as new, nothing already on disk is downloaded again
    assert not set(plan.fetch) & set(known)
    assert not set(plan.refetch) & {u for u, r in known.items() if r.key in on_disk}
    for seq in (plan.fetch, plan.refetch, plan.gone, plan.back):
        assert len(set(seq)) == len(seq)

    recs, disk = _apply(plan, server, known, on_disk, sizes)

    assert set(recs) >= set(known), "a record was removed"
    for uid, (fl, kw) in server.items():
        assert uid in recs, f"server message {uid} has no record"
        rec = recs[uid]
        assert rec.key in disk, f"server message {uid} has no file"
        assert (rec.flags, rec.keywords) == (fl, kw), f"flags of {uid} differ from the server's"
        assert rec.on_server
    for uid, rec in recs.items():
        if uid not in server:
            assert rec.on_server is False, f"UID {uid} is not on the server but is recorded as present"

    # a second run against the same server has nothing to do
    view2 = _gather(draw_bool, draw_subset, server, recs, sizes)
    plan2 = plan_backup(view2, recs, disk)
    assert plan2.empty, plan2


def test_plan_keeps_expunged_message_gone_when_nothing_was_expunged_since():
    # run 1 marked UID 5 gone; run 2's counts prove nothing else was expunged (present=None)
    known = {
        4: Record(uid=4, key="k4", flags=frozenset({"\\Seen"})),
        5: Record(uid=5, key="k5", flags=frozenset(), on_server=False),
    }
    view = ServerView(flags={}, new={}, present=None)
    plan = plan_backup(view, known, {"k4", "k5"})
    assert plan.back == (), "an expunged message is reported back on the server"
    assert plan.empty
    # its local file was removed by the user: there is nothing on the server to download again
    plan = plan_backup(view, known, {"k4"})
    assert plan.refetch == ()


def test_plan_basic_cases():
    known = {
        1: Record(uid=1, key="k1", flags=frozenset({"\\Seen"})),
        2: Record(uid=2, key="k2", flags=frozenset()),
        3: Record(uid=3, key="k3", flags=frozenset()),
        4: Record(uid=4, key="k4", flags=frozenset(), on_server=False),
    }
    view = ServerView(
        flags={1: (frozenset({"\\Seen"}), frozenset()), 2: (frozenset({"\\Flagged"}), frozenset({"$Work"})),
               4: (frozenset(), frozenset()), 9: (frozenset(), frozenset())},
        new={9: 100},
        present=frozenset({1, 2, 4, 9}),
    )
    plan = plan_backup(view, known, {"k1", "k2", "k3"})
    assert plan.fetch == (9,)
    assert plan.refetch == (4,)          # back on the server and its file is gone: download again
    assert plan.set_flags == ((2, frozenset({"\\Flagged"}), frozenset({"$Work"})),)
    assert plan.gone == (3,)             # expunged: state marked, file kept
    assert plan.back == (4,)


@given(sizes=st.dictionaries(st.integers(1, 10_000), st.integers(0, 3000), max_size=40),
       max_bytes=st.integers(1, 5000), max_count=st.integers(1, 10), data=st.data())
def test_batches_cover_every_uid_once_in_order_within_limits(sizes, max_bytes, max_count, data):
    uids = data.draw(st.permutations(sorted(sizes)))
    out = batches(sizes, uids, max_bytes, max_count)
    assert [u for b in out for u in b] == list(uids)
    for b in out:
        assert b, "empty batch"
        assert len(b) <= max_count
        if len(b) > 1:
            assert sum(sizes[u] for u in b) <= max_bytes
    # greedy: a batch is only closed when the next message would not fit
    for b, nxt in zip(out, out[1:]):
        cost = sum(max(sizes[u], 1) for u in b) + max(sizes[nxt[0]], 1)
        assert cost > max_bytes or len(b) == max_count


def test_batches_big_message_alone():
    sizes = {1: 10, 2: 10_000, 3: 10, 4: 10}
    assert batches(sizes, [1, 2, 3, 4], 100) == [[1], [2], [3, 4]]
    assert batches({}, [], 100) == []


pairs = st.tuples(st.sampled_from(["", "<a@x>", "<b@x>", "<c@x>"]), st.sampled_from([100, 200]))


@given(old=st.lists(pairs, max_size=8), srv=st.dictionaries(st.integers(1, 50), pairs, max_size=8))
def test_rematch_only_unambiguous_pairs(old, srv):
    records = [Record(uid=i + 1, key=f"k{i}", flags=frozenset(), size=size, message_id=mid)
               for i, (mid, size) in enumerate(old)]
    server = {uid: (size, mid) for uid, (mid, size) in srv.items()}
    got = rematch(records, server)

    def n_old(p):
        return sum(1 for r in records if (r.message_id, r.size) == p)

    def n_srv(p):
        return sum(1 for (s, m) in server.values() if (m, s) == p)

    for uid, rec in got.items():
        pair = (rec.message_id, rec.size)
        assert pair == (server[uid][1], server[uid][0])
        assert rec.message_id, "matched without a Message-ID"
        assert n_old(pair) == 1 and n_srv(pair) == 1, f"ambiguous pair {pair} matched"
    assert len({id(r) for r in got.values()}) == len(got), "one record bound to two UIDs"
    for uid, (size, mid) in server.items():
        if mid and n_old((mid, size)) == 1 and n_srv((mid, size)) == 1:
            assert uid in got, f"unambiguous pair {(mid, size)} not matched"


def test_rematch_examples():
    a = Record(uid=1, key="ka", flags=frozenset(), size=100, message_id="<a@x>")
    b1 = Record(uid=2, key="kb1", flags=frozenset(), size=100, message_id="<b@x>")
    b2 = Record(uid=3, key="kb2", flags=frozenset(), size=100, message_id="<b@x>")
    c = Record(uid=4, key="kc", flags=frozenset(), size=100, message_id="<c@x>")
    server = {10: (100, "<a@x>"), 11: (100, "<b@x>"), 12: (100, "<c@x>"), 13: (100, "<c@x>"),
              14: (101, "<a@x>")}
    assert rematch([a, b1, b2, c], server) == {10: a}


# ============================================================================ 5. folder selection

@pytest.mark.parametrize("name, patterns, expected", [
    ("Sent", ("*",), True),
    ("Sent", (), False),
    ("Trash", ("*", "!Trash"), False),
    ("Sent", ("*", "!Trash"), True),
    ("Trash", ("!Trash", "*"), True),                       # last match wins
    ("Archive/2023", ("*", "!Archive/*", "Archive/2024"), False),
    ("Archive/2024", ("*", "!Archive/*", "Archive/2024"), True),
    ("Archive", ("*", "!Archive/*"), True),
    ("INBOX", ("inbox",), True),
    ("Inbox", ("INBOX",), True),
    ("inbox", ("*", "!INBOX"), False),
    ("INBOX", ("*", "!Inbox"), False),
    ("sent", ("Sent",), False),                             # only INBOX ignores case
    ("INBOX/Sub", ("INBOX",), False),
])
def test_selected(name, patterns, expected):
    assert selected(name, patterns) is expected


def test_map_paths_reports_collision_instead_of_merging():
    folders = [FolderInfo("INBOX", "/", ()), FolderInfo("Sent", "/", ()), FolderInfo("Inbox", "/", ()),
               FolderInfo("A/B", "/", ())]
    for layout in LAYOUTS:
        out, errors = map_paths(folders, ROOT, layout, False)
        assert out["INBOX"] == ROOT
        assert "Inbox" not in out
        assert set(errors) == {"Inbox"}
        assert "INBOX" in errors["Inbox"]
        assert len(set(out.values())) == len(out) == 3


def test_map_paths_reports_names_that_cannot_be_stored():
    """A name that is not valid text (a lone surrogate: what invalid modified UTF-7 from the server
    decodes to), a name longer than a directory name can be, a path deeper than the file system
    allows, and one name listed twice: each is reported for that folder; the rest are mapped."""
    folders = [FolderInfo("INBOX", ".", ()), FolderInfo("bad\ud834", ".", ()), FolderInfo("L" * 300, ".", ()),
               FolderInfo(".".join(["D" * 250] * 20), ".", ()), FolderInfo("Twice", ".", ()),
               FolderInfo("Twice", ".", ()), FolderInfo("L" * 200, ".", ())]
    for layout in LAYOUTS:
        for utf8 in (False, True):
            out, errors = map_paths(folders, ROOT, layout, utf8)
            assert set(out) == {"INBOX", "Twice", "L" * 200}
            assert "invalid modified UTF-7" in errors["bad\ud834"]
            assert "bytes long" in errors["L" * 300] and "!NAME" in errors["L" * 300]
            assert "bytes long" in errors[".".join(["D" * 250] * 20)]
            assert "more than once" in errors["Twice"]
            assert not any("\ud834" in e for e in errors.values())


def test_collision_message_never_carries_a_raw_control_character():
    # one name split on '.', the other on '/': the same parts, so the same directory
    folders = [FolderInfo("a\x1b[31m.b", ".", ()), FolderInfo("a\x1b[31m/b", "/", ())]
    for layout in LAYOUTS:
        out, errors = map_paths(folders, ROOT, layout, False)
        assert list(out) == ["a\x1b[31m.b"]
        assert errors["a\x1b[31m/b"].startswith("maps to the same directory as 'a\\x1b[31m.b'")
        assert "\x1b" not in errors["a\x1b[31m/b"]


@pytest.mark.parametrize("text, shown", [
    ("Inbox", "Inbox"),
    ("Entwürfe 📧", "Entwürfe 📧"),
    ("evil\r\nmailsync: error: fake", "evil\\x0d\\x0amailsync: error: fake"),
    ("esc\x1b[31mred", "esc\\x1b[31mred"),
    ("nul\x00 c1\x85 del\x7f", "nul\\x00 c1\\x85 del\\x7f"),
    ("rtl\u202etxt\u2028", "rtl\\u202etxt\\u2028"),
    ("bad\ud834", "bad\\ud834"),
])
def test_cli_shows_server_text_on_one_safe_line(text, shown):
    from mailsync.cli import _show
    assert _show(text) == shown


def test_cli_json_carries_a_lone_surrogate_as_an_escape():
    import json

    from mailsync.cli import _json
    assert _json({"name": "Entwürfe"}) == json.dumps({"name": "Entwürfe"}, indent=2, ensure_ascii=False)
    text = _json({"name": "bad\ud834"})
    text.encode("utf-8")  # printable on any UTF-8 stdout
    assert json.loads(text) == {"name": "bad\ud834"}


# ============================================================================ 6. IMAP helpers

@pytest.mark.parametrize("uids, expected", [
    ([1, 2, 3, 7, 9, 10], "1:3,7,9:10"),
    ([10, 9, 7, 3, 2, 1, 2], "1:3,7,9:10"),
    ([5], "5"),
    ([], ""),
])
def test_seqset_examples(uids, expected):
    assert seqset(uids) == expected


@given(st.sets(st.integers(1, 2**32 - 1), max_size=50) | st.sets(st.integers(1, 60), max_size=40))
def test_seqset_round_trip_and_minimal(uids):
    text = seqset(uids)
    got: set[int] = set()
    ranges = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition(":")
        lo, hi = int(a), int(b or a)
        assert lo < hi or not b, f"degenerate range {part}"
        ranges.append((lo, hi))
        got.update(range(lo, hi + 1))
    assert got == uids
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert lo > hi + 1, "adjacent ranges not merged"


@pytest.mark.parametrize("data, expected", [
    (b"From: a@x\r\nMessage-ID: <abc@x>\r\nSubject: s\r\n\r\nbody", "<abc@x>"),
    (b"Message-Id: <first@x>\r\n\r\n", "<first@x>"),
    (b"From: a@x\r\nMessage-ID:\r\n <folded@x>\r\nSubject: s\r\n\r\nbody", "<folded@x>"),
    (b"From: a@x\nMessage-ID:\n\t<lf@x>\nSubject: s\n\nbody", "<lf@x>"),
    (b"From: a@x\r\nMessage-ID: <nosep@x>\r\n", "<nosep@x>"),
    (b"Message-ID: <only@x>", "<only@x>"),
    (b"X-Message-ID: <fake@x>\r\nMessage-ID: <real@x>\r\n\r\n", "<real@x>"),
    (b"From: a@x\r\nSubject: no id\r\n\r\nMessage-ID: <in-body@x>\r\n", ""),
    (b"From: a@x\r\nSubject: s\r\n", ""),
    (b"", ""),
])
def test_message_id(data, expected):
    assert message_id(data) == expected


# ============================================================================ 7. configuration

BASE = {"host": "imap.example.org", "username": "me@example.org", "maildir": "/srv/mail"}


def _acc(**overrides):
    sec = {**BASE, **overrides}
    return parse({"accounts": {"main": sec}}, CFG).accounts["main"]


def _config_error(sec) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse({"accounts": {"main": sec}}, CFG)
    return ei.value


def test_config_defaults():
    acc = _acc()
    assert (acc.protocol, acc.port, acc.layout, acc.mode) == ("imap", 993, "maildir++", "backup")
    assert acc.utf8_names is False
    assert acc.folders == ("*",)
    assert acc.maildir == Path("/srv/mail")
    assert _acc(protocol="pop3").port == 995
    assert _acc(protocol="pop3", port=1995).port == 1995
    assert _acc(layout="fs").utf8_names is True
    assert _acc(maildir="Mail").maildir == Path("/x/Mail")  # relative to the config file


def test_config_unknown_key_suggests_close_match():
    err = _config_error({**BASE, "hots": "imap.example.org"})
    assert "'hots'" in str(err)
    assert "did you mean 'host'" in str(err)
    assert str(CFG) in str(err) and "main" in str(err)
    err = _config_error({**BASE, "fingreprint": "x"})
    assert "'fingreprint'" in str(err) and "'fingerprint'" in str(err)


@pytest.mark.parametrize("key, value", [
    ("port", "993"), ("port", True), ("port", 9.5), ("host", 5), ("utf8_names", "yes"), ("utf8_names", 1),
    ("timeout", "60"), ("timeout", False), ("folders", "*"), ("connections", [3]), ("maildir", ["/a"]),
    ("password_command", 7), ("fingerprint", 123),
])
def test_config_wrong_type_names_the_key(key, value):
    err = _config_error({**BASE, key: value})
    assert f"'{key}'" in str(err)


def test_config_wrong_password_type_does_not_echo_it():
    err = _config_error({**BASE, "password": 31415926})
    assert "'password'" in str(err)
    assert "31415926" not in str(err)


@pytest.mark.parametrize("missing", ["host", "username", "maildir"])
def test_config_missing_required_key(missing):
    sec = {k: v for k, v in BASE.items() if k != missing}
    assert f"missing key '{missing}'" in str(_config_error(sec))
    assert f"missing key '{missing}'" in str(_config_error({**BASE, missing: ""}))


HEX = "0123456789abcdef" * 4  # 64 hex digits


@pytest.mark.parametrize("given_fp", [
    "sha256:" + ":".join(HEX[i:i + 2] for i in range(0, 64, 2)),
    "SHA256:" + ":".join(HEX[i:i + 2] for i in range(0, 64, 2)).upper(),
    HEX,
    "  " + HEX.upper() + "  ",
])
def test_config_fingerprint_normalised(given_fp):
    assert _acc(fingerprint=given_fp).fingerprint == HEX.upper()


@pytest.mark.parametrize("bad", [
    HEX[:-1], HEX + "0", "sha256:" + "zz" * 32, "sha1:" + "ab" * 20, "", "sha256:",
    "md5:" + HEX[:32],
])
def test_config_bad_fingerprint_rejected(bad):
    assert "'fingerprint'" in str(_config_error({**BASE, "fingerprint": bad}))


@pytest.mark.parametrize("key, value", [
    ("port", 0), ("port", 65536), ("protocol", "IMAP4"), ("layout", "mbox"), ("mode", "copy"),
    ("timeout", 0), ("connections", 0), ("connections", 17), ("retries", 11), ("batch_bytes", 10),
    ("folders", ["*", ""]), ("folders", ["!"]), ("password_command", []),
])
def test_config_out_of_range_values_name_the_key(key, value):
    assert f"'{key}'" in str(_config_error({**BASE, key: value}))


def test_config_only_one_password_source():
    err = _config_error({**BASE, "password_env": "PW", "password_command": "pass mail"})
    assert "password_command" in str(err) and "password_env" in str(err)


# TOML can hold any of these (tomllib reads integers of any size)
toml_scalars = (st.text(max_size=20) | st.integers(min_value=-(10**400), max_value=10**400)
                | st.integers(-70000, 70000) | st.floats() | st.booleans() | st.datetimes()
                | st.dates() | st.times())
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)
config_keys = st.sampled_from(sorted(_KEYS)) | st.text(max_size=12)
valid_like = {
    "host": st.sampled_from(["h", ""]), "username": st.just("u"), "maildir": st.sampled_from(["/m", "m", ""]),
    "protocol": st.sampled_from(["imap", "pop3", "x"]), "layout": st.sampled_from(["fs", "maildir++"]),
    "fingerprint": st.sampled_from([HEX, "sha256:" + HEX, "x"]),
    "folders": st.lists(st.sampled_from(["*", "!Trash", "", "!"]), max_size=3),
}


@st.composite
def junk_sections(draw):
    sec: dict = {}
    if draw(st.booleans()):
        sec.update(BASE)  # get past the early checks so the later ones see junk too
    for key in draw(st.lists(config_keys, max_size=5)):
        strat = toml_values
        if key in valid_like and draw(st.booleans()):
            strat = valid_like[key]
        sec[key] = draw(strat)
    return sec


junk_configs = (
    st.dictionaries(st.text(max_size=10), toml_values, max_size=3)
    | st.builds(lambda secs: {"accounts": secs}, st.dictionaries(st.text(max_size=8), junk_sections(), max_size=3))
    | st.builds(lambda v: {"accounts": v}, toml_values)
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(junk_configs)
@example({"accounts": {"main": {**BASE, "timeout": 10**400}}})
@example({"accounts": {"main": {**BASE, "timeout": float("nan")}}})
@example({"accounts": {"main": {**BASE, "port": 10**400}}})
@example({"accounts": {"main": {**BASE, "password_command": [1, 2]}}})
@example({"accounts": {"main": {**BASE, "folders": [["*"]]}}})
@example({"accounts": {"main": {**BASE, "ca_file": "\x00"}}})
@example({"accounts": {"main": {**BASE, "batch_bytes": dt.date(2024, 1, 1)}}})
def test_config_junk_only_raises_config_error(data):
    try:
        cfg = parse(data, CFG)
    except ConfigError as exc:
        assert str(exc)
        return
    for acc in cfg.accounts.values():
        assert acc.host and acc.username and acc.maildir.is_absolute()
        assert 1 <= acc.port <= 65535
        assert 1 <= acc.timeout <= 3600


# ============================================================================ 8. state and run lock

def test_state_schema_version_and_private_file(tmp_path):
    st_ = State(tmp_path)
    try:
        version = st_.db.execute("PRAGMA user_version").fetchone()[0]
        assert version == len(MIGRATIONS)
        fid = st_.folder("INBOX", ".")["id"]
        with st_.transaction() as tx:
            tx.add(fid, 7, Record(uid=1, key="k1", flags=frozenset({"\\Seen"}),
                                  keywords=frozenset({"$Junk", "Work"}), size=10, sha256="ab",
                                  message_id="<m@x>"), None)
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            p = tmp_path / name
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, name
        assert stat.S_IMODE((tmp_path / DB_NAME).stat().st_mode) == 0o600
    finally:
        st_.close()
    # reopening keeps the schema and the data
    st2 = State(tmp_path)
    try:
        assert st2.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        rec = st2.records(fid, 7)[1]
        assert rec.keywords == frozenset({"$Junk", "Work"}) and rec.flags == frozenset({"\\Seen"})
    finally:
        st2.close()


def test_run_lock_excludes_a_second_run_until_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockedError) as ei:
            with RunLock(tmp_path):
                pass
        assert f"pid {os.getpid()}" in str(ei.value)
        assert ei.value.exit_code == 7
    with RunLock(tmp_path) as again:
        assert again.fd is not None
    assert re.fullmatch(r"\d+\n", (tmp_path / LOCK_NAME).read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["new", "cur"]), st.sampled_from("abcdef"),
                                st.sampled_from(["", ":2,S", ":2,FS"])), max_size=8),
       change=st.sampled_from(["none", "drop", "rename", "move", "extra"]))
def test_holds_just_agrees_with_the_listing(tmp_path_factory, files, change):
    """The check that lets a run record its folder's stamp (no listing kept in memory) says "in
    step" exactly when a listing would, and never when one message has two files."""
    from mailsync.maildir import MaildirFolder
    d = tmp_path_factory.mktemp("md")
    mf = MaildirFolder(d)
    mf.ensure()
    for sub, key, info in files:
        (d / sub / f"{key}{info}").touch()
    expected = dict(mf.listing())
    if expected and change != "none":
        key = sorted(expected)[0]
        sub, name = expected[key]
        if change == "drop":
            del expected[key]
        elif change == "rename":
            expected[key] = (sub, name + "T")
        elif change == "move":
            expected[key] = ("new" if sub == "cur" else "cur", name)
        else:
            expected["zzz"] = ("new", "zzz")
    made = {(sub, key + info) for sub, key, info in files}
    doubled = len(made) > len({key for _, key, _ in files})  # a message with two files
    assert mf.holds_just(expected) == (mf.listing() == expected and not doubled)


def test_new_keys_are_unique_in_a_process_and_across_a_fork():
    """Two deliveries never get one file name, even from a forked worker (a pool's processes):
    and every key is one that recovery recognises as ours in tmp/."""
    from mailsync.maildir import _OUR_TMP, new_key
    keys = {new_key() for _ in range(2000)}
    assert len(keys) == 2000 and all(_OUR_TMP.match(k) for k in keys)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's keys carry its pid and draws its own random bits
        os.write(w, "\n".join(new_key() for _ in range(200)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read().split("\n")
    os.waitpid(pid, 0)
    parent = [new_key() for _ in range(200)]
    assert len(set(child)) == 200 and not set(child) & set(parent)
    assert {k.split("P")[1].split("Q")[0] for k in child} == {str(pid)}
    tail = {k.split("R")[1].split(".")[0] for k in child}  # the random parts differ from the parent's
    assert not tail & {k.split("R")[1].split(".")[0] for k in parent}


class _Trickle(io.RawIOBase):
    """A socket's reads: the bytes in pieces of the given sizes."""

    def __init__(self, data: bytes, pieces: list[int]) -> None:
        self.data, self.pieces, self.pos = data, pieces, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.pieces.pop(0) if self.pieces else len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from([b".", b"..", b".x", b"x.", b"", b"a\r", b"\r", b"From x", b". ."]), max_size=8),
       lf=st.booleans(), pieces=st.lists(st.integers(1, 7), max_size=40), buf=st.sampled_from([1, 3, 8192]))
def test_pop3_answers_read_byte_exact_and_never_past_their_end(lines, lf, pieces, buf):
    """A POP3 message comes back exactly as the server holds it, whatever the line starts and
    however the bytes arrive, and the pipelined answer after it is left for the next read."""
    from mailsync.pop3 import read_dotted
    eol = b"\n" if lf else b"\r\n"
    body = b"".join(line + eol for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + eol for line in lines) + b"." + eol
    f = io.BufferedReader(_Trickle(wire + b"+OK next\r\n", pieces), buffer_size=buf)
    assert read_dotted(f, 1 << 20) == body
    assert f.read() == b"+OK next\r\n"


def test_pop3_answer_that_never_ends_is_refused():
    import poplib

    from mailsync.pop3 import read_dotted
    f = io.BufferedReader(_Trickle(b"x" * 100_000, []), buffer_size=4096)
    with pytest.raises(poplib.error_proto, match="longer than"):
        read_dotted(f, 50_000)


class _FakeSession:
    broken = False

    def close(self) -> None:
        pass


def test_pool_shares_one_connection_while_folders_are_quick():
    """Folders that each take less than a login share the first connection: a run where little
    changed opens no others, however many are allowed."""
    import threading
    import time

    from mailsync.runner import Pool, fan_out, with_session
    opened = []
    pool = Pool(lambda: opened.append(1) or _FakeSession(), 3, _FakeSession(), grace=5.0)

    def work(i):
        time.sleep(0.005)  # a quick folder (the grace is 5 s)
        return i
    done = fan_out(range(20), lambda i: with_session(pool, lambda s: work(i), retries=0, stop=threading.Event()),
                   3, threading.Event())
    assert done == list(range(20)) and opened == []


def test_pool_opens_its_connections_when_folders_are_slow(monkeypatch):
    """While every connection stays busy past the grace, and the process mostly waits, the others
    are opened (up to the limit)."""
    import threading

    from mailsync import runner
    from mailsync.runner import Pool, fan_out, with_session
    opened, all_open = [], threading.Event()

    def connect():
        opened.append(1)
        if len(opened) == 2:
            all_open.set()
        return _FakeSession()

    def work(s):
        assert all_open.wait(10), "the pool did not open its other connections"
        return s

    monkeypatch.setattr(runner, "_cpu_seconds", lambda: 0.0)  # the process waits (for the network)
    pool = Pool(connect, 3, _FakeSession(), grace=0.05)
    sessions = fan_out(range(3), lambda i: with_session(pool, work, retries=0, stop=threading.Event()),
                       3, threading.Event())
    assert len(opened) == 2 and len({id(s) for s in sessions}) == 3


def test_pool_opens_no_more_connections_while_python_is_busy(monkeypatch):
    """Folders that keep this process's CPU busy (a server nearby) stay on the connections
    open: another thread would only wait its turn for the interpreter."""
    import threading
    import time

    from mailsync import runner
    monkeypatch.setattr(runner, "_cpu_seconds", time.monotonic)  # as if one core were kept busy
    opened = []

    def work(i):
        time.sleep(0.4)  # (longer than the grace and the CPU sample)
        return i
    pool = runner.Pool(lambda: opened.append(1) or _FakeSession(), 3, _FakeSession(), grace=0.05)
    done = runner.fan_out(range(2), lambda i: runner.with_session(pool, lambda s: work(i), retries=0,
                                                                  stop=threading.Event()), 2, threading.Event())
    assert done == [0, 1] and opened == []


def test_idle_answers_split_across_reads_are_read_whole():
    """A server's answer during IDLE that arrives in pieces (a STATUS line cut between two TLS
    records) is read whole, not as a lost start and a garbled rest; what is left unread stays
    for the next look. The watch had stopped listening on such a line."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    from mailsync.watch import _idle_check
    ours, server = socket.socketpair()
    f = ours.makefile("rb")

    def get_line():
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise EOFError(f"unterminated line: {line!r}")
        return line[:-2]
    client = SimpleNamespace(socket=lambda: ours, _imap=SimpleNamespace(file=f, _get_line=get_line),
                             _set_read_timeout=lambda: ours.settimeout(None))

    def send():
        server.sendall(b"* 3 EXISTS\r\n* STATUS INBOX (MESS")
        time.sleep(0.3)
        server.sendall(b"AGES 5)\r\n")
    t = threading.Thread(target=send)
    t.start()
    answers = _idle_check(client, 5.0, line_timeout=5.0)
    t.join()
    assert answers == [(3, b"EXISTS"), (b"STATUS", b"INBOX", (b"MESSAGES", 5))]
    assert _idle_check(client, 0.05) == []
    server.sendall(b"* 4 EXISTS\r\n")
    assert _idle_check(client, 5.0) == [(4, b"EXISTS")]
    server.close()
    with pytest.raises(Exception, match="closed the connection"):
        _idle_check(client, 5.0)
    ours.close()


def test_the_sync_path_imports_imapclient_without_importlib_metadata():
    """login gives imapclient its version module (read from its .dist-info name) instead of the one
    that loads importlib.metadata at every start; the version it reports is still the installed one."""
    code = ("import sys, mailsync.command, mailsync.engine, imapclient\n"
            "print('importlib.metadata' in sys.modules, imapclient.__version__, imapclient.version_info)\n"
            "import importlib.metadata\n"
            "print(importlib.metadata.version('imapclient'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    loaded, version, info = out[0].split(" ", 2)
    assert loaded == "False", "importlib.metadata is loaded at start-up again"
    assert version == out[1] and info == repr((*(int(p) for p in out[1].split(".")), "final"))
