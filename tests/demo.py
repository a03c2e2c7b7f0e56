"""`make demo`: a throwaway local Dovecot filled with sample mail, and a real `mailsync sync` of it.

Idempotent: the server's mail is kept in .demo/ between runs, so a second run shows an
incremental sync. `make clean` removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import corpus
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    server = Dovecot(DEMO / "server", users={"demo": "demo-password"})
    server.stop()  # a server left over by an interrupted demo
    fresh = not server.maildir("demo").exists()
    server.start()
    try:
        if fresh:
            print("Filling the demo server with sample mail...")
            for i, folder in enumerate(corpus.FOLDERS):
                server.seed("demo", folder, [corpus.ordinary(n, 1500 + 97 * n, tag=f"f{i}m")
                                             for n in range(60)], start=i * 1000)
                server.seed("demo", folder, [corpus.ordinary(n, 800, tag=f"f{i}s") for n in range(20)],
                            flags="S", start=i * 1000 + 100)
            server.seed("demo", "INBOX", corpus.MALFORMED, start=9000)
            server.seed("demo", "INBOX", [corpus.with_attachment(n, 300) for n in range(5)], flags="FS",
                        start=9100)
        pw_file = DEMO / "password"
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, b"demo-password\n")
        os.close(fd)
        config = DEMO / "config.toml"
        config.write_text(f"""# written by `make demo`
[accounts.demo]
host = "127.0.0.1"
port = {server.imaps_port}
username = "demo"
password_command = ["cat", "{pw_file}"]
ca_file = "{server.ca_file}"
maildir = "{DEMO / 'Mail'}"
folders = ["*", "!Trash"]
""")
        cmd = [sys.executable, "-m", "mailsync", "--config", str(config), "sync", "demo"]
        print(f"$ mailsync --config {config.relative_to(ROOT)} sync demo")
        r = subprocess.run(cmd, cwd=ROOT)
        if r.returncode != 0:
            return r.returncode
        print(f"\nThe backup is in {DEMO / 'Mail'} (a Maildir: try `mutt -f {DEMO / 'Mail'}`).")
        print("Run `make demo` again for an incremental run (nothing new to fetch).")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
