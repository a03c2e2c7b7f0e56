"""kill -9 at 22 or more points in every mode (backup, two-way sync, POP3, migrate, restore), then a re-run:
the end state equals that of an uninterrupted run, every message is there exactly once, no
partial file is ever visible in cur/ or new/, and tmp/ leftovers are cleaned by the next run.

Each mode is one test that loops over its points (two at a time: every point has its own Maildir,
state and, where the run changes the server, its own server account). A point is either a
crash point (MAILSYNC_CRASH_AT=NAME:N, `mailsync/crashpoint.py`: the process must exit 137
there) or a kill by time: SIGKILL once the K-th message file is visible (in the Maildir, or in
the destination's mail store for migrate and restore), or after a share of the time the
uninterrupted run took (which is done first, and is also the end state every point must reach).
Runs are started through tests/forkrun.py (see there).
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mailsync.maildir import KeywordMap, folder_path
from mailsync.model import flags_from_letters, split_name
from tests.forkrun import Launcher
from tests.helpers import MailUser, msg, sha

WORKERS = 2
BODY = "k" * 12_000  # 5 messages fill a 64 KiB batch: many batches, so many durable steps


@dataclass(frozen=True)
class Point:
    kind: str    # "crash": MAILSYNC_CRASH_AT; "files": SIGKILL once K message files are visible
    arg: object  # (in the server's store: "server-files"); "delay": after this share of the clean run's time

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"SIGKILL at {self.arg:.0%} of the run"
        return {"crash": "crash at {}", "files": "SIGKILL at file {}",
                "server-files": "SIGKILL at server file {}"}[self.kind].format(self.arg)


def crash(*specs: str) -> list[Point]:
    return [Point("crash", s) for s in specs]


def by_time(files: list[int], delays: list[float]) -> list[Point]:
    return [Point("files", k) for k in files] + [Point("delay", d) for d in delays]


# ----------------------------------------------------------------------------- running

def args(config: Path, *rest: str) -> list[str]:
    return ["--config", str(config), *rest]


def count_files(root: Path) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) in ("cur", "new"):
            n += len(files)
    return n


def kill_run(launch: Launcher, cmd: list[str], env: dict, point: Point, watch: Path, ref: float) -> int:
    """Run mailsync with cmd and kill it at point (ref: seconds the uninterrupted run took);
    returns the exit status: 137 at a crash point, -9 when killed, 0 when it ended first."""
    if point.kind == "crash":
        p = launch.run(cmd, {**env, "MAILSYNC_CRASH_AT": str(point.arg)})
        assert p.returncode == 137, f"{point}: not reached (exit {p.returncode}): {p.stderr[-2000:]}"
        return p.returncode
    before = count_files(watch) if watch.exists() else 0
    p = launch.start(cmd, env)
    if point.kind == "delay":
        try:
            p.wait(float(point.arg) * ref)
        except subprocess.TimeoutExpired:
            p.kill()
    else:
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if watch.exists() and count_files(watch) - before >= int(point.arg):
                break
            time.sleep(0.003)
        p.kill()
    p.wait(60)
    if point.kind in ("files", "server-files"):
        assert p.returncode == -signal.SIGKILL, \
            f"{point}: the run ended before the kill (exit {p.returncode}): {p.stderr[-2000:]}"
    else:
        assert p.returncode in (0, -signal.SIGKILL), f"{point}: exit {p.returncode}: {p.stderr[-2000:]}"
    return p.returncode


def rerun(launch: Launcher, cmd: list[str], env: dict, point) -> float:
    """A clean run, which must succeed; returns the seconds it took."""
    t0 = time.monotonic()
    p = launch.run(cmd, env)
    assert p.returncode == 0, f"{point}: the re-run exits {p.returncode}: {p.stderr[-2000:]}"
    return time.monotonic() - t0


def sweep(points: list[Point], one) -> list[object]:
    """one(i, point) for every point, WORKERS at a time; every failure is reported with its point.
    (one(i, None) is the uninterrupted run, done first by the caller.)"""
    failures: list[str] = []
    results: list[object] = [None] * len(points)

    def go(i: int) -> None:
        try:
            results[i] = one(i, points[i])
        except Exception as exc:  # noqa: BLE001 - collected, reported below with the point
            failures.append(f"{points[i]}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(WORKERS) as ex:
        list(ex.map(go, range(len(points))))
    assert not failures, f"{len(failures)} of {len(points)} kill points failed:\n" + "\n".join(failures)
    return results


@dataclass
class Outcome:
    point: Point
    status: int | None  # of the killed run: 137 at a crash point, -9 killed, 0 ended before the kill
    leftovers: int      # files it left in tmp/ (all cleaned by the re-run)


def check_outcomes(results: list[Outcome], tmp: bool = True) -> None:
    """The sweep did what it says: crash points reached, kills by time landing mid-run (a run
    that ended before its delay is allowed, not all of them), and tmp/ clean-up exercised."""
    assert all(o.status == 137 for o in results if o.point.kind == "crash")
    assert all(o.status == -9 for o in results if o.point.kind in ("files", "server-files"))
    delays = [o for o in results if o.point.kind == "delay"]
    assert any(o.status == -9 for o in delays), "every run ended before its delay: no kill by time landed"
    if tmp:
        assert any(o.leftovers for o in results), "no kill left a file in tmp/: the clean-up was not exercised"


# ----------------------------------------------------------------------------- what is where

def local_state(root: Path) -> dict[str, list[tuple[str, str, tuple[str, ...]]]]:
    """Maildir folder (relative dir) -> sorted (sha256, cur|new, flags with keywords) of its files."""
    out: dict[str, list] = {}
    for dirpath, _dirs, _files in os.walk(root):
        d = Path(dirpath)
        if not ((d / "cur").is_dir() and (d / "new").is_dir()):
            continue
        kw = KeywordMap(d)
        items = []
        for sub in ("cur", "new"):
            for f in os.listdir(d / sub):
                info = split_name(f)[1] or ""
                flags = flags_from_letters(info) | kw.keywords(info)
                items.append((sha((d / sub / f).read_bytes()), sub, tuple(sorted(flags))))
        if items:
            out[str(d.relative_to(root))] = sorted(items)
    return out


def tmp_files(root: Path) -> int:
    return sum(len(files) for dirpath, _d, files in os.walk(root) if os.path.basename(dirpath) == "tmp")


def visible_ok(root: Path, allowed: set[str], point: Point) -> None:
    """After a kill: every file in cur/ or new/ is a whole message we know, none there twice."""
    for folder, items in local_state(root).items():
        counts = Counter(h for h, _, _ in items)
        partial = [h for h in counts if h not in allowed]
        assert not partial, f"{point}: {folder}: {len(partial)} visible files are not whole messages"
        twice = [h for h, n in counts.items() if n > 1]
        assert not twice, f"{point}: {folder}: {len(twice)} messages visible twice after the kill"


def state_ok(root: Path, point: Point) -> list[tuple]:
    """Every state row names a file that is there; no upload left pending. Returns the rows by
    content, to compare with the uninterrupted run's."""
    db = sqlite3.connect(f"file:{root / '.mailsync.db'}?mode=ro", uri=True)
    try:
        folders = {fid: path for fid, path in db.execute("SELECT id, path FROM folders")}
        rows = db.execute("SELECT folder_id, key, sha256, on_server FROM messages").fetchall()
        pop = db.execute("SELECT key, sha256, on_server FROM pop3").fetchall()
        pending = db.execute("SELECT count(*) FROM uploads").fetchone()[0]
    finally:
        db.close()
    assert pending == 0, f"{point}: {pending} uploads still journaled"
    keys: dict[str, set[str]] = {}
    for dirpath, _d, files in os.walk(root):
        if os.path.basename(dirpath) in ("cur", "new"):
            rel = os.path.relpath(os.path.dirname(dirpath), root)
            keys.setdefault(rel, set()).update(split_name(f)[0] for f in files)
    out = []
    for fid, key, digest, on in rows:
        assert key in keys.get(folders[fid], set()), f"{point}: the state names {key}, not on disk"
        out.append((folders[fid], digest, on))
    for key, digest, on in pop:
        assert key in keys.get(".", set()), f"{point}: the state names {key}, not on disk"
        out.append(("pop3", digest, on))
    return sorted(out)


