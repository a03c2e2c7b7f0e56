"""`mailsync watch`: how soon delivered mail is in the Maildir, and whether memory stays flat.

    python -m bench.watch --deliveries 50                 # latency: median and worst of 50
    python -m bench.watch --soak 3600 --every 5           # an hour of deliveries, RSS sampled

Latency: a watch runs against a private Dovecot (poll_interval = 3600, so only push can bring
mail); each message is delivered by APPEND from another connection, 2 s after the last one arrived, and
the time from the APPEND's OK until the message's file is in the Maildir's new/ is taken (the
Maildir is looked at every 2 ms). Part of it is the server's: Dovecot tells IDLE and NOTIFY clients about new mail 0.5 s after
it arrives (measured here too: a plain IMAP client in IDLE, the same deliveries).

Soak: the same set-up for --soak seconds, a delivery every --every seconds, the watch's RSS
(VmRSS) sampled every 10 s; printed at the start, every 10 minutes, and at the end, with the
verdict: flat when the last quarter's median is within 5 MiB of the second quarter's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.dovecot import Dovecot
from tests.helpers import ROOT, MailUser, msg


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def files(maildir: Path) -> int:
    return sum(1 for sub in ("new", "cur") for _ in (maildir / sub).iterdir()) if (maildir / "new").is_dir() else 0


def start_watch(user: MailUser) -> tuple[subprocess.Popen, list[dict]]:
    p = subprocess.Popen([sys.executable, "-m", "mailsync", "--config", str(user.config), "watch", "--json"],
                         env=user.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True)
    events: list[dict] = []

    def read() -> None:
        for line in p.stdout:
            events.append(json.loads(line))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not any(e["event"] == "listening" for e in events):
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit("the watch did not start listening")
        time.sleep(0.01)
    time.sleep(1)  # the sync after it began listening
    return p, events


def server_notice_delay(user: MailUser, n: int) -> list[float]:
    """Seconds from APPEND to the EXISTS a plain IDLE client gets: the server's share."""
    c = user.imap()
    c.select_folder("INBOX", readonly=True)
    c.idle()
    w = user.imap()
    out = []
    try:
        for i in range(n):
            w.append("INBOX", msg(900000 + i, body="probe"))
            t0 = time.perf_counter()
            while not any(isinstance(r, tuple) and b"EXISTS" in r for r in c.idle_check(timeout=5)):
                pass
            out.append(time.perf_counter() - t0)
    finally:
        c.idle_done()
        c.logout()
        w.logout()
    return out


def latency(user: MailUser, n: int) -> list[float]:
    p, _ = start_watch(user)
    w = user.imap()
    out = []
    try:
        for i in range(n):
            before = files(user.maildir)
            w.append("INBOX", msg(i, body="latency"))
            t0 = time.perf_counter()
            deadline = t0 + 30
            while files(user.maildir) <= before:
                if time.perf_counter() > deadline:
                    raise SystemExit(f"delivery {i} not in the Maildir after 30 s")
                time.sleep(0.002)
            out.append(time.perf_counter() - t0)
            time.sleep(2)  # apart, as mail comes: each delivery its own notification and sync
    finally:
        w.logout()
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    return out


def soak(user: MailUser, seconds: float, every: float) -> None:
    p, events = start_watch(user)
    w = user.imap()
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    sent = 0
    next_sample = next_report = t0
    try:
        while time.monotonic() - t0 < seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - t0, rss_mib(p.pid)))
                next_sample += 10
            if now >= next_report:
                print(f"  {now - t0:6.0f} s  RSS {samples[-1][1]:6.1f} MiB  delivered {sent}  "
                      f"in Maildir {files(user.maildir)}", flush=True)
                next_report += 600
            try:
                w.append("INBOX", msg(100000 + sent, body="soak " + "x" * (sent % 5000)))
            except Exception:  # noqa: BLE001 - the delivering client's own connection: open another
                w = user.imap()
                continue
            sent += 1
            time.sleep(every)
        time.sleep(3)
        samples.append((time.monotonic() - t0, rss_mib(p.pid)))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)
    q = len(samples) // 4
    second, last = [r for _, r in samples[q:2 * q]], [r for _, r in samples[3 * q:]]
    m2, m4 = statistics.median(second), statistics.median(last)
    stored = files(user.maildir)
    print(f"soak: {seconds:.0f} s, {sent} deliveries, {stored} in the Maildir; RSS start {samples[0][1]:.1f} MiB, "
          f"max {max(r for _, r in samples):.1f}, 2nd-quarter median {m2:.1f}, last-quarter median {m4:.1f}: "
          f"{'flat' if abs(m4 - m2) <= 5 else 'GROWING'}; exit {p.returncode}; "
          f"syncs {sum(1 for e in events if e['event'] == 'sync')}, "
          f"reconnects {sum(1 for e in events if e['event'] == 'disconnected')}")
    if stored != sent:
        raise SystemExit(f"{sent} delivered but {stored} in the Maildir")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deliveries", type=int, default=50)
    ap.add_argument("--soak", type=float, default=0, help="seconds of soak (0: latency only)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between soak deliveries")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mailsync-bench-watch-"))
    server_root = Path(tempfile.mkdtemp(prefix="mailsync-bench-watch-dovecot-"))  # (Dovecot sets its modes)
    server = Dovecot(server_root).start()
    try:
        user = MailUser.create(server, "watch", root / "user")
        user.write_config("poll_interval = 3600\n")
        if args.soak:
            soak(user, args.soak, args.every)
            return
        base = server_notice_delay(user, 10)
        shutil.rmtree(user.maildir, ignore_errors=True)
        lat = latency(user, args.deliveries)
        print(f"watch: {len(lat)} deliveries, APPEND to file in the Maildir: median {statistics.median(lat):.3f} s, "
              f"worst {max(lat):.3f} s (the server's share: EXISTS to a plain IDLE client after "
              f"{statistics.median(base):.3f} s median)")
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(server_root, ignore_errors=True)


if __name__ == "__main__":
    main()
