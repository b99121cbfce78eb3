"""Workload characterization: the numbers behind the paper's motivation figures, for any canonical table.

- ``prefix_hits``: cached tokens per call under an infinite prefix cache (calls in row order; a block
  hits when the whole prefix up to and including it was the prefix of an earlier call, the chained
  semantics of vLLM's cache and of both backends). ``prefix_hit_bound`` is their share of all input
  tokens: the upper bound for any real cache. Where the trace's ids are already chain ids (each id
  always follows the same id: Mooncake, Claude Code v8) this equals the shared README's definition.
- ``cached_tokens_cdf``: per-call distribution of cached tokens (or cached share of the prompt).
- ``length_stats``, ``burstiness``, ``dependency_stats``: input/output lengths and sum input / sum output,
  arrival burstiness (inter-arrival CV, counts per 1/10/60 s window), and DAG depth and fan-out.

``python -m traces.characterize [NAME ...]`` prints the summary of shared traces and shipped workflows. What
they cost on a GPU cluster (GPU-seconds per call, prefill share, sustainable calls/s) needs the cost model:
``python -m sim.characterize``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from traces.shared import splitmix64

_P = 0x100000001B3  # odd multiplier of the rolling prefix hash (FNV prime)


def prefix_hits(df: pd.DataFrame, within_session: bool = False) -> np.ndarray:
    """Cached tokens of each call with an infinite cache; ``within_session`` gives each session its own cache.

    Prefix hashes are a 64-bit rolling hash over mixed block ids (collision odds ~1e-4 for 100 M
    blocks). Whether a prefix of length j was seen is monotone in j, so each call needs a binary search
    over its prefixes and only its new (missed) prefixes are added to the seen set: about one second
    per ten million blocks.
    """
    sizes = df["hash_block_size"].to_numpy()
    n_in = df["input_tokens"].to_numpy()
    longest = max((len(h) for h in df["block_hashes"]), default=0)
    pow_p, pow_q = _powers(_P, longest), _powers(pow(_P, -1, 1 << 64), longest)
    sessions = df["session_id"].to_numpy() if within_session else np.full(len(df), "")
    seen: dict[str, set[int]] = {}
    out = np.zeros(len(df), dtype=np.int64)
    with np.errstate(over="ignore"):
        for i, blocks in enumerate(df["block_hashes"]):
            n = len(blocks)
            if n == 0:
                continue
            x = splitmix64(np.asarray(blocks, dtype=np.int64).astype(np.uint64))
            keys = np.cumsum(x * pow_q[:n]) * pow_p[:n]
            cache = seen.setdefault(sessions[i], set())
            lo, hi = 0, n  # number of leading prefixes already seen
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if int(keys[mid - 1]) in cache:
                    lo = mid
                else:
                    hi = mid - 1
            cache.update(keys[lo:].tolist())
            out[i] = min(lo * int(sizes[i]), int(n_in[i]))
    return out


def prefix_hit_bound(df: pd.DataFrame, within_session: bool = False) -> float:
    """Share of all input tokens an infinite prefix cache would serve (the bound any cache can reach)."""
    total = int(df["input_tokens"].sum())
    return float(prefix_hits(df, within_session).sum() / total) if total else 0.0


def cached_tokens_cdf(df: pd.DataFrame, fraction: bool = False, within_session: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted per-call cached tokens, or cached share of the prompt; cumulative probability)."""
    hits = prefix_hits(df, within_session).astype(float)
    values = np.sort(hits / df["input_tokens"].to_numpy() if fraction else hits)
    return values, np.arange(1, len(values) + 1) / max(len(values), 1)


