"""The other direction of maildir.folder_path: which folders exist on disk, and their names.

local_folders() lists every Maildir folder under an account's root and gives each one the server
folder name (split into parts) that folder_path() maps to that directory. A directory counts only
if folder_path() could have produced exactly its path: names that do not decode, that decode in a
non-canonical spelling, or that decode to a name folder_path() puts elsewhere are not guessed at;
they are returned in a separate list so the caller can report them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mailsync import utf7
from mailsync.maildir import SUBDIRS, disk_component, folder_path, storage_error

_HEX = frozenset("0123456789abcdefABCDEF")
_MAIL_SUBDIRS = ("cur", "new")  # tmp/ alone does not make a folder


def unescape_component(text: str, layout: str, utf8_names: bool) -> str:
    """One directory-name component -> the folder-name component disk_component() made it from.

    Undoes the %XX escapes (UTF-8 bytes, several in a row for one character) and "%-" (the empty
    name), then modified UTF-7 unless utf8_names. Raises ValueError for anything disk_component
    could never have produced, including non-canonical spellings of a valid name (lower-case hex,
    needless escapes, split UTF-7 runs), so that no two directories ever decode to the same name.
    The maildir++ first-component spelling "%6Dailsync" belongs to folder_path, not to this
    function, and is rejected here like any other needless escape.
    """
    if layout not in ("maildir++", "fs", "flat"):
        raise ValueError(f"unknown layout {layout!r}")
    name = _unescape(text, utf8_names)
    if disk_component(name, layout, utf8_names) != text:
        raise ValueError(f"{text!r} is not how the name {name!r} is written on disk")
    return name


def _unescape(text: str, utf8_names: bool) -> str:
    """Decode one component without insisting on the canonical spelling (the caller checks)."""
    if text == "%-":
        return ""
    if text == "":
        raise ValueError("empty directory name")
    out: list[str] = []
    pending = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "%":
            hx = text[i + 1:i + 3]
            if len(hx) != 2 or not set(hx) <= _HEX:
                raise ValueError(f"bad %-escape at position {i} in {text!r}")
            pending.append(int(hx, 16))
            i += 3
            continue
        if pending:
            out.append(_utf8(pending, text))
            pending.clear()
        if 0xD800 <= ord(ch) <= 0xDFFF:  # bytes that are not UTF-8 (os.fsdecode's surrogateescape)
            raise ValueError(f"{text!r} is not valid UTF-8")
        out.append(ch)
        i += 1
    if pending:
        out.append(_utf8(pending, text))
    name = "".join(out)
    return name if utf8_names else utf7.decode(name)  # ValueError on anything invalid


def _utf8(raw: bytearray, text: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"%-escapes in {text!r} are not UTF-8") from None


def local_folders(root: Path, layout: str, utf8_names: bool
                  ) -> tuple[dict[tuple[str, ...], Path], list[Path]]:
    """Every Maildir folder under root: (parts -> directory, directories whose names don't decode).

    The root is ("INBOX",) when it has cur/ or new/. A directory is a folder when it has a cur/ or
    new/ subdirectory. maildir++: the dot-directories directly under root. fs: nested directories,
    never cur/, new/, tmp/ or anything starting with '.'; a directory without cur/new is no folder,
    but folders below it still are. A symbolic link to a directory counts only when it points
    inside root (never out of it, never at root itself), is never descended through (no loops),
    and is dropped when its target is already listed under another name: one directory, one
    folder, so an alias never turns into a second server folder holding the same messages.

    The bad list holds directories that look like mail folders (or, in fs, have one below them)
    whose names folder_path() could not have produced; nothing inside them is reported as a folder.
    A missing root is simply empty; other errors reading the tree raise StorageError.
    """
    if layout not in ("maildir++", "fs", "flat"):
        raise ValueError(f"unknown layout {layout!r}")
    root = Path(root)
    real_root = os.path.realpath(root)
    folders: dict[tuple[str, ...], Path] = {}
    bad: list[Path] = []
    if not os.path.isdir(real_root):
        return folders, bad
    if layout != "flat" and _is_folder(root, real_root):  # flat: INBOX is root/INBOX
        folders[("INBOX",)] = root

    links: list[tuple[tuple[str, ...], Path]] = []  # folders reached through a symlink

    def accept(path: Path, comps: list[str], is_link: bool) -> None:
        try:
            parts = tuple(_unescape(c, utf8_names) for c in comps)
        except ValueError:
            bad.append(path)
            return
        # folder_path is the authority on spelling: the name must lead back to exactly this
        # directory. That rejects needless or lower-case escapes, split UTF-7 runs, .INBOX, fs
        # INBOX/, a raw .mailsync.x, and accepts whatever folder_path writes (.%6Dailsync.x).
        if folder_path(root, list(parts), layout, utf8_names) != path or parts in folders:
            bad.append(path)
            return
        if is_link:
            links.append((parts, path))
        else:
            folders[parts] = path

    def done() -> tuple[dict[tuple[str, ...], Path], list[Path]]:
        # plain folders were reached through real directories only: their real path is known
        taken = {os.path.join(real_root, os.path.relpath(p, root)) for p in folders.values()}
        for parts, path in links:
            real = os.path.realpath(path)
            if real not in taken:
                taken.add(real)
                folders[parts] = path
        return dict(sorted(folders.items(), key=lambda kv: str(kv[1]))), sorted(bad)

    if layout == "maildir++":
        for name, is_link in _subdirs(root, real_root):
            if not name.startswith(".") or name in (".", ".."):
                continue
            path = root / name
            if _is_folder(path, real_root):
                accept(path, name[1:].split("."), is_link)
        return done()

    if layout == "flat":  # every folder a directory directly under root, no leading dot
        for name, is_link in _subdirs(root, real_root):
            if name.startswith(".") or name.lower() in SUBDIRS:
                continue
            path = root / name
            if _is_folder(path, real_root):
                accept(path, name.split("."), is_link)
        return done()

    # fs: depth-first over real directories; (path, components, topmost undecodable ancestor)
    stack: list[tuple[Path, list[str], Path | None]] = [(root, [], None)]
    reported: set[Path] = set()
    while stack:
        here, comps, broken = stack.pop()
        for name, is_link in _subdirs(here, real_root):
            if name.startswith(".") or name.lower() in SUBDIRS:
                continue
            path = here / name
            sub = comps + [name]
            sub_broken = broken
            if sub_broken is None:
                try:
                    unescape_component(name, layout, utf8_names)
                except ValueError:
                    sub_broken = path
            if _is_folder(path, real_root):
                if sub_broken is not None:
                    if sub_broken not in reported:
                        reported.add(sub_broken)
                        bad.append(sub_broken)
                else:
                    accept(path, sub, is_link)
            if not is_link:
                stack.append((path, sub, sub_broken))
    return done()


def _inside(target: str, real_root: str) -> bool:
    real = os.path.realpath(target)
    return real != real_root and os.path.commonpath([real, real_root]) == real_root


def _subdirs(path: Path, real_root: str) -> list[tuple[str, bool]]:
    """(name, is a symlink) for the directories in path; symlinks only when they stay in root."""
    out = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        out.append((entry.name, False))
                    elif entry.is_symlink() and entry.is_dir() and _inside(entry.path, real_root):
                        out.append((entry.name, True))
                except OSError:
                    continue  # vanished or unreadable entry: not a directory we can use
    except (FileNotFoundError, NotADirectoryError):
        return []  # removed while we looked
    except OSError as exc:
        raise storage_error(exc, f"cannot read {path}") from None
    return sorted(out)


def _is_folder(path: Path, real_root: str) -> bool:
    """path has cur/ or new/ as a directory (a symlink to one counts only inside root)."""
    for sub in _MAIL_SUBDIRS:
        p = os.path.join(path, sub)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISLNK(st.st_mode) and os.path.isdir(p) and _inside(p, real_root):
            return True
    return False
