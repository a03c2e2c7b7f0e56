"""Pure planning: what a backup run must do for one folder. No I/O, no clock, no globals."""

from __future__ import annotations

from collections.abc import Mapping, Set

from mailsync.model import BackupPlan, Record, ServerView, SyncPlan, split_flags


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


CONFLICT_POLICIES = ("server", "local", "union")


def merge_flags(base: frozenset[str], local: frozenset[str], remote: frozenset[str]) -> frozenset[str]:
    """Per-flag three-way merge: added = now - base, removed = base - now, on each side.
    With a base, two sides cannot disagree about one flag (each can only move it away from the
    base, so both moved it the same way); changes to different flags both survive."""
    added = (local - base) | (remote - base)
    removed = (base - local) | (base - remote)
    return (base | added) - removed


def plan_sync(base: Mapping[int, Record], remote_flags: Mapping[int, tuple[frozenset[str], frozenset[str]]],
              remote_present: Set[int] | None, remote_new: Set[int], local: Mapping[str, frozenset[str]],
              conflict: str = "server") -> SyncPlan:
    """Three-way plan for one folder.

    base: the state's records (last synced flags) of messages on both sides at the last sync.
    remote_flags: server flags of known UIDs read this run (absent = unchanged since base).
    remote_present: every UID on the server, or None when nothing was expunged.
    remote_new: UIDs on the server the state does not know.
    local: key -> flags and keywords (from the file name) of every message file in the folder.
    Flags and keywords merge alike, each on its own, against the base.
    """
    if conflict not in CONFLICT_POLICIES:
        raise ValueError(conflict)
    keys = {r.key for r in base.values()}
    fetch = sorted(u for u in remote_new if u not in base)
    upload = sorted(k for k in local if k not in keys)
    push, pull, record = [], [], []
    delete_local, delete_remote, forget, refetch, reupload, conflicts = [], [], [], [], [], []
    for uid in sorted(base):
        rec = base[uid]
        r_on = uid in remote_present if remote_present is not None else True
        l_on = rec.key in local
        r_fl, r_kw = remote_flags.get(uid, (rec.flags, rec.keywords)) if r_on else (rec.flags, rec.keywords)
        base_all = rec.flags | rec.keywords
        r_all = r_fl | r_kw
        if not r_on and not l_on:
            forget.append(uid)
        elif not r_on:
            if local[rec.key] == base_all:
                delete_local.append(uid)
            else:
                conflicts.append(f"UID {uid}: expunged on the server, flags changed locally; "
                                 + ("removed (conflict = server)" if conflict == "server" else "kept and uploaded again"))
                (delete_local if conflict == "server" else reupload).append(uid)
        elif not l_on:
            if r_all == base_all:
                delete_remote.append(uid)
            else:
                conflicts.append(f"UID {uid}: removed locally, flags changed on the server; "
                                 + ("deleted on the server (conflict = local)" if conflict == "local"
                                    else "kept and downloaded again"))
                (delete_remote if conflict == "local" else refetch).append(uid)
        else:
            merged = merge_flags(base_all, local[rec.key], r_all)
            if merged != r_all:
                push.append((uid, merged - r_all, r_all - merged))
            if merged != local[rec.key]:
                pull.append((uid, merged))
            if merged != base_all:
                record.append((uid, *split_flags(merged)))
    return SyncPlan(fetch=tuple(fetch), upload=tuple(upload), push=tuple(push), pull=tuple(pull),
                    record=tuple(record), delete_local=tuple(delete_local), delete_remote=tuple(delete_remote),
                    forget=tuple(forget), refetch=tuple(refetch), reupload=tuple(reupload),
                    conflicts=tuple(conflicts))


def deletion_guard(plan: SyncPlan, messages: int, max_delete: int | None, fraction: float = 0.10) -> str | None:
    """Why this plan deletes too much (None if it may go ahead). Default limit: 10% of the
    folder (at least 5 messages); deleting every message of a folder of 2 or more always trips."""
    n = plan.deletions
    if n == 0:
        return None
    if max_delete is not None:
        if n > max_delete:
            return f"would delete {n} of {messages} messages (max_delete = {max_delete})"
        return None
    if messages >= 2 and n >= messages:
        return f"would delete all {messages} messages"
    limit = max(5, int(messages * fraction))
    if n > limit:
        return f"would delete {n} of {messages} messages (more than 10%)"
    return None
