"""The Celery side of `mailsync fleet` (the optional extra `mailsync[fleet]`: celery, redis): the
Celery app and its settings, the task that runs one job (work.run_job) on a worker, the per-account
lock, the per-host connection semaphore and byte-rate token bucket in Redis, and the per-job
progress hash.

Only `fleet run --broker`, `fleet worker` and `fleet status` import this module; the local fleet
and the other commands never import celery or redis. docs/fleet.md explains every setting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from mailsync.errors import ConfigError, ConnectError

PREFIX = "mailsync:fleet"
TASK = "mailsync.fleet.run_job"
log = logging.getLogger(__name__)
STATUS_TTL = 7 * 86400  # the progress hashes are kept a week


def _imports():
    try:
        import celery
        import redis
    except ImportError:
        raise ConfigError("the Celery backend needs the fleet extra",
                          hint="pip install 'mailsync[fleet]' (celery[redis], redis)") from None
    return celery, redis


@dataclass
class Settings:
    """The worker's settings (`mailsync fleet worker` options). With the defaults a job whose
    worker died runs again within 2 minutes: its message comes back after visibility_timeout
    (checked every restore_interval), its account lock expired after lock_ttl."""
    visibility_timeout: float = 100.0   # broker: an unacknowledged message is redelivered after this
    restore_interval: float = 10.0      # how often a worker looks for such messages
    lock_ttl: float = 30.0              # the account lock lives this long without a heartbeat
    soft_time_limit: int = 24 * 3600    # a job that runs longer is stopped (SoftTimeLimitExceeded)...
    time_limit: int = 24 * 3600 + 600   # ... and its worker process killed after this
    result_expires: int = 7 * 86400     # results stay in Redis a week
    retry_countdown: float = 10.0       # a job whose account is busy is tried again after this
    host_wait: float = 5.0              # waits this long for host connection slots before it retries
    redis_wait: float = 60.0            # Redis away when a job starts: waits this long for it
    config: str | None = None           # the config file on this worker (default: the job's path)

    @property
    def heartbeat(self) -> float:
        return max(0.2, self.lock_ttl / 3)


SETTINGS = Settings()


def conf(broker: str, s: Settings) -> dict:
    """The Celery settings (docs/fleet.md, "The Celery settings")."""
    return {
        "broker_url": broker, "result_backend": broker,
        "task_serializer": "json", "result_serializer": "json", "accept_content": ["json"],
        "task_acks_late": True,                # ack when the job ended: a worker that dies loses no job
        "task_reject_on_worker_lost": True,    # a pool process killed mid-job: the job goes back to the queue
        "worker_prefetch_multiplier": 1,       # a worker holds no more jobs than it runs
        "task_soft_time_limit": s.soft_time_limit, "task_time_limit": s.time_limit,
        "broker_transport_options": {"visibility_timeout": s.visibility_timeout,
                                     "unacked_restore_interval": s.restore_interval,
                                     "unacked_restore_throttle": 1},
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        "result_expires": s.result_expires,
        "result_backend_always_retry": True,   # a result is stored once Redis is back, not dropped
        "result_backend_max_retries": 60, "result_backend_max_sleep_between_retries_ms": 5000,
        "broker_connection_retry_on_startup": True, "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_track_started": True, "worker_hijack_root_logger": False, "worker_redirect_stdouts": False,
    }


def make_app(broker: str, s: Settings | None = None):
    celery, _ = _imports()
    app = celery.Celery("mailsync-fleet", set_as_current=False)
    app.conf.update(conf(broker, s or SETTINGS))
    app.task(name=TASK, bind=True, max_retries=None, acks_late=True)(_run_task)
    return app


# -- Redis on the worker -------------------------------------------------------------------------

_clients: dict = {}


def client(url: str):
    """One redis client per process (a prefork child makes its own)."""
    _, redis = _imports()
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                             health_check_interval=10)
    return _clients[key]


def safe_url(url: str) -> str:
    """The broker URL without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


