"""Loaders for the shared real traces: each file becomes one validated canonical table.

``load_trace(name, **knobs)`` is the one entry point; ``TRACES`` lists the names. Two kinds of trace:

- *Request traces* (Mooncake, Azure 2023) carry their own arrival clock. Each row is one call.
- *Agent-session traces* (Claude Code kv-cache-tester v8/v6, TraceLab) have a clock per session only.
  Each session keeps its internal timing and dependencies (a call is released when its parents finish
  plus its think time); session starts come from a seeded arrival process (``session_rate`` for
  Poisson, or ``arrivals``, e.g. ``"replay:azure-code"``).

Knobs, applied in this order, all seeded by ``seed``: ``max_sessions`` (first N sessions, or rows of a
request trace, read from the file), ``sample_frac`` (random fraction of sessions / rows), placement
(agent traces), ``window_s=(start, end)`` (keep rows, or sessions, starting in the window; times
shifted to start at 0), ``rate_scale`` (divide arrival times: 2.0 = twice the load), ``max_think_s``
(cap think times, e.g. the multi-day idle gaps of Claude Code sessions) and ``context_limit_tokens``
(the model's context window, default 131,072: a call whose prompt + output would not fit is compacted as an
agent harness does, see ``traces.compaction``; None keeps the calls as recorded). A call that cannot fit even
compacted (a huge output in a small window) is kept for the engine to refuse and counted in
``table.attrs["over_limit_calls"]``.

Claude Code conventions (see ``_claude_session``): a call's parent is the previous call of the same
agent loop. A sub-agent's first call's parent is the main-loop call that spawned it; the first main
call issued after the sub-agent completed also waits for the sub-agent's last call. The ``t`` of a
sub-agent entry is its *completion* time when ``duration_ms`` is present: the spawning call ends one
``duration_ms`` earlier (to within 1 s for all 63 v8 sub-agents), so the start is ``t - duration``.
v6 records most turns twice (streaming then non-streaming, identical input); each such pair becomes
one call (first call's time and think time, second call's output). The number merged is in
``table.attrs["merged_duplicates"]``; no other call is dropped. ``claude-code-v6-raw`` keeps the copies
(the README's v6 statistics are for the set as recorded).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import json
import math
import os
import re
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces.arrivals import ArrivalProcess, Poisson, Replay, parse_arrivals
from traces.compaction import DEFAULT_CONTEXT_LIMIT, check_limit, compact_prompt, compact_session
from traces.schema import WorkloadError, make_table
from traces.sessions import Session, no_gc, sessions_to_table
from traces.shared import SHARED_DIR

TRACES_DIR = SHARED_DIR / "traces"
DEFAULT_SESSION_RATE = 0.1  # agent sessions per second when neither session_rate nor arrivals is given


def traces_dir() -> Path:
    """Where the shared traces live: $PYTHIA_TRACES_DIR, else ../shared/traces next to the repo."""
    return Path(os.environ.get("PYTHIA_TRACES_DIR", TRACES_DIR))


@dataclass(frozen=True)
class TraceSpec:
    path: str  # relative to traces_dir()
    read: Callable[[Path, int | None], object]  # (file, max_sessions) -> table or (sessions, attrs)
    sessions: bool  # True: agent sessions without a common clock
    about: str


# ---------------------------------------------------------------------------------------------------
# Request traces


def _read_mooncake(path: Path, limit: int | None) -> pd.DataFrame:
    cols: dict[str, list] = {"arrival_s": [], "input_tokens": [], "output_tokens": [], "block_hashes": []}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and lineno > limit:
                break
            where = f"{path}:{lineno}"
            row = _json_line(line, where)
            n_in = _field(row, "input_length", where, integer=True, minimum=1)
            hashes = row.get("hash_ids")
            if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):
                raise WorkloadError(f"{where}: field 'hash_ids' must be a list of integers")
            if len(hashes) > -(-n_in // 512):
                raise WorkloadError(f"{where}: field 'hash_ids' has {len(hashes)} blocks of 512 tokens for "
                                    f"input_length={n_in}; expected ceil(input_length / 512)")
            cols["arrival_s"].append(_field(row, "timestamp", where) / 1000.0)
            cols["input_tokens"].append(n_in)
            cols["output_tokens"].append(_field(row, "output_length", where, integer=True))
            cols["block_hashes"].append(hashes)
    return _request_table(cols, 512, str(path))


def _read_azure(path: Path, limit: int | None) -> pd.DataFrame:
    with _open_text(path) as f:
        rows = list(csv.reader(f))
    header, body = rows[0] if rows else [], rows[1:] if limit is None else rows[1:limit + 1]
    need = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if [h.strip() for h in header] != need:
        raise WorkloadError(f"{path}:1: header is {header}; expected the columns {need}")
    for i, r in enumerate(body):
        if len(r) != 3:
            raise WorkloadError(f"{path}:{i + 2}: expected 3 fields (TIMESTAMP,ContextTokens,GeneratedTokens), "
                                f"got {len(r)}")
    stamps = pd.to_datetime(pd.Series([r[0] for r in body], dtype=object), format="ISO8601", errors="coerce")
    cols: dict[str, list] = {"input_tokens": [], "output_tokens": []}
    for i, r in enumerate(body):
        where = f"{path}:{i + 2}"
        if pd.isna(stamps[i]):
            raise WorkloadError(f"{where}: field 'TIMESTAMP'={r[0]!r} is not a 'YYYY-MM-DD HH:MM:SS.fffffff' time")
        cols["input_tokens"].append(_int_text(r[1], "ContextTokens", where, minimum=1))
        cols["output_tokens"].append(_int_text(r[2], "GeneratedTokens", where, minimum=0))
    cols["arrival_s"] = ((stamps - stamps.min()).dt.total_seconds()).tolist() if body else []
    return _request_table(cols, 16, str(path))


def _request_table(cols: dict[str, list], block_size: int, source: str) -> pd.DataFrame:
    """Rows in arrival order (stable, so equal timestamps keep file order), times from 0."""
    arrival = np.asarray(cols["arrival_s"], dtype=float)
    order = np.argsort(arrival, kind="stable")
    table = {k: [v[i] for i in order] for k, v in cols.items()}
    table["arrival_s"] = arrival[order] - (arrival[order[0]] if len(order) else 0.0)
    table["request_id"] = np.arange(len(order))
    table["hash_block_size"] = block_size
    return make_table(table, source)


# ---------------------------------------------------------------------------------------------------
# Claude Code (kv-cache-tester) agent sessions

_HASHES = re.compile(rb'"hash_ids"\s*:\s*\[([^\]]*)\]')


def _read_claude_code(path: Path, limit: int | None, *, merge_duplicates: bool) -> tuple[list[Session], dict]:
    sessions: list[Session] = []
    merged = 0
    next_id = 0  # local-scope ids are offset per session so that sessions never share a block id
    with _open_tar(path) as tf, no_gc():
        for member in tf:
            if not (member.isfile() and member.name.endswith(".json")):
                continue
            if limit is not None and len(sessions) >= limit:
                break
            session, n, next_id = _claude_session(tf.extractfile(member).read(), f"{path}:{member.name}",
                                                  merge_duplicates, next_id)
            sessions.append(session)
            merged += n
    if not sessions:
        raise WorkloadError(f"{path}: no traces/*.json session files in the archive")
    return sessions, {"merged_duplicates": merged}


@dataclass
class _RecordedCall:
    t: float  # start on the session clock
    end: float  # recorded end (t + api_time of the last merged copy); NaN when api_time is absent
    think: float  # recorded think_time; NaN when absent
    n_in: int
    n_out: int
    span: int  # index of the hash_ids array
    agent: str
    system_tokens: int  # tool definitions + system prompt of the agent that made the call (-1: not recorded)
    user: bool | None  # a user message started this call (input_types has "text"); None: input_types absent


@dataclass
class _File:
    """One session file: its bytes, where its hash_ids arrays are, and how many ids each holds."""

    raw: bytes
    spans: list[tuple[int, int]]
    sizes: np.ndarray
    block: int
    merge_duplicates: bool


def _claude_session(raw: bytes, where: str, merge_duplicates: bool, next_id: int) -> tuple[Session, int, int]:
    """Parse one session file. The hash_ids arrays (almost all of the bytes) are cut out with a regex
    and parsed by numpy in one go; json only sees the small remainder, which is what makes loading hundreds of
    sessions fast."""
    spans = [m.span(1) for m in _HASHES.finditer(raw)]
    count = iter(range(len(spans)))
    try:
        doc = json.loads(_HASHES.sub(lambda m: b'"hash_ids":%d' % next(count), raw))
    except (json.JSONDecodeError, UnicodeDecodeError):
        try:
            json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WorkloadError(f"{where}: not valid JSON ({e})") from None
        raise WorkloadError(f"{where}: could not be read as a kv-cache-tester session") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise WorkloadError(f"{where}: field 'requests' (a list of calls) is missing")
    arrays = _parse_id_lists(raw, spans, where)
    f = _File(raw, spans, np.array([len(a) for a in arrays]),
              _field(doc, "block_size", where, integer=True, minimum=1), merge_duplicates)
    nonempty = [a for a in arrays if len(a)]
    if doc.get("hash_id_scope", "local") == "local" and nonempty:
        low, high = min(int(a.min()) for a in nonempty), max(int(a.max()) for a in nonempty)
        arrays = [a + (next_id - low) for a in arrays]
        next_id += high - low + 1

    main, merged = _loop([(i, r) for i, r in enumerate(doc["requests"]) if not _is_subagent(r)],
                         f"{where}: requests", "main", _system_tokens(doc, where), f)
    calls: list[_RecordedCall] = list(main)
    parents: list[list[int]] = [[] if k == 0 else [k - 1] for k in range(len(main))]
    continues = list(range(-1, len(main) - 1))
    unrecorded = [where] if main and main[0].system_tokens < 0 else []
    main_t = np.array([c.t for c in main])
    for i, sub in enumerate(doc["requests"]):
        if not _is_subagent(sub):
            continue
        sub_where = f"{where}: requests[{i}]"
        t_entry = _field(sub, "t", sub_where)
        duration = _field(sub, "duration_ms", sub_where, required=False) / 1000.0
        start = t_entry if math.isnan(duration) else t_entry - duration
        inner, n = _loop(list(enumerate(sub.get("requests") or [])), f"{sub_where}.requests",
                         str(sub.get("subagent_type") or "subagent"), _system_tokens(sub, sub_where), f, offset=start)
        merged += n
        if not inner:
            continue
        first = len(calls)
        spawner = int(np.searchsorted(main_t, start + 1.0, side="right")) - 1  # last main call before it
        calls += inner
        parents.append([spawner] if spawner >= 0 else [])
        parents += [[first + k] for k in range(len(inner) - 1)]
        continues += [-1] + [first + k for k in range(len(inner) - 1)]
        unrecorded += [sub_where] if inner[0].system_tokens < 0 else []
        done = _end(inner[-1]) if math.isnan(duration) else t_entry
        consumer = int(np.searchsorted(main_t, done - 1.0, side="left"))  # first main call after it completed
        if spawner < consumer < len(main):
            parents[consumer].append(len(calls) - 1)

    think = np.zeros(len(calls))
    for k, (c, ps) in enumerate(zip(calls, parents, strict=True)):
        if len(ps) == 1 and c.agent == calls[ps[0]].agent and not math.isnan(c.think):
            think[k] = c.think
        elif ps:
            think[k] = max(0.0, c.t - max(_end(calls[p]) for p in ps))
    session = Session(
        session_id=str(doc.get("id", Path(where).stem)),
        t=np.array([c.t for c in calls], dtype=float),
        input_tokens=np.array([c.n_in for c in calls], dtype=np.int64),
        output_tokens=np.array([c.n_out for c in calls], dtype=np.int64),
        think_s=think, parents=parents, agent=[c.agent for c in calls],
        hashes=[arrays[c.span] for c in calls], hash_block_size=f.block,
        continues=np.array(continues, dtype=np.int64),
        head_tokens=np.array([c.system_tokens for c in calls], dtype=np.int64),
        meta=_fit_facts(where, [c.user for c in calls], "'input_types'", unrecorded,
                        "'tool_tokens' and 'system_tokens'"))
    return session, merged, next_id


def _fit_facts(where: str, user: list[bool | None], user_field: str, unrecorded_head: list[str],
               head_fields: str) -> dict:
    """What the fitter needs beyond the table, and where the trace lacks it (so its error can name the field)."""
    missing = {}
    if unrecorded_head:
        missing[head_fields] = unrecorded_head[0]
    if any(u is None for u in user):
        missing[user_field] = where
    return {"source": where, "user_turn": np.array([bool(u) for u in user]), "missing": missing}


def _system_tokens(entry: dict, where: str) -> int:
    """The Claude Code prefix every call of this agent starts with: tool definitions + system prompt (-1 when
    neither field is recorded)."""
    sizes = [_field(entry, k, where, integer=True, required=False) for k in ("tool_tokens", "system_tokens")]
    known = [v for v in sizes if not math.isnan(v)]
    return int(sum(known)) if known else -1


def _loop(reqs: list[tuple[int, object]], where: str, agent: str, system_tokens: int, f: _File,
          offset: float = 0.0) -> tuple[list[_RecordedCall], int]:
    """The calls of one agent loop. With ``merge_duplicates`` a call whose input (length and hash ids)
    equals the previous call's is folded into it: v6's streaming + non-streaming proxy copies."""
    out: list[_RecordedCall] = []
    merged = 0
    prev_key = None
    for i, r in reqs:
        w = f"{where}[{i}]"
        if not isinstance(r, dict):
            raise WorkloadError(f"{w}: expected a call object, got {type(r).__name__}")
        span = r.get("hash_ids")
        if type(span) is not int:
            raise WorkloadError(f"{w}: field 'hash_ids' must be a list of integers")
        n_in = _field(r, "in", w, integer=True, minimum=1)
        if f.sizes[span] > -(-n_in // f.block):
            raise WorkloadError(f"{w}: field 'hash_ids' has {f.sizes[span]} blocks of {f.block} tokens for "
                                f"in={n_in}; expected at most ceil(in / block_size)")
        t = offset + _field(r, "t", w)
        kinds = r.get("input_types")
        call = _RecordedCall(t, t + _field(r, "api_time", w, required=False),
                             _field(r, "think_time", w, required=False), n_in, _field(r, "out", w, integer=True),
                             span, agent, system_tokens, "text" in kinds if isinstance(kinds, list) else None)
        key = (n_in, f.raw[slice(*f.spans[span])]) if f.merge_duplicates else None
        if key is not None and key == prev_key:
            first = out[-1]
            out[-1] = _RecordedCall(first.t, call.end, first.think, first.n_in, call.n_out, first.span, agent,
                                    system_tokens, first.user)
            merged += 1
            continue
        out.append(call)
        prev_key = key
    return out, merged


def _end(c: _RecordedCall) -> float:
    return c.t if math.isnan(c.end) else c.end


def _is_subagent(r: object) -> bool:
    return isinstance(r, dict) and r.get("type") == "subagent"


def _parse_id_lists(raw: bytes, spans: list[tuple[int, int]], where: str) -> list[np.ndarray]:
    """Each hash_ids array of a file as int64. A call's list usually starts with the whole list of the
    call before it (the conversation grows), so only the new tail is parsed: 40x fewer numbers."""
    out: list[np.ndarray] = []
    prev_s, prev_e = 0, 0
    for s, e in spans:
        n = prev_e - prev_s
        if out and n and e - s >= n and raw.startswith(raw[prev_s:prev_e], s) and (e - s == n or raw[s + n] == 44):
            arr = out[-1] if e - s == n else np.concatenate([out[-1], _ints(raw, s + n + 1, e, where)])
        else:
            arr = _ints(raw, s, e, where)
        out.append(arr)
        prev_s, prev_e = s, e
    return out


def _ints(raw: bytes, s: int, e: int, where: str) -> np.ndarray:
    text = raw[s:e]
    if not text.strip():
        return np.zeros(0, np.int64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # older numpy warns on unparsable text
            arr = np.fromstring(text, dtype=np.int64, sep=",")
    except ValueError:  # newer numpy raises instead
        arr = np.zeros(0, np.int64)
    if arr.size != text.count(b",") + 1:
        bad = next((x for x in text.split(b",") if not re.fullmatch(rb"\s*-?\d+\s*", x)), text)
        line = raw.count(b"\n", 0, s) + 1
        raise WorkloadError(f"{where}:{line}: field 'hash_ids' holds {bad.strip()[:40]!r}, not an integer block id")
    return arr


# ---------------------------------------------------------------------------------------------------
# TraceLab example rounds


def _read_tracelab(path: Path, limit: int | None, block: int = 16) -> tuple[list[Session], dict]:
    """Rounds become calls of their session; block ids are synthesized from ``prefix_tokens``.

    A round's prompt shares ``min(prefix_tokens, previous round's input)`` leading tokens with the
    previous round's prompt; the first round's cached prefix is the provider's common system prompt
    (shared by the sessions of one provider, and the head compaction keeps). The rest of each prompt is new
    content. A round is sent at its last input event (user message or tool result); its think time is the
    gap since the previous round's last output event. A round whose ``first_input_event_type`` is
    ``user_message`` is a user turn.
    """
    by_session: dict[str, list[tuple[int, dict, str]]] = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            row = _json_line(line, where)
            for key in ("session_id", "provider"):
                if not isinstance(row.get(key), str):
                    raise WorkloadError(f"{where}: field '{key}' must be a string")
            _field(row, "round_index", where, integer=True)
            by_session.setdefault(row["session_id"], []).append((row["round_index"], row, where))
    next_id = 0
    provider_prefix: dict[str, list[int]] = {}
    sessions = []
    for sid, rounds in list(by_session.items())[:limit]:
        rounds.sort(key=lambda x: x[0])
        t, n_in, n_out, think, hashes, user = [], [], [], [], [], []
        prev_end = None
        for _, row, where in rounds:
            n = _field(row, "input_tokens_total", where, integer=True, minimum=1)
            prefix = min(_field(row, "prefix_tokens", where, integer=True), n)
            start, end = _round_times(row, where)
            if hashes:
                shared = list(hashes[-1][:min(prefix, n_in[-1]) // block])
            else:
                run = provider_prefix.setdefault(row["provider"], [])
                while len(run) < prefix // block:
                    run.append(next_id)
                    next_id += 1
                shared = run[:prefix // block]
            fresh = -(-n // block) - len(shared)
            hashes.append(np.array(shared + list(range(next_id, next_id + fresh)), dtype=np.int64))
            next_id += fresh
            t.append(start)
            think.append(0.0 if prev_end is None else max(0.0, start - prev_end))
            prev_end = end
            n_in.append(n)
            n_out.append(_field(row, "output_tokens", where, integer=True))
            kind = row.get("first_input_event_type")
            user.append(kind == "user_message" if isinstance(kind, str) else None)
        head = min(_field(rounds[0][1], "prefix_tokens", rounds[0][2], integer=True), n_in[0])
        sessions.append(Session(
            session_id=sid, t=np.asarray(t) - t[0], input_tokens=np.asarray(n_in, dtype=np.int64),
            output_tokens=np.asarray(n_out, dtype=np.int64),
            think_s=np.asarray(think), parents=[[] if k == 0 else [k - 1] for k in range(len(t))],
            agent=[rounds[0][1]["provider"]] * len(t), hashes=hashes, hash_block_size=block,
            continues=np.arange(-1, len(t) - 1), head_tokens=np.full(len(t), head, dtype=np.int64),
            meta=_fit_facts(f"{path}: session {sid}", user, "'first_input_event_type'", [], "'prefix_tokens'")))
    return sessions, {}


_INPUT_EVENTS = ("user_message", "tool_result")


def _round_times(row: dict, where: str) -> tuple[float, float]:
    events = row.get("timing_events")
    if not isinstance(events, list) or not events:
        raise WorkloadError(f"{where}: field 'timing_events' must be a non-empty list")
    try:
        stamps = [(e["event_type"], pd.Timestamp(e["timestamp"]).timestamp()) for e in events]
    except (KeyError, TypeError, ValueError) as e:
        raise WorkloadError(f"{where}: field 'timing_events' needs event_type and an ISO 8601 timestamp "
                            f"in every event ({e})") from None
    inputs = [s for kind, s in stamps if kind in _INPUT_EVENTS]
    outputs = [s for kind, s in stamps if kind not in _INPUT_EVENTS]
    start = max(inputs) if inputs else min(s for _, s in stamps)
    return start, max(outputs) if outputs else start


# ---------------------------------------------------------------------------------------------------
# Registry and knobs

TRACES: dict[str, TraceSpec] = {
    "mooncake-conversation": TraceSpec("mooncake/conversation_trace.jsonl.gz", _read_mooncake, False,
                                       "Kimi conversation service, 1 h, 512-token prefix block hashes"),
    "mooncake-synthetic": TraceSpec("mooncake/synthetic_trace.jsonl.gz", _read_mooncake, False,
                                    "Mooncake synthetic (public datasets, Poisson), 17 min"),
    "azure-code": TraceSpec("azure_llm_2023/AzureLLMInferenceTrace_code.csv.gz", _read_azure, False,
                            "Azure 2023 coding service, 57 min, very bursty, no prefix data"),
    "azure-conv": TraceSpec("azure_llm_2023/AzureLLMInferenceTrace_conv.csv.gz", _read_azure, False,
                            "Azure 2023 conversation service, 58 min, no prefix data"),
    "claude-code-v8": TraceSpec("claude_code_weka/kv-cache-tester_traces_v8_local.tar.gz",
                                lambda p, n: _read_claude_code(p, n, merge_duplicates=False), True,
                                "710 Claude Code sessions (WEKA v8), 64-token blocks, sub-agents"),
    "claude-code-v6": TraceSpec("claude_code_weka/kv-cache-tester_traces_v6_global.tar.gz",
                                lambda p, n: _read_claude_code(p, n, merge_duplicates=True), True,
                                "454 Claude Code sessions (WEKA v6), global block ids, stream duplicates merged"),
    "claude-code-v6-raw": TraceSpec("claude_code_weka/kv-cache-tester_traces_v6_global.tar.gz",
                                    lambda p, n: _read_claude_code(p, n, merge_duplicates=False), True,
                                    "claude-code-v6 as recorded, stream/non-stream copies kept (README statistics)"),
    "tracelab": TraceSpec("tracelab/example_session_round_trace.jsonl.gz", _read_tracelab, True,
                          "TraceLab example: 2 sessions (Claude Code, Codex), 19 rounds"),
}


def trace_path(name: str) -> Path:
    """The file behind a trace name, with an error that says where traces are expected."""
    if name not in TRACES:
        raise WorkloadError(f"unknown trace '{name}'; known traces: {', '.join(TRACES)}")
    path = traces_dir() / TRACES[name].path
    if not path.exists():
        raise WorkloadError(f"trace '{name}': {path} does not exist. The shared traces are expected under "
                            f"{traces_dir()} (set PYTHIA_TRACES_DIR to the folder that holds mooncake/, "
                            f"azure_llm_2023/, claude_code_weka/ and tracelab/)")
    return path


def read_sessions(name: str, max_sessions: int | None = None) -> tuple[list[Session], dict]:
    """The sessions of an agent trace on their own clocks, as recorded (no compaction; used by traces.fit)."""
    path = trace_path(name)
    if not TRACES[name].sessions:
        raise WorkloadError(f"{path}: trace '{name}' is a request trace (one row per call, no session, agent or "
                            f"parent fields), not agent sessions")
    return TRACES[name].read(path, max_sessions)


def load_trace(name: str, *, window_s: tuple[float, float] | None = None, rate_scale: float = 1.0,
               sample_frac: float = 1.0, context_limit_tokens: int | None = DEFAULT_CONTEXT_LIMIT,
               session_rate: float | None = None, arrivals: ArrivalProcess | str | dict | None = None,
               max_sessions: int | None = None, max_think_s: float | None = None, seed: int = 0) -> pd.DataFrame:
    """Load a shared trace as a validated canonical table (see the module docstring for the knobs)."""
    _check_knobs(name, window_s, rate_scale, sample_frac, context_limit_tokens, session_rate, max_sessions,
                 max_think_s)
    path = trace_path(name)
    spec = TRACES[name]
    rng_sample, rng_arrivals = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if not spec.sessions:
        if session_rate is not None or arrivals is not None or max_think_s is not None:
            raise WorkloadError(f"trace '{name}' has recorded arrival times; session_rate, arrivals and "
                                "max_think_s apply to agent-session traces only")
        table = spec.read(path, max_sessions)
        keep = np.ones(len(table), bool)
        if sample_frac < 1.0:
            keep &= rng_sample.random(len(table)) < sample_frac
        t = table["arrival_s"].to_numpy()
        if window_s is not None:
            keep &= (t >= window_s[0]) & (t < window_s[1])
        table = table[keep].reset_index(drop=True)
        table["arrival_s"] = (table["arrival_s"] - (window_s[0] if window_s else 0.0)) / rate_scale
        table["request_id"] = np.arange(len(table))
        _compact_rows(table, context_limit_tokens)
        table = make_table(table, f"{name} ({path})")
        table.attrs["over_limit_calls"] = _over_limit(table, context_limit_tokens)
        return table

    sessions, attrs = spec.read(path, max_sessions)
    if sample_frac < 1.0:
        sessions = [s for s, u in zip(sessions, rng_sample.random(len(sessions)), strict=True) if u < sample_frac]
    process = resolve_arrivals(arrivals) if arrivals is not None else Poisson(session_rate or DEFAULT_SESSION_RATE)
    starts = process.times(rng_arrivals, n=len(sessions))
    if window_s is not None:
        inside = (starts >= window_s[0]) & (starts < window_s[1])
        sessions, starts = [s for s, k in zip(sessions, inside, strict=True) if k], starts[inside] - window_s[0]
    next_id = 1 + max((int(h.max()) for s in sessions for h in s.hashes if len(h)), default=-1)
    for s in sessions:
        s.workflow = name
        next_id = compact_session(s, context_limit_tokens, next_id)
        if max_think_s is not None:
            s.think_s = np.minimum(s.think_s, max_think_s)
    table = sessions_to_table(sessions, starts / rate_scale, f"{name} ({path})")
    table.attrs.update(attrs)
    table.attrs["over_limit_calls"] = _over_limit(table, context_limit_tokens)
    return table


def _over_limit(table: pd.DataFrame, limit: int | None) -> int:
    """Calls whose prompt + output exceed the window even compacted (an engine refuses them, as vLLM does)."""
    return 0 if limit is None else int(((table["input_tokens"] + table["output_tokens"]) > limit).sum())


def _compact_rows(table: pd.DataFrame, limit: int | None) -> None:
    """A request trace's rows are independent prompts: one longer than the window is compacted on its own."""
    too_long = [] if limit is None else \
        np.flatnonzero((table["input_tokens"] + table["output_tokens"]).to_numpy() > limit)
    if not len(too_long):
        return
    next_id = 1 + max((max(h) for h in table["block_hashes"] if len(h)), default=-1)
    for i in too_long:
        hashes, n_in, next_id = compact_prompt(
            np.asarray(table.at[i, "block_hashes"], dtype=np.int64), int(table.at[i, "input_tokens"]),
            int(table.at[i, "output_tokens"]), int(table.at[i, "hash_block_size"]), limit, next_id)
        table.at[i, "block_hashes"] = hashes.tolist()
        table.at[i, "input_tokens"] = n_in


