"""Compaction: what an agent harness does when a conversation outgrows the model's context window.

Agent harnesses do not keep the first N tokens of a prompt. When the conversation no longer fits (or earlier,
at their own threshold, as Claude Code does) they keep the system prompt and the most recent turns and replace
the middle by a summary the model wrote. The next prompt starts
like the old one (the system prompt still hits the prefix cache) and then differs: the cache misses once, and
later calls of the conversation extend the compacted prompt and hit again.

One rule, used by the trace loaders (on block ids, ``compact_session``, ``compact_prompt``) and by the
workflow generator (on prompt segments):

- a call is compacted when its prompt + output would exceed ``context_limit_tokens`` (the model's
  ``max_position_embeddings``, default ``DEFAULT_CONTEXT_LIMIT``) or the agent's own earlier trigger
  (``compact_at_tokens`` of a workflow agent);
- its prompt becomes *head + summary + recent*: the head (system prompt and static context, rounded down to
  whole blocks), a summary (a new block run) and the conversation's most recent tokens (from a block boundary
  to the end, so the call's own new input stays). Summary and recent share a body of the agent's fitted
  ``compacted_tokens``, at most (and by default) ``context_limit_tokens // 8``, about the share of the old
  prompt the Claude Code harness keeps beyond its system prompt (``python -m traces.fit --show``:
  compacted_p50 / compact_at_p50), half each (the summary at least one block);
- a call that does not fit even then (head + body + output > limit) is refused: a ``WorkloadError`` names it.
  Recorded traces are what they are: there (``strict=False``) such a call is compacted as far as the rule goes
  and kept, for the engine to refuse as vLLM would, and the loaders count it in ``attrs["over_limit_calls"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces.schema import MAX_TOKENS, WorkloadError

DEFAULT_CONTEXT_LIMIT = 131_072  # max_position_embeddings of Llama-3.1-8B, the project's default model
BODY_FRACTION = 8  # default body (summary + recent) = context limit // BODY_FRACTION


@dataclass(frozen=True)
class Plan:
    """A compacted prompt: ``head`` tokens from the start, a ``summary`` of new content, the last ``recent``
    tokens of the old prompt (starting at a block boundary). All three are whole blocks except ``recent``,
    which ends where the prompt ends."""

    head: int
    summary: int
    recent: int

    @property
    def length(self) -> int:
        return self.head + self.summary + self.recent


def check_limit(limit: int | None, where: str) -> None:
    whole = isinstance(limit, int | np.integer | float) and not isinstance(limit, bool) and np.isfinite(limit) \
        and int(limit) == limit
    if limit is not None and not (whole and 1 <= limit <= MAX_TOKENS):
        raise WorkloadError(f"{where}: context_limit_tokens={limit} must be an integer in [1, {MAX_TOKENS}] (or None: "
                            "no limit)")


def plan(prompt: int, output: int, head: int, block: int, limit: int | None, trigger: int | None = None,
         body: int | None = None, where: str = "call", strict: bool = True) -> Plan | None:
    """How to compact a ``prompt``-token prompt followed by ``output`` tokens; None if it needs no compaction.

    ``head`` tokens at the start are kept (rounded down to whole blocks of ``block`` tokens); ``trigger`` is
    the agent's own earlier threshold, ``body`` its summary + recent size (at most, and by default, ``limit // 8``).
    """
    bounds = [b for b in (limit, trigger) if b is not None]
    if not bounds or prompt + output <= min(bounds):
        return None
    if limit is not None:
        body = limit // BODY_FRACTION if body is None else min(body, limit // BODY_FRACTION)
    elif body is None:
        raise WorkloadError(f"{where}: a compaction trigger without a body size (compacted_tokens) or a limit")
    head = min(head, prompt) // block * block
    summary = max(block, body // 2 // block * block)
    start = min(prompt, max(head, -(-(prompt - (body - summary)) // block) * block))  # recent tail: whole blocks
    new = Plan(head, summary, prompt - start)
    if strict and limit is not None and new.length + output > limit:
        raise WorkloadError(
            f"{where}: prompt {prompt} + output {output} tokens exceed the context limit of {limit} tokens, and "
            f"compacted (head {new.head} + summary {new.summary} + recent {new.recent}) it still would not fit: "
            f"shorten the system prompt, static context or output, or raise context_limit_tokens")
    if new.length >= prompt:
        return None  # only the agent's own trigger fired and compacting would not shorten the prompt
    return new


def compact_prompt(hashes: np.ndarray, n_in: int, n_out: int, block: int, limit: int | None,
                   next_id: int) -> tuple[np.ndarray, int, int]:
    """One recorded prompt on its own (a request trace's row: no head, no conversation), not strict:
    (block ids, length, next id)."""
    p = plan(n_in, n_out, 0, block, limit, strict=False)
    if p is None:
        return hashes, n_in, next_id
    summary = np.arange(next_id, next_id + p.summary // block, dtype=np.int64)
    tail = np.asarray(hashes[-(-(n_in - p.recent) // block):], dtype=np.int64) if len(hashes) else hashes
    out = np.concatenate([summary, tail]) if len(hashes) else hashes
    return out, p.length, next_id + len(summary)


def compact_session(s, limit: int | None, next_id: int) -> int:
    """Compact a recorded session's calls in place (``s`` is a ``traces.sessions.Session``), not strict;
    returns the next free block id.

    A call continues a conversation when ``s.continues`` names its predecessor. While the call's block ids
    extend the predecessor's original ids, it is mapped onto the predecessor's compacted prompt: the first
    ``b`` original blocks are replaced by the compacted prefix ``C`` (head + summary [+ a kept piece]). A call
    that does not extend its predecessor (the harness compacted on its own, as the trace recorded) starts over.
    """
    if limit is None or not np.any(s.input_tokens + s.output_tokens > limit):
        return next_id  # compacted calls only get shorter: nothing to do unless a recorded call is too long
    block = s.hash_block_size
    n = len(s)
    original = list(s.hashes)
    state: list[tuple[int, np.ndarray]] = [(0, np.zeros(0, np.int64))] * n
    heads = np.zeros(n, np.int64) if s.head_tokens is None else np.maximum(s.head_tokens, 0)
    for i in range(n):
        h, n_in, n_out = original[i], int(s.input_tokens[i]), int(s.output_tokens[i])
        b, c = 0, np.zeros(0, np.int64)
        p = -1 if s.continues is None else int(s.continues[i])
        if p >= 0 and state[p][0] and np.array_equal(h[:state[p][0]], original[p][:state[p][0]]):
            b, c = state[p]  # the call extends its compacted predecessor
        cur = np.concatenate([c, h[b:]]) if b else h
        cur_n = len(c) * block + n_in - b * block
        step = plan(cur_n, n_out, int(heads[i]), block, limit, strict=False)
        if step is not None:
            k = -(-(cur_n - step.recent) // block)  # first kept block of the current prompt
            summary = np.arange(next_id, next_id + step.summary // block, dtype=np.int64)
            next_id += len(summary)
            b += max(0, k - len(c))  # the recent tail starts in the original ids ...
            c = np.concatenate([cur[:step.head // block], summary, c[k:]])  # ... or in an earlier summary
            cur = np.concatenate([c, h[b:]])
            cur_n = step.length
        state[i] = (b, c)
        s.hashes[i] = cur
        s.input_tokens[i] = cur_n
    return next_id