_LOCK = """
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v and v ~= ARGV[1] then return 0 end
end
for i, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1], 'PX', ARGV[2]) end
return 1
"""
_EXTEND = """
local ok = 1
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2])
  elseif not v then redis.call('SET', k, ARGV[1], 'PX', ARGV[2])
  else ok = 0 end
end
return ok
"""
_UNLOCK = """
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) end
end
return 1
"""
# a sorted set per host: one member per connection slot held, scored by its expiry (ms)
_SEM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) + n > limit then return 0 end
for i = 1, n do redis.call('ZADD', KEYS[1], now + ttl, ARGV[1] .. '#' .. i) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"""
_SEM_EXTEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do redis.call('ZADD', KEYS[1], now + ttl, ARGV[1] .. '#' .. i) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
"""


# a token bucket per host (docs/fleet.md, "The per-host byte rate"): a hash of tokens (bytes,
# may go negative: the waits already promised) and the time it was last updated (ms, Redis's
# clock, so the workers' clocks do not matter). ARGV: rate (bytes/s), burst (bytes), bytes to take.
# Returns the milliseconds the caller must wait before its bytes fit.
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens, ms = tonumber(v[1]), tonumber(v[2])
if not tokens or not ms then tokens, ms = 0, now end
tokens = math.min(burst, tokens + math.max(0, now - ms) * rate / 1000) - n
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ms', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], 3600000)
if tokens >= 0 then return 0 end
return math.ceil(-tokens * 1000 / rate)
"""


def rate_key(host: str) -> str:
    return f"{PREFIX}:rate:{host.lower()}"


class RedisBucket:
    """ratelimit.Limiter shared by every worker: the token bucket of one host in Redis. Like the
    local one it starts empty, holds one second of the rate, and charges one take at most 60 s
    of it. Redis away: the bytes pass unlimited (logged), the job goes on."""

    def __init__(self, r, host: str, rate: int, sleep=time.sleep) -> None:
        from mailsync.ratelimit import MAX_WAIT
        self.r, self.key, self.rate, self.sleep = r, rate_key(host), rate, sleep
        self.burst, self.cap = rate, int(MAX_WAIT * rate)

    def take(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        try:
            ms = int(self.r.eval(_RATE, 1, self.key, self.rate, self.burst, min(nbytes, self.cap)))
        except Exception:  # Redis away a moment: do not fail the job for it
            log.debug("rate limit: Redis unreachable; %d bytes not limited", nbytes, exc_info=True)
            return
        if ms > 0:
            self.sleep(ms / 1000)


def rate_factory(r, rate: int):
    """For ratelimit.install: each account's host gets its Redis bucket at `rate` bytes/s, with
    the account's own max_bytes_per_second (process-local) as well."""
    from mailsync import ratelimit
    buckets: dict[str, RedisBucket] = {}

    def factory(acc):
        host = acc.host.lower()
        if host not in buckets:
            buckets[host] = RedisBucket(r, host, rate)
        return ratelimit.chain(ratelimit.local(acc), buckets[host])
    return factory


def lock_keys(keys) -> list[str]:
    """run.keys_of's keys as Redis keys: the account(s), and the Maildir of a job that keeps one."""
    return sorted(f"{PREFIX}:lock:{kind}:{name}" for kind, name in keys)


def host_key(host: str) -> str:
    return f"{PREFIX}:host:{host.lower()}"


