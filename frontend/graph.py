"""Which call is released when: the workload's job DAG as the front end walks it.

A call without parents is released at its ``arrival_s``; a call with parents ``think_s`` after the last of
them finished (failed and refused calls count as finished, so a job never waits forever). Both backends ask
the same ``CallGraph``; they differ only in how they wait.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

import pandas as pd

from policies.api import RequestInfo
from traces.schema import validate


def request_infos(table: pd.DataFrame, pool: str = "default") -> list[RequestInfo]:
    """What the front end knows of each call of a canonical workload table, in row order."""
    cols = ["request_id", "arrival_s", "input_tokens", "block_hashes", "hash_block_size", "session_id", "job_id",
            "workflow", "agent", "expected_output_tokens", "next_agents", "slo_s", "parents"]
    out = []
    for (rid, arr, inp, blocks, hbs, sess, job, wf, agent, exp_out, nxt, slo, parents) in zip(
            *(table[c].tolist() for c in cols), strict=True):
        out.append(RequestInfo(int(rid), float(arr), int(inp), tuple(blocks), int(hbs), pool, sess, int(job), wf,
                               agent, int(exp_out), tuple(a for a in nxt.split(",") if a), float(slo),
                               tuple(int(p) for p in parents)))
    return out


class CallGraph:
    """The calls of a workload table, each tagged with its pool, and their release order.

    ``agent_pools`` maps an agent to the pool that serves it; other agents go to ``default_pool``.
    """

    def __init__(self, table: pd.DataFrame, agent_pools: Mapping[str, str], default_pool: str, source: str):
        validate(table, source)
        self.infos: dict[int, RequestInfo] = {
            i.request_id: replace(i, pool=agent_pools.get(i.agent, default_pool)) if i.agent in agent_pools else i
            for i in request_infos(table, default_pool)}
        ids = list(self.infos)
        self.output_tokens: dict[int, int] = dict(zip(ids, table["output_tokens"].tolist(), strict=True))
        self.think_s: dict[int, float] = dict(zip(ids, table["think_s"].tolist(), strict=True))
        self._waiting_on = {rid: len(p) for rid, p in zip(ids, table["parents"], strict=True)}
        self._children: dict[int, list[int]] = {}
        for rid, parents in zip(ids, table["parents"], strict=True):
            for p in parents:
                self._children.setdefault(int(p), []).append(rid)
        self.roots = [rid for rid, n in self._waiting_on.items() if n == 0]  # in arrival order (validated)
        self.remaining = len(ids)
        self._job_left = Counter(i.job_id for i in self.infos.values())  # calls of each job not finished

    def last_of_job(self, request_id: int) -> bool:
        """Whether ``request_id`` is the last unfinished call of its job (a job id -1 is no job)."""
        job = self.infos[request_id].job_id
        return job >= 0 and self._job_left[job] == 1

    def __len__(self) -> int:
        return len(self.infos)

    def done(self, request_id: int) -> list[int]:
        """Count ``request_id`` as finished; return the calls it was the last parent of (release each after its
        ``think_s``)."""
        self.remaining -= 1
        self._job_left[self.infos[request_id].job_id] -= 1
        released = []
        for child in self._children.get(request_id, ()):
            self._waiting_on[child] -= 1
            if self._waiting_on[child] == 0:
                released.append(child)
        return released