def distribution(values: np.ndarray | pd.Series, digits: int = 1) -> dict:
    """n, mean, p10/p50/p90/p99 and max, rounded like the shared README."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": round(float(a.mean()), digits),
            **{f"p{p}": round(float(np.percentile(a, p)), digits) for p in (10, 50, 90, 99)},
            "max": round(float(a.max()), digits)}


def length_stats(df: pd.DataFrame) -> dict:
    out = int(df["output_tokens"].sum())
    return {"input_tokens": distribution(df["input_tokens"]), "output_tokens": distribution(df["output_tokens"]),
            "input_over_output": round(int(df["input_tokens"].sum()) / out, 1) if out else float("nan")}


def burstiness(df: pd.DataFrame, windows: tuple[int, ...] = (1, 10, 60)) -> dict:
    """Arrival burstiness over ``arrival_s`` (for dependent calls: their recorded or estimated time).

    Inter-arrival CV (1.0 for Poisson) and request counts per window: mean, max, max/mean, CV; plus
    input tokens per 10 s. Same definitions as the shared traces' compute_stats.py.
    """
    ts = np.sort(df["arrival_s"].to_numpy(dtype=float))
    if len(ts) < 2 or ts[-1] == ts[0]:
        return {"requests": len(ts)}
    ts = ts - ts[0]
    gaps = np.diff(ts)
    out: dict = {"requests": len(ts), "duration_s": round(float(ts[-1]), 1),
                 "mean_rate_rps": round(len(ts) / float(ts[-1]), 3),
                 "interarrival_cv": round(float(gaps.std() / gaps.mean()), 2)}
    for w in windows:
        counts = np.bincount((ts // w).astype(int))
        out[f"per_{w}s"] = {"mean": round(float(counts.mean()), 2), "max": int(counts.max()),
                            "max_over_mean": round(float(counts.max() / counts.mean()), 2),
                            "cv": round(float(counts.std() / counts.mean()), 2)}
    order = np.argsort(df["arrival_s"].to_numpy(dtype=float), kind="stable")
    sums = np.bincount((ts // 10).astype(int), weights=df["input_tokens"].to_numpy(dtype=float)[order])
    out["input_tokens_per_10s"] = {"max_over_mean": round(float(sums.max() / sums.mean()), 2),
                                   "cv": round(float(sums.std() / sums.mean()), 2)}
    return out


def dependency_stats(df: pd.DataFrame) -> dict:
    """Depth of each job's call DAG (longest parent chain, in calls) and fan-out (children per call)."""
    pos = {int(r): k for k, r in enumerate(df["request_id"])}
    depth = np.zeros(len(df), dtype=np.int64)
    children = np.zeros(len(df), dtype=np.int64)
    for k, parents in enumerate(df["parents"]):
        for p in parents:
            j = pos[int(p)]
            depth[k] = max(depth[k], depth[j] + 1)
            children[j] += 1
    jobs = df["job_id"].to_numpy()
    per_job = pd.Series(depth + 1).groupby(jobs).max() if len(df) else pd.Series(dtype=int)
    with_children = children[children > 0]
    return {"calls": len(df), "roots": int(sum(len(p) == 0 for p in df["parents"])),
            "jobs": int(len(np.unique(jobs[jobs >= 0]))),
            "job_depth": distribution(per_job[per_job.index >= 0]),
            "fan_out": {"calls_with_children": int(len(with_children)),
                        "mean": round(float(with_children.mean()), 2) if len(with_children) else 0.0,
                        "max": int(children.max()) if len(df) else 0,
                        "calls_with_2plus": int((children >= 2).sum())}}


def characterize(df: pd.DataFrame, within_session: bool = False) -> dict:
    """Everything above for one table, as a JSON-ready dict."""
    hits = prefix_hits(df, within_session)
    total = int(df["input_tokens"].sum())
    share = hits / df["input_tokens"].to_numpy()
    return {"rows": len(df),
            "prefix_hit_bound": round(float(hits.sum() / total), 4) if total else 0.0,
            "calls_with_no_hit": round(float((hits == 0).mean()), 4) if len(df) else 0.0,
            "cached_share_per_call": distribution(share, 3),
            **length_stats(df), "burstiness": burstiness(df), "dependencies": dependency_stats(df)}


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2^64."""
    with np.errstate(over="ignore"):
        return np.concatenate([[1], np.cumprod(np.full(max(n - 1, 0), base, dtype=np.uint64))]).astype(np.uint64)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawTextHelpFormatter):
    """Defaults shown, epilog as written."""


def main(argv: list[str] | None = None) -> None:
    from traces.loaders import TRACES, load_trace
    from traces.workflow import WORKFLOWS, make_workload

    about = "\n".join(f"  {n:22s} {spec.about}" for n, spec in TRACES.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter,
                                     epilog=f"traces:\n{about}\nworkflows: {', '.join(WORKFLOWS)}")
    parser.add_argument("names", nargs="*", help="traces or workflows (default: all)")
    parser.add_argument("--json", action="store_true", help="print the full characterization as JSON")
    args = parser.parse_args(argv)
    for name in args.names or [*TRACES, *WORKFLOWS]:
        df = load_trace(name) if name in TRACES else make_workload(name)
        within = name.startswith("claude-code-v")
        c = characterize(df, within_session=within)
        if args.json:
            print(json.dumps({name: c}, indent=1))
            continue
        b = c["burstiness"]
        print(f"{name:24s} rows {c['rows']:7d}  in:out {c['input_over_output']:6.1f}"
              f"  hit bound {100 * c['prefix_hit_bound']:5.1f} %"
              f"{' (per session)' if within else ''}  inter-arrival CV {b.get('interarrival_cv', float('nan')):5.2f}"
              f"  per-60s max/mean {b.get('per_60s', {}).get('max_over_mean', float('nan')):5.2f}"
              f"  depth p50 {c['dependencies']['job_depth'].get('p50', 0)}")


if __name__ == "__main__":
    main()
