"""Model-based tests of the two-way planner (mailsync.plan.plan_sync): no server, no disk.

A hypothesis state machine keeps two in-memory stores, a "server" (uid -> content, system flags,
keywords) and a "Maildir" (key -> content, system flags | keywords: the file's info letters, keywords
mapped through dovecot-keywords), plus the sync state (base: uid -> Record) that only ever changes by
applying plans. System flags and keywords sync alike, both ways, merged on their union against
base.flags | base.keywords. Random edits on both sides are interleaved with syncs; after every sync
that is applied, both sides must agree, no message may be lost, per-flag (and per-keyword) changes on
the two sides must both survive and a second sync must have nothing to do.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mailsync.model import Record, SyncPlan
from mailsync.plan import CONFLICT_POLICIES, deletion_guard, merge_flags, plan_sync

SYSTEM = ("\\Seen", "\\Answered", "\\Flagged", "\\Draft", "\\Deleted")
KEYWORDS = ("$Label1", "$Junk", "$Forwarded")
ALL = SYSTEM + KEYWORDS
F = frozenset
EMPTY: frozenset[str] = frozenset()

system_flags = st.frozensets(st.sampled_from(SYSTEM))
any_flags = st.frozensets(st.sampled_from(ALL))   # system flags and keywords, as a file carries them


def split(flags: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The model's own split of a union set into (system flags, keywords)."""
    return F(f for f in flags if f in SYSTEM), F(f for f in flags if f not in SYSTEM)


# --------------------------------------------------------------------------------------------
# applying a plan to the in-memory stores


class Ids:
    """UIDs and local keys are never reused."""

    def __init__(self) -> None:
        self._uids = itertools.count(1)
        self._keys = itertools.count(1)

    def uid(self) -> int:
        return next(self._uids)

    def key(self) -> str:
        return f"k{next(self._keys)}"


def check_plan_shape(plan: SyncPlan, base: dict[int, Record]) -> None:
    """Every base UID is handled in at most one way; flag work only for messages on both sides."""
    groups = {
        "delete_local": plan.delete_local, "delete_remote": plan.delete_remote, "forget": plan.forget,
        "refetch": plan.refetch, "reupload": plan.reupload,
    }
    seen: dict[int, str] = {}
    for name, uids in groups.items():
        assert len(set(uids)) == len(uids), f"{name} lists a UID twice: {uids}"
        for uid in uids:
            assert uid in base, f"{name} names UID {uid}, not in base"
            assert uid not in seen, f"UID {uid} both in {seen[uid]} and {name}"
            seen[uid] = name
    for name, uids in (("push", [p[0] for p in plan.push]), ("pull", [p[0] for p in plan.pull]),
                       ("record", [r[0] for r in plan.record])):
        assert len(set(uids)) == len(uids), f"{name} lists a UID twice: {uids}"
        for uid in uids:
            assert uid in base, f"{name} names UID {uid}, not in base"
            assert uid not in seen, f"UID {uid} both in {seen[uid]} and {name}"
    for uid, add, remove in plan.push:
        assert not (add & remove), f"push for UID {uid} adds and removes {add & remove}"
        assert add or remove, f"empty push for UID {uid}"
    for uid, fl, kw in plan.record:
        assert (fl, kw) == split(fl | kw), f"record for UID {uid} splits badly: flags {sorted(fl)} keywords {sorted(kw)}"
    assert not (set(plan.fetch) & set(base)), "fetch names a known UID"


def apply_plan(plan: SyncPlan, server: dict, local: dict, base: dict, ids: Ids) -> None:
    """Do what an engine does with a plan, on the in-memory stores (mutates them)."""
    old = dict(base)
    for uid in plan.fetch:
        content, flags, kws = server[uid]
        key = ids.key()
        local[key] = (content, flags | kws)
        base[uid] = Record(uid=uid, key=key, flags=flags, keywords=kws)
    for key in plan.upload:  # APPEND with the file's flags and keywords
        content, all_ = local[key]
        uid = ids.uid()
        server[uid] = (content, *split(all_))
        base[uid] = Record(uid=uid, key=key, flags=split(all_)[0], keywords=split(all_)[1])
    for uid, add, remove in plan.push:  # STORE +FLAGS / -FLAGS, keywords included
        content, flags, kws = server[uid]
        server[uid] = (content, *split(((flags | kws) | add) - remove))
    for uid, all_ in plan.pull:  # rename the file: letters for flags and keywords
        key = old[uid].key
        content, _ = local[key]
        local[key] = (content, all_)
    for uid, flags, kws in plan.record:
        base[uid] = replace(old[uid], flags=flags, keywords=kws)
    for uid in plan.delete_local:
        del local[old[uid].key]
        del base[uid]
    for uid in plan.delete_remote:
        del server[uid]
        del base[uid]
    for uid in plan.forget:
        del base[uid]
    for uid in plan.refetch:  # local file gone, server changed: download again under a new key
        content, flags, kws = server[uid]
        key = ids.key()
        local[key] = (content, flags | kws)
        base[uid] = Record(uid=uid, key=key, flags=flags, keywords=kws)
    for uid in plan.reupload:  # expunged on the server, changed locally: APPEND the file again
        key = old[uid].key
        content, all_ = local[key]
        new = ids.uid()
        fl, kw = split(all_)
        server[new] = (content, fl, kw)
        del base[uid]
        base[new] = Record(uid=new, key=key, flags=fl, keywords=kw)


