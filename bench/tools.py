"""Benchmark mailsync against mbsync (isync) on the same local Dovecot and corpus
(`python -m bench.tools --messages 10000`). Each tool pulls into its own Maildir with fsync on.
Scenarios: full first backup, no-change re-run, re-run after 1% of flags changed on the server.
Runs alternate between the tools and repeat; the table gives median (min-max) wall seconds, plus
CPU seconds and peak RSS of the tool's process."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.backup import build_corpus
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent


def measure(cmd: list[str], env: dict) -> tuple[float, float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _, status, rusage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {err[-500:]}")
    return wall, cpu, rusage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if not shutil.which("mbsync"):
        raise SystemExit("mbsync is not installed: apt-get install isync (make bench does it)")
    tmp = Path(tempfile.mkdtemp(prefix="mailsync-bench-"))
    tmp.chmod(0o755)
    server = Dovecot(tmp / "server", users={"bench": "bench-pw"}).start()
    try:
        size = build_corpus(server, "bench", a.messages, 5)
        env = dict(os.environ, BENCH_PW="bench-pw")
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for rep in range(a.repeat):
            for tool in (("mailsync", "mbsync") if rep % 2 == 0 else ("mbsync", "mailsync")):
                d = tmp / f"{tool}-{rep}"
                d.mkdir()
                if tool == "mailsync":
                    cfg = d / "config.toml"
                    cfg.write_text(f'[accounts.b]\nhost = "127.0.0.1"\nport = {server.imaps_port}\nusername = "bench"\n'
                                   f'password_env = "BENCH_PW"\nca_file = "{server.ca_file}"\nmaildir = "{d / "Mail"}"\n')
                    cmd = [sys.executable, "-m", "mailsync", "--config", str(cfg), "sync", "b", "--quiet"]
                else:
                    (d / "Mail").mkdir()
                    cfg = d / "mbsyncrc"
                    cfg.write_text(f"""IMAPAccount b
Host localhost
Port {server.imaps_port}
User bench
Pass bench-pw
SSLType IMAPS
CertificateFile {server.ca_file}

IMAPStore remote
Account b

MaildirStore local
Inbox {d / 'Mail'}
SubFolders Maildir++

Channel b
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
Expunge None
SyncState *
""")
                    cmd = ["mbsync", "-q", "-c", str(cfg), "-a"]
                for scenario in ("full", "no-change", "1% flags"):
                    if scenario == "1% flags":
                        per = a.messages // 100 // 5
                        flag = "\\Flagged" if rep % 2 == 0 else "\\Answered"
                        for f in range(5):
                            name = "INBOX" if f == 0 else f"Folder {f}/Sub"
                            server.doveadm("flags", "add", "-u", "bench", flag, "mailbox", name,
                                           "uid", f"{1 + rep * per}:{per + rep * per}")
                    results.setdefault((tool, scenario), []).append(measure(cmd, env))
                    if scenario == "1% flags" and tool == "mailsync":
                        pass
        print(f"\n{a.messages} messages, {size / 1e6:.0f} MB, {a.repeat} runs each, alternating\n")
        print("| scenario | tool | wall s median (min-max) | CPU s | peak RSS MB |")
        print("|---|---|---|---|---|")
        for scenario in ("full", "no-change", "1% flags"):
            for tool in ("mailsync", "mbsync"):
                xs = results[(tool, scenario)]
                w = [x[0] for x in xs]
                print(f"| {scenario} | {tool} | {statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f}) | "
                      f"{statistics.median(x[1] for x in xs):.2f} | {max(x[2] for x in xs):.0f} |")
            ms = statistics.median(x[0] for x in results[("mailsync", scenario)])
            mb = statistics.median(x[0] for x in results[("mbsync", scenario)])
            print(f"| {scenario} | ratio mailsync/mbsync | {ms / mb:.2f} | | |")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