def state_not_ahead(root: Path, server: dict[str, dict[int, tuple]] | None, point=None,
                    deleted: frozenset[str] = frozenset(), sync: bool = False) -> None:
    """Every state row names a file on disk (in cur/, new/, or tmp/ to be published), except the
    files deleted on purpose (local deletions still to be carried to the server) and, in sync
    mode, those of messages no longer on the server (their local copies are being deleted too;
    a row without its file for a message still on the server would read as a local deletion).
    A folder's saved UIDNEXT covers only messages that are recorded with their files.
    server: folder -> UID -> ..., as MailUser.server_messages(), now."""
    db = sqlite3.connect(f"file:{root / '.mailsync.db'}?mode=ro", uri=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='folders'").fetchone():
            return  # killed after the state file was made, before its schema was committed: empty
        folders = db.execute("SELECT id, name, path, uidnext FROM folders").fetchall()
        rows = db.execute("SELECT folder_id, uid, key FROM messages").fetchall()
        pop = [r[0] for r in db.execute("SELECT key FROM pop3")]
    finally:
        db.close()
    names = {split_name(f)[0] for sub in ("cur", "new", "tmp") if (root / sub).is_dir() for f in os.listdir(root / sub)}
    assert not set(pop) - names, f"{point}: the state names POP3 messages whose files are not on disk"
    for fid, name, path, uidnext in folders:
        d = root / path
        names = {split_name(f)[0] for sub in ("cur", "new", "tmp") if (d / sub).is_dir() for f in os.listdir(d / sub)}
        recorded = {uid for f, uid, key in rows if f == fid}
        for f, uid, key in rows:
            if f == fid:
                if key in names or key in deleted or (sync and uid not in server.get(name, {})):
                    continue
                raise AssertionError(f"{point}: {name}: the state names UID {uid} ({key}), whose file is gone")
        if uidnext and server is not None:
            missing = [uid for uid in server.get(name, {}) if uid < uidnext and uid not in recorded]
            assert not missing, f"{point}: {name}: counters saved past UIDs {missing} that are not stored"


def server_state(u: MailUser) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """Server folder -> sorted (sha256, flags) of its messages (empty folders left out)."""
    out = {}
    for folder, msgs in u.server_messages().items():
        if msgs:
            out[folder] = sorted((sha(b), tuple(sorted(f))) for b, f in msgs.values())
    return out


def server_ok(u: MailUser, allowed: Counter, point: Point) -> None:
    """After a killed copy: the destination holds only whole source messages, none too often."""
    for folder, items in server_state(u).items():
        extra = Counter(h for h, _ in items) - allowed
        assert not extra, f"{point}: {folder} on the destination: {sum(extra.values())} copies too many"


def differences(got: dict, want: dict) -> str:
    """What differs between two *_state() results, message by message: lost, extra, flags."""
    out = []
    for folder in sorted(set(got) | set(want)):
        g = Counter(item[0] for item in got.get(folder, ()))
        w = Counter(item[0] for item in want.get(folder, ()))
        lost, extra = sum((w - g).values()), sum((g - w).values())
        other = len(set(got.get(folder, ())) ^ set(want.get(folder, ()))) if not (lost or extra) else 0
        if lost or extra or other:
            out.append(f"{folder}: {lost} lost, {extra} extra (duplicated){', flags or place differ' if other else ''}")
    return "; ".join(out) or "same"


def as_backup(server: dict, root: Path, layout: str = "maildir++") -> dict:
    """What an exact backup of `server` looks like as local_state()."""
    out = {}
    for folder, items in server.items():
        rel = str(folder_path(root, folder.split("/"), layout, False).relative_to(root))
        out[rel] = sorted((h, "cur" if "\\Seen" in fl else "new", fl) for h, fl in items)
    return out


def point_user(base: MailUser, tmp: Path) -> MailUser:
    """The same server account, its own directory (config, Maildir)."""
    tmp.mkdir(parents=True)
    return MailUser(base.server, base.name, base.password, tmp)


def seed_three_folders(u: MailUser) -> None:
    u.server.seed(u.name, "INBOX", [msg(i, BODY) for i in range(16)])
    u.server.seed(u.name, "Work", [msg(100 + i, BODY) for i in range(12)], flags="S")
    u.server.seed(u.name, "Archive/2020", [msg(200 + i, BODY) for i in range(6)], flags="FS")
    u.append("Archive/2020", [msg(210, BODY), msg(211, BODY)], flags=[b"\\Answered", b"$Work"])


# ----------------------------------------------------------------------------- backup, POP3

BACKUP_POINTS = crash("staged:1", "staged:4", "staged:8", "recorded:1", "recorded:3", "recorded:6",
                      "recorded:9", "published:1", "published:6", "published:13", "published:22",
                      "published:30", "published:36", "folder:1", "folder:2", "folder:3") \
    + by_time(files=[2, 9, 17, 26], delays=[0.15, 0.4])

POP3_POINTS = crash("staged:1", "staged:2", "staged:4", "staged:6", "recorded:1", "recorded:3",
                    "recorded:5", "recorded:6", "published:1", "published:4", "published:9",
                    "published:12", "published:15", "published:21", "published:27", "published:30") \
    + by_time(files=[3, 10, 17, 24], delays=[0.2, 0.45])


def download_sweep(launch: Launcher, user: MailUser, tmp_path: Path, points: list[Point], extra: str,
                   port: int) -> list:
    """Backup or POP3: the server does not change, so the points share its account."""
    want: dict = {}

    def one(i, point):
        u = point_user(user, tmp_path / f"p{i}")
        cmd = args(u.write_config(f"batch_bytes = 65536\nconnections = 2\n{extra}", port=port), "sync", "test")
        env = u.env()
        status = None
        if point is not None:
            status = kill_run(launch, cmd, env, point, u.maildir, want["seconds"])
            visible_ok(u.maildir, allowed, point)
            if (u.maildir / ".mailsync.db").exists():
                state_not_ahead(u.maildir, None if "pop3" in extra else uids, point)
        leftovers = tmp_files(u.maildir)
        seconds = rerun(launch, cmd, env, point)
        assert tmp_files(u.maildir) == 0, f"{point}: tmp/ leftovers not cleaned"
        got = {"local": local_state(u.maildir), "state": state_ok(u.maildir, point)}
        if point is None:
            want.update(got, seconds=seconds)
        else:
            assert got["local"] == want["local"], \
                f"{point}: not the uninterrupted run's end state: {differences(got['local'], want['local'])}"
            assert got["state"] == want["state"], f"{point}: the state is not the uninterrupted run's"
        return Outcome(point, status, leftovers)

    server = server_state(user)
    uids = user.server_messages()
    allowed = {h for items in server.values() for h, _ in items}
    one(len(points), None)  # the uninterrupted run
    return want["local"], server, sweep(points, one)


def test_backup_killed_at_22_points(user, tmp_path):
    seed_three_folders(user)
    with Launcher() as launch:
        want, server, results = download_sweep(launch, user, tmp_path, BACKUP_POINTS, "", user.server.imaps_port)
    assert want == as_backup(server, tmp_path), "the uninterrupted backup is not exact"
    check_outcomes(results)


def test_pop3_killed_at_22_points(user, tmp_path):
    msgs = [msg(i, BODY) for i in range(30)]
    user.server.seed(user.name, "INBOX", msgs)
    with Launcher() as launch:
        # (at 1.5 MB/s: the pipelined download of 360 kB would otherwise end within milliseconds
        # of its last files, before a kill "at file 24" can land)
        want, _server, results = download_sweep(launch, user, tmp_path, POP3_POINTS,
                                                'protocol = "pop3"\nmax_bytes_per_second = 1500000',
                                                user.server.pop3s_port)
    assert want == {".": sorted((sha(m), "new", ()) for m in msgs)}, "the uninterrupted download is not exact"
    check_outcomes(results)


# ----------------------------------------------------------------------------- two-way sync

# marked-deleted: after STORE +FLAGS \Deleted, before the EXPUNGE (once per folder: INBOX and Work
# both have messages deleted locally); the next run must still read them as "to delete"
SYNC_POINTS = crash("upload-journaled:1", "upload-journaled:4", "upload-journaled:6", "appended:2",
                    "appended:5", "appended:6", "marked-deleted:1", "marked-deleted:2", "expunged:1",
                    "expunged:2", "staged:1", "staged:3", "recorded:1", "recorded:2", "recorded:3", "published:1",
                    "published:7", "published:14", "folder:1", "folder:2") \
    + by_time(files=[2, 6, 11], delays=[0.15, 0.4]) + [Point("server-files", 3)]

SYNC_EXTRA = 'mode = "sync"\nbatch_bytes = 65536\nconnections = 2'


def mid(n: int) -> str:
    return f"<m{n}.{os.getpid()}@example.com>"


def server_uids(u: MailUser, folder: str, ns: list[int]) -> list[int]:
    c = u.imap()
    try:
        c.select_folder(folder, readonly=True)
        return [uid for n in ns for uid in c.search(["HEADER", "Message-ID", mid(n)])]
    finally:
        c.logout()


def sync_template(launch: Launcher, t: MailUser) -> None:
    """A synced account, then changes on both sides: on the Maildir 6 new messages, 3 deleted,
    one flagged; on the server 14 new messages, 2 expunged, one answered."""
    t.server.seed(t.name, "INBOX", [msg(i, BODY) for i in range(12)])
    t.server.seed(t.name, "Work", [msg(100 + i, BODY) for i in range(8)], flags="S")
    t.write_config(SYNC_EXTRA)
    rerun(launch, args(t.config, "sync", "test"), t.env(), "the first sync")
    work = folder_path(t.maildir, ["Work"], "maildir++", False)
    by_sha = {}
    for d in (t.maildir, work):
        for sub in ("cur", "new"):
            for f in (d / sub).iterdir():
                by_sha[sha(f.read_bytes())] = f
    for i in range(5):
        (t.maildir / "new" / f"17000001{i:02d}.local{i}.host:2,").write_bytes(msg(300 + i, BODY))
    (work / "cur" / "1700000200.local9.host:2,S").write_bytes(msg(309, BODY))
    for n in (1, 2, 101):
        by_sha[sha(msg(n, BODY))].unlink()
    f3 = by_sha[sha(msg(3, BODY))]
    f3.rename(t.maildir / "cur" / (split_name(f3.name)[0] + ":2,F"))
    t.append("INBOX", [msg(400 + i, BODY) for i in range(10)])
    t.append("Work", [msg(500 + i, BODY) for i in range(4)])
    c = t.imap()
    try:
        c.select_folder("Work")
        gone = [uid for n in (102, 103) for uid in c.search(["HEADER", "Message-ID", mid(n)])]
        c.delete_messages(gone)
        c.expunge()
        c.select_folder("INBOX")
        c.add_flags(c.search(["HEADER", "Message-ID", mid(5)]), [b"\\Answered"])
    finally:
        c.logout()


def deleted_keys(root: Path) -> frozenset[str]:
    """Keys the state knows whose files are gone (deleted locally)."""
    db = sqlite3.connect(f"file:{root / '.mailsync.db'}?mode=ro", uri=True)
    try:
        known = {k for (k,) in db.execute("SELECT key FROM messages")}
    finally:
        db.close()
    there = {split_name(f)[0] for dirpath, _d, files in os.walk(root) for f in files}
    return frozenset(known - there)


def clone(t: MailUser, name: str, tmp: Path) -> MailUser:
    """A new account whose server mailbox and Maildir are copies of t's (same UIDVALIDITY, UIDs)."""
    u = MailUser.create(t.server, name, tmp)
    dst = t.server.maildir(name)
    shutil.rmtree(dst)
    shutil.copytree(t.server.maildir(t.name), dst, symlinks=True)
    if os.getuid() == 0:
        t.server._own(dst)
        for dirpath, dirs, files in os.walk(dst):
            t.server._own(*(Path(dirpath) / x for x in dirs + files))
    shutil.copytree(t.maildir, u.maildir, symlinks=True)
    u.write_config(SYNC_EXTRA)
    return u


def test_sync_killed_at_26_points(user, tmp_path):
    with Launcher() as launch:
        sync_template(launch, user)
        allowed_local = {h for items in local_state(user.maildir).values() for h, _, _ in items}
        allowed_local |= {h for items in server_state(user).values() for h, _ in items}
        once = Counter(allowed_local)
        deleted = deleted_keys(user.maildir)
        assert len(deleted) == 3
        want: dict = {}

        def one(i, point):
            u = clone(user, f"{user.name}s{i}", tmp_path / f"p{i}")
            cmd = args(u.config, "sync", "test")
            status = None
            if point is not None:
                watch = u.server.maildir(u.name) if point.kind == "server-files" else u.maildir
                status = kill_run(launch, cmd, u.env(), point, watch, want["seconds"])
                visible_ok(u.maildir, allowed_local, point)
                state_not_ahead(u.maildir, u.server_messages(), point, deleted, sync=True)
                server_ok(u, once, point)
            leftovers = tmp_files(u.maildir)
            seconds = rerun(launch, cmd, u.env(), point)
            assert tmp_files(u.maildir) == 0, f"{point}: tmp/ leftovers not cleaned"
            got = {"local": local_state(u.maildir), "server": server_state(u), "state": state_ok(u.maildir, point)}
            if point is None:
                want.update(got, seconds=seconds)
            else:
                assert got["server"] == want["server"], f"{point}: the server is not the uninterrupted run's: " \
                    + differences(got["server"], want["server"])
                assert got["local"] == want["local"], f"{point}: the Maildir is not the uninterrupted run's: " \
                    + differences(got["local"], want["local"])
                assert got["state"] == want["state"], f"{point}: the state is not the uninterrupted run's"
            return Outcome(point, status, leftovers)

        one(len(SYNC_POINTS), None)  # the uninterrupted run
        results = sweep(SYNC_POINTS, one)

    def no_place(d):  # a mail reader may leave an unseen message in cur/
        return {f: sorted((h, fl) for h, _, fl in items) for f, items in d.items()}
    assert no_place(want["local"]) == no_place(as_backup(want["server"], tmp_path)), \
        "after the uninterrupted sync the two sides differ"
    expected = {"INBOX": [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 300, 301, 302, 303, 304] + list(range(400, 410)),
                "Work": [100, 104, 105, 106, 107, 309, 500, 501, 502, 503]}
    assert {f: sorted(h for h, _ in items) for f, items in want["server"].items()} == \
        {f: sorted(sha(msg(n, BODY)) for n in ns) for f, ns in expected.items()}
    check_outcomes(results)


# ----------------------------------------------------------------------------- migrate, restore

MIGRATE_POINTS = crash("created:1", "created:2", "appended:1", "appended:3", "appended:5", "appended:7",
                       "appended:9", "recorded:1", "recorded:2", "recorded:4", "recorded:6", "recorded:8",
                       "recorded:9", "folder:1", "folder:2", "folder:3") \
    + by_time(files=[3, 12, 20, 28], delays=[0.15, 0.4])

RESTORE_POINTS = crash("created:1", "created:2", "appended:1", "appended:4", "appended:9", "appended:12",
                       "appended:15", "appended:16", "appended:17", "appended:22", "appended:28",
                       "appended:33", "appended:36", "folder:1", "folder:2", "folder:3") \
    + by_time(files=[2, 10, 19, 27], delays=[0.2, 0.45])


def account(u: MailUser, name: str, password_env: str, extra: str = "") -> str:
    return (f'[accounts.{name}]\nhost = "127.0.0.1"\nport = {u.server.imaps_port}\nusername = "{u.name}"\n'
            f'password_env = "{password_env}"\nmaildir = "{u.maildir}"\nca_file = "{u.server.ca_file}"\n{extra}\n')


def copy_sweep(launch: Launcher, src: MailUser, tmp_path: Path, points: list[Point], command) -> list:
    """migrate or restore into a new, empty account per point; the source does not change."""
    want = server_state(src)
    allowed = Counter(h for items in want.values() for h, _ in items)
    ref: dict = {}

    def one(i, point):
        dst = MailUser.create(src.server, f"{src.name}c{i}", tmp_path / f"p{i}")
        cfg = dst.tmp / "copy.toml"
        cfg.write_text(account(src, "test", "MAILSYNC_TEST_PASSWORD", "batch_bytes = 65536")
                       + account(dst, "dst", "DST_PASSWORD"))
        env = src.env(DST_PASSWORD=dst.password, XDG_STATE_HOME=str(dst.tmp / "state"))
        cmd = args(cfg, *command)
        status = None
        if point is not None:
            status = kill_run(launch, cmd, env, point, src.server.maildir(dst.name), ref["seconds"])
            server_ok(dst, allowed, point)
        ref.setdefault("seconds", rerun(launch, cmd, env, point))
        got = server_state(dst)
        assert got == want, f"{point}: the destination is not the source: {differences(got, want)}"
        return Outcome(point, status, 0)

    one(len(points), None)  # the uninterrupted run
    return sweep(points, one)


def test_migrate_killed_at_22_points(user, tmp_path):
    seed_three_folders(user)
    with Launcher() as launch:
        results = copy_sweep(launch, user, tmp_path, MIGRATE_POINTS, ["migrate", "test", "dst"])
    check_outcomes(results, tmp=False)


def test_restore_killed_at_22_points(user, tmp_path):
    seed_three_folders(user)
    with Launcher() as launch:
        rerun(launch, args(user.config, "sync", "test"), user.env(), "the backup")
        results = copy_sweep(launch, user, tmp_path, RESTORE_POINTS, ["restore", "dst", "--from", str(user.maildir)])
    check_outcomes(results, tmp=False)
