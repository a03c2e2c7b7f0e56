"""`mailsync compare IMAP_ACCOUNT POP3_ACCOUNT`: what each protocol gives a backup of one mailbox.

Both accounts are downloaded into fresh temporary Maildirs (the accounts' own backups are not
touched), each twice: the first run shows what a full backup costs, the second what a re-run
costs. Messages are then matched by content (SHA-256 of the stored bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from mailsync.config import Account
from mailsync.errors import ConfigError, PartialFailure
from mailsync.imap import message_id


def _files(root: Path, inbox_only: bool) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if inbox_only and rel.parts and rel.parts[0] not in ("cur", "new"):
            dirnames[:] = []
            continue
        if Path(dirpath).name in ("cur", "new"):
            out.extend(Path(dirpath) / f for f in filenames)
    return out


def _digest(paths: list[Path]) -> dict[str, tuple[int, str]]:
    """sha256 -> (size, Message-ID) of each stored message (duplicates collapse)."""
    out = {}
    for p in paths:
        data = p.read_bytes()
        out[hashlib.sha256(data).hexdigest()] = (len(data), message_id(data))
    return out


def compare(imap_acc: Account, pop_acc: Account, imap_pw: str, pop_pw: str, *, keep: Path | None = None) -> dict:
    if imap_acc.protocol != "imap" or pop_acc.protocol != "pop3":
        raise ConfigError(f"compare needs an IMAP account then a POP3 account; got {imap_acc.name} "
                          f"({imap_acc.protocol}) and {pop_acc.name} ({pop_acc.protocol})")
    from mailsync import engine, pop3

    base = keep or Path(tempfile.mkdtemp(prefix="mailsync-compare-"))
    try:
        ia = dataclasses.replace(imap_acc, maildir=base / "imap", mode="backup")
        pa = dataclasses.replace(pop_acc, maildir=base / "pop3", delete_after_days=None)
        t = time.monotonic()
        r1 = engine.run(ia, imap_pw, mode="backup")
        imap_first = time.monotonic() - t
        t = time.monotonic()
        r2 = engine.run(ia, imap_pw, mode="backup")
        imap_again = time.monotonic() - t
        t = time.monotonic()
        p1 = pop3.download(pa, pop_pw)
        pop_first = time.monotonic() - t
        t = time.monotonic()
        pop3.download(pa, pop_pw)
        pop_again = time.monotonic() - t
        for r in (r1, r2, p1):
            bad = r.failed
            if bad:
                raise PartialFailure(f"compare: {r.account}: {bad[0].name}: {bad[0].error}")

        imap_all = _digest(_files(ia.maildir, inbox_only=False))
        imap_inbox = _digest(_files(ia.maildir, inbox_only=True))
        pop_all = _digest(_files(pa.maildir, inbox_only=False))
        only_imap = set(imap_inbox) - set(pop_all)
        only_pop = set(pop_all) - set(imap_inbox)
        # same message (Message-ID and size), different bytes: a server converting content
        ids_pop = {(v[1], v[0]): h for h, v in pop_all.items() if v[1]}
        ids_imap = {(v[1], v[0]): h for h, v in imap_inbox.items() if v[1]}
        differ = sorted({k[0] for k in ids_pop.keys() & ids_imap.keys() if ids_pop[k] != ids_imap[k]})
        import sqlite3
        db = sqlite3.connect(ia.maildir / ".mailsync.db")
        flagged = db.execute("SELECT count(*) FROM messages WHERE flags<>'' OR keywords<>''").fetchone()[0]
        db.close()
        return {
            "imap": {
                "account": imap_acc.name,
                "folders": len(r1.folders),
                "messages": sum(f.new for f in r1.folders),
                "bytes": sum(f.bytes for f in r1.folders),
                "inbox_messages": len(imap_inbox),
                "flags_kept": f"yes: \\Seen \\Answered \\Flagged \\Draft \\Deleted and keywords ({flagged} messages carry some)",
                "first_run_seconds": round(imap_first, 3),
                "rerun_seconds": round(imap_again, 3),
                "rerun_cost": f"{sum(1 for f in r2.folders if f.skipped)} of {len(r2.folders)} folders skipped after one "
                              "STATUS (CONDSTORE)" if any(f.skipped for f in r2.folders)
                              else "a UID and FLAGS scan of every folder",
            },
            "pop3": {
                "account": pop_acc.name,
                "folders": 1,
                "messages": sum(f.new for f in p1.folders),
                "bytes": sum(f.bytes for f in p1.folders),
                "inbox_messages": len(pop_all),
                "flags_kept": "no: POP3 has no flags or folders",
                "first_run_seconds": round(pop_first, 3),
                "rerun_seconds": round(pop_again, 3),
                "rerun_cost": "LIST and UIDL of the whole mailbox",
            },
            "only_in_imap_inbox": len(only_imap),
            "only_in_pop3": len(only_pop),
            "imap_other_folders_messages": len(set(imap_all) - set(imap_inbox)),
            "same_message_different_bytes": differ,
            "kept_in": str(base) if keep else None,
        }
    finally:
        if keep is None:
            shutil.rmtree(base, ignore_errors=True)


def table(d: dict) -> str:
    i, p = d["imap"], d["pop3"]
    rows = [
        ("", f"IMAP ({i['account']})", f"POP3 ({p['account']})"),
        ("folders", str(i["folders"]), str(p["folders"])),
        ("messages", str(i["messages"]), str(p["messages"])),
        ("bytes", str(i["bytes"]), str(p["bytes"])),
        ("INBOX messages", str(i["inbox_messages"]), str(p["inbox_messages"])),
        ("flags kept", i["flags_kept"], p["flags_kept"]),
        ("first backup", f"{i['first_run_seconds']:.2f} s", f"{p['first_run_seconds']:.2f} s"),
        ("re-run", f"{i['rerun_seconds']:.2f} s", f"{p['rerun_seconds']:.2f} s"),
        ("re-run costs", i["rerun_cost"], p["rerun_cost"]),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.append("")
    lines.append(f"INBOX messages only IMAP has (by content): {d['only_in_imap_inbox']}")
    lines.append(f"messages only POP3 has (by content):       {d['only_in_pop3']}")
    lines.append(f"messages in other folders (IMAP only):     {d['imap_other_folders_messages']}")
    if d["same_message_different_bytes"]:
        lines.append(f"same Message-ID and size, different bytes: {len(d['same_message_different_bytes'])} "
                     f"(e.g. {d['same_message_different_bytes'][0]}): the server converts content on one protocol")
    return "\n".join(lines)