def inputs(server: dict, local: dict, base: dict, *, changed_only: set[int] | None = None,
           none_present: bool = False):
    """plan_sync's inputs as an engine gathers them.

    changed_only: pass remote flags only for these base UIDs (CONDSTORE CHANGEDSINCE); None: all.
    none_present: pass remote_present=None (only valid when nothing was expunged since the base).
    """
    remote_flags = {uid: (server[uid][1], server[uid][2]) for uid in base if uid in server
                    and (changed_only is None or uid in changed_only)}
    remote_present = None if none_present else set(server)
    remote_new = {uid for uid in server if uid not in base}
    local_flags = {key: all_ for key, (_, all_) in local.items()}  # flags and keywords of each file
    return remote_flags, remote_present, remote_new, local_flags


def run_plan(base, remote_flags, remote_present, remote_new, local_flags, policy) -> SyncPlan:
    """plan_sync, checking that it is pure (does not touch its inputs)."""
    snap = (dict(base), dict(remote_flags), None if remote_present is None else set(remote_present),
            set(remote_new), dict(local_flags))
    plan = plan_sync(base, remote_flags, remote_present, remote_new, local_flags, conflict=policy)
    assert snap == (dict(base), dict(remote_flags), None if remote_present is None else set(remote_present),
                    set(remote_new), dict(local_flags)), "plan_sync changed its inputs"
    return plan


# --------------------------------------------------------------------------------------------
# the state machine


