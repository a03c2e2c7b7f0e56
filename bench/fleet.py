"""Benchmark: a fleet of mailboxes (default 50 × 500 messages) backed up from one local Dovecot three ways:

1. `mailsync sync ACCOUNT` for one account after another (a shell-style loop of processes);
2. `mailsync fleet run jobs.csv --processes 4` (local worker processes);
3. `mailsync fleet run jobs.csv --broker redis://...` with 2 `mailsync fleet worker --concurrency 2`
   on a private redis-server.

`.venv/bin/python -m bench.fleet [--mailboxes 50 --messages 500 --repeat 3]`. Every run starts from
empty Maildirs (and an empty state directory); the server mail is the same for all. Before the
timed runs one untimed fleet run warms Dovecot's caches and the page cache, so that no variant pays
for them alone; the variants then take turns (seq, local, celery, seq, ...).

Where the CPU goes: when the cgroup v1 `cpuacct` controller is writable (root), Dovecot (master
and every process it forks), the mailsync processes (the sync processes, `fleet run`, its pool
and the Celery workers) and redis-server each run in a cgroup of their own, whose `cpuacct.usage`
is read before and after each run: exact, also for processes that came and went. The machine's
busy time comes from /proc/stat; what is neither is "other" (other processes on the machine, and
kernel work not charged to a task). The 1-minute load average is noted before and after each run.
Prints a Markdown table; MB are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.backup import build_corpus
from bench.measure import DEFAULT_DIR, workdir
from bench.report import machine
from tests.dovecot import Dovecot
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CGROOT = Path("/sys/fs/cgroup/cpuacct")
TICK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting -----------------------------------------------------------------------------

class Cgroup:
    """A cpuacct (cgroup v1) group; usage() in CPU seconds. enabled is False where it cannot be made."""

    def __init__(self, name: str) -> None:
        self.path = CGROOT / f"mailsync-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir(exist_ok=True)
            self.usage()
            self.enabled = True
        except OSError:
            self.enabled = False

    def add(self, pid: int) -> None:
        if self.enabled:
            try:
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                pass  # it exited meanwhile

    def usage(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def system(self) -> float:
        """CPU seconds in the kernel (cpuacct.stat, in ticks)."""
        for line in (self.path / "cpuacct.stat").read_text().splitlines():
            if line.startswith("system"):
                return int(line.split()[1]) / TICK
        return 0.0

    def remove(self) -> None:
        if not self.enabled:
            return
        parent = self.path.parent / "cgroup.procs"
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                parent.write_text(pid + "\n")
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def descendants(root: int) -> list[int]:
    """root and every process below it (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _proc(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a process, from /proc/PID/stat."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(f[1]), (int(f[11]) + int(f[12])) / TICK


def _kind(pid: int, ppid: int, kinds: dict[int, str]) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "fleet worker" in cmd:
        return "celery pool process" if kinds.get(ppid, "").startswith("celery") else "celery worker (main)"
    if "fleet run" in cmd:
        return "fleet run (coordinator)"
    if "multiprocessing" in cmd:
        return "local pool process"
    if " sync " in cmd:
        return "sync process"
    return "other (password commands...)"


class Sampler:
    """top-style: every `every` s, the CPU time of each process of a cgroup, by kind of process.
    A process's CPU after its last sample is missed (at most `every` s of it), so this is for
    the split between long-lived processes; the cgroup's own total is exact."""

    def __init__(self, cg: Cgroup, every: float = 0.2) -> None:
        import threading
        self.cg, self.every = cg, every
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self.stop = threading.Event()
        self.sample()
        self.first = dict(self.last)
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        try:
            pids = [int(x) for x in (self.cg.path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            got = _proc(pid)
            if got is None:
                continue
            if pid not in self.kinds:
                self.kinds[pid] = _kind(pid, got[0], self.kinds)
            self.last[pid] = got[1]

    def loop(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()

    def done(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        out: dict[str, float] = {}
        for pid, cpu in self.last.items():
            k = self.kinds[pid]
            out[k] = out.get(k, 0.0) + cpu - self.first.get(pid, 0.0)
        return out


def busy_seconds() -> tuple[float, float]:
    """(busy, iowait) CPU seconds of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK, iowait / TICK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class Result:
    variant: str
    wall: float
    messages: int
    bytes: int
    cpu: dict[str, float] = field(default_factory=dict)  # mailsync, dovecot, redis, busy, iowait
    load: tuple[float, float] = (0.0, 0.0)
    split: dict[str, float] = field(default_factory=dict)  # sampled mailsync CPU by kind of process


# -- the fleet ------------------------------------------------------------------------------------

def users(n: int) -> list[str]:
    return [f"u{i:03d}" for i in range(1, n + 1)]


def write_config(path: Path, server: Dovecot, names: list[str], maildirs: Path) -> None:
    """[templates.box] for the fleet, and one [accounts.NAME] per user for the sequential loop:
    the same keys (the password from a password_command, as a fleet would have it)."""
    common = f'host = "127.0.0.1"\nport = {server.imaps_port}\nca_file = "{server.ca_file}"\n'
    parts = [(f'[templates.box]\n{common}username = "{{user}}"\npassword_command = ["printf", "%s", "pw-{{user}}"]\n'
              f'maildir = "{maildirs}/{{user}}"\n')]
    for u in names:
        parts.append(f'[accounts.{u}]\n{common}username = "{u}"\npassword_command = ["printf", "%s", "pw-{u}"]\n'
                     f'maildir = "{maildirs}/{u}"\n')
    path.write_text("\n".join(parts))


def count_maildirs(d: Path) -> tuple[int, int]:
    """(messages, bytes) of every message file under d (cur/ and new/ of every folder)."""
    n = b = 0
    for dirpath, _, files in os.walk(d):
        if os.path.basename(dirpath) in ("cur", "new"):
            for f in files:
                n += 1
                b += os.path.getsize(os.path.join(dirpath, f))
    return n, b


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.tmp = workdir(a.dir, "fleet-")
        self.names = users(a.mailboxes)
        self.server = Dovecot(self.tmp / "server", users={u: f"pw-{u}" for u in self.names})
        self.cg = {k: Cgroup(k) for k in ("mailsync", "dovecot", "redis")}
        self.redis: RedisServer | None = None
        self.runs = 0

    # one run's directory, config and environment
    def prepare(self, label: str) -> tuple[Path, Path, dict[str, str]]:
        self.runs += 1
        d = self.tmp / f"run{self.runs:02d}-{label}"
        d.mkdir()
        cfg = d / "config.toml"
        write_config(cfg, self.server, self.names, d / "Mail")
        jobs = d / "jobs.csv"
        jobs.write_text("command,account,user\n" + "".join(f"sync,box,{u}\n" for u in self.names))
        env = dict(os.environ, XDG_STATE_HOME=str(d / "state"))
        env.pop("MAILSYNC_CRASH_AT", None)
        return d, cfg, env

    def popen(self, cmd: list[str], env: dict[str, str], log: Path, **kw) -> subprocess.Popen:
        """cmd, in the mailsync cgroup from its first instruction on (a shell joins it, then execs cmd)."""
        if self.cg["mailsync"].enabled:
            procs = self.cg["mailsync"].path / "cgroup.procs"
            cmd = ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]
        with open(log, "ab") as f:
            return subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=f, **kw)

    def snapshot(self) -> dict[str, float]:
        s = {k: cg.usage() for k, cg in self.cg.items() if cg.enabled}
        for k in ("mailsync", "dovecot"):
            if self.cg[k].enabled:
                s[k + " sys"] = self.cg[k].system()
        s["busy"], s["iowait"] = busy_seconds()
        return s

    def timed(self, variant: str, body, setup=None, teardown=None) -> Result:
        """One run of body(d, cfg, env, ctx), timed; setup (untimed) makes ctx, teardown(ctx) ends it."""
        d, cfg, env = self.prepare(variant.split()[0])
        ctx = setup(d, cfg, env) if setup else None
        if self.a.settle:  # let the kernel write back (and free) what the previous run left behind
            os.sync()
            time.sleep(self.a.settle)
        l0 = loadavg()
        s0 = self.snapshot()
        sampler = Sampler(self.cg["mailsync"]) if self.cg["mailsync"].enabled else None
        t0 = time.perf_counter()
        body(d, cfg, env, ctx)
        wall = time.perf_counter() - t0
        s1 = self.snapshot()
        split = sampler.done() if sampler else {}
        l1 = loadavg()
        if teardown:
            teardown(ctx)
        n, b = count_maildirs(d / "Mail")
        if n != self.total_messages:
            raise SystemExit(f"{variant}: {n} messages in the Maildirs, expected {self.total_messages}; see {d}")
        shutil.rmtree(d / "Mail", ignore_errors=True)
        r = Result(variant, wall, n, b, {k: s1[k] - s0[k] for k in s1}, (l0, l1), split)
        print(f"  {variant}: {wall:.1f} s, load {l0:.2f} -> {l1:.2f}, CPU "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.cpu.items()) + "; sampled: "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(split.items())), file=sys.stderr, flush=True)
        return r

    # -- the three variants ------------------------------------------------------------------------

    def sequential(self, d: Path, cfg: Path, env: dict[str, str], _ctx) -> None:
        for u in self.names:
            p = self.popen([sys.executable, "-m", "mailsync", "--config", str(cfg), "sync", u], env, d / "seq.log")
            if p.wait() != 0:
                raise SystemExit(f"mailsync sync {u} failed; see {d / 'seq.log'}")

    def local(self, d: Path, cfg: Path, env: dict[str, str], _ctx) -> None:
        self._fleet(d, cfg, env, "--processes", str(self.a.processes))

    def _fleet(self, d: Path, cfg: Path, env: dict[str, str], *args: str) -> None:
        p = self.popen([sys.executable, "-m", "mailsync", "--config", str(cfg), "fleet", "run", str(d / "jobs.csv"),
                        "--report", str(d / "report.json"), "--quiet", *args], env, d / "fleet.log")
        if p.wait() != 0:
            raise SystemExit(f"fleet run failed ({p.returncode}); see {d / 'fleet.log'}")

    def celery(self, d: Path, cfg: Path, env: dict[str, str], _ctx) -> None:
        self._fleet(d, cfg, env, "--broker", self.redis.url, *self.a.broker_args)

    def start_workers(self, d: Path, cfg: Path, env: dict[str, str]) -> list[subprocess.Popen]:
        if self.redis is None:
            self.redis = RedisServer(self.tmp / "redis").start()
            self.cg["redis"].add(self.redis.proc.pid)
        procs = []
        for i in range(self.a.workers):
            procs.append(self.popen([sys.executable, "-m", "mailsync", "fleet", "worker", "--broker", self.redis.url,
                                     "--concurrency", str(self.a.concurrency)], env, d / f"worker{i}.log",
                                    start_new_session=True))
        # ready: each worker's log says so (Celery's "ready."); else give them 15 s
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("ready" in (d / f"worker{i}.log").read_text(errors="replace") for i in range(len(procs))):
                break
            time.sleep(0.2)
        else:
            time.sleep(15)
        time.sleep(1)
        return procs

    @staticmethod
    def stop_workers(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # -- the whole benchmark -----------------------------------------------------------------------

    def run(self) -> list[Result]:
        a = self.a
        self.server.start()
        for pid in descendants(int((self.server.root / "run" / "master.pid").read_text())):
            self.cg["dovecot"].add(pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as ex:
            sizes = list(ex.map(lambda iu: build_corpus(self.server, iu[1], a.messages, a.folders, seed=iu[0]),
                                enumerate(self.names, 1)))
        self.total_messages, self.total_bytes = a.mailboxes * a.messages, sum(sizes)
        print(f"corpus: {a.mailboxes} mailboxes × {a.messages} messages = {self.total_messages} messages, "
              f"{self.total_bytes / 1e6:.0f} MB, {a.folders} folders each (seeded in {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

        variants = {
            "sequential": ("sequential `mailsync sync`", self.sequential, None, None),
            "processes": (f"fleet --processes {a.processes}", self.local, None, None),
            "broker": (f"fleet --broker, {a.workers} workers × {a.concurrency}" + (" " + " ".join(a.broker_args)
                       if a.broker_args else ""), self.celery, self.start_workers, self.stop_workers),
        }
        variants = {k: v for k, v in variants.items() if not a.only or k in a.only}
        print("warm-up (untimed): fleet --processes 4", file=sys.stderr, flush=True)
        self.timed("warm-up", self.local)
        results: list[Result] = []
        for rep in range(a.repeat):
            print(f"repeat {rep + 1}/{a.repeat}", file=sys.stderr, flush=True)
            for label, fn, setup, teardown in variants.values():
                results.append(self.timed(label, fn, setup, teardown))
        return results

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        self.server.stop()
        for cg in self.cg.values():
            cg.remove()
        if not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def table(results: list[Result], cores: int) -> str:
    names = list(dict.fromkeys(r.variant for r in results))
    by = {n: [r for r in results if r.variant == n] for n in names}
    base = med([r.wall for r in by[names[0]]])
    out = ["| variant | wall s, median (min–max) | msg/s | MB/s | speed-up | load avg before→after |",
           "|---|---|---|---|---|---|"]
    for n in names:
        rs = by[n]
        w = med([r.wall for r in rs])
        loads = ", ".join(f"{r.load[0]:.1f}→{r.load[1]:.1f}" for r in rs)
        out.append(f"| {n} | {w:.1f} ({min(r.wall for r in rs):.1f}–{max(r.wall for r in rs):.1f}) | "
                   f"{rs[0].messages / w:,.0f} | {rs[0].bytes / 1e6 / w:.1f} | {base / w:.2f}× | {loads} |")
    if all("mailsync" in r.cpu for r in results):
        out += ["", (f"CPU seconds during the run (medians); the machine has {cores} cores, so wall × {cores} is "
                     "the CPU time there was:"), "",
                ("| variant | wall × cores | busy (all) | mailsync (of which kernel) | Dovecot (of which kernel) | redis "
                 "| other | idle | of which iowait |"),
                "|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            rs = by[n]
            cap = med([r.wall * cores for r in rs])
            c = {k: med([r.cpu[k] for r in rs]) for k in rs[0].cpu}
            other = med([r.cpu["busy"] - r.cpu["mailsync"] - r.cpu["dovecot"] - r.cpu["redis"] for r in rs])
            idle = med([r.wall * cores - r.cpu["busy"] for r in rs])

            def pct(x: float, cap: float = cap) -> str:
                return f"{x:.1f} ({100 * x / cap:.0f}%)"
            out.append(f"| {n} | {cap:.1f} | {pct(c['busy'])} | {pct(c['mailsync'])} ({c['mailsync sys']:.1f}) | "
                       f"{pct(c['dovecot'])} ({c['dovecot sys']:.1f}) | "
                       f"{c['redis']:.1f} | {pct(other)} | {pct(idle)} | {c['iowait']:.1f} |")
        out += ["", ("mailsync's CPU seconds by kind of process (medians; sampled every 0.2 s, top-style, so "
                     "short-lived processes are undercounted):"), ""]
        for n in names:
            kinds = sorted({k for r in by[n] for k in r.split})
            out.append(f"- {n}: " + ", ".join(f"{k} {med([r.split.get(k, 0.0) for r in by[n]]):.1f}"
                                                for k in kinds))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mailboxes", type=int, default=50)
    ap.add_argument("--messages", type=int, default=500, help="messages per mailbox")
    ap.add_argument("--folders", type=int, default=5, help="folders per mailbox")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--processes", type=int, default=4, help="fleet run --processes (local backend)")
    ap.add_argument("--workers", type=int, default=2, help="Celery workers")
    ap.add_argument("--concurrency", type=int, default=2, help="fleet worker --concurrency")
    ap.add_argument("--broker-args", default="", help="more options for fleet run --broker, e.g. "
                    "'--max-connections-per-host 12'")
    ap.add_argument("--only", default="", help="comma-separated subset of sequential,processes,broker")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="before each timed run: sync() and wait this many seconds (default 0)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory (default .bench/)")
    a = ap.parse_args()
    a.broker_args = a.broker_args.split()
    a.only = [x for x in a.only.split(",") if x]
    before = machine([])
    b = Bench(a)
    try:
        results = b.run()
    finally:
        b.close()
    after = machine([])
    total = results[0]
    print(f"\n{a.mailboxes} mailboxes × {a.messages} messages ({total.messages} messages, {total.bytes / 1e6:.0f} MB), "
          f"{a.repeat} runs each; {after}\n")
    if after != before:
        print(f"NOTE: the code changed during the benchmark; at the start: {before}\n")
    print(table(results, os.cpu_count() or 1))


if __name__ == "__main__":
    main()
