"""`mailsync fleet`: many jobs (backup, sync, migrate, verify) from one jobs file (docs/fleet.md).

- jobs.py: the jobs file, read and checked as a whole before anything runs -> Job (a plain dict
  on the wire, no secrets);
- work.py: run_job(), one job in this process, retried by cause (next_wait);
- backend.py: the Backend seam, the local process-pool backend;
- run.py: the scheduler (one job per account at a time), the progress, the report;
- celery_app.py, celery_backend.py: the Celery / Redis backend (the optional extra `fleet`):
  the worker's task with its Redis account lock and per-host connection slots, and the
  coordinator's side; only `fleet run --broker`, `fleet worker` and `fleet status` import them.

Only `mailsync fleet ...` imports this package; the other commands never do.
"""
