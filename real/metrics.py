"""vLLM's Prometheus ``/metrics`` text -> the ``ReplicaMetrics`` a policy sees, and the server's latency sums.

The simulator exports the same seven numbers from its engine state; here they come from a real
server's scrape, so a router or scaler gets identical inputs from both backends. The latency histograms'
sums and counts split a call's time the way the simulator does (queue, prefill, decode on the engine's
clock) from what the API process adds, which a client cannot see. Pure parsing, no HTTP: the executor
fetches the text.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from frontend.ledger import ReplicaMetrics

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

# phase -> vLLM histogram. Engine-core clock: queue (queued -> first scheduled), prefill (scheduled -> first token),
# decode (first -> last token), itl (per output token after the first). API process clock, from the call's arrival
# there: ttft (first token handed to the API process), e2e (finished there).
LATENCY_HISTOGRAMS = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "ttft": "vllm:time_to_first_token_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
}

Samples = dict[str, list[tuple[dict[str, str], float]]]


class MetricsError(ValueError):
    """A /metrics page that lacks what the policies need; the message names the server and the metric."""


def parse_prometheus(text: str) -> Samples:
    """Prometheus text exposition -> {sample name: [(labels, value), ...]} (prometheus_client's own parser)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
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


def latency_sums(text: str) -> dict[str, tuple[float, int]]:
    """phase -> (sum of seconds, number of observations) of LATENCY_HISTOGRAMS, summed over the server's engines.
    Cumulative since the server started; phases the server does not export are left out."""
    samples = parse_prometheus(text)
    out = {}
    for phase, name in LATENCY_HISTOGRAMS.items():
        if f"{name}_sum" in samples and f"{name}_count" in samples:
            out[phase] = (sum(v for _, v in samples[f"{name}_sum"]),
                          int(round(sum(v for _, v in samples[f"{name}_count"]))))
    return out
