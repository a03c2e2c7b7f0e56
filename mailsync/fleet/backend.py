"""Where jobs run: the Backend seam, and the local backend (a process pool on this machine).

A backend takes jobs as plain dicts (Job.to_dict()) and hands back plain result dicts
(work.run_job's). It knows nothing of the scheduling: the scheduler (run.schedule) decides what
to submit when (never two jobs of one account at once, at most `capacity` in flight), so every
backend keeps that rule without help.

The Celery backend (celery_backend.CeleryBackend, the optional extra `fleet`) plugs in here:
submit() sends the job as a Celery task whose body (celery_app) calls work.run_job on a worker,
which reads the config file itself; results() reads the results from Redis.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from mailsync.fleet.work import INTERRUPTED, failed_result, run_job


class Backend(ABC):
    """Runs jobs somewhere. submit() returns at once; results() waits for some to end."""

    capacity: int = 1  # jobs the scheduler keeps in flight at most

    @abstractmethod
    def submit(self, job: dict) -> Hashable:
        """Start job (a Job.to_dict()); a handle (a future-like) that results() names it by."""

    @abstractmethod
    def results(self, timeout: float | None = None) -> list[tuple[Hashable, dict]]:
        """(handle, result dict) of jobs that ended: waits until at least one has (or timeout
        seconds passed: then maybe none). Never raises for a job's failure: a job that could not
        report is a failed_result()."""

    def close(self) -> None:
        """After the last result: release the workers."""


# -- the local backend ------------------------------------------------------------------------

_queue = None  # in a worker: where its progress goes (None: nowhere)


def _worker_init(queue, debug: bool) -> None:
    """In each worker process, once. Between jobs a Ctrl-C is ignored (an idle worker that died
    of it would break the pool, and the jobs running in the others with it); during a job it is
    the job's (see _pool_job)."""
    global _queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _queue = queue
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(process)d %(name)s %(message)s",
                            stream=sys.stderr)


class _Bytes:
    """A job's progress events -> the coordinator's byte count, at most twice a second."""

    def __init__(self, queue) -> None:
        self.queue, self.pending, self.last = queue, 0, time.monotonic()
        self.lock = threading.Lock()  # the commands report from their folder threads

    def __call__(self, event: str, data: dict) -> None:
        if event == "message":
            with self.lock:
                self.pending += data.get("bytes", 0)
                if time.monotonic() - self.last >= 0.5:
                    self.flush()

    def flush(self) -> None:
        if self.pending:
            self.queue.put(self.pending)
            self.pending, self.last = 0, time.monotonic()


def _pool_job(config_path: str, job: dict, retries: int, login_only: bool) -> dict:
    """One job in a worker process. A Ctrl-C reaches the job as KeyboardInterrupt: the command
    ends its current batch, run_job returns the job as interrupted."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = _Bytes(_queue) if _queue is not None else None
    try:
        return run_job(config_path, job, retries=retries, login_only=login_only, progress=progress)
    except KeyboardInterrupt:  # landed after run_job's own handling
        return failed_result(job, "", exit_code=130, outcome=INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if progress is not None:
            progress.flush()


def start_method() -> str:
    """forkserver where there is one (POSIX), else spawn: never fork, which would copy the
    coordinator's threads and locks into the workers."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class LocalBackend(Backend):
    """Jobs on a concurrent.futures.ProcessPoolExecutor of `processes` worker processes. With
    live=True the workers report the bytes they move as they go: take them with bytes_moved()."""

    def __init__(self, config_path: str, processes: int, *, retries: int = 3, login_only: bool = False,
                 debug: bool = False, live: bool = False) -> None:
        self.config_path, self.capacity = str(config_path), processes
        self.retries, self.login_only, self.debug = retries, login_only, debug
        self._ctx = multiprocessing.get_context(start_method())
        if self._ctx.get_start_method() == "forkserver":
            self._ctx.set_forkserver_preload(["mailsync.fleet.work"])  # each worker starts with it imported
        self._queue = self._ctx.Queue() if live else None
        self._pool = self._new_pool()
        self._inflight: dict[Future, dict] = {}

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.capacity, mp_context=self._ctx, initializer=_worker_init,
                                   initargs=(self._queue, self.debug))

    def submit(self, job: dict) -> Future:
        args = (_pool_job, self.config_path, job, self.retries, self.login_only)
        try:
            f = self._pool.submit(*args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a new pool for the rest
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            f = self._pool.submit(*args)
        self._inflight[f] = job
        return f

    def results(self, timeout: float | None = None) -> list[tuple[Hashable, dict]]:
        if not self._inflight:
            return []
        done, _ = wait(list(self._inflight), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for f in done:
            job = self._inflight.pop(f)
            exc = f.exception()
            if exc is None:
                out.append((f, f.result()))
            elif isinstance(exc, KeyboardInterrupt):
                out.append((f, failed_result(job, "", exit_code=130, outcome=INTERRUPTED)))
            else:
                why = "its worker process died" if isinstance(exc, BrokenProcessPool) else \
                    f"{type(exc).__name__}: {exc}"
                out.append((f, failed_result(job, f"internal error: {why}")))
        return out

    def bytes_moved(self) -> int:
        """Bytes the workers reported since the last call (0 without live)."""
        n = 0
        while self._queue is not None:
            try:
                n += self._queue.get_nowait()
            except queue_mod.Empty:
                break
        return n

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._queue is not None:
            self._queue.close()
