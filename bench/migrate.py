"""Benchmark: `mailsync migrate` of N messages between two accounts of a local Dovecot
(`python -m bench.migrate --messages 5000`). Prints messages/s and MB/s, and the re-run time."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.backup import build_corpus
from bench.measure import DEFAULT_DIR, workdir
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    a = ap.parse_args()
    tmp = workdir(a.dir, "migrate-")
    server = Dovecot(tmp / "server", users={"src": "pw", "dst": "pw"}).start()
    try:
        size = build_corpus(server, "src", a.messages, 5)
        common = f'host = "127.0.0.1"\nport = {server.imaps_port}\npassword_env = "BENCH_PW"\nca_file = "{server.ca_file}"\n'
        cfg = tmp / "config.toml"
        cfg.write_text(f'[accounts.src]\n{common}username = "src"\nmaildir = "{tmp / "a"}"\n\n'
                       f'[accounts.dst]\n{common}username = "dst"\nmaildir = "{tmp / "b"}"\n')
        env = dict(os.environ, BENCH_PW="pw", XDG_STATE_HOME=str(tmp / "state"))
        rows = []
        for label in ("first run", "re-run"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "mailsync", "--config", str(cfg), "migrate", "src", "dst",
                                "--json"], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
            dt = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            rows.append((label, dt, json.loads(r.stdout)["totals"]))
        assert rows[0][2]["copied"] == a.messages, rows[0][2]
        print(f"\n| migrate {a.messages} messages, {size / 1e6:.0f} MB | wall s | rate |\n|---|---|---|")
        for label, dt, t in rows:
            rate = f"{t['copied'] / dt:.0f} msg/s, {t['bytes'] / 1e6 / dt:.1f} MB/s" if t["copied"] else \
                f"{t['present']} already present"
            print(f"| {label} | {dt:.2f} | {rate} |")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
