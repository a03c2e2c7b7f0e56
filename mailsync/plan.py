"""Pure planning: what a backup run must do for one folder. No I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Mapping, Set

from mailsync.model import BackupPlan, Record, ServerView


def plan_backup(server: ServerView, known: Mapping[int, Record], on_disk: Set[str]) -> BackupPlan:
    """Server -> Maildir, one way, never deleting local mail.

    known: the state's records for this folder's current UIDVALIDITY, by UID.
    on_disk: the keys of the message files present in the folder (new/ and cur/).
    """
    fetch = sorted(uid for uid in server.new if uid not in known)
    present = server.present
    refetch: list[int] = []
    set_flags: list[tuple[int, frozenset[str], frozenset[str]]] = []
    gone: list[int] = []
    back: list[int] = []
    for uid, rec in known.items():
        on_server = uid in present if present is not None else rec.on_server
        if not on_server:
            if rec.on_server:
                gone.append(uid)
            continue
        if not rec.on_server:
            back.append(uid)
        if rec.key not in on_disk:
            refetch.append(uid)  # a backup never silently loses a message
            continue
        seen = server.flags.get(uid)
        if seen is not None and (seen[0] != rec.flags or seen[1] != rec.keywords):
            set_flags.append((uid, seen[0], seen[1]))
    return BackupPlan(
        fetch=tuple(fetch),
        refetch=tuple(sorted(refetch)),
        set_flags=tuple(sorted(set_flags, key=lambda t: t[0])),
        gone=tuple(sorted(gone)),
        back=tuple(sorted(back)),
    )


def batches(sizes: Mapping[int, int], uids, max_bytes: int, max_count: int = 1000) -> list[list[int]]:
    """Group UIDs into fetch batches bounded by total size (a bigger message goes alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for uid in uids:
        size = max(int(sizes.get(uid, 0)), 1)
        if cur and (total + size > max_bytes or len(cur) >= max_count):
            out.append(cur)
            cur, total = [], 0
        cur.append(uid)
        total += size
    if cur:
        out.append(cur)
    return out


def rematch(old: list[Record], server: Mapping[int, tuple[int, str]]) -> dict[int, Record]:
    """After a UIDVALIDITY change: new UID -> old record, matched by (Message-ID, size).

    Only unambiguous pairs (one old record and one server message with the same pair) are
    matched; everything else is downloaded again and matched by content hash afterwards.
    """
    by_pair: dict[tuple[str, int], list[Record]] = {}
    for rec in old:
        if rec.message_id:
            by_pair.setdefault((rec.message_id, rec.size), []).append(rec)
    srv_pairs: dict[tuple[str, int], list[int]] = {}
    for uid, (size, mid) in server.items():
        if mid:
            srv_pairs.setdefault((mid, size), []).append(uid)
    out: dict[int, Record] = {}
    for pair, uids in srv_pairs.items():
        recs = by_pair.get(pair, [])
        if len(uids) == 1 and len(recs) == 1:
            out[uids[0]] = recs[0]
    return out
