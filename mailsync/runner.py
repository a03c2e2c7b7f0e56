"""The runner: what every command does around its work on one folder.

- `Pool`: logged-in sessions shared by folder workers, at most `size` open; a session whose reply
  was cut (`broken`) is never reused.
- `with_session`: one folder's work on a session from the pool, retried with backoff (1, 2, 4 ...
  30 s) when the connection is lost, at most `retries` times; a Ctrl-C (the `stop` event) ends a
  wait at once. A server's refusal (ServerError) is not retried: asking again gets the same answer.
- `fan_out`: folders over worker threads, results in input order; a Ctrl-C tells the workers to
  stop at their next batch and waits for them, so nothing they use is closed under them.

Sync (backup, mirror, two-way), POP3 download and verify run their folders through these; what a
folder's outcome is (the typed FolderResult) stays the caller's business.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

from mailsync.errors import ConnectionLost, MailsyncError, SessionError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("mailsync.runner")
T = TypeVar("T")
R = TypeVar("R")

MAX_DELAY = 30
MAX_GRACE = 2.0  # seconds a worker waits for a busy session before opening another (Pool)
CPU_SAMPLE = 0.25  # seconds of this process's CPU use a Pool looks at before opening another session
CPU_BOUND = 0.6    # ... and the share of one core above which another session's thread would not help
_cpu_seconds = time.process_time  # (every thread of this process; the tests replace it)


class Stopped(Exception):
    """The run was interrupted (Ctrl-C) or told to stop: stop between batches; what is saved stays
    saved."""


# a session: anything with `broken` (its replies are out of step: never reuse it), `close()`, and
# optionally `valid_until` (when its OAuth2 login token ends); ImapSession, Pop3Session
Session = object


def backoff(attempt: int) -> int:
    """Seconds to wait before retry number `attempt` (1, 2, ...)."""
    return min(2 ** (attempt - 1), MAX_DELAY)


class Pool:
    """Logged-in sessions shared by the folder workers; at most `size` are opened. If another one
    cannot be opened (e.g. a provider's connection limit), the workers share those already open.

    `grace` (> 0): a worker that finds every session busy opens another only when it can help:
    - none came back for `grace` (the caller passes what opening one took): folders that take
      less than a login each (flag changes, a few new messages) share one connection instead of
      paying for more;
    - and over the last CPU_SAMPLE seconds this process used less than CPU_BOUND of a core. A
      download from a server across a network mostly waits for it, and another connection
      overlaps that wait; one that already keeps Python busy (a server on the same machine or
      network) gains nothing from another thread but turns at the interpreter lock, which
      measured as 40% more CPU and 15% more time for the same backup on 3 connections.
    A long backup from a distant server has its connections a quarter of a second later."""

    def __init__(self, connect: Callable[[], Session], size: int, first: Session | None = None,
                 grace: float = 0.0) -> None:
        self._connect, self.size, self.grace = connect, size, min(grace, MAX_GRACE)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._all: list[Session] = []
        self._opened = 0
        self._lock = threading.Lock()
        self._given = time.monotonic()  # when a session last came back (give)
        if first is not None:
            self._free.put(first)
            self._all.append(first)
            self._opened = 1

    def take(self) -> Session:
        waited = self.grace <= 0
        # (sessions coming back before this worker asked do not count; nor CPU used before)
        since, cpu0 = time.monotonic(), _cpu_seconds()
        while True:
            got = None
            with self._lock:
                try:
                    got = self._free.get_nowait()
                except queue.Empty:
                    open_new = self._opened < self.size and (waited or self._opened == 0)
                    if open_new:
                        self._opened += 1
            if got is None and not open_new:
                now = time.monotonic()
                left = max(max(self._given, since) + self.grace - now, since + CPU_SAMPLE - now, 0.001)
                try:
                    got = self._free.get(timeout=0.5 if waited else left)
                except queue.Empty:
                    if not waited:
                        waited, since, cpu0 = self._another_helps(since, cpu0)
                    continue  # a session may have been dropped meanwhile: maybe open one
            if got is not None:
                if not got.broken and not _token_ends(got):
                    return got
                self.drop(got)  # out of step since it was given back, or its login token ends
                continue
            try:
                s = self._connect()
            except MailsyncError:
                with self._lock:
                    self._opened -= 1
                    if self._opened == 0:
                        raise
                    self.size = self._opened
                log.info("could not open another connection; continuing with %d", self.size)
                continue
            except BaseException:
                with self._lock:
                    self._opened -= 1
                raise
            with self._lock:
                self._all.append(s)
            return s

    def _another_helps(self, since: float, cpu0: float) -> tuple[bool, float, float]:
        """(open another?, start of the window, CPU seconds then): see the class. A window
        whose CPU was too high starts the next one."""
        now = time.monotonic()
        if now - max(self._given, since) < self.grace or now - since < CPU_SAMPLE:
            return False, since, cpu0
        cpu = _cpu_seconds()
        if (cpu - cpu0) / (now - since) < CPU_BOUND:
            return True, since, cpu0
        return False, now, cpu

    def give(self, s: Session) -> None:
        if s.broken:  # a reply was cut or could not be read: never reuse it
            self.drop(s)
        else:
            self._given = time.monotonic()
            self._free.put(s)

    def drop(self, s: Session) -> None:
        s.close()
        with self._lock:
            self._opened -= 1
            if s in self._all:
                self._all.remove(s)

    def close(self) -> None:
        for s in list(self._all):
            s.close()


TOKEN_MARGIN = 60  # seconds: a session whose OAuth2 token ends sooner is not handed out again


def _token_ends(s: Session) -> bool:
    """The session logged in with an OAuth2 token that ends within TOKEN_MARGIN: a new session
    (with a refreshed token) is opened instead, between folders, before the server ends it."""
    until = getattr(s, "valid_until", None)
    return until is not None and until - time.monotonic() < TOKEN_MARGIN


class Fresh:
    """A pool that opens a new session for each attempt and closes it after (POP3: one folder,
    one connection, and what ends the session, QUIT or not, is the work's own decision)."""

    def __init__(self, connect: Callable[[], Session], first: Session | None = None) -> None:
        self._connect, self._first = connect, first

    def take(self) -> Session:
        s, self._first = self._first, None
        return s if s is not None else self._connect()

    def give(self, s: Session) -> None:
        s.close()

    drop = give


def with_session(pool: Pool | Fresh, work: Callable[[Session], T], *, retries: int, stop: threading.Event,
                 on_retry: Callable[[SessionError, int], None] = lambda err, delay: None) -> T:
    """work(session) on a session from pool, until it returns. A lost connection (or a session
    that could not be opened, lost or refused) is retried `retries` times, after on_retry(error,
    delay) and a wait of backoff(attempt) seconds; then its error is raised. Every other exception
    is the caller's (the session is given back, or dropped if it broke). Raises Stopped if stop is
    set before an attempt."""
    attempt = 0
    while True:
        if stop.is_set():
            raise Stopped()
        try:
            session = pool.take()
        except SessionError as exc:  # no session could be opened: lost or refused, retried
            err: SessionError = exc
        else:
            try:
                out = work(session)
            except ConnectionLost as exc:
                pool.drop(session)
                err = exc
            except BaseException:
                pool.give(session)
                raise
            else:
                pool.give(session)
                return out
        attempt += 1
        if attempt > retries:
            raise err
        delay = backoff(attempt)
        log.info("%s; retrying in %ss", err, delay)
        on_retry(err, delay)
        stop.wait(delay)  # (a Ctrl-C meanwhile ends the wait: the next attempt raises Stopped)


def fan_out(items: Iterable[T], fn: Callable[[T], R], workers: int, stop: threading.Event,
            on_interrupt: Callable[[], None] = lambda: None) -> list[R]:
    """fn over items, on up to `workers` threads (in this thread if one is enough), results in
    the items' order. If this thread is interrupted (Ctrl-C), stop is set, on_interrupt runs, the
    workers are waited for (they stop at their next batch), and the interruption is raised."""
    items = list(items)
    if len(items) <= 1 or workers <= 1:
        return [fn(i) for i in items]
    # (imported here: a run where nothing changed has no use for it)
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        results = list(ex.map(fn, items))
    except BaseException:
        on_interrupt()
        stop.set()
        _join(ex)
        raise
    _join(ex)
    return results


def _join(ex: ThreadPoolExecutor) -> None:
    """Wait for the workers to end. A Ctrl-C meanwhile does not cut the wait short: the state and
    the connections are closed next, and must not be while a worker still uses them."""
    interrupted = None
    while True:
        try:
            ex.shutdown(wait=True, cancel_futures=True)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted
