"""Benchmark: full backup of N messages from a local Dovecot, a no-change re-run, and a re-run
after 1% of flags changed on the server. `make bench` (or python -m bench.backup --messages N).

Prints one Markdown table; numbers are wall-clock seconds of the whole `mailsync sync` process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from bench.measure import DEFAULT_DIR, measure, workdir
from tests import corpus
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent


def build_corpus(server: Dovecot, user: str, n: int, folders: int, seed: int = 1) -> int:
    rnd = random.Random(seed)
    total = 0
    per = n // folders
    for f in range(folders):
        name = "INBOX" if f == 0 else f"Folder {f}/Sub"
        msgs = []
        for i in range(per):
            r = rnd.random()
            size = rnd.randint(20_000, 100_000) if r < 0.09 else (rnd.randint(1_000_000, 2_000_000) if r < 0.095
                                                                  else rnd.randint(1_500, 8_000))
            m = corpus.ordinary(f * 1_000_000 + i, size, tag=f"b{f}-")
            msgs.append(m)
            total += len(m)
        server.seed(user, name, msgs[: per // 2], flags="S", start=f * 1_000_000)
        server.seed(user, name, msgs[per // 2:], start=f * 1_000_000 + per // 2)
    return total


def run(config: Path, *args: str) -> tuple[float, dict, int]:
    """One `mailsync sync` process: wall seconds, its --json summary, its peak RSS in KiB."""
    out, log = config.parent / "sync.json", config.parent / "sync.log"
    with open(out, "wb") as f:
        r, code = measure([sys.executable, "-m", "mailsync", "--config", str(config), "sync", "bench", "--json",
                           *args], log, cwd=ROOT, stdout=f.fileno())
    if code != 0:
        raise SystemExit(f"mailsync failed: {log.read_text(errors='replace')[-2000:]}")
    return r.wall, json.loads(out.read_text()), int(r.rss_mb * 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--folders", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--mode", choices=["backup", "sync"], default="backup")
    ap.add_argument("--basic", action="store_true",
                    help="the server advertises IMAP4rev1 basics only (no CONDSTORE, QRESYNC, UIDPLUS)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    a = ap.parse_args()
    tmp = workdir(a.dir, "backup-")
    extra = "protocol imap {\n  imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID\n}\n" if a.basic else ""
    server = Dovecot(tmp / "server", users={"bench": "bench-pw"}, extra_conf=extra)
    server.start()
    try:
        t0 = time.perf_counter()
        size = build_corpus(server, "bench", a.messages, a.folders)
        print(f"corpus: {a.messages} messages, {size / 1e6:.1f} MB in {a.folders} folders "
              f"(built in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        cfg = tmp / "config.toml"
        cfg.write_text(f"""[accounts.bench]
host = "127.0.0.1"
port = {server.imaps_port}
username = "bench"
password_env = "BENCH_PW"
ca_file = "{server.ca_file}"
maildir = "{tmp / 'Mail'}"
mode = "{a.mode}"
""")
        os.environ["BENCH_PW"] = "bench-pw"
        full, s, rss = run(cfg)
        assert s["totals"]["new"] == a.messages, s["totals"]
        if a.mode == "sync":
            run(cfg)  # the first re-run sees the counters our own first run left
        noop, s2, _ = run(cfg)
        assert s2["totals"]["new"] == 0
        # 1% of flags changed on the server
        changed = max(1, a.messages // 100)
        per = changed // a.folders or 1
        for f in range(a.folders):
            name = "INBOX" if f == 0 else f"Folder {f}/Sub"
            server.doveadm("flags", "add", "-u", "bench", "\\Flagged", "mailbox", name, "uid", f"1:{per}")
        flags, s3, _ = run(cfg)
        assert s3["totals"]["flags_changed"] == per * a.folders, s3["totals"]
        rows = [
            ("full backup", full, f"{a.messages / full:.0f} msg/s, {size / 1e6 / full:.1f} MB/s"),
            ("no-change re-run", noop, ""),
            (f"re-run after {per * a.folders} flags changed", flags, ""),
        ]
        caps = "IMAP4rev1 basics" if a.basic else "CONDSTORE/QRESYNC"
        print(f"\nmode = {a.mode}, server with {caps}")
        print(f"\n| {a.messages} messages, {size / 1e6:.0f} MB | wall s | rate |\n|---|---|---|")
        for name, t, rate in rows:
            print(f"| {name} | {t:.2f} | {rate} |")
        print(f"\npeak RSS of mailsync: {rss / 1024:.0f} MB")
    finally:
        server.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
