"""Byte-rate limits: `max_bytes_per_second` of an account, and the fleet's per-host rate.

A Limiter's take(nbytes) blocks until nbytes fit the rate. The transfer code asks for the limiter
of an account with current(acc) and calls take() with the message bytes it moves: before each
APPEND (migrate, restore: transfer.Destination.append_many), after each body downloaded
(backup/sync: folderjob.FolderJob.download; POP3: pop3._download, per RETR).

By default current(acc) is a token bucket of this process, one per account and rate
(acc.max_bytes_per_second), or a no-op without a limit. `mailsync fleet` (the Celery worker)
replaces it for a job with install(factory): factory(acc) returns the limiter to use (one shared
by all workers through Redis, see fleet/celery_app.py), or None for the default.

The token bucket starts empty and holds at most `burst` bytes (default one second of the rate):
after t seconds, at most rate * t + burst bytes have been taken (and, starting empty, at most
rate * t before the bucket had time to fill). A take larger than the bucket is allowed and paid
for by waiting (the bucket goes into debt), so any message size passes. One take is charged at
most max_wait (60 s) of the rate, so a single wait stays under a minute (IMAP servers drop idle
connections): a message larger than 60 s of the rate goes over the limit by the excess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

MAX_WAIT = 60.0


class Limiter(Protocol):
    def take(self, nbytes: int) -> None:
        """Block until nbytes fit the rate (then count them as moved)."""


class NoLimit:
    def take(self, nbytes: int) -> None:
        pass


NO_LIMIT = NoLimit()


class TokenBucket:
    """A process-local token bucket (thread-safe: an account's folder threads share one).
    clock and sleep are injectable for tests."""

    def __init__(self, rate: float, burst: float | None = None, *, max_wait: float = MAX_WAIT,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.max_wait, self.clock, self.sleep = max_wait, clock, sleep
        self.tokens = 0.0  # starts empty
        self.stamp = clock()
        self.lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Count nbytes as taken; the seconds to wait before they fit."""
        charge = min(float(nbytes), self.max_wait * self.rate)
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - charge
            self.stamp = now
            return max(0.0, -self.tokens / self.rate)

    def take(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        wait = self.reserve(nbytes)
        if wait > 0:
            self.sleep(wait)


class Chain:
    """Every limiter's rate at once (an account's own limit and the fleet's per-host one)."""

    def __init__(self, *limiters: Limiter) -> None:
        self.limiters = [x for x in limiters if x is not NO_LIMIT]

    def take(self, nbytes: int) -> None:
        for lim in self.limiters:
            lim.take(nbytes)


def chain(*limiters: Limiter) -> Limiter:
    real = [x for x in limiters if x is not NO_LIMIT]
    return real[0] if len(real) == 1 else Chain(*real) if real else NO_LIMIT


# -- the hook ------------------------------------------------------------------------------------

Factory = Callable[[object], "Limiter | None"]
_factory: Factory | None = None
_local: dict[tuple, TokenBucket] = {}
_local_lock = threading.Lock()


def local(acc) -> Limiter:
    """The process-local limiter of an account: its max_bytes_per_second, or none."""
    rate = getattr(acc, "max_bytes_per_second", None)
    if not rate:
        return NO_LIMIT
    key = (acc.name, acc.host.lower(), rate)
    with _local_lock:
        if key not in _local:
            _local[key] = TokenBucket(rate)
        return _local[key]


def current(acc) -> Limiter:
    """The limiter for an account (its host): the installed factory's, else local(acc)."""
    f = _factory
    if f is not None:
        lim = f(acc)
        if lim is not None:
            return lim
    return local(acc)


def install(factory: Factory | None) -> Factory | None:
    """Make factory(acc) decide current(acc) (None: back to the default); returns the previous one."""
    global _factory
    prev, _factory = _factory, factory
    return prev
