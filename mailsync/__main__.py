"""`python -m mailsync` and the `mailsync` command (mailsync.command). A Ctrl-C while Python
imports the command line (before it can handle one) ends with the same one line and exit 130, not a
traceback."""

import os
import sys

try:
    from mailsync.command import run
except KeyboardInterrupt:
    sys.stderr.write("mailsync: interrupted\n")
    sys.stderr.flush()
    os._exit(130)

if __name__ == "__main__":
    run()
