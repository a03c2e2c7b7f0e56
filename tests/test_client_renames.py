"""A mail reader (mutt, neomutt, notmuch) works in the Maildir while mailsync runs.

A separate process plays the mail reader: it renames files to change their flags (S and F
toggled), moves them from new/ to cur/, delivers a few new messages into new/ (tmp/ first, with
proper unique Maildir names, LF line endings as Unix tools write them) and, in two-way sync,
deletes two files. Meanwhile real `mailsync` runs follow one another against Dovecot, with the
server's flags changed between runs. Every run must succeed (a file renamed or deleted under a
run is normal, never an error), and in the end both sides must hold the same messages, each
exactly once.
"""

from __future__ import annotations

import ast
import collections
import random
import subprocess
import sys
import time
from pathlib import Path

from mailsync.maildir import MaildirFolder
from mailsync.model import flags_from_letters, split_name
from tests.helpers import local_files, msg, sha
from tests.test_sync import assert_next_run_changes_nothing

CLIENT = r'''
import os, random, socket, sys, time

root, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deliver_max, delete_max, log = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
rng = random.Random(seed)
host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
start = time.time()
deadline = start + 60  # a safety net: the test stops the client long before
# deliveries and deletions spread over the syncs (which take a few seconds)
deliver_at = sorted(rng.uniform(0.3, 1.5) for _ in range(deliver_max))
delete_at = sorted(rng.uniform(0.3, 1.5) for _ in range(delete_max))
mine = set()
stats = dict(renames=0, vanished=0, delivered=0, deleted=0)
q = 0
while time.time() < deadline and not os.path.exists(stop):
    files = []
    for sub in ("new", "cur"):
        try:
            files += [(sub, f) for f in os.listdir(os.path.join(root, sub)) if not f.startswith(".")]
        except FileNotFoundError:
            pass
    now = time.time() - start
    if deliver_at and now >= deliver_at[0]:
        deliver_at.pop(0)
        q += 1
        t = time.time()
        name = f"{int(t)}.M{int((t % 1) * 1e6)}P{os.getpid()}Q{q}.{host}"
        body = (f"From: reader@example.com\nTo: b@example.com\nSubject: written offline {q}\n"
                f"Message-ID: <offline{q}.{seed}@example.com>\n\nwritten while mailsync ran {q}\n").encode()
        tmp = os.path.join(root, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, os.path.join(root, "new", name))
        os.unlink(tmp)
        mine.add(name)
        with open(log, "a") as f:
            f.write(body.hex() + "\n")
        stats["delivered"] += 1
        continue
    if not files:
        time.sleep(0.005)
        continue
    sub, name = rng.choice(files)
    key, sep, info = name.partition(":2,")
    if delete_at and now >= delete_at[0] and key not in mine:
        delete_at.pop(0)
        try:
            os.unlink(os.path.join(root, sub, name))
            stats["deleted"] += 1
        except FileNotFoundError:
            stats["vanished"] += 1
        continue
    letters = set(info)
    letters ^= {rng.choice("SSF")}
    new = key + ":2," + "".join(sorted(letters))
    try:
        os.rename(os.path.join(root, sub, name), os.path.join(root, "cur", new))  # new/ -> cur/ as mutt does
        stats["renames"] += 1
    except FileNotFoundError:
        stats["vanished"] += 1  # renamed (or removed) by mailsync meanwhile: look again
    time.sleep(rng.uniform(0, 0.002))
print(stats)
'''