class SyncModel(RuleBasedStateMachine):
    @initialize(start=st.lists(any_flags, max_size=4))
    def setup(self, start) -> None:
        self.ids = Ids()
        self.server: dict[int, tuple[str, frozenset[str], frozenset[str]]] = {}
        self.local: dict[str, tuple[str, frozenset[str]]] = {}   # key -> (content, flags | keywords)
        self.base: dict[int, Record] = {}
        self.contents = itertools.count(1)
        self.alive: set[str] = set()      # created and not deleted/expunged by a rule (or kept by sync)
        self.created: set[str] = set()
        self.touched: set[int] = set()    # server UIDs whose flags changed since the last applied sync
        self.expunged_since_sync = False
        for flags in start:  # a few messages already synced (through a plan, like every base record)
            content = f"m{next(self.contents)}"
            self.server[self.ids.uid()] = (content, *split(flags))
            self.created.add(content)
            self.alive.add(content)
        plan = run_plan(self.base, *inputs(self.server, self.local, self.base), "server")
        apply_plan(plan, self.server, self.local, self.base, self.ids)
        self.touched.clear()

    def synced(self) -> list[int]:
        return sorted(uid for uid, rec in self.base.items() if uid in self.server and rec.key in self.local)

    # ---- edits on the server ----

    @rule(flags=any_flags)
    def server_new(self, flags) -> None:
        content = f"m{next(self.contents)}"
        self.server[self.ids.uid()] = (content, *split(flags))
        self.created.add(content)
        self.alive.add(content)

    @precondition(lambda self: self.server)
    @rule(data=st.data(), flag=st.sampled_from(ALL), add=st.booleans())
    def server_flag(self, data, flag: str, add: bool) -> None:
        uid = data.draw(st.sampled_from(sorted(self.server)), label="uid")
        content, flags, kws = self.server[uid]
        if flag in SYSTEM:
            flags = flags | {flag} if add else flags - {flag}
        else:
            kws = kws | {flag} if add else kws - {flag}
        self.server[uid] = (content, flags, kws)
        self.touched.add(uid)

    @precondition(lambda self: self.server)
    @rule(data=st.data())
    def server_expunge(self, data) -> None:
        uid = data.draw(st.sampled_from(sorted(self.server)), label="uid")
        content = self.server.pop(uid)[0]
        self.alive.discard(content)
        self.expunged_since_sync = True

    # ---- edits in the Maildir ----

    @rule(flags=any_flags)
    def local_new(self, flags) -> None:
        content = f"m{next(self.contents)}"
        self.local[self.ids.key()] = (content, flags)
        self.created.add(content)
        self.alive.add(content)

    @precondition(lambda self: self.local)
    @rule(data=st.data(), flag=st.sampled_from(ALL), add=st.booleans())
    def local_flag(self, data, flag: str, add: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.local)), label="key")
        content, flags = self.local[key]
        self.local[key] = (content, flags | {flag} if add else flags - {flag})

    @precondition(lambda self: self.local)
    @rule(data=st.data())
    def local_delete(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.local)), label="key")
        content = self.local.pop(key)[0]
        self.alive.discard(content)

    # ---- the same message edited on both sides (composites of the rules above, made likely) ----

    @precondition(lambda self: self.synced())
    @rule(data=st.data(), flags=st.lists(st.sampled_from(ALL), min_size=2, max_size=2, unique=True))
    def both_change_flags(self, data, flags) -> None:
        uid = data.draw(st.sampled_from(self.synced()), label="uid")
        a, b = flags
        self._server_toggle(uid, a)
        key = self.base[uid].key
        content, l_fl = self.local[key]
        self.local[key] = (content, l_fl ^ {b})

    @precondition(lambda self: self.synced())
    @rule(data=st.data(), flag=st.sampled_from(ALL), server_side=st.booleans())
    def delete_one_side_change_other(self, data, flag: str, server_side: bool) -> None:
        uid = data.draw(st.sampled_from(self.synced()), label="uid")
        key = self.base[uid].key
        if server_side:  # expunged on the server, flag toggled locally
            content = self.server.pop(uid)[0]
            self.expunged_since_sync = True
            c, l_fl = self.local[key]
            self.local[key] = (c, l_fl ^ {flag})
        else:            # removed locally, flag toggled on the server
            content = self.local.pop(key)[0]
            self._server_toggle(uid, flag)
        self.alive.discard(content)

    def _server_toggle(self, uid: int, flag: str) -> None:
        content, s_fl, kws = self.server[uid]
        self.server[uid] = (content, *split((s_fl | kws) ^ {flag}))
        self.touched.add(uid)

    # ---- sync ----

    @rule(policy=st.sampled_from(CONFLICT_POLICIES), changed_only=st.booleans(), none_present=st.booleans(),
          force=st.booleans(), max_delete=st.one_of(st.none(), st.integers(0, 3)))
    def sync(self, policy: str, changed_only: bool, none_present: bool, force: bool, max_delete) -> None:
        none_present = none_present and not self.expunged_since_sync
        ins = inputs(self.server, self.local, self.base, changed_only=self.touched if changed_only else None,
                     none_present=none_present)
        plan = run_plan(self.base, *ins, policy)
        check_plan_shape(plan, self.base)
        if not force:
            why = deletion_guard(plan, len(self.base), max_delete)
            if why is not None:
                # the guard trips: nothing of this folder is applied, so nothing can be lost
                assert plan.deletions > 0, f"guard tripped without deletions: {why}"
                event("deletion guard tripped")
                return
        expected = self._expectations(policy)
        apply_plan(plan, self.server, self.local, self.base, self.ids)
        self.touched.clear()
        self.expunged_since_sync = False
        self._check_after_sync(expected, policy)

    def _expectations(self, policy: str) -> dict:
        """What must hold for each base message after the sync, from the state before it."""
        out = {}
        for uid, rec in self.base.items():
            on_srv = uid in self.server
            on_loc = rec.key in self.local
            b_all = rec.flags | rec.keywords
            if on_srv:
                s_all = self.server[uid][1] | self.server[uid][2]
            if on_srv and on_loc:
                content = self.server[uid][0]
                l_all = self.local[rec.key][1]
                sd, ld = s_all ^ b_all, l_all ^ b_all
                if sd and ld and not (sd & ld):
                    event("different flags changed on both sides")
                if set(KEYWORDS) & sd:
                    event("keyword changed on the server")
                if set(KEYWORDS) & ld:
                    event("keyword changed locally")
                # per flag and per keyword: whichever side moved it away from the base wins
                # (both sides cannot disagree)
                out[content] = ("flags", b_all ^ (sd | ld), sd, ld)
            elif on_srv:  # removed locally
                content = self.server[uid][0]
                changed = s_all != b_all
                if changed:
                    event(f"conflict: removed locally, changed on server ({policy})")
                    if s_all - b_all <= set(KEYWORDS) and b_all - s_all <= set(KEYWORDS):
                        event(f"conflict: removed locally, keyword-only change on server ({policy})")
                keep = changed and policy != "local"
                out[content] = ("kept", s_all) if keep else ("gone",)
            elif on_loc:  # expunged on the server
                content = self.local[rec.key][0]
                l_all = self.local[rec.key][1]
                changed = l_all != b_all
                if changed:
                    event(f"conflict: expunged on server, changed locally ({policy})")
                    if (l_all ^ b_all) <= set(KEYWORDS):
                        event(f"conflict: expunged on server, keyword-only change locally ({policy})")
                keep = changed and policy != "server"
                out[content] = ("kept", l_all) if keep else ("gone",)
        return out

    def _check_after_sync(self, expected: dict, policy: str) -> None:
        srv = Counter(c for c, _, _ in self.server.values())
        loc = Counter(c for c, _ in self.local.values())
        # 1. both sides agree: same messages on both sides, each once
        assert srv == loc, f"server {sorted(srv.elements())} != local {sorted(loc.elements())}"
        assert all(n == 1 for n in srv.values()), f"a message is duplicated: {srv}"
        assert set(self.base) == set(self.server), f"base UIDs {sorted(self.base)} != server {sorted(self.server)}"
        assert {r.key for r in self.base.values()} == set(self.local), "base keys != local files"
        for uid, rec in self.base.items():
            content, s_fl, s_kw = self.server[uid]
            l_content, l_all = self.local[rec.key]
            assert content == l_content, f"UID {uid} and file {rec.key} are different messages"
            assert s_fl | s_kw == l_all == rec.flags | rec.keywords, (
                f"UID {uid} ({content}): server {sorted(s_fl | s_kw)} local {sorted(l_all)} "
                f"base {sorted(rec.flags | rec.keywords)}")
            assert (rec.flags, rec.keywords) == (s_fl, s_kw), (
                f"UID {uid}: base flags {sorted(rec.flags)} keywords {sorted(rec.keywords)} split differently from "
                f"the server's {sorted(s_fl)} / {sorted(s_kw)}")
        # 2. nothing lost: every message not deleted by a rule is on both sides
        present = set(srv)
        lost = self.alive - present
        assert not lost, f"messages lost: {sorted(lost)}"
        assert present <= self.created
        self.alive |= present  # kept by a conflict policy: a real message again
        # 4. per-flag merge and deletion/change conflicts, message by message
        by_content = {c: (uid, fl | kw) for uid, (c, fl, kw) in self.server.items()}
        for content, exp in expected.items():
            if exp[0] == "gone":
                assert content not in present, f"{content} should be gone (policy {policy})"
            elif exp[0] == "kept":
                assert content in present, f"{content} should be kept (policy {policy})"
                assert by_content[content][1] == exp[1], (
                    f"{content} kept with flags {sorted(by_content[content][1])}, expected {sorted(exp[1])}")
            else:
                _, want, sd, ld = exp
                assert content in present, f"{content} was on both sides and vanished"
                got = by_content[content][1]
                assert got == want, (f"{content}: server changed {sorted(sd)}, local changed {sorted(ld)}, "
                                     f"result {sorted(got)}, expected {sorted(want)}")
        # 3. a second sync right away has nothing to do, whatever the policy and input variant
        for pol in CONFLICT_POLICIES:
            for changed_only, none_present in ((None, False), (set(), True), (set(), False)):
                again = run_plan(self.base, *inputs(self.server, self.local, self.base, changed_only=changed_only,
                                                    none_present=none_present), pol)
                assert again.empty, f"second sync ({pol}) not empty: {again}"
                assert not again.conflicts, f"second sync ({pol}) reports conflicts: {again.conflicts}"

    @invariant()
    def base_is_consistent(self) -> None:
        # base only names UIDs and keys that were handed out
        if not hasattr(self, "base"):
            return
        assert len({r.key for r in self.base.values()}) == len(self.base), "two base records share a key"


SyncModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestSyncModel = SyncModel.TestCase


# --------------------------------------------------------------------------------------------
# merge_flags


def test_merge_different_flags_both_survive():
    base = F({"\\Seen"})
    local = F({"\\Seen", "\\Flagged"})        # local added \Flagged
    remote = F()                               # server removed \Seen
    assert merge_flags(base, local, remote) == F({"\\Flagged"})
    assert merge_flags(base, remote, local) == F({"\\Flagged"})


def test_merge_same_change_on_both_sides():
    base = F({"\\Seen"})
    both = F({"\\Seen", "\\Answered"})
    assert merge_flags(base, both, both) == both
    assert merge_flags(base, F(), F()) == F()


def test_merge_one_side_unchanged_takes_the_other():
    base = F({"\\Seen", "\\Draft"})
    other = F({"\\Flagged"})
    assert merge_flags(base, base, other) == other
    assert merge_flags(base, other, base) == other


@given(base=any_flags, local=any_flags, remote=any_flags)
def test_merge_per_flag(base, local, remote):
    merged = merge_flags(base, local, remote)
    assert merged == merge_flags(base, remote, local)
    for flag in ALL:
        l_moved, r_moved = (flag in local) != (flag in base), (flag in remote) != (flag in base)
        if l_moved:
            assert (flag in merged) == (flag in local)
        if r_moved:
            assert (flag in merged) == (flag in remote)
        if not (l_moved or r_moved):
            assert (flag in merged) == (flag in base)


