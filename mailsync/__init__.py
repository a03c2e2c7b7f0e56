"""mailsync: keep a local Maildir in step with IMAP and POP3 servers."""

__version__ = "0.1.0"