def start_client(u, tmp_path: Path, seed: int, deliver: int, delete: int):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    stop = tmp_path / "client.stop"
    log = tmp_path / "client.log"
    log.write_text("")
    p = subprocess.Popen([sys.executable, str(script), str(u.maildir), str(seed), str(stop),
                          str(deliver), str(delete), str(log)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, stop, log


def stop_client(p, stop: Path) -> str:
    stop.write_text("")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out


def change_server_flags(u, rng: random.Random, n: int, new: int = 0):
    c = u.imap()
    try:
        c.select_folder("INBOX")
        uids = c.search("ALL")
        for uid in rng.sample(uids, min(n, len(uids))):
            flag = rng.choice([b"\\Seen", b"\\Seen", b"\\Flagged", b"\\Answered"])
            (c.add_flags if rng.random() < 0.5 else c.remove_flags)([uid], [flag])
    finally:
        c.logout()
    if new:
        u.append("INBOX", [msg(1000 + rng.randrange(10**6), "new on the server") for _ in range(new)])


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def sides(u):
    """(local, server): normalised message contents, as Counters (a duplicate counts twice)."""
    local = collections.Counter(sha(lf(b)) for b in local_files(u.maildir).values())
    server = collections.Counter(sha(lf(b)) for b, _ in u.server_messages()["INBOX"].values())
    return local, server


def flags_by_content(u):
    """(local, server): normalised content hash -> system flags (file letters / server FLAGS)."""
    local = {sha(lf(b)): flags_from_letters(split_name(p.name)[1] or "") for p, b in local_files(u.maildir).items()}
    server = {sha(lf(b)): frozenset(f for f in fl if f.startswith("\\"))
              for b, fl in u.server_messages()["INBOX"].values()}
    return local, server


def ok(r, what: str):
    assert r.returncode == 0, f"{what} exited {r.returncode}:\n{r.stderr}"
    return r


def test_two_way_sync_while_a_mail_reader_renames_files(user, tmp_path):
    user.write_config('mode = "sync"')
    user.server.seed(user.name, "INBOX", [msg(i) for i in range(40)])
    ok(user.run("sync", "test"), "first sync")
    rng = random.Random(7)
    p, stop, log = start_client(user, tmp_path, seed=7, deliver=2, delete=2)
    try:
        time.sleep(0.2)
        for i in range(8):
            ok(user.run("sync", "test"), f"sync {i + 1} (while the reader renames files)")
            change_server_flags(user, rng, n=20, new=1 if i % 3 == 0 else 0)
    finally:
        stats = ast.literal_eval(stop_client(p, stop))
    print("client:", stats)
    assert stats["delivered"] == 2 and stats["deleted"] + stats["vanished"] >= 2 and stats["renames"] > 100, stats
    for i in range(2):
        ok(user.run("sync", "test"), f"quiet sync {i + 1}")
    local, server = sides(user)
    assert max(local.values()) == 1, "a message is twice in the Maildir"
    assert max(server.values()) == 1, "a message is twice on the server"
    assert local == server, (f"only local: {len(local - server)}, only on the server: {len(server - local)}")
    l_flags, s_flags = flags_by_content(user)
    differ = {h: (l_flags[h], s_flags[h]) for h in l_flags if l_flags[h] != s_flags[h]}
    assert not differ, f"flags differ between the sides (local, server): {differ}"
    delivered = [bytes.fromhex(h) for h in log.read_text().split()]
    assert delivered, "the reader delivered nothing: the test did not test deliveries"
    for d in delivered:
        assert server[sha(lf(d))] == 1, "a message delivered by the reader is not on the server exactly once"
    assert_next_run_changes_nothing(user)


def test_backup_while_a_mail_reader_renames_files(user, tmp_path):
    user.server.seed(user.name, "INBOX", [msg(i) for i in range(40)])
    ok(user.run("sync", "test"), "first backup")
    rng = random.Random(11)
    p, stop, _log = start_client(user, tmp_path, seed=11, deliver=0, delete=0)
    try:
        time.sleep(0.2)
        for i in range(6):
            ok(user.run("sync", "test"), f"backup {i + 1} (while the reader renames files)")
            change_server_flags(user, rng, n=20, new=1 if i % 2 == 0 else 0)
    finally:
        stats = stop_client(p, stop)
    print("client:", stats)
    ok(user.run("sync", "test"), "quiet backup")
    local, server = sides(user)
    assert max(local.values()) == 1, "a message is twice in the backup"
    assert local == server, (f"only local: {len(local - server)}, only on the server: {len(server - local)}")
    # byte for byte too (a backup stores the server's bytes)
    assert sorted(sha(b) for b in local_files(user.maildir).values()) == \
        sorted(sha(b) for b, _ in user.server_messages()["INBOX"].values())


def test_retag_merges_into_a_file_renamed_meanwhile(tmp_path):
    """The rule behind the above, deterministically: a run that found k:2,S and adds \\Answered
    to it, while a mail reader renamed it to k:2,FS (flagged it), leaves k:2,FRS (both changes);
    a file deleted meanwhile stays deleted; a file moved from new/ to cur/ is found and read."""
    mf = MaildirFolder(tmp_path)
    mf.ensure()
    (tmp_path / "cur" / "k1:2,FS").write_bytes(b"one")            # scanned as cur/k1:2,S
    assert mf.retag("k1", ("cur", "k1:2,S"), frozenset({"\\Seen", "\\Answered"})) == ("cur", "k1:2,FRS")
    # the run removes \\Seen; the reader had added \\Flagged: to new/ with F only
    assert mf.retag("k1", ("cur", "k1:2,RS"), frozenset({"\\Answered"})) == ("new", "k1:2,FR")
    assert sorted(p.name for p in local_files(tmp_path)) == ["k1:2,FR"]
    assert mf.retag("k2", ("cur", "k2:2,S"), frozenset()) is None  # deleted meanwhile
    assert local_files(tmp_path) == {tmp_path / "new" / "k1:2,FR": b"one"}
    (tmp_path / "cur" / "k3:2,S").write_bytes(b"three")           # scanned as new/k3 (no info yet)
    assert mf.read(("new", "k3")) == b"three"
    assert mf.load("k3", ("new", "k3"))[2] == ("cur", "k3:2,S")
    assert mf.remove("k3", ("new", "k3")) == ("cur", "k3:2,S") and mf.load("k3", ("new", "k3")) is None


def test_retag_when_a_reader_renames_between_its_link_and_unlink(tmp_path, monkeypatch):
    """retag links the new name, then unlinks the old one. A reader renaming the file in between
    leaves our link as a second name of the message: it is dropped and the change merged again;
    but where our link is the message's only name left, it is kept (never lose mail)."""
    import os as real_os
    mf = MaildirFolder(tmp_path)
    mf.ensure()
    unlink = real_os.unlink
    race: list = []

    def racing_unlink(path, *a, **kw):
        if race:
            race.pop()(path)
        return unlink(path, *a, **kw)

    monkeypatch.setattr(real_os, "unlink", racing_unlink)
    # the reader flags it (cur/k1:2,S -> cur/k1:2,FS) just before our unlink of the old name
    (tmp_path / "cur" / "k1:2,S").write_bytes(b"one")
    race.append(lambda p: real_os.rename(p, tmp_path / "cur" / "k1:2,FS"))
    assert mf.retag("k1", ("cur", "k1:2,S"), frozenset({"\\Seen", "\\Answered"})) == ("cur", "k1:2,FRS")
    assert local_files(tmp_path) == {tmp_path / "cur" / "k1:2,FRS": b"one"}
    # the reader removes the old name itself (as if it had renamed it onto ours): ours is kept
    (tmp_path / "cur" / "k2:2,S").write_bytes(b"two")
    race.append(lambda p: unlink(p))
    assert mf.retag("k2", ("cur", "k2:2,S"), frozenset({"\\Seen", "\\Flagged"})) == ("cur", "k2:2,FS")
    assert local_files(tmp_path)[tmp_path / "cur" / "k2:2,FS"] == b"two"
