"""`mailsync fleet run`: read and check the jobs file, schedule the jobs on a backend (one job per
account at a time), show progress, write the report, decide the exit code."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable
from pathlib import Path

from mailsync.config import Config
from mailsync.errors import ConfigError
from mailsync.fleet.backend import Backend, LocalBackend
from mailsync.fleet.jobs import Job, JobsError, accounts_of, read_jobs
from mailsync.fleet.work import INTERRUPTED, NOT_RUN, OK, blank_result
from mailsync.model import human_size

COLUMNS = ("line", "account", "command", "destination", "outcome", "exit_code", "messages", "bytes", "folders",
           "seconds", "attempts", "worker", "error")
EXIT_SOME_FAILED = 9
EXIT_INTERRUPTED = 130
Echo = Callable[[str], None]


def keys_of(cfg: Config, job: Job) -> frozenset:
    """What a job must have to itself: its accounts, and the Maildir of one that keeps one (two
    accounts may share a Maildir; its run lock would refuse the second one)."""
    acc, dst = accounts_of(cfg, job)
    keys = {("account", acc.name)}
    if dst is not None:
        keys.add(("account", dst.name))
    if job.command != "migrate":
        keys.add(("maildir", os.path.abspath(acc.maildir)))
    return frozenset(keys)


def schedule(jobs: list[Job], backend: Backend, keys: Callable[[Job], frozenset], *,
             on_result: Callable[[Job, dict], None] = lambda job, result: None,
             tick: Callable[[], None] = lambda: None) -> tuple[dict[int, dict], bool]:
    """Run jobs on backend, in file order as far as the rule allows: never two jobs that share a
    key at once, at most backend.capacity in flight. Returns (line -> result, interrupted).

    A Ctrl-C stops the scheduling: nothing more is submitted, the jobs running end (their own
    Ctrl-C handling ends their current batch) and are waited for; the others never ran."""
    pending = list(jobs)
    running: dict[Hashable, tuple[Job, frozenset]] = {}
    busy: set = set()
    results: dict[int, dict] = {}
    interrupted = False

    def collect(timeout: float) -> None:
        for handle, result in backend.results(timeout=timeout):
            job, k = running.pop(handle)
            busy.difference_update(k)
            results[job.line] = result
            on_result(job, result)
        tick()

    try:
        while pending or running:
            i = 0
            while len(running) < backend.capacity and i < len(pending):
                k = keys(pending[i])
                if k & busy:
                    i += 1
                    continue
                job = pending.pop(i)
                running[backend.submit(job.to_dict())] = (job, k)
                busy.update(k)
            collect(0.5)
    except KeyboardInterrupt:
        interrupted = True
        while running:
            try:
                collect(0.5)
            except KeyboardInterrupt:  # another Ctrl-C: still wait, the workers are ending
                continue
    return results, interrupted


def report_format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("csv", "json"):
        raise ConfigError(f"--report {path}: the name must end in .csv or .json")
    return fmt


def write_report(path: Path, rows: list[dict]) -> None:
    """The report, replaced as a whole (never half-written): JSON (a list of objects: the COLUMNS
    and the command's own totals as `details`) or CSV (the COLUMNS), by path's extension."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        if report_format(path) == "json":
            json.dump(rows, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        else:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    os.replace(tmp, path)


def summary(rows: list[dict], seconds: float) -> str:
    """"fleet: 20 jobs: 18 ok, 2 failed (1 auth, 1 network) (1234 messages, 5.6 MB) in 12.3 s"."""
    n = Counter(r["outcome"] for r in rows)
    failed = {k: v for k, v in sorted(n.items()) if k not in (OK, INTERRUPTED, NOT_RUN)}
    parts = [f"{n[OK]} ok", f"{sum(failed.values())} failed"
             + (f" ({', '.join(f'{v} {k}' for k, v in failed.items())})" if failed else "")]
    parts += [f"{n[k]} {k.replace('-', ' ')}" for k in (INTERRUPTED, NOT_RUN) if n[k]]
    return (f"fleet: {len(rows)} jobs: {', '.join(parts)} ({sum(r['messages'] for r in rows)} messages, "
            f"{human_size(sum(r['bytes'] for r in rows))}) in {seconds:.1f} s")


def _line(job: Job, r: dict) -> str:
    what = f"{r['outcome']}, {r['messages']} messages ({human_size(r['bytes'])}), {r['seconds']:.1f} s"
    if r["attempts"] > 1:
        what += f", {r['attempts']} attempts"
    return f"{job.label}: {what}" + (f": {r['error']}" if r["error"] else "")


class _Bars:
    """tqdm bars on stderr: jobs done of all, and bytes moved."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm
        self.jobs = tqdm(total=total, unit="job", desc="jobs", position=0, file=sys.stderr)
        self.bytes = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc="bytes", position=1,
                          file=sys.stderr)

    def close(self) -> None:
        self.jobs.close()
        self.bytes.close()


def run(cfg: Config, jobs_path: Path, *, processes: int = 4, report: Path | None = None, retries: int = 3,
        quiet: bool = False, check_logins: bool = False, debug: bool = False,
        out: Echo = print, err: Echo = lambda s: print(s, file=sys.stderr),
        backend: Backend | None = None, broker: str | None = None, max_per_host: int = 10,
        broker_wait: float = 120.0, resend_delay: float = 30.0, max_bytes_per_host: int = 0) -> int:
    """The command. Returns its exit code: 0 every job ok, 9 some not, 2 a bad jobs file or
    option (nothing ran), 130 interrupted."""
    if not 1 <= processes <= 64:
        raise ConfigError(f"--processes {processes}: give 1 to 64")
    if not 0 <= retries <= 10:
        raise ConfigError(f"--retries {retries}: give 0 to 10")
    if report is not None:
        report_format(report)
        if not report.parent.is_dir():
            raise ConfigError(f"--report {report}: directory {report.parent} does not exist")
    if max_bytes_per_host and not broker and backend is None:
        raise ConfigError(f"--max-bytes-per-second-per-host {max_bytes_per_host}: only with --broker (the local "
                          "fleet limits each process: set max_bytes_per_second on the accounts)")
    if max_bytes_per_host and max_bytes_per_host < 1024:
        raise ConfigError(f"--max-bytes-per-second-per-host {max_bytes_per_host}: give at least 1024")
    try:
        jobs = read_jobs(jobs_path, cfg)
    except JobsError as exc:
        for line in str(exc).splitlines():
            err(f"mailsync: error: {line}")
        return JobsError.exit_code
    keys = {job.line: keys_of(cfg, job) for job in jobs}
    show_bars = not quiet and sys.stderr.isatty()
    if backend is None and broker:
        if not 1 <= max_per_host <= 1000:
            raise ConfigError(f"--max-connections-per-host {max_per_host}: give 1 to 1000")
        from mailsync.fleet.celery_backend import (
            CeleryBackend,  # the fleet extra: celery, redis
        )
        backend = CeleryBackend(broker, str(cfg.path.resolve()), capacity=len(jobs), retries=retries,
                                login_only=check_logins, max_per_host=max_per_host,
                                max_bytes_per_host=max_bytes_per_host, broker_wait=broker_wait,
                                resend_delay=resend_delay, warn=err)
    backend = backend or LocalBackend(str(cfg.path.resolve()), min(processes, len(jobs)), retries=retries,
                                      login_only=check_logins, debug=debug, live=show_bars)
    bars = _Bars(len(jobs)) if show_bars else None
    say = (bars.jobs.write if bars else err) if not quiet else (lambda s: None)
    results: dict[int, dict] = {}
    last_write = [time.monotonic()]

    def rows() -> list[dict]:
        return [results.get(j.line) or blank_result(j.to_dict()) for j in jobs]

    def on_result(job: Job, r: dict) -> None:
        results[job.line] = r
        if bars:
            bars.jobs.update(1)
            if r["outcome"] != OK:
                say(_line(job, r))
        else:
            say(_line(job, r))
        if report is not None and time.monotonic() - last_write[0] >= 5:  # a long run: keep it current
            write_report(report, rows())
            last_write[0] = time.monotonic()

    def tick() -> None:
        if bars and hasattr(backend, "bytes_moved"):
            n = backend.bytes_moved()
            if n:
                bars.bytes.update(n)

    t0 = time.monotonic()
    try:
        _, interrupted = schedule(jobs, backend, lambda j: keys[j.line], on_result=on_result, tick=tick)
    finally:
        backend.close()
        if bars:
            bars.close()
    final = rows()
    if report is not None:
        write_report(report, final)
    bad = [(j, r) for j, r in zip(jobs, final) if r["outcome"] != OK]
    for j, r in bad:
        if r["outcome"] not in (INTERRUPTED, NOT_RUN):
            err(f"mailsync: error: {j.label}: {r['outcome']}: {r['error'] or 'exit code ' + str(r['exit_code'])}")
    if not quiet:
        out(summary(final, time.monotonic() - t0) + (f"; report: {report}" if report is not None else ""))
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if not bad else EXIT_SOME_FAILED