def test_merge_keywords_like_flags():
    base = F({"\\Seen", "$Label1"})
    local = F({"\\Seen", "$Label1", "$Junk"})   # local added a keyword
    remote = F({"$Label1"})                      # server removed \Seen
    assert merge_flags(base, local, remote) == F({"$Label1", "$Junk"})
    assert merge_flags(base, F({"\\Seen"}), base) == F({"\\Seen"})   # a keyword removed on one side


# --------------------------------------------------------------------------------------------
# deletion / change conflicts under each policy

REC = Record(uid=7, key="k7", flags=F({"\\Seen"}), keywords=F({"$Label1"}))
ALL7 = REC.flags | REC.keywords                 # what the file k7 carries when unchanged
BASE = {7: REC}

# changes of one side away from the base: a system flag, a keyword added, a keyword removed
LOCAL_CHANGES = {"flag": ALL7 | {"\\Flagged"}, "keyword+": ALL7 | {"$Junk"}, "keyword-": REC.flags}
REMOTE_CHANGES = {"flag": (F(), REC.keywords), "keyword+": (REC.flags, REC.keywords | {"$Junk"}),
                  "keyword-": (REC.flags, F())}


def plan_one(local, remote_flags, present, policy="server"):
    return plan_sync(BASE, remote_flags, present, set(), local, conflict=policy)


@pytest.mark.parametrize("policy", CONFLICT_POLICIES)
def test_unchanged_deletions_propagate(policy):
    p = plan_one({"k7": ALL7}, {}, set(), policy)               # expunged on the server
    assert p.delete_local == (7,) and not p.conflicts and not p.reupload
    p = plan_one({}, {}, {7}, policy)                           # removed locally
    assert p.delete_remote == (7,) and not p.conflicts and not p.refetch
    p = plan_one({}, {7: (REC.flags, REC.keywords)}, {7}, policy)   # removed locally, server read unchanged
    assert p.delete_remote == (7,) and not p.conflicts and not p.refetch
    p = plan_one({}, {}, set(), policy)                         # gone on both sides
    assert p.forget == (7,) and p.deletions == 0 and not p.conflicts


@pytest.mark.parametrize("change", sorted(LOCAL_CHANGES))
@pytest.mark.parametrize("policy,outcome", [("server", "delete_local"), ("local", "reupload"), ("union", "reupload")])
def test_expunged_on_server_changed_locally(policy, outcome, change):
    p = plan_one({"k7": LOCAL_CHANGES[change]}, {}, set(), policy)
    assert getattr(p, outcome) == (7,)
    other = {"delete_local", "reupload"} - {outcome}
    assert all(getattr(p, o) == () for o in other)
    assert len(p.conflicts) == 1 and "UID 7" in p.conflicts[0]
    assert not (p.pull or p.push or p.record or p.delete_remote or p.refetch or p.forget)


@pytest.mark.parametrize("change", sorted(REMOTE_CHANGES))
@pytest.mark.parametrize("policy,outcome", [("server", "refetch"), ("local", "delete_remote"), ("union", "refetch")])
def test_removed_locally_changed_on_server(policy, outcome, change):
    """A keyword-only change on the server conflicts with a local deletion like a flag change."""
    p = plan_one({}, {7: REMOTE_CHANGES[change]}, {7}, policy)
    assert getattr(p, outcome) == (7,)
    other = {"refetch", "delete_remote"} - {outcome}
    assert all(getattr(p, o) == () for o in other)
    assert len(p.conflicts) == 1 and "UID 7" in p.conflicts[0]
    assert not (p.pull or p.push or p.record or p.delete_local or p.reupload or p.forget)


