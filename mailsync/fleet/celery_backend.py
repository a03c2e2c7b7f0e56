"""The Celery backend of `mailsync fleet run --broker URL` (the coordinator's side), and `fleet
status`. Each job is sent as one Celery task (celery_app.TASK); results are read straight from the
Redis result backend (one MGET for every job in flight). Redis away: a warning, then waiting up to
`broker_wait` seconds; Redis restarted empty (its data lost): the jobs in flight without a result
are sent again (after `resend_delay`, so that a copy still running keeps its account lock); each
job is idempotent, and a copy of a job that already ran returns its stored result.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Hashable

from mailsync.errors import ConnectError
from mailsync.fleet import celery_app as ca
from mailsync.fleet.backend import Backend
from mailsync.fleet.work import failed_result


def _errors():
    import kombu.exceptions
    import redis
    return (redis.RedisError, kombu.exceptions.OperationalError, OSError)


class CeleryBackend(Backend):
    def __init__(self, broker: str, config_path: str, *, capacity: int, retries: int = 3, login_only: bool = False,
                 max_per_host: int = 10, max_bytes_per_host: int = 0, broker_wait: float = 120.0, resend_delay: float = 30.0,
                 warn: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        _, redis = ca._imports()
        self.broker, self.config_path, self.capacity = broker, str(config_path), max(1, capacity)
        self.retries, self.login_only, self.max_per_host = retries, login_only, max_per_host
        self.max_bytes_per_host = max_bytes_per_host
        self.broker_wait, self.resend_delay, self.warn = broker_wait, resend_delay, warn
        self.r = redis.Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=3)
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise ConnectError(f"cannot reach the broker at {ca.safe_url(broker)}: {exc}",
                               hint="is redis-server running there? (see docs/fleet.md)") from None
        self.app = ca.make_app(broker)
        self.task = self.app.tasks[ca.TASK]
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.marker = f"{ca.PREFIX}:run:{self.run_id}:marker"
        self._mark()
        self.inflight: dict[str, dict] = {}
        self.unsent: dict[str, float] = {}   # task id -> when to send (again)
        self.down_since: float | None = None
        self.failed: list[tuple[str, dict]] = []
        self.last_bytes = 0
        self.last_check = 0.0

    def _mark(self) -> None:
        pipe = self.r.pipeline()
        pipe.set(self.marker, "1", ex=ca.STATUS_TTL)
        pipe.zadd(ca.RUNS_KEY, {self.run_id: time.time()})
        pipe.execute()

    def _queued(self, job: dict) -> None:
        row = {"line": job.get("line"), "account": job.get("account_name"), "command": job.get("command"),
               "destination": job.get("destination_name"), "state": "queued", "messages": 0, "bytes": 0,
               "attempt": 0, "worker": "", "updated": round(time.time(), 3)}
        self.r.hset(ca.jobs_key(self.run_id), str(job.get("line")), json.dumps(row))
        self.r.expire(ca.jobs_key(self.run_id), ca.STATUS_TTL)

    def _send(self, tid: str, job: dict, countdown: float | None = None) -> None:
        self._queued(job)
        kw = {"retries": self.retries, "login_only": self.login_only, "run_id": self.run_id,
              "max_per_host": self.max_per_host}
        if self.max_bytes_per_host:  # only when given: workers of an older version take these jobs too
            kw["max_bytes_per_host"] = self.max_bytes_per_host
        self.task.apply_async((self.config_path, job), kw, task_id=tid, countdown=countdown, retry=False)

    def submit(self, job: dict) -> str:
        tid = f"{self.run_id}-{job.get('line')}-{uuid.uuid4().hex[:8]}"
        self.inflight[tid] = job
        try:
            self._send(tid, job)
        except _errors() as exc:
            self._lost(exc)
            self.unsent[tid] = 0.0
        return tid

    def _lost(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.warn(f"mailsync: warning: lost the broker at {ca.safe_url(self.broker)} "
                      f"({' '.join(str(exc).split())[:200]}); waiting up to {self.broker_wait:.0f} s for it")

    def _poll(self) -> list[tuple[Hashable, dict]]:
        out: list[tuple[Hashable, dict]] = []
        now = time.monotonic()
        try:
            if now - self.last_check >= 1.0 or self.down_since is not None:
                self.last_check = now
                if not self.r.exists(self.marker):  # Redis came back without its data: send again
                    self._mark()
                    if self.inflight:
                        self.warn(f"mailsync: warning: the broker at {ca.safe_url(self.broker)} lost its data "
                                  f"(restarted?); sending the unfinished jobs again in {self.resend_delay:.0f} s")
                    for tid in self.inflight:
                        self.unsent.setdefault(tid, now + self.resend_delay)
            for tid, when in list(self.unsent.items()):
                if when <= now:
                    if not self._declared():
                        break
                    self._send(tid, self.inflight[tid], countdown=None)
                    del self.unsent[tid]
            tids = list(self.inflight)
            metas = self.r.mget([f"celery-task-meta-{t}" for t in tids]) if tids else []
            if self.down_since is not None:
                self.warn(f"mailsync: the broker is back after {now - self.down_since:.0f} s")
                self.down_since = None
        except _errors() as exc:
            self._lost(exc)
            if time.monotonic() - self.down_since > self.broker_wait:
                why = (f"the broker at {ca.safe_url(self.broker)} was unreachable for {self.broker_wait:.0f} s; "
                       "the job may still have run: run the jobs file again (nothing is copied twice)")
                out = [(tid, failed_result(job, why, exit_code=ConnectError.exit_code, outcome="broker"))
                       for tid, job in self.inflight.items()]
                self.inflight.clear()
                self.unsent.clear()
            return out
        for tid, meta in zip(tids, metas):
            if meta is None:
                continue
            m = json.loads(meta)
            if m.get("status") == "SUCCESS":
                out.append((tid, m["result"]))
            elif m.get("status") == "FAILURE":
                res = m.get("result") or {}
                why = f"{res.get('exc_type', 'error')}: {res.get('exc_message', '')}"
                out.append((tid, failed_result(self.inflight[tid], f"internal error on the worker: {why}")))
            else:
                continue
            del self.inflight[tid]
            self.unsent.pop(tid, None)
        return out

    def _declared(self) -> bool:
        """The task queue and its binding exist in Redis (after a restart a worker may not have
        declared them again yet; a message sent before would go nowhere)."""
        try:
            with self.app.connection_for_write() as conn:
                q = self.app.amqp.queues[self.app.conf.task_default_queue]
                q.bind(conn.default_channel).declare()
            return True
        except _errors():
            return False

    def results(self, timeout: float | None = None) -> list[tuple[Hashable, dict]]:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            out = self._poll()
            if out or not self.inflight or time.monotonic() >= deadline:
                return out
            time.sleep(0.2)

    def bytes_moved(self) -> int:
        """Bytes the workers reported (the progress hash) since the last call."""
        try:
            rows = self.r.hvals(ca.jobs_key(self.run_id))
        except _errors():
            return 0
        total = sum(json.loads(v).get("bytes", 0) for v in rows)
        n, self.last_bytes = max(0, total - self.last_bytes), max(total, self.last_bytes)
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.r.close()


def status(broker: str, run_id: str | None = None) -> tuple[str, list[dict]]:
    """The progress rows of a run (default: the latest), in jobs-file order."""
    _, redis = ca._imports()
    r = redis.Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=3)
    try:
        if run_id is None:
            last = r.zrevrange(ca.RUNS_KEY, 0, 0)
            if not last:
                return "", []
            run_id = last[0].decode()
        rows = [json.loads(v) for v in r.hvals(ca.jobs_key(run_id))]
    except redis.RedisError as exc:
        raise ConnectError(f"cannot reach the broker at {ca.safe_url(broker)}: {exc}") from None
    return run_id, sorted(rows, key=lambda row: row.get("line") or 0)


def status_line(row: dict, now: float | None = None) -> str:
    from mailsync.model import human_size
    age = (now or time.time()) - (row.get("updated") or 0)
    dst = f" -> {row['destination']}" if row.get("destination") else ""
    parts = [row.get("state", "?"), f"{row.get('messages', 0)} messages ({human_size(row.get('bytes', 0))})"]
    if row.get("attempt"):
        parts.append(f"attempt {row['attempt']}")
    if row.get("worker"):
        parts.append(f"worker {row['worker']}")
    parts.append(f"updated {age:.0f} s ago")
    return f"line {row.get('line')}: {row.get('command')} {row.get('account')}{dst}: " + ", ".join(parts) + \
        (f": {row['error']}" if row.get("error") else "")
