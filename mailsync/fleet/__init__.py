"""`mailsync fleet`: many jobs (backup, sync, migrate, verify) from one jobs file (docs/fleet.md).

- jobs.py: the jobs file, read and checked as a whole before anything runs -> Job (a plain dict
  on the wire, no secrets);
- work.py: run_job(), one job in this process, retried by cause (next_wait);
- local.py: the Backend seam, the local process-pool backend, the scheduler (one job per account
  at a time), the report.

Only `mailsync fleet ...` imports this package; the other commands never do.
"""
