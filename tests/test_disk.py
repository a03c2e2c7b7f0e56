"""Disk full: a clear error, nothing half-written, and the run after space is freed completes.
A real ENOSPC from a small tmpfs in a private mount namespace (unshare -Urm), so no root needed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, msg

CHECK = textwrap.dedent("""
    import hashlib, os, sys
    root = sys.argv[1]
    files = []
    for d, _, fs in os.walk(root):
        if os.path.basename(d) in ("cur", "new"):
            files += [open(os.path.join(d, f), "rb").read() for f in fs]
    tmp = sum(len(fs) for d, _, fs in os.walk(root) if os.path.basename(d) == "tmp")
    print(len(files), len({hashlib.sha256(b).hexdigest() for b in files}), tmp,
          ",".join(sorted(hashlib.sha256(b).hexdigest()[:12] for b in files)))
""")


def test_disk_full_then_space_freed(user, tmp_path):
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed for the disk-full test")
    msgs = [msg(i, body="d" * 40_000) for i in range(40)]  # about 1.6 MB
    user.server.seed(user.name, "INBOX", msgs)
    mnt = tmp_path / "small"
    mnt.mkdir()
    user.write_config("batch_bytes = 65536", maildir=mnt / "Mail")
    (tmp_path / "check.py").write_text(CHECK)
    cmd = [sys.executable, "-m", "mailsync", "--config", str(user.config), "sync", "test"]
    script = f"""
        mount -t tmpfs -o size=600k tmpfs {mnt} || exit 99
        {" ".join(cmd)}; echo "rc1=$?"
        {sys.executable} {tmp_path / "check.py"} {mnt / "Mail"}
        mount -o remount,size=20m {mnt}
        {" ".join(cmd)}; echo "rc2=$?"
        {sys.executable} {tmp_path / "check.py"} {mnt / "Mail"}
    """
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True,
                       env=user.env(), cwd=ROOT, timeout=120)
    assert "rc1=" in r.stdout, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    rc1 = int(next(line for line in lines if line.startswith("rc1=")).split("=")[1])
    rc2 = int(next(line for line in lines if line.startswith("rc2=")).split("=")[1])
    first, second = [line.split() for line in lines if line and line[0].isdigit()][:2]
    assert rc1 == 8, r.stdout + r.stderr
    assert ("No space left" in r.stderr or "disk is full" in r.stderr) and "free" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("mailsync: error") == 1
    # nothing half-written: every visible file is a complete message, none twice, tmp/ clean
    want = {hashlib.sha256(m).hexdigest()[:12] for m in msgs}
    n1, distinct1 = int(first[0]), int(first[1])
    assert n1 == distinct1 < 40  # (tmp/ leftovers are cleaned by the next run, checked below)
    assert n1 == 0 or set(first[3].split(",")) <= want
    assert rc2 == 0
    assert int(second[0]) == int(second[1]) == 40 and set(second[3].split(",")) == want
    assert int(second[2]) == 0
