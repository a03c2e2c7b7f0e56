"""local_folders / unescape_component: the directories on disk back to server folder names."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailsync.localfolders import local_folders, unescape_component
from mailsync.maildir import disk_component, folder_path

LAYOUTS = ("maildir++", "fs")
BOTH = [(layout, utf8) for layout in LAYOUTS for utf8 in (False, True)]

# Short enough that even a fully escaped maildir++ name (one directory for all parts) stays
# well under NAME_MAX = 255 bytes.
_TRICKY = st.sampled_from([
    "", ".", "..", ".hidden", "a.b", "a/b", "%", "%41", "%-", "%6Dailsync", "100%", "2024 Q1",
    "cur", "CUR", "new", "tmp", "Tmp", "mailsync", "MailSync", "INBOX", "inbox", "maildirfolder",
    "Entwürfe", "日本", "&", "&-", "a&b", "x\x00y", "\x7f", "\u0085", "😀", "ä ö", " ", "-",
])
_ANY = st.text(st.characters(blacklist_categories=("Cs",)), max_size=5)
_PART = st.one_of(_TRICKY, _ANY)
_PARTS = st.lists(_PART, min_size=1, max_size=3)


def _is_inbox(parts) -> bool:
    return len(parts) == 1 and parts[0].upper() == "INBOX"


def _make(root: Path, parts, layout: str, utf8: bool, sub: str = "cur") -> Path:
    path = folder_path(root, list(parts), layout, utf8)
    (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def _expected(names, root: Path, layout: str, utf8: bool) -> dict[tuple[str, ...], Path]:
    out = {}
    for parts in names:
        key = ("INBOX",) if _is_inbox(parts) else tuple(parts)
        out[key] = folder_path(root, list(parts), layout, utf8)
    return out


# ----------------------------------------------------------------------------- round trips

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_PARTS, min_size=1, max_size=8), layout=st.sampled_from(LAYOUTS),
       utf8=st.booleans())
@example(names=[["A"], ["A", "B"], ["A", "B", "C"], ["cur"], [".hidden"], [""], ["a.b", "c/d"]],
         layout="fs", utf8=True)
@example(names=[["mailsync"], ["mailsync", "db"], ["mailsync", "lock"], ["%6Dailsync"], [""],
                ["", ""], ["Entwürfe"], ["Archive", "2024 Q1"], ["INBOX", "Sub"], ["inbox"]],
         layout="maildir++", utf8=False)
def test_round_trip_many_folders_in_one_root(names, layout, utf8):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, parts in enumerate(names):
            _make(root, parts, layout, utf8, ("cur", "new")[i % 2])  # either makes a Maildir
        # the state files live in every root and must never be taken for anything
        (root / ".mailsync.db").write_bytes(b"")
        (root / ".mailsync.lock").write_bytes(b"")
        found, bad = local_folders(root, layout, utf8)
        assert bad == []
        assert found == _expected(names, root, layout, utf8)


@settings(max_examples=500, deadline=None)
@given(name=_PART, layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
def test_unescape_inverts_disk_component(name, layout, utf8):
    assert unescape_component(disk_component(name, layout, utf8), layout, utf8) == name


@settings(max_examples=500, deadline=None)
@given(text=st.text(st.sampled_from("%-.&+,AaBb09EFef2Ddcurtmp\u00e4\x01/"), max_size=8),
       layout=st.sampled_from(LAYOUTS), utf8=st.booleans())
def test_unescape_accepts_exactly_what_disk_component_writes(text, layout, utf8):
    try:
        name = unescape_component(text, layout, utf8)
    except ValueError:
        return
    assert disk_component(name, layout, utf8) == text


# ----------------------------------------------------------------------------- known names

@pytest.mark.parametrize("dirname, utf8, parts", [
    (".Entw&APw-rfe", False, ("Entwürfe",)),
    (".Entwürfe", True, ("Entwürfe",)),
    (".Archive.2024 Q1", False, ("Archive", "2024 Q1")),
    (".a%2Eb.c%2Fd", False, ("a.b", "c/d")),
    (".%-", False, ("",)),
    (".%-.x", True, ("", "x")),
    (".100%25", True, ("100%",)),
    (".%6Dailsync", False, ("mailsync",)),
    (".%6Dailsync.db", True, ("mailsync", "db")),
    (".x.mailsync", False, ("x", "mailsync")),
    (".INBOX.Sent", False, ("INBOX", "Sent")),
])
def test_maildirpp_known_names(tmp_path, dirname, utf8, parts):
    (tmp_path / dirname / "cur").mkdir(parents=True)
    assert local_folders(tmp_path, "maildir++", utf8) == ({parts: tmp_path / dirname}, [])


@pytest.mark.parametrize("rel, utf8, parts", [
    ("A/B", True, ("A", "B")),
    ("Entw&APw-rfe", False, ("Entwürfe",)),
    ("Entwürfe", True, ("Entwürfe",)),
    ("%2Ehidden/%63ur", True, (".hidden", "cur")),
    ("%54mp/%4Eew", False, ("Tmp", "New")),
    ("a.b/c%2Fd", True, ("a.b", "c/d")),
    ("%-/%-", True, ("", "")),
    ("INBOX/Sent", False, ("INBOX", "Sent")),
    ("mailsync", True, ("mailsync",)),
])
def test_fs_known_names(tmp_path, rel, utf8, parts):
    (tmp_path / rel / "new").mkdir(parents=True)
    assert local_folders(tmp_path, "fs", utf8) == ({parts: tmp_path / rel}, [])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_root_is_inbox(tmp_path, layout, utf8):
    assert local_folders(tmp_path, layout, utf8) == ({}, [])
    (tmp_path / "tmp").mkdir()
    assert local_folders(tmp_path, layout, utf8) == ({}, [])  # tmp/ alone is no Maildir
    (tmp_path / "new").mkdir()
    assert local_folders(tmp_path, layout, utf8) == ({("INBOX",): tmp_path}, [])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_missing_root_is_empty(tmp_path, layout, utf8):
    assert local_folders(tmp_path / "nope", layout, utf8) == ({}, [])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_cur_new_tmp_are_never_folders(tmp_path, layout, utf8):
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub / "cur").mkdir(parents=True)  # even if they look like Maildirs
    folder = _make(tmp_path, ["A"], layout, utf8)
    for sub in ("new", "tmp"):
        (folder / sub).mkdir()
        (folder / sub / "cur").mkdir()
    found, bad = local_folders(tmp_path, layout, utf8)
    assert found == {("INBOX",): tmp_path, ("A",): folder}
    assert bad == []


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_files_and_state_files_are_ignored(tmp_path, layout, utf8):
    for name in (".mailsync.db", ".mailsync.db-wal", ".mailsync.db-shm", ".mailsync.lock",
                 ".Plain", "Plain", "maildirfolder", "%ZZ", ".%ZZ"):
        (tmp_path / name).write_bytes(b"x")
    folder = _make(tmp_path, ["A"], layout, utf8)
    (folder / "maildirfolder").write_bytes(b"")
    (folder / "dovecot-uidlist").write_bytes(b"")
    assert local_folders(tmp_path, layout, utf8) == ({("A",): folder}, [])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_cur_as_a_file_does_not_make_a_folder(tmp_path, layout, utf8):
    folder = folder_path(tmp_path, ["A"], layout, utf8)
    folder.mkdir()
    (folder / "cur").write_bytes(b"")
    assert local_folders(tmp_path, layout, utf8) == ({}, [])


def test_fs_parent_without_maildir_is_no_folder_but_its_children_are(tmp_path):
    (tmp_path / "A" / "B" / "C" / "cur").mkdir(parents=True)
    (tmp_path / "A" / "X" / "new").mkdir(parents=True)
    found, bad = local_folders(tmp_path, "fs", True)
    assert found == {("A", "B", "C"): tmp_path / "A/B/C", ("A", "X"): tmp_path / "A/X"}
    assert bad == []


def test_fs_hidden_directories_are_skipped(tmp_path):
    (tmp_path / ".git" / "cur").mkdir(parents=True)
    (tmp_path / "A" / ".Trash" / "cur").mkdir(parents=True)
    (tmp_path / "A" / "cur").mkdir()
    assert local_folders(tmp_path, "fs", True) == ({("A",): tmp_path / "A"}, [])


def test_maildirpp_ignores_non_dot_and_nested_directories(tmp_path):
    (tmp_path / "Other" / "cur").mkdir(parents=True)
    (tmp_path / ".A" / "cur").mkdir(parents=True)
    (tmp_path / ".A" / ".B" / "cur").mkdir(parents=True)  # not maildir++; not ours to name
    assert local_folders(tmp_path, "maildir++", False) == ({("A",): tmp_path / ".A"}, [])


# ----------------------------------------------------------------------------- undecodable

@pytest.mark.parametrize("dirname, utf8", [
    (".%ZZ", True),             # not hex
    (".a%4", True),             # cut short
    (".a%", False),
    (".%C3", True),             # half a UTF-8 character
    (".%FF", True),             # never UTF-8
    (".%2e", True),             # lower-case hex is not how we write it
    (".%41", False),            # needless escape: 'A' is written as itself
    (".%6Dfoo", True),          # only a whole first "mailsync" is spelled that way
    (".x.%6Dailsync", True),    # ... and only as the first component
    (".mailsync", False),       # a raw "mailsync" first component is never written
    (".mailsync.x", True),
    (".a..b", True),            # empty component not written as %-
    ("..a", False),
    (".a.", False),
    (".%-%-", True),
    (".Entw&APw", False),       # unterminated modified UTF-7
    (".&AGE-", False),          # 'a' in base64: not canonical
    (".&AOQ-&APY-", False),     # split run: "äö" is &AOQA9g-
    (".Entwürfe", False),       # raw 8-bit in a modified UTF-7 root
    (".INBOX", False),          # INBOX is the root
    (".inbox", True),
])
def test_maildirpp_undecodable_names_are_reported(tmp_path, dirname, utf8):
    (tmp_path / dirname / "cur").mkdir(parents=True)
    (tmp_path / ".Good" / "new").mkdir(parents=True)
    found, bad = local_folders(tmp_path, "maildir++", utf8)
    assert found == {("Good",): tmp_path / ".Good"}
    assert bad == [tmp_path / dirname]


@pytest.mark.parametrize("rel, utf8, reported", [
    ("%ZZ", True, "%ZZ"),
    ("%2e", True, "%2e"),
    ("%2Ehidden", False, None),     # fine
    ("%63UR", True, None),          # fine: "cUR"
    ("%63ux", True, "%63ux"),       # "cux" is written as itself
    ("%43UR", True, None),          # fine: "CUR"
    ("%-x", True, "%-x"),
    ("Entwürfe", False, "Entwürfe"),
    ("INBOX", True, "INBOX"),       # INBOX is the root
    ("%ZZ/Sub", True, "%ZZ"),       # nothing below an undecodable directory is named
    ("%ZZ/Sub/Deeper", True, "%ZZ"),
])
def test_fs_undecodable_names_are_reported(tmp_path, rel, utf8, reported):
    (tmp_path / rel / "cur").mkdir(parents=True)
    (tmp_path / "Good" / "new").mkdir(parents=True)
    found, bad = local_folders(tmp_path, "fs", utf8)
    if reported is None:
        assert bad == []
        assert len(found) == 2
    else:
        assert found == {("Good",): tmp_path / "Good"}
        assert bad == [tmp_path / reported]


def test_fs_undecodable_parent_reported_once_and_only_with_mail_below(tmp_path):
    (tmp_path / "%ZZ" / "A" / "cur").mkdir(parents=True)
    (tmp_path / "%ZZ" / "B" / "cur").mkdir(parents=True)
    (tmp_path / "%YY" / "empty").mkdir(parents=True)  # no mail anywhere below: just a directory
    assert local_folders(tmp_path, "fs", True) == ({}, [tmp_path / "%ZZ"])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_name_that_is_not_utf8_on_disk_is_reported(tmp_path, layout, utf8):
    raw = (b"." if layout == "maildir++" else b"") + b"bad\xff"
    os.makedirs(os.path.join(os.fsencode(tmp_path), raw, b"cur"))
    found, bad = local_folders(tmp_path, layout, utf8)
    assert found == {}
    assert bad == [tmp_path / os.fsdecode(raw)]


def test_maildirpp_undecodable_directory_without_maildir_is_not_reported(tmp_path):
    (tmp_path / ".%ZZ").mkdir()
    (tmp_path / ".%YY" / "tmp").mkdir(parents=True)
    assert local_folders(tmp_path, "maildir++", True) == ({}, [])


@pytest.mark.parametrize("text", ["", "%", "%G0", "%-%-", "a%-", "%C3%28", "%ED%A0%80"])
@pytest.mark.parametrize("layout, utf8", BOTH)
def test_unescape_rejects(text, layout, utf8):
    with pytest.raises(ValueError):
        unescape_component(text, layout, utf8)


def test_unescape_examples():
    assert unescape_component("Entw&APw-rfe", "maildir++", False) == "Entwürfe"
    assert unescape_component("%C2%80x%C2%9F", "maildir++", True) == "\x80x\x9f"
    assert unescape_component("😀", "maildir++", True) == "😀"
    assert unescape_component("&2D3eAA-", "maildir++", False) == "😀"
    assert unescape_component("%2E%2E", "maildir++", True) == ".."
    assert unescape_component("%2E.", "fs", True) == ".."
    assert unescape_component("%63ur", "fs", False) == "cur"
    assert unescape_component("a%2Fb%25", "fs", True) == "a/b%"
    assert unescape_component("%00%7F%C2%85", "fs", True) == "\x00\x7f\x85"
    with pytest.raises(ValueError):
        unescape_component("%F0%9F%98%80", "maildir++", True)  # written as itself
    with pytest.raises(ValueError):
        unescape_component("cur", "fs", True)
    with pytest.raises(ValueError):
        unescape_component(".x", "fs", True)
    with pytest.raises(ValueError):
        unescape_component("a.b", "maildir++", True)
    with pytest.raises(ValueError):
        unescape_component("x", "mbox", True)
    with pytest.raises(ValueError):  # folder_path's spelling of a first component, not ours
        unescape_component("%6Dailsync", "maildir++", False)


# ----------------------------------------------------------------------------- symlinks

@pytest.mark.parametrize("layout, utf8", BOTH)
def test_symlinks_out_of_root_are_not_followed(tmp_path, layout, utf8):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "cur").mkdir(parents=True)
    (outside / "Sub" / "cur").mkdir(parents=True)
    root.mkdir()
    link = folder_path(root, ["Out"], layout, utf8)
    link.symlink_to(outside)
    half = _make(root, ["Half"], layout, utf8, "new")  # only its cur/ points out
    (half / "cur").symlink_to(outside / "cur")
    leaky = folder_path(root, ["Leaky"], layout, utf8)
    leaky.mkdir()
    (leaky / "cur").symlink_to(outside / "cur")
    assert local_folders(root, layout, utf8) == ({("Half",): half}, [])


@pytest.mark.parametrize("layout, utf8", BOTH)
def test_symlink_inside_root_counts_once_and_is_not_descended(tmp_path, layout, utf8):
    real = _make(tmp_path, ["Real"], layout, utf8)
    child = _make(tmp_path, ["Real", "Child"], layout, utf8)
    alias = folder_path(tmp_path, ["Alias"], layout, utf8)
    alias.symlink_to(real.name)  # the same directory as Real: not a second folder
    (tmp_path / ".store" / "kept" / "cur").mkdir(parents=True)  # no folder name of its own
    kept = folder_path(tmp_path, ["Kept"], layout, utf8)
    kept.symlink_to(Path(".store") / "kept")
    twice = folder_path(tmp_path, ["Twice"], layout, utf8)
    twice.symlink_to(Path(".store") / "kept")
    loop = folder_path(tmp_path, ["Loop"], layout, utf8)
    loop.symlink_to(".")  # the root itself: never a folder, never a loop
    found, bad = local_folders(tmp_path, layout, utf8)
    assert bad == []
    assert found == {("Kept",): kept, ("Real",): real, ("Real", "Child"): child}


def test_root_given_through_a_symlink(tmp_path):
    (tmp_path / "real" / ".A" / "cur").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    root = tmp_path / "link"
    assert local_folders(root, "maildir++", False) == ({("A",): root / ".A"}, [])
