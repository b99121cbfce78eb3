"""vLLM's Prometheus ``/metrics`` text -> the ``ReplicaMetrics`` a policy sees.

The simulator exports the same seven numbers from its engine state; here they come from a real
server's scrape, so a router or scaler gets identical inputs from both backends. Pure parsing, no
HTTP: the executor fetches the text.
"""

from __future__ import annotations

import re

from policies.frontend import ReplicaMetrics

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

# ReplicaMetrics field -> vLLM metric name (vLLM >= 0.11 names; the old gpu_* names are gone)
SUMMED = {
    "num_running": "vllm:num_requests_running",
    "num_waiting": "vllm:num_requests_waiting",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "num_preemptions": "vllm:num_preemptions_total",
}
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"

Samples = dict[str, list[tuple[dict[str, str], float]]]


class MetricsError(ValueError):
    """A /metrics page that lacks what the policies need; the message names the server and the metric."""


def parse_prometheus(text: str) -> Samples:
    """Prometheus text exposition -> {metric name: [(labels, value), ...]}; comments are skipped."""
    out: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        parsed = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(labels or "")}
        out.setdefault(name, []).append((parsed, float(value)))
    return out


def replica_metrics(text: str, source: str = "/metrics") -> ReplicaMetrics:
    """One scrape of a vLLM server (summed over its engines; KV usage averaged)."""
    samples = parse_prometheus(text)

    def need(name: str) -> list[tuple[dict[str, str], float]]:
        if name not in samples:
            raise MetricsError(f"{source}: no '{name}' in the scrape; is this a vLLM >= 0.11 OpenAI server "
                               f"with stats logging on (no --disable-log-stats)?")
        return samples[name]

    counts = {field: int(round(sum(v for _, v in need(name)))) for field, name in SUMMED.items()}
    usage = [v for _, v in need(KV_USAGE)]
    capacity = 0
    for labels, _ in need(CACHE_CONFIG):
        try:
            capacity += int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        except (KeyError, ValueError):
            raise MetricsError(f"{source}: '{CACHE_CONFIG}' lacks integer num_gpu_blocks/block_size labels "
                               f"(got {labels})") from None
    return ReplicaMetrics(kv_usage=sum(usage) / len(usage), kv_capacity_tokens=capacity, **counts)
