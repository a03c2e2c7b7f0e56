"""Wall time, CPU time and peak RSS of one child process.

Peak RSS needs care. The ru_maxrss that wait4() or getrusage(RUSAGE_CHILDREN) report for a process
started from Python includes the *parent's* peak: at exec() Linux records the peak of the memory
image being replaced, which for a process spawned with vfork (as subprocess does) or fork is the
harness's own. A harness that held a corpus in memory would make every tool look that big. So the
command runs under GNU time (`/usr/bin/time`, Debian package `time`), which forks from its own
small image, and its %M is the tool's true peak. Without GNU time the tool's VmHWM in
/proc/PID/status is sampled every 10 ms while it runs (a peak in its last moments can be missed).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass
class Run:
    wall: float      # seconds
    cpu: float       # user + sys seconds of the tool's process (and the children it waited for)
    rss_mb: float    # peak resident set size, MiB
    ok: bool = True  # set by the caller: the result was checked and is what was expected


@cache
def gnu_time() -> str | None:
    for path in ("/usr/bin/time",):
        try:
            r = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "GNU" in r.stdout + r.stderr:
            return path
    return None


def rss_method() -> str:
    return "GNU time" if gnu_time() else "VmHWM sampled every 10 ms"


def _sample_hwm(pid: int, out: list[int], done: threading.Event) -> None:
    status = f"/proc/{pid}/status"
    while not done.is_set():
        try:
            with open(status) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[0] = max(out[0], int(line.split()[1]))
                        break
        except OSError:
            return
        done.wait(0.01)


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            stdout: int | None = None) -> tuple[Run, int]:
    """Run cmd to completion with stderr (and stdout, unless given) appended to log.
    Returns the Run and the exit code."""
    gt = gnu_time()
    rss_file = log.with_name(log.name + ".rss")
    full = [gt, "-q", "-f", "%M", "-o", str(rss_file), *cmd] if gt else cmd
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=err if stdout is None else stdout,
                             stderr=err, env=env, cwd=cwd)
        peak, done = [0], threading.Event()
        sampler = None
        if not gt:
            sampler = threading.Thread(target=_sample_hwm, args=(p.pid, peak, done), daemon=True)
            sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        if sampler:
            sampler.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if gt:
        try:
            lines = [x for x in rss_file.read_text().split() if x.isdigit()]
            peak[0] = int(lines[-1]) if lines else 0
        except OSError:
            pass
        rss_file.unlink(missing_ok=True)
    return Run(wall, ru.ru_utime + ru.ru_stime, peak[0] / 1024), p.returncode


DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".bench"


def workdir(base: Path, prefix: str) -> Path:
    """A fresh directory for one benchmark run under base (default .bench/ in the repository).

    Not under /tmp: on some machines file creation there is much slower than elsewhere on the same
    disk, which would be measured instead of the tools. As root, Dovecot's processes run as the
    `dovecot` user and must reach the server directory, so base and the run directory are 0755
    (their parents must be traversable too)."""
    import tempfile
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()
    d.chmod(0o755)
    return d
