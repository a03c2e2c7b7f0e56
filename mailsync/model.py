"""Flags, Maildir info strings and the per-message records the planner works on."""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

# IMAP system flag <-> Maildir info letter. One table, both directions.
FLAG_LETTERS: dict[str, str] = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS: dict[str, str] = {v: k for k, v in FLAG_LETTERS.items()}
_CANON = {k.lower(): k for k in FLAG_LETTERS}


def human_size(n: float) -> str:
    """Bytes for people: 512 B, 3.4 KB, 1.2 MB (the summaries and reports)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def normalise_flags(raw) -> tuple[frozenset[str], frozenset[str]]:
    """Split server flags into (system flags we map, keywords). \\Recent is the server's: dropped.
    A folder has few distinct flag sets: each is split once and its frozensets shared."""
    try:
        return _normalised(tuple(raw))
    except TypeError:  # unhashable items: not from a server reply
        return _normalise(raw)


@functools.lru_cache(maxsize=4096)
def _normalised(raw: tuple) -> tuple[frozenset[str], frozenset[str]]:
    return _normalise(raw)


def _normalise(raw) -> tuple[frozenset[str], frozenset[str]]:
    system: set[str] = set()
    keywords: set[str] = set()
    for f in raw:
        if isinstance(f, bytes):
            f = f.decode("utf-8", "replace")
        low = f.lower()
        if low in _CANON:
            system.add(_CANON[low])
        elif low == "\\recent" or f.startswith("\\"):
            continue  # \Recent and unknown system flags are not ours to keep
        else:
            keywords.add(f)
    return frozenset(system), frozenset(keywords)


def split_flags(flags) -> tuple[frozenset[str], frozenset[str]]:
    """One set of IMAP flags and keywords -> (system flags we map, keywords)."""
    system = frozenset(f for f in flags if f in FLAG_LETTERS)
    return system, frozenset(flags) - system


def info_letters(flags: frozenset[str], extra: str = "") -> str:
    """Maildir info letters for flags, in ASCII order, keeping letters we do not know (extra)."""
    letters = {FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS}
    letters.update(c for c in extra if c not in LETTER_FLAGS and c.isprintable() and c not in ",:/")
    return "".join(sorted(letters))


def flags_from_letters(letters: str) -> frozenset[str]:
    return frozenset(LETTER_FLAGS[c] for c in letters if c in LETTER_FLAGS)


def split_name(name: str) -> tuple[str, str | None]:
    """A Maildir file name -> (unique key, info letters or None). Never looks inside the key."""
    key, sep, info = name.partition(":2,")
    if not sep:
        # some tools on file systems without ':' use '!2,' or ';2,'
        for alt in ("!2,", ";2,"):
            key, sep, info = name.partition(alt)
            if sep:
                break
        else:
            return name, None
    return key, info


def join_name(key: str, letters: str) -> str:
    return f"{key}:2,{letters}"


def encode_flags(flags: frozenset[str]) -> str:
    return " ".join(sorted(flags))


def decode_flags(text: str | None) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


@dataclass(frozen=True, slots=True)
class Record:
    """What the state knows of one message of a folder."""

    uid: int
    key: str
    flags: frozenset[str]
    keywords: frozenset[str] = frozenset()
    size: int = 0
    sha256: str = ""
    message_id: str = ""
    on_server: bool = True


@dataclass(frozen=True)
class ServerView:
    """What a folder's gather step saw on the server.

    flags: UID -> (system flags, keywords) for messages whose flags we read this run (all of
      them, or only those changed since the last HIGHESTMODSEQ).
    new: UID -> size of messages not known to the state.
    present: every UID on the server, or None when the gather proved nothing was expunged.
    """

    flags: dict[int, tuple[frozenset[str], frozenset[str]]]
    new: dict[int, int]
    present: frozenset[int] | None


@dataclass(frozen=True)
class BackupPlan:
    fetch: tuple[int, ...] = ()            # new on the server
    refetch: tuple[int, ...] = ()          # known, but its file is gone from disk
    set_flags: tuple[tuple[int, frozenset[str], frozenset[str]], ...] = ()
    gone: tuple[int, ...] = ()             # expunged on the server: keep the file, mark state
    back: tuple[int, ...] = ()             # marked gone before, seen on the server again

    @property
    def empty(self) -> bool:
        return not (self.fetch or self.refetch or self.set_flags or self.gone or self.back)


class Outcome(enum.Enum):
    """How one folder of a run ended. Every outcome but OK and SKIPPED is a failure, and comes
    with the folder's error message (FolderResult.error)."""

    OK = "ok"                    # done (possibly with notices or conflicts)
    SKIPPED = "skipped"          # unchanged on both sides, nothing to do (or not ours to create)
    LOST = "lost"                # the connection was lost, `retries` times in a row (ConnectionLost)
    REFUSED = "refused"          # the server refused a command or sent what we cannot read (ServerError)
    GUARDED = "guarded"          # the deletion guard stopped it; nothing was changed (SafetyAbort)
    FAILED = "failed"            # anything else: a name collision, a local error, a storage error...
    INTERRUPTED = "interrupted"  # Ctrl-C, or stopped after another folder's storage error

    @property
    def failed(self) -> bool:
        return self not in (Outcome.OK, Outcome.SKIPPED)


