"""ratelimit: the token bucket (injected clock), the hook, and max_bytes_per_second on real
downloads (IMAP backup, POP3) against the test Dovecot. Only lower bounds on time: the limiter's
correctness (a run cannot move its bytes faster than the rate), never a speed target."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from mailsync import ratelimit
from mailsync.ratelimit import NO_LIMIT, TokenBucket
from tests.helpers import local_files, msg


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def bucket(rate, burst=None, **kw):
    t = FakeTime()
    return TokenBucket(rate, burst, clock=t.clock, sleep=t.sleep, **kw), t


def test_the_rate_is_honoured_from_an_empty_bucket():
    b, t = bucket(1000)
    start = t.now
    for _ in range(50):
        b.take(100)
        # after each take returns, the bytes taken fit the rate: starting empty, no burst
        assert (t.now - start) * 1000 >= 100 * (_ + 1) - 1e-6
    assert t.now - start == pytest.approx(5.0)


def test_a_burst_is_bounded_by_the_bucket():
    b, t = bucket(1000, burst=2000)
    t.now += 3600  # idle an hour: the bucket holds 2000 bytes, not an hour of them
    start = t.now
    b.take(2000)
    assert t.now == start  # the burst passes at once
    b.take(1000)
    assert t.now - start == pytest.approx(1.0)  # then the rate
    # over any stretch: bytes <= rate * elapsed + burst
    for _ in range(20):
        b.take(500)
    assert 3000 + 20 * 500 <= 1000 * (t.now - start) + 2000 + 1e-6


def test_a_take_larger_than_the_bucket_waits_for_it_and_one_take_is_charged_at_most_max_wait():
    b, t = bucket(1000)
    b.take(5000)
    assert t.slept == [pytest.approx(5.0)]
    b2, t2 = bucket(1000, max_wait=60)
    b2.take(10**9)  # a huge message: one wait of at most a minute
    assert t2.slept == [pytest.approx(60.0)]


def test_idle_time_pays_but_only_up_to_the_bucket():
    b, t = bucket(1000)
    b.take(1000)
    assert t.slept == [pytest.approx(1.0)]
    t.now += 0.5
    b.take(500)
    assert len(t.slept) == 1  # the half second of idle time paid for it
    b.take(0)
    assert len(t.slept) == 1


def test_threads_share_one_bucket():
    b = TokenBucket(200_000)  # real clock: 4 threads x 10 x 5000 bytes = 200 KB: at least ~1 s
    t0 = time.monotonic()
    threads = [threading.Thread(target=lambda: [b.take(5000) for _ in range(10)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert time.monotonic() - t0 >= 200_000 / 200_000 - 0.01


def test_the_hook_default_install_and_restore():
    acc = SimpleNamespace(name="a", host="Mail.Example", max_bytes_per_second=None)
    assert ratelimit.current(acc) is NO_LIMIT
    acc2 = SimpleNamespace(name="b", host="mail.example", max_bytes_per_second=4096)
    lim = ratelimit.current(acc2)
    assert isinstance(lim, TokenBucket) and lim.rate == 4096
    assert ratelimit.current(acc2) is lim  # one bucket per account and rate in the process
    mine = TokenBucket(2048)
    prev = ratelimit.install(lambda a: mine if a.name == "a" else None)
    try:
        assert ratelimit.current(acc) is mine
        assert ratelimit.current(acc2) is lim  # None from the factory: the default
    finally:
        ratelimit.install(prev)
    assert ratelimit.current(acc) is NO_LIMIT
    both = ratelimit.chain(lim, mine)
    assert isinstance(both, ratelimit.Chain) and both.limiters == [lim, mine]
    assert ratelimit.chain(NO_LIMIT, mine) is mine and ratelimit.chain(NO_LIMIT) is NO_LIMIT


def test_no_redis_or_celery_import_for_normal_runs():
    import subprocess
    import sys

    from tests.helpers import ROOT
    code = ("import sys, mailsync.ratelimit, mailsync.folderjob, mailsync.pop3, mailsync.transfer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'redis', 'kombu')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       check=False)
    assert r.stdout.strip() == "[]", r.stderr


# -- real downloads ------------------------------------------------------------------------------

RATE = 100 * 1024


def _timed(user, *args):
    t0 = time.monotonic()
    r = user.run(*args)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), took


def test_backup_honours_max_bytes_per_second(user):
    user.server.seed(user.name, "INBOX", [msg(i, "b" * 10_000) for i in range(30)])  # about 300 KB
    user.write_config(f"max_bytes_per_second = {RATE}")
    s, took = _timed(user, "sync", "test", "--json")
    assert s["totals"]["new"] == 30
    total = sum(len(b) for b in local_files(user.maildir).values())
    assert total >= 300_000
    # the limiter starts empty; one bucket (one second) of slack all the same
    assert took >= (total - RATE) / RATE, (took, total)


def test_pop3_honours_max_bytes_per_second(user):
    user.server.seed(user.name, "INBOX", [msg(i, "p" * 10_000) for i in range(20)])  # about 200 KB
    user.write_config(f'protocol = "pop3"\nmax_bytes_per_second = {RATE}', port=user.server.pop3s_port)
    s, took = _timed(user, "sync", "test", "--json")
    assert s["totals"]["new"] == 20
    total = sum(len(b) for b in local_files(user.maildir).values())
    assert total >= 200_000
    assert took >= (total - RATE) / RATE, (took, total)