def test_keyword_moved_between_flags_and_keywords_is_no_change():
    """Only the union counts: the server's split of the same set is not a change."""
    p = plan_one({}, {7: (F(), ALL7)}, {7}, "server")
    assert p.delete_remote == (7,) and not p.conflicts


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        plan_one({"k7": ALL7}, {}, None, "newest")


def test_nothing_changed_plans_nothing():
    for present in (None, {7}):
        for flags in ({}, {7: (REC.flags, REC.keywords)}):
            assert plan_one({"k7": ALL7}, flags, present).empty


def test_local_keyword_added_is_pushed():
    p = plan_one({"k7": ALL7 | {"$Junk"}}, {}, {7})
    assert p.push == ((7, F({"$Junk"}), F()),)
    assert p.record == ((7, REC.flags, REC.keywords | {"$Junk"}),)
    assert not p.pull and not p.conflicts


def test_local_keyword_removed_is_pushed():
    p = plan_one({"k7": REC.flags}, {7: (REC.flags, REC.keywords)}, {7})
    assert p.push == ((7, F(), F({"$Label1"})),)
    assert p.record == ((7, REC.flags, F()),)
    assert not p.pull and not p.conflicts


def test_server_keyword_change_is_pulled():
    p = plan_one({"k7": ALL7}, {7: (REC.flags, F({"$Junk"}))}, {7})   # $Label1 -> $Junk on the server
    assert p.pull == ((7, REC.flags | {"$Junk"}),)
    assert p.record == ((7, REC.flags, F({"$Junk"})),)
    assert not p.push and not p.conflicts


def test_keyword_and_flag_changes_on_both_sides_both_survive():
    # local added $Junk and removed $Label1, server removed \Seen and added $Forwarded
    p = plan_one({"k7": F({"\\Seen", "$Junk"})}, {7: (F(), F({"$Label1", "$Forwarded"}))}, {7})
    merged = F({"$Junk", "$Forwarded"})
    assert p.push == ((7, F({"$Junk"}), F({"$Label1"})),)
    assert p.pull == ((7, merged),)
    assert p.record == ((7, F(), merged),)


def test_new_on_both_sides():
    p = plan_sync(BASE, {}, {7, 9}, {9}, {"k7": ALL7, "k8": F({"\\Draft", "$Junk"})})
    assert p.fetch == (9,) and p.upload == ("k8",)
    assert not (p.push or p.pull or p.record)


# --------------------------------------------------------------------------------------------
# deletion_guard


def deleting(n: int, remote: int = 0) -> SyncPlan:
    return SyncPlan(delete_local=tuple(range(n - remote)), delete_remote=tuple(range(1000, 1000 + remote)))


@pytest.mark.parametrize("messages,n,trips", [
    (100, 10, False), (100, 11, True),      # 10% of the folder
    (1000, 100, False), (1000, 101, True),
    (20, 5, False), (20, 6, True),          # floor of 5
    (30, 5, False), (30, 6, True),
    (6, 5, False),
    (5, 5, True), (2, 2, True), (3, 3, True), (10, 10, True),  # every message of the folder
    (1, 1, False),                          # a folder of one: floor applies
    (50, 0, False), (0, 0, False),
])
def test_deletion_guard_default(messages, n, trips):
    assert (deletion_guard(deleting(n), messages, None) is not None) == trips
    # deletions on either side count the same
    assert (deletion_guard(deleting(n, remote=n // 2), messages, None) is not None) == trips


@pytest.mark.parametrize("messages,n,max_delete,trips", [
    (100, 3, 3, False), (100, 4, 3, True),
    (100, 50, 50, False),                   # explicit limit replaces the 10% rule
    (2, 2, 5, False),                       # ... and the all-of-folder rule
    (100, 1, 0, True), (100, 0, 0, False),
])
def test_deletion_guard_max_delete(messages, n, max_delete, trips):
    assert (deletion_guard(deleting(n), messages, max_delete) is not None) == trips


def test_deletion_guard_message_says_why():
    assert "all 4" in deletion_guard(deleting(4), 4, None)
    assert "max_delete = 2" in deletion_guard(deleting(3), 100, 2)
