"""`python -m mailsync` and the `mailsync` command. A Ctrl-C while Python imports the command
line (before mailsync.cli can handle it) ends with the same one line and exit 130, not a
traceback."""

import os
import sys


def run() -> None:
    try:
        from mailsync.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("mailsync: interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    main()


if __name__ == "__main__":
    run()
