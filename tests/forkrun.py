"""Run the mailsync command many times, fast: a server process imports mailsync once, then forks
one child per run, which runs what `python -m mailsync ARGS` runs (`mailsync.cli.main()`), with
the given environment, working directory and argv, in a process of its own. A run so started
can exit anywhere (`os._exit` at a crash point) or be killed with SIGKILL like any other; only
the interpreter start-up and the imports (about 0.4 s a run) are saved.

Set MAILSYNC_TEST_SUBPROCESS=1 to start every run as `python -m mailsync` instead.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import ROOT

_SERVER = r"""
import importlib, json, os, sys, traceback
import mailsync, mailsync.cli, mailsync.crashpoint
for name in ("check", "compare", "config", "engine", "folderjob", "imap", "maildir", "pop3", "secrets",
             "state", "transfer", "verify"):
    importlib.import_module("mailsync." + name)
out = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    fds = [os.open(req[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) for k in ("stdout", "stderr")]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            importlib.reload(mailsync.crashpoint)  # it reads MAILSYNC_CRASH_AT when imported
            sys.argv = ["mailsync", *req["args"]]
            try:
                mailsync.cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    for fd in fds:
        os.close(fd)
    out.write(json.dumps({"pid": pid}) + "\n")
    out.flush()
    _, status = os.waitpid(pid, 0)
    out.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
    out.flush()
"""


class ForkServer:
    def __init__(self) -> None:
        env = dict(os.environ)
        env.pop("MAILSYNC_CRASH_AT", None)
        self.p = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  cwd=ROOT, env=env)
        self.buf = b""
        self.dir = Path(tempfile.mkdtemp(prefix="mailsync-forkrun-"))
        self.n = 0

    def _line(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (exit {self.p.wait()})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def start(self, args: list[str], env: dict, cwd: Path = ROOT) -> "Forked":
        self.n += 1
        out, err = self.dir / f"{self.n}.out", self.dir / f"{self.n}.err"
        req = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()
        got = self._line(30)
        if got is None:
            raise RuntimeError("the fork server did not start a run")
        return Forked(self, got["pid"], out, err)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)
        self.p.stdout.close()
        for f in self.dir.iterdir():
            f.unlink()
        self.dir.rmdir()


class Forked:
    """A run started by ForkServer, with the subprocess.Popen calls the tests use."""

    def __init__(self, server: ForkServer, pid: int, out: Path, err: Path) -> None:
        self.server, self.pid, self._out, self._err = server, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            got = self.server._line(0)
            if got is not None:
                self.returncode = got["status"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            got = self.server._line(timeout)
            if got is None:
                raise subprocess.TimeoutExpired(f"mailsync (pid {self.pid})", timeout)
            self.returncode = got["status"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid that may have been reused
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")


class _Popen:
    """The same calls on a real `python -m mailsync` process (MAILSYNC_TEST_SUBPROCESS=1)."""

    def __init__(self, args: list[str], env: dict, cwd: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "mailsync", *args], env=env, cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.p.pid
        self._out = self._err = ""

    @property
    def returncode(self):
        return self.p.returncode

    def poll(self):
        return self.p.poll()

    def wait(self, timeout=None):
        try:
            self._out, self._err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise
        return self.p.returncode

    def send_signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self):
        return self._out

    @property
    def stderr(self):
        return self._err


class Launcher:
    """start(args, env) -> a run; one fork server per thread that asks (each serves one run at a time)."""

    def __init__(self) -> None:
        import threading
        self.fork = os.environ.get("MAILSYNC_TEST_SUBPROCESS") != "1"
        self._local = threading.local()
        self._servers: list[ForkServer] = []

    def start(self, args: list[str], env: dict, cwd: Path = ROOT):
        if not self.fork:
            return _Popen(args, env, cwd)
        server = getattr(self._local, "server", None)
        if server is None:
            server = self._local.server = ForkServer()
            self._servers.append(server)
        return server.start(args, env, cwd)

    def run(self, args: list[str], env: dict, timeout: float = 120):
        p = self.start(args, env)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        return p

    def close(self) -> None:
        for s in self._servers:
            s.close()
        self._servers.clear()

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