@dataclass
class FolderResult:
    """What a run did in one folder: its outcome and counters (engine.RunResult holds them all)."""

    name: str
    new: int = 0
    refetched: int = 0
    flags_changed: int = 0
    gone: int = 0
    rebound: int = 0
    renumbered: int = 0       # of rebound: mail we held under an old UID, bound to its new one
    bytes: int = 0
    seconds: float = 0.0
    skipped_too_big: int = 0  # POP3 and backup: larger than max_message_size, not downloaded
    notices: list[str] = field(default_factory=list)
    error: str = ""           # set with a failed outcome (fail()), empty otherwise
    outcome: Outcome = Outcome.OK
    # two-way sync
    uploaded: int = 0
    flags_pushed: int = 0
    deleted_local: int = 0
    deleted_remote: int = 0
    conflicts: list[str] = field(default_factory=list)
    plan: object = None

    def __post_init__(self) -> None:
        if self.error and not self.outcome.failed:  # FolderResult(name=..., error=...)
            self.outcome = Outcome.FAILED

    def fail(self, outcome: Outcome, error: str) -> None:
        """Record the folder's failure: how (outcome) and the message shown for it."""
        assert outcome.failed, outcome
        self.outcome, self.error = outcome, error or outcome.value

    def succeed(self) -> None:
        """Clear a failure recorded by an earlier attempt (a retry went through)."""
        if self.outcome.failed:
            self.outcome = Outcome.OK
        self.error = ""

    @property
    def failed(self) -> bool:
        return self.outcome.failed

    @property
    def skipped(self) -> bool:
        """Nothing to do in this folder (`skipped_unchanged` in --json)."""
        return self.outcome is Outcome.SKIPPED

    @skipped.setter
    def skipped(self, value: bool) -> None:
        if value:
            self.outcome = Outcome.SKIPPED
        elif self.outcome is Outcome.SKIPPED:
            self.outcome = Outcome.OK

    @property
    def gone_from_server(self) -> int:
        """Expunged on the server, not counting messages the server only gave new UIDs."""
        return max(0, self.gone - self.renumbered)


@dataclass(frozen=True)
class SyncPlan:
    """Two-way plan for one folder. UIDs are the server's; keys name local files."""

    fetch: tuple[int, ...] = ()                # new on the server -> download
    upload: tuple[str, ...] = ()               # new in the Maildir -> APPEND
    push: tuple[tuple[int, frozenset[str], frozenset[str]], ...] = ()   # (uid, add, remove) on the server
    pull: tuple[tuple[int, frozenset[str]], ...] = ()                   # (uid, flags) -> rename the file
    record: tuple[tuple[int, frozenset[str], frozenset[str]], ...] = ()  # (uid, flags, keywords) new base
    delete_local: tuple[int, ...] = ()         # expunged on the server -> remove the file
    delete_remote: tuple[int, ...] = ()        # file removed locally -> \Deleted + UID EXPUNGE
    forget: tuple[int, ...] = ()               # gone on both sides -> drop from state
    refetch: tuple[int, ...] = ()              # removed locally but changed on the server: keep it
    reupload: tuple[int, ...] = ()             # expunged on the server but changed locally: keep it
    pair: tuple[tuple[int, str], ...] = ()     # (uid, key) new on both sides, the same message: bind
    conflicts: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any((self.fetch, self.upload, self.push, self.pull, self.record, self.delete_local,
                        self.delete_remote, self.forget, self.refetch, self.reupload, self.pair))

    @property
    def deletions(self) -> int:
        return len(self.delete_local) + len(self.delete_remote)
