"""Which server folders a run covers, and where each lives on disk."""

from __future__ import annotations

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
    """Server folder name -> directory, and name -> error for names that would share a directory
    with an earlier one (the first keeps it; the other is reported, never merged)."""
    out: dict[str, Path] = {}
    errors: dict[str, str] = {}
    seen: dict[Path, str] = {}
    for f in folders:
        path = folder_path(root, f.parts, layout, utf8_names)
        if path in seen:
            errors[f.name] = (f"maps to the same directory as '{seen[path]}' ({path}); "
                              "exclude one of them with folders = [..., \"!NAME\"]")
            continue
        seen[path] = f.name
        out[f.name] = path
    return out, errors
