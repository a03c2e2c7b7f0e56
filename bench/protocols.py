"""Benchmark: the same INBOX downloaded over IMAPS and over POP3S (`python -m bench.protocols`).

Prints messages/s and MB/s of a full download and the wall time of a re-run for each protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import DEFAULT_DIR, workdir
from tests import corpus
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent


def timed(config: Path, account: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mailsync", "--config", str(config), "sync", account, "--json"],
                       check=False, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return time.perf_counter() - t0, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    a = ap.parse_args()
    tmp = workdir(a.dir, "protocols-")
    server = Dovecot(tmp / "server", users={"bench": "bench-pw"}).start()
    try:
        rnd = random.Random(7)
        msgs = [corpus.ordinary(i, rnd.randint(1_500, 8_000) if rnd.random() > 0.05 else rnd.randint(20_000, 100_000))
                for i in range(a.messages)]
        server.seed("bench", "INBOX", msgs)
        size = sum(map(len, msgs))
        common = f'host = "127.0.0.1"\nusername = "bench"\npassword_env = "BENCH_PW"\nca_file = "{server.ca_file}"\n'
        cfg = tmp / "config.toml"
        cfg.write_text(f"[accounts.imap]\n{common}port = {server.imaps_port}\nmaildir = \"{tmp / 'imap'}\"\n"
                       f"folders = [\"INBOX\"]\n\n[accounts.pop]\n{common}protocol = \"pop3\"\n"
                       f"port = {server.pop3s_port}\nmaildir = \"{tmp / 'pop'}\"\n")
        os.environ["BENCH_PW"] = "bench-pw"
        rows = []
        for name in ("imap", "pop"):
            full, s = timed(cfg, name)
            assert s["totals"]["new"] == a.messages, s["totals"]
            again, _ = timed(cfg, name)
            rows.append((name, full, again))
        print(f"\n| {a.messages} messages, {size / 1e6:.1f} MB, INBOX | full download | msg/s | MB/s | re-run |")
        print("|---|---|---|---|---|")
        for name, full, again in rows:
            label = "IMAPS" if name == "imap" else "POP3S"
            print(f"| {label} | {full:.2f} s | {a.messages / full:.0f} | {size / 1e6 / full:.1f} | {again:.2f} s |")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