def _check_knobs(name, window_s, rate_scale, sample_frac, context_limit_tokens, session_rate, max_sessions,
                 max_think_s) -> None:
    where = f"load_trace('{name}')"
    if window_s is not None and not (len(window_s) == 2 and 0 <= window_s[0] < window_s[1]):
        raise WorkloadError(f"{where}: window_s={window_s} must be (start, end) with 0 <= start < end seconds")
    for knob, value, low in (("rate_scale", rate_scale, 0.0), ("session_rate", session_rate, 0.0),
                             ("max_think_s", max_think_s, -1e-300)):
        if value is not None and not (np.isfinite(value) and value > low):
            raise WorkloadError(f"{where}: {knob}={value} must be a finite number > {max(low, 0)}")
    if not 0.0 < sample_frac <= 1.0:
        raise WorkloadError(f"{where}: sample_frac={sample_frac} must be in (0, 1]")
    check_limit(context_limit_tokens, where)
    if max_sessions is not None and (int(max_sessions) != max_sessions or max_sessions < 1):
        raise WorkloadError(f"{where}: max_sessions={max_sessions} must be an integer >= 1")


# ---------------------------------------------------------------------------------------------------
# Small parsing helpers: every error names the file, line and field


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise WorkloadError(f"{path}: not a readable tar archive ({e})") from None


