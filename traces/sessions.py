"""Sessions on their own clocks, and placing them on one clock as a canonical table.

Agent traces (Claude Code, TraceLab) and generated workflow jobs share one shape: a few dozen calls
whose times are relative to the session's start, linked by parent edges. ``sessions_to_table`` puts
each session at a start time and merges them into release order, so the loaders and the workflow
generator build tables the same way.
"""

from __future__ import annotations

import gc
import heapq
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from traces.schema import WorkloadError, make_table, validate


@dataclass
class Session:
    """One session (or workflow job): its calls on the session's own clock, linked by parent indices."""

    session_id: str
    t: np.ndarray  # call start in seconds from the session start (recorded, or the generator's estimate)
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    think_s: np.ndarray
    parents: list[list[int]]  # indices of other calls of this session (no cycles)
    agent: list[str]
    hashes: list[np.ndarray]  # block ids per call; unique to this content within the table being built
    hash_block_size: int
    workflow: str = ""
    expected_output_tokens: np.ndarray | None = None
    next_agents: list[str] = field(default_factory=list)
    slo_s: np.ndarray | None = None
    # What compaction and the fitter need: the call whose prompt + output this call's prompt extends (-1: it
    # starts a conversation), and the tokens of static head (system prompt, tools, static context) it starts with.
    continues: np.ndarray | None = None
    head_tokens: np.ndarray | None = None
    meta: dict = field(default_factory=dict)  # source-specific per-session facts (e.g. for fitting)

    def __len__(self) -> int:
        return len(self.t)


@contextmanager
def no_gc():
    """Pause the cyclic garbage collector while building millions of block id lists.

    The lists hold no cycles, but each collection would walk all of them again: with GC on, a full
    Claude Code load spends most of its time in the collector.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def sessions_to_table(sessions: list[Session], starts: np.ndarray, source: str) -> pd.DataFrame:
    """Place ``sessions[i]`` at ``starts[i]`` and merge all calls into one validated table.

    Job ids follow start order. Rows are sorted by release key: a call's key is the later of its own
    time and its parents' keys, so every parent precedes its children and the roots are in time order.
    """
    with no_gc():
        return _sessions_to_table(sessions, starts, source)


def _sessions_to_table(sessions: list[Session], starts: np.ndarray, source: str) -> pd.DataFrame:
    order = np.argsort(starts, kind="stable")
    sessions = [sessions[i] for i in order]
    starts = np.asarray(starts, dtype=float)[order]
    keys, sess_idx, ranks = [], [], []
    for j, (s, start) in enumerate(zip(sessions, starts, strict=True)):
        key, rank = _release_order(s)
        keys.append(start + np.asarray(key))
        sess_idx.append(np.full(len(s), j))
        ranks.append(np.asarray(rank))
    if not sessions:
        return make_table({"request_id": [], "arrival_s": [], "input_tokens": [], "output_tokens": []}, source)
    key = np.concatenate(keys)
    sess = np.concatenate(sess_idx)
    perm = np.lexsort((np.concatenate(ranks), sess, key))
    first = np.cumsum([0] + [len(s) for s in sessions])
    request_id = np.empty(len(perm), dtype=np.int64)
    request_id[perm] = np.arange(len(perm))

    def col(get) -> np.ndarray:
        return np.concatenate([np.asarray(get(s)) for s in sessions])[perm]

    blocks = _as_lists(sessions)
    rid = request_id.tolist()
    parents = []
    for j, s in enumerate(sessions):
        base = int(first[j])
        parents += [[rid[base + p] for p in ps] for ps in s.parents]
    table = {
        "request_id": np.arange(len(perm)),
        "arrival_s": col(lambda s: s.t) + starts[sess[perm]],
        "input_tokens": col(lambda s: s.input_tokens),
        "output_tokens": col(lambda s: s.output_tokens),
        "hash_block_size": col(lambda s: np.full(len(s), s.hash_block_size)),
        "session_id": col(lambda s: np.full(len(s), s.session_id, dtype=object)),
        "job_id": sess[perm],
        "workflow": col(lambda s: np.full(len(s), s.workflow, dtype=object)),
        "agent": col(lambda s: np.asarray(s.agent, dtype=object)),
        "parents": [parents[k] for k in perm],
        "think_s": col(lambda s: s.think_s),
        "slo_s": col(lambda s: np.full(len(s), np.nan) if s.slo_s is None else s.slo_s),
        "expected_output_tokens": col(lambda s: np.full(len(s), -1) if s.expected_output_tokens is None
                                      else s.expected_output_tokens),
        "next_agents": col(lambda s: np.asarray(s.next_agents or [""] * len(s), dtype=object)),
    }
    # make_table would re-check every block id in Python (94 M of them in Claude Code v8); the lists are
    # built here from int64 arrays, so they are set after it and checked by validate.
    out = make_table(table, source)
    out["block_hashes"] = [blocks[k] for k in perm]
    return validate(out, source)


def _release_order(s: Session) -> tuple[list[float], list[int]]:
    """Each call's release key (the later of its own time and its parents' keys) and its rank in a
    topological order (ties in key are broken by it, so a parent always precedes its children)."""
    children: list[list[int]] = [[] for _ in range(len(s))]
    waiting = [len(ps) for ps in s.parents]
    for i, ps in enumerate(s.parents):
        for p in ps:
            children[p].append(i)
    key = s.t.astype(float).tolist()
    rank = [0] * len(s)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    for r in range(len(s)):
        if not ready:
            raise WorkloadError(f"session {s.session_id}: its calls' parents form a cycle")
        i = heapq.heappop(ready)
        rank[i] = r
        for c in children[i]:
            key[c] = max(key[c], key[i])
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    return key, rank


def _as_lists(sessions: list[Session]) -> list[list[int]]:
    """All block id arrays as Python lists in which equal ids are one int object.

    A Claude Code session repeats the same ids in every call (94 million entries in v8 for 3.6 million
    distinct ids), so sharing the int objects keeps a full load near one GB instead of four.
    """
    flats = [np.concatenate(s.hashes).astype(np.int64) if s.hashes else np.zeros(0, np.int64) for s in sessions]
    used = [f for f in flats if len(f)]
    if not used:
        return [[] for s in sessions for _ in s.hashes]
    low, high = min(int(f.min()) for f in used), max(int(f.max()) for f in used)
    total = sum(len(f) for f in used)
    dense = high - low <= 4 * total + (1 << 20)
    uniq = None if dense else np.unique(np.concatenate(used))
    pool = np.arange(low, high + 1).astype(object) if dense else uniq.astype(object)
    out: list[list[int]] = []
    for s, flat in zip(sessions, flats, strict=True):
        objs = pool[flat - low] if dense else pool[np.searchsorted(uniq, flat)]
        ends = np.cumsum([len(h) for h in s.hashes]).tolist()
        out += [objs[a:b].tolist() for a, b in zip([0] + ends[:-1], ends, strict=True)]
    return out
