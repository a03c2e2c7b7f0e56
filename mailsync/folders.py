"""Which server folders a run covers, and where each lives on disk."""

from __future__ import annotations

import os
from fnmatch import fnmatchcase
from pathlib import Path

from mailsync.maildir import folder_path


def selected(name: str, patterns: tuple[str, ...]) -> bool:
    """Patterns apply in order, the last match wins; '!' excludes. INBOX matches any case."""
    keep = False
    for pat in patterns:
        negate = pat.startswith("!")
        p = pat[1:] if negate else pat
        target = name
        if name.upper() == "INBOX" and p.upper() == "INBOX":
            target, p = "INBOX", "INBOX"
        if fnmatchcase(target, p):
            keep = not negate
    return keep


def map_paths(folders, root: Path, layout: str, utf8_names: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """Server folder name -> directory, and name -> error for names that cannot be stored: names that
    would share a directory with an earlier one (the first keeps it; the other is reported, never
    merged), names that are not valid text (invalid modified UTF-7 from the server), and names whose
    directory would be too long for the file system."""
    out: dict[str, Path] = {}
    errors: dict[str, str] = {}
    seen: dict[Path, str] = {}
    name_max, path_max = _limits(root)
    for f in folders:
        if not _valid_text(f.name):
            errors[f.name] = ("the server sent this name in invalid modified UTF-7 (it decodes to no valid "
                              "text); it cannot be selected or stored, so it is skipped")
            continue
        path = folder_path(root, f.parts, layout, utf8_names)
        if path in seen:
            if seen[path] == f.name:
                errors[f.name] = ("the server lists this name more than once (or under two spellings that "
                                  "decode to it); the folders cannot be told apart")
            else:
                errors[f.name] = (f"maps to the same directory as {_shown(seen[path])} ({path}); "
                                  "exclude one of them with folders = [..., \"!NAME\"]")
            continue
        why = _too_long(path, root, name_max, path_max)
        if why:
            errors[f.name] = why + "; exclude it with folders = [..., \"!NAME\"]"
            continue
        seen[path] = f.name
        out[f.name] = path
    return out, errors


# room left in a path for "/cur/<file name>" (a Maildir file name is about 60 bytes plus the host name)
_FILE_ROOM = 320


def _valid_text(name: str) -> bool:
    """False for names holding lone surrogates: what a decoder makes of invalid UTF-7 or UTF-16."""
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in name)


def _shown(name: str) -> str:
    """A folder name quoted for a message, control characters escaped (never sent raw to a terminal)."""
    return "'" + "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in name) + "'"


def _limits(root: Path) -> tuple[int, int]:
    """The file system's longest file name and path (bytes) where root is, or the usual 255/4096."""
    p = Path(root)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        name_max, path_max = os.pathconf(p, "PC_NAME_MAX"), os.pathconf(p, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096
    return (name_max if name_max > 0 else 255), (path_max if path_max > 0 else 4096)  # -1: no limit given


def _too_long(path: Path, root: Path, name_max: int, path_max: int) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return ""
    for comp in rel.parts:
        size = len(os.fsencode(comp))
        if size > name_max:
            return (f"its directory name would be {size} bytes long, more than the file system allows "
                    f"({name_max})")
    size = len(os.fsencode(str(path)))
    if size + _FILE_ROOM > path_max:
        return f"its directory path would be {size} bytes long, too long for the file system ({path_max})"
    return ""