class Held:
    """A job's account locks and host slots, kept alive by a heartbeat thread while it runs."""

    def __init__(self, r, keys: list[str], hosts: dict[str, int], ttl: float, heartbeat: float) -> None:
        self.r, self.keys, self.hosts = r, keys, hosts
        self.token = uuid.uuid4().hex  # this run of the job: a redelivered copy has another one
        self.ttl_ms = max(1, int(ttl * 1000))
        self.heartbeat = heartbeat
        self.slots: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lock(self) -> bool:
        return bool(self.r.eval(_LOCK, len(self.keys), *self.keys, self.token, self.ttl_ms))

    def take_slots(self, limit: int) -> bool:
        """Every host's slots, or none."""
        for host, n in sorted(self.hosts.items()):
            if self.r.eval(_SEM, 1, host_key(host), self.token, n, limit, self.ttl_ms):
                self.slots.append(host)
            else:
                self.give_slots()
                return False
        return True

    def give_slots(self) -> None:
        for host in self.slots:
            n = self.hosts[host]
            self.r.zrem(host_key(host), *[f"{self.token}#{i}" for i in range(1, n + 1)])
        self.slots = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="fleet-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.r.eval(_EXTEND, len(self.keys), *self.keys, self.token, self.ttl_ms)
                for host in self.slots:
                    self.r.eval(_SEM_EXTEND, 1, host_key(host), self.token, self.hosts[host], self.ttl_ms)
            except Exception:  # Redis away for a while: try again at the next beat
                log.debug("heartbeat failed", exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for _ in range(30):  # Redis may be restarting: the locks expire anyway, but try
            try:
                self.give_slots()
                self.r.eval(_UNLOCK, len(self.keys), *self.keys, self.token)
                return
            except Exception:  # noqa: BLE001
                time.sleep(1)


# -- progress ------------------------------------------------------------------------------------

def jobs_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:jobs"


RUNS_KEY = f"{PREFIX}:runs"


def done_key(task_id: str) -> str:
    return f"{PREFIX}:done:{task_id}"


class Status:
    """One job's line in its run's progress hash: state, messages, bytes, attempt, worker,
    updated (epoch seconds). Written at most twice a second while the job moves mail; a failed
    write is skipped (the next one will do)."""

    def __init__(self, r, run_id: str, job: dict, worker: str, attempt: int = 0) -> None:
        self.r, self.run_id, self.job, self.worker = r, run_id, job, worker
        self.messages = self.bytes = 0
        self.attempt = attempt
        self.last = 0.0
        self.lock = threading.Lock()

    def write(self, state: str, **more) -> None:
        if not self.run_id:
            return
        row = {"line": self.job.get("line"), "account": self.job.get("account_name") or self.job.get("account"),
               "command": self.job.get("command"), "destination": self.job.get("destination_name"),
               "state": state, "messages": self.messages, "bytes": self.bytes, "attempt": self.attempt,
               "worker": self.worker, "updated": round(time.time(), 3), **more}
        try:
            self.r.hset(jobs_key(self.run_id), str(row["line"]), json.dumps(row))
        except Exception:  # the next write will do
            log.debug("progress write failed", exc_info=True)

    def __call__(self, event: str, data: dict) -> None:
        """work.run_job's progress events (from the commands' folder threads)."""
        with self.lock:
            if event == "message":
                self.messages += 1
                self.bytes += data.get("bytes", 0)
            elif event == "retry":
                self.write(f"retrying ({data.get('cause')}) in {data.get('wait')} s")
                return
            else:
                return
            if time.monotonic() - self.last >= 0.5:
                self.last = time.monotonic()
                self.write("running")


def worker_name() -> str:
    """hostname:pid of the Celery worker (its main process, not the pool process)."""
    return os.environ.get("MAILSYNC_FLEET_WORKER") or f"{socket.gethostname()}:{os.getpid()}"


# -- the task ------------------------------------------------------------------------------------

def _plan(config_path: str, job: dict) -> tuple[list[str], dict[str, int]]:
    """The job's lock keys and connections by host, from the config on this worker."""
    from mailsync import config as config_mod
    from mailsync.fleet.jobs import Job, accounts_of
    from mailsync.fleet.run import keys_of
    cfg = config_mod.load(config_path)
    j = Job.from_dict(job)
    acc, dst = accounts_of(cfg, j)
    hosts: dict[str, int] = {}
    for a in (acc, dst):
        if a is not None:
            hosts[a.host.lower()] = hosts.get(a.host.lower(), 0) + a.connections
    return lock_keys(keys_of(cfg, j)), hosts


def _prepare(self, r, tid: str, path: str, job: dict, me: str, run_id: str, max_per_host: int):
    """Before the job runs: its stored result if a copy already ran (a dict); else its locks and
    host slots taken (a started Held, or None for a job without any); or raises Retry."""
    s = SETTINGS
    stored = r.get(done_key(tid))
    if stored is not None:  # a copy of a job that already ran (redelivered or resent): its result
        return json.loads(stored)
    status = Status(r, run_id, job, me)
    try:
        keys, hosts = _plan(path, job)
    except ConfigError:
        keys, hosts = [], {}  # run_job reports the config problem itself
    held = None
    if keys:
        held = Held(r, keys, {h: min(n, max_per_host) for h, n in hosts.items()} if max_per_host else {},
                    s.lock_ttl, s.heartbeat)
        if not held.lock():
            status.write("waiting (the account is busy: another copy of this job runs)")
            raise self.retry(countdown=s.retry_countdown)
        if held.hosts:
            deadline = time.monotonic() + s.host_wait
            while not held.take_slots(max_per_host):
                if time.monotonic() >= deadline:
                    held.release()
                    status.write(f"waiting (host connection limit {max_per_host})")
                    raise self.retry(countdown=1)
                time.sleep(0.2)
        held.start()
    return held


def _run_task(self, config_path: str, job: dict, retries: int = 3, login_only: bool = False, run_id: str = "",
              max_per_host: int = 0, max_bytes_per_host: int = 0) -> dict:
    from mailsync import ratelimit
    from mailsync.fleet.work import failed_result, run_job
    s = SETTINGS
    r = client(self.app.conf.broker_url)
    tid = self.request.id
    path = s.config or config_path
    me = worker_name()
    _, redis = _imports()
    deadline = time.monotonic() + s.redis_wait
    while True:  # Redis away (restarting): wait for it here rather than fail the job
        try:
            held = _prepare(self, r, tid, path, job, me, run_id, max_per_host)
            break
        except redis.ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)
    if isinstance(held, dict):  # a copy of a job that already ran
        return held
    status = Status(r, run_id, job, me)
    try:
        try:
            status.attempt = int(r.hincrby(f"{PREFIX}:run:{run_id}:attempts", str(job.get("line")), 1))
        except Exception:  # noqa: BLE001 - Redis away a moment: the count is only for `fleet status`
            status.attempt = 1
        status.write("running")
        # a pool process runs one job at a time: the per-host byte rate is installed for this job
        prev = ratelimit.install(rate_factory(r, max_bytes_per_host) if max_bytes_per_host else None)
        try:
            result = run_job(path, job, retries=retries, login_only=login_only, progress=status)
        except Exception as exc:  # noqa: BLE001 - the soft time limit, or a bug: reported, not raised
            result = failed_result(job, f"{type(exc).__name__}: {exc}")
        finally:
            ratelimit.install(prev)
    finally:
        if held is not None:
            held.release()
    result["worker"] = me
    try:
        r.set(done_key(tid), json.dumps(result), ex=s.result_expires)
    except Exception:  # Celery stores the result itself (and retries)
        log.debug("could not store the done marker", exc_info=True)
    status.messages, status.bytes = result["messages"], result["bytes"]
    status.write(result["outcome"], error=result["error"], seconds=result["seconds"])
    return result


# -- the worker command --------------------------------------------------------------------------

def worker(broker: str, *, concurrency: int, settings: Settings, loglevel: str = "WARNING",
           name: str | None = None) -> None:
    """`mailsync fleet worker`: a Celery worker (prefork pool of `concurrency` processes) that runs
    fleet jobs until stopped (Ctrl-C / SIGTERM: it ends the running jobs first)."""
    _, redis = _imports()
    try:
        redis.Redis.from_url(broker, socket_connect_timeout=5, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise ConnectError(f"cannot reach the broker at {safe_url(broker)}: {exc}") from None
    global SETTINGS
    SETTINGS = settings
    os.environ["MAILSYNC_FLEET_WORKER"] = f"{socket.gethostname()}:{os.getpid()}"
    app = make_app(broker, settings)
    argv = ["worker", f"--concurrency={concurrency}", "--pool=prefork", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--hostname={name or 'mailsync'}-{os.getpid()}@%h"]
    app.worker_main(argv)