def _json_line(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected a JSON object per line")
    return row


def _field(row: dict, key: str, where: str, *, integer: bool = False, minimum: float = 0,
           required: bool = True) -> float:
    """A numeric field, checked; absent optional fields are NaN."""
    value = row.get(key)
    if value is None:
        if required:
            raise WorkloadError(f"{where}: field '{key}' is missing")
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise WorkloadError(f"{where}: field '{key}'={value!r} must be a finite number")
    if integer and value != int(value):
        raise WorkloadError(f"{where}: field '{key}'={value!r} must be an integer")
    if value < minimum:
        raise WorkloadError(f"{where}: field '{key}'={value!r} must be >= {minimum}")
    return int(value) if integer else float(value)


def _int_text(text: str, key: str, where: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise WorkloadError(f"{where}: field '{key}'={text!r} is not an integer") from None
    if value < minimum:
        raise WorkloadError(f"{where}: field '{key}'={value} must be >= {minimum}")
    return value


def resolve_arrivals(spec: ArrivalProcess | str | dict) -> ArrivalProcess:
    """``parse_arrivals``, with a replayed trace's recorded arrival times attached (``Replay.recorded``)."""
    process = parse_arrivals(spec)
    if isinstance(process, Replay) and process.recorded is None:
        process = dataclasses.replace(process, recorded=_recorded_arrivals(process.trace))
    return process


@functools.lru_cache(maxsize=8)
def _recorded_arrivals(name: str) -> np.ndarray:
    """Arrival times (s, from 0) of a trace's calls without parents; loaded once per process."""
    if name in TRACES and TRACES[name].sessions:
        raise WorkloadError(f"replay:{name}: agent-session traces have no common clock to replay; "
                            f"replay a trace with recorded arrivals: "
                            f"{', '.join(n for n, s in TRACES.items() if not s.sessions)}")
    t = load_trace(name)["arrival_s"].to_numpy()
    t = t - t[0]
    t.flags.writeable = False
    return t
