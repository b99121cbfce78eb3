"""Time of one vLLM engine step on one replica: a roofline per operator group, calibrated on real A100 timings.

One step is one forward pass over the batch, run in lockstep on the replica's `tp` GPUs:

    gpu  = layers x [linear(T) + attention + 2 all-reduces of T x hidden] + LM head(S)
    step = overlap(gpu, layers x launch_per_layer) + cpu(S)      (overlap ~ the larger of the two)

T is the number of tokens in the step (new prefill tokens plus one per decoding sequence) and S the number of
sequences. Every term is a roofline (FLOPs over achieved FLOP/s against bytes over achieved bandwidth) plus fixed
per-kernel costs; the constants live in `sim.hardware` and come from `python -m sim.calibration`.

`python -m sim.costmodel --gpu a100-40gb --model llama-3.1-8b --tp 1 --prefill 2048 --decode-batch 64 --context 2048`
prints one step's time, its breakdown and the replica's KV capacity.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.hardware import DEFAULT_GPU, GPU, get_gpu
from sim.models import Model, load_model, num_gpu_blocks

DEFAULT_MODEL = "llama-3.1-8b"
# FlashAttention's decode heuristics: with fewer (sequence, kv head) thread blocks than this fraction of the SMs it
# splits the KV across blocks (plus a combine kernel); otherwise it runs blocks in waves of this many per SM.
SPLIT_KV_BELOW_FRACTION_OF_SMS = 0.8
DECODE_BLOCKS_PER_SM = 2


# ---- operator groups: per layer and per GPU, in seconds -------------------------------------------------------------


def gemm_time(gpu: GPU, m: float, k: float, n: float, dtype_bytes: int) -> float:
    """(m x k) @ (k x n): a smooth roofline of tensor-core time and streaming the weights and activations."""
    c = gpu.calibration
    compute = 2.0 * m * k * n / (gpu.peak_flops * c.gemm_flops_eff)
    memory = dtype_bytes * (k * n + m * k + m * n) / (gpu.hbm_bandwidth * c.gemm_bw_eff)
    p = c.gemm_roofline_p
    return c.gemm_kernel_s + (compute**p + memory**p) ** (1.0 / p)


def elementwise_time(gpu: GPU, nbytes: float) -> float:
    """A memory-bound kernel that reads and writes `nbytes` in total."""
    c = gpu.calibration
    return c.elementwise_kernel_s + nbytes / (gpu.hbm_bandwidth * c.elementwise_bw_eff)


def layer_gemm_time(gpu: GPU, model: Model, tp: int, tokens: int) -> float:
    """The four GEMMs of one layer: fused QKV, attention output, fused gate+up, down."""
    h, d = model.hidden_size, model.dtype_bytes
    return (
        gemm_time(gpu, tokens, h, model.qkv_width(tp), d)
        + gemm_time(gpu, tokens, model.heads_per_gpu(tp) * model.head_dim, h, d)
        + gemm_time(gpu, tokens, h, model.mlp_up_width(tp), d)
        + gemm_time(gpu, tokens, model.intermediate_size / tp, h, d)
    )


def layer_elementwise_time(gpu: GPU, model: Model, tp: int, tokens: int) -> float:
    """The elementwise kernels of one layer: norms, rotary embedding, activation, residual add."""
    h = model.hidden_size
    rope = 2 * (model.heads_per_gpu(tp) + model.kv_heads_per_gpu(tp)) * model.head_dim  # read + write q, k
    act = (3 if model.gated_mlp else 2) * model.intermediate_size / tp  # read gate and up, write the product
    elements_per_token = [2 * h] * model.norms_per_layer + [rope, act, 3 * h]
    return sum(elementwise_time(gpu, tokens * e * model.dtype_bytes) for e in elements_per_token)


def linear_layer_time(gpu: GPU, model: Model, tp: int, tokens: int) -> float:
    """Everything in one layer but attention and communication, as Vidur's mlp profiles time it."""
    return layer_gemm_time(gpu, model, tp, tokens) + layer_elementwise_time(gpu, model, tp, tokens)


def prefill_attention_time(gpu: GPU, model: Model, tp: int, new: int, cached: int) -> float:
    """FlashAttention over `new` query tokens against `cached` + `new` keys.

    Work counts query-key pairs; the new x new causal block is weighted by `prefill_attn_causal_weight` (masking
    halves its pairs but its diagonal tiles run less efficiently; the fit says which wins).
    """
    c = gpu.calibration
    heads, kv_heads, hd, d = model.heads_per_gpu(tp), model.kv_heads_per_gpu(tp), model.head_dim, model.dtype_bytes
    pairs = new * (cached + c.prefill_attn_causal_weight * new)
    flops = 4.0 * pairs * hd * heads
    nbytes = d * hd * (2.0 * (cached + new) * kv_heads + 2.0 * new * heads)
    return (
        c.prefill_attn_kernel_s
        + flops / (gpu.peak_flops * c.prefill_attn_flops_eff)
        + nbytes / (gpu.hbm_bandwidth * c.prefill_attn_bw_eff)
    )


def decode_attention_time(gpu: GPU, model: Model, tp: int, num_decode: int, context_sum, maximum: Callable = max):
    """FlashAttention decode: `num_decode` sequences whose KV (context lengths summing to `context_sum`) is streamed.

    Parallelism is one thread block per (sequence, KV head). Few blocks take the split-KV path; otherwise blocks run
    in waves, and the busiest SM (ceil(blocks / SMs) blocks) streams at one SM's rate, which can be slower than the
    whole-HBM roofline. `context_sum` may be a numpy array (with `maximum=np.maximum`): the same float operations in
    the same order then give bit-identical per-element results.
    """
    c = gpu.calibration
    kv_heads, hd, d = model.kv_heads_per_gpu(tp), model.head_dim, model.dtype_bytes
    stream = context_sum * float(2 * kv_heads * hd * d) / (gpu.hbm_bandwidth * c.decode_attn_bw_eff)
    blocks = num_decode * kv_heads
    if blocks < SPLIT_KV_BELOW_FRACTION_OF_SMS * gpu.num_sms:
        return c.decode_attn_split_kernel_s + stream
    waves = math.ceil(blocks / (DECODE_BLOCKS_PER_SM * gpu.num_sms))
    sm_bandwidth = c.decode_attn_sm_bw_eff * gpu.hbm_bandwidth / gpu.num_sms
    busiest_sm = math.ceil(blocks / gpu.num_sms) * (context_sum / num_decode) * float(2 * hd * d) / sm_bandwidth
    return waves * c.decode_attn_wave_s + maximum(stream, busiest_sm)


def all_reduce_time(gpu: GPU, tp: int, nbytes, minimum: Callable = min):
    """One NCCL all-reduce of `nbytes` across the replica's `tp` GPUs (zero for tp = 1); `nbytes` may be an
    array when `minimum=np.minimum`."""
    if tp == 1:
        return 0.0
    fits = gpu.calibration.all_reduce
    if tp not in fits:
        raise ValueError(f"no all-reduce calibration for tp={tp} on {gpu.name}; calibrated tp: {sorted(fits)}")
    f = fits[tp]
    ll = f.ll_latency_s + nbytes / (f.ll_bw_fraction * gpu.nvlink_bandwidth)
    simple = f.simple_latency_s + nbytes / (f.simple_bw_fraction * gpu.nvlink_bandwidth)
    return minimum(ll, simple)


def overlap(gpu_s, launch_s, sqrt: Callable = math.sqrt):
    """GPU time of a step whose kernels the CPU launches in `launch_s`: the two overlap, so the step takes about
    the longer of them, and a little more near the crossover (a 4-norm; 3..6 fit Splitwise's steps equally well).
    Square roots only, so arrays (`sqrt=np.sqrt`) give bit-identical per-element results."""
    g2, l2 = gpu_s * gpu_s, launch_s * launch_s
    return sqrt(sqrt(g2 * g2 + l2 * l2))


# ---- one engine step -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Step times of one replica (`model` on `tp` x `gpu`). Build it with `make_cost_model`.

    Costs that depend only on the token count or the sequence count are memoised, so `step_time` is a couple of
    dictionary look-ups plus the attention arithmetic.
    """

    gpu: GPU
    model: Model
    tp: int
    _layers: float = field(init=False, repr=False)
    _decode_floor: float = field(init=False, repr=False)
    _prefill_floor: float = field(init=False, repr=False)
    _token_costs: dict[int, float] = field(init=False, repr=False, compare=False)
    _seq_costs: dict[int, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model.check_tp(self.tp)
        all_reduce_time(self.gpu, self.tp, 0.0)  # refuses an uncalibrated tp now, not mid-simulation
        set_ = object.__setattr__
        set_(self, "_layers", float(self.model.num_layers))
        c = self.gpu.calibration
        set_(self, "_decode_floor", self.model.num_layers * c.launch_per_layer_s)
        set_(self, "_prefill_floor", self.model.num_layers * c.prefill_launch_per_layer_s)
        set_(self, "_token_costs", {})
        set_(self, "_seq_costs", {})

    # Per-group pieces (seconds, whole step); breakdown() reports them, the hot path memoises their sums.
    def linear(self, tokens: int) -> float:
        return self._layers * linear_layer_time(self.gpu, self.model, self.tp, tokens)

    def all_reduce(self, tokens: int) -> float:
        nbytes = tokens * self.model.hidden_size * self.model.dtype_bytes
        return self._layers * 2.0 * all_reduce_time(self.gpu, self.tp, nbytes)

    def lm_head(self, seqs: int) -> float:
        """Logits of the last token of each sequence (vLLM prunes the others), vocab-parallel over tp."""
        m = self.model
        return gemm_time(self.gpu, seqs, m.hidden_size, m.vocab_size / self.tp, m.dtype_bytes)

    def cpu(self, seqs: int) -> float:
        c = self.gpu.calibration
        return c.cpu_step_s + c.cpu_step_per_tp_s * (self.tp - 1) + c.cpu_per_seq_s * seqs

    def prefill_attention(self, prefill: Sequence[tuple[int, int]]) -> float:
        attn = 0.0
        for new, cached in prefill:
            attn += prefill_attention_time(self.gpu, self.model, self.tp, new, cached)
        return self._layers * attn

    def decode_attention(self, num_decode: int, context_sum: int) -> float:
        if num_decode == 0:
            return 0.0
        return self._layers * decode_attention_time(self.gpu, self.model, self.tp, num_decode, context_sum)

    def _token_cost(self, tokens: int) -> float:
        cost = self._token_costs.get(tokens)
        if cost is None:
            cost = self._token_costs[tokens] = self.linear(tokens) + self.all_reduce(tokens)
        return cost

    def _seq_cost(self, seqs: int) -> float:
        cost = self._seq_costs.get(seqs)
        if cost is None:
            cost = self._seq_costs[seqs] = self.lm_head(seqs)
        return cost

    def step_time(self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context_sum: int) -> float:
        """Seconds for one step: `prefill` = (new_tokens, tokens_already_in_kv) per prefill chunk;
        num_decode decode sequences whose context lengths sum to decode_context_sum. An empty step takes 0."""
        tokens = num_decode
        attn = 0.0
        for new, cached in prefill:
            tokens += new
            attn += prefill_attention_time(self.gpu, self.model, self.tp, new, cached)
        if num_decode:
            attn += decode_attention_time(self.gpu, self.model, self.tp, num_decode, decode_context_sum)
        seqs = len(prefill) + num_decode
        if seqs == 0:
            return 0.0
        gpu = self._token_cost(tokens) + self._layers * attn + self._seq_cost(seqs)
        return overlap(gpu, self._prefill_floor if prefill else self._decode_floor) + self.cpu(seqs)

    def decode_step_times(self, num_decode: int, context_sum: int, k: int) -> np.ndarray:
        """Times of k consecutive decode-only steps; step i has context sum context_sum + i*num_decode.
        Bit-identical to [step_time((), num_decode, context_sum + i*num_decode) for i in range(k)]: the same
        float operations in the same order, on arrays."""
        if num_decode == 0:
            return np.zeros(k)
        context_sums = context_sum + np.arange(k, dtype=np.int64) * num_decode
        attn = 0.0 + decode_attention_time(self.gpu, self.model, self.tp, num_decode, context_sums, np.maximum)
        gpu = self._token_cost(num_decode) + self._layers * attn + self._seq_cost(num_decode)
        return overlap(gpu, self._decode_floor, np.sqrt) + self.cpu(num_decode)

    def breakdown(
        self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context_sum: int
    ) -> dict[str, float]:
        """Milliseconds per operator group of one step; the values add up to step_time (up to rounding)."""
        prefill = list(prefill)
        seqs = len(prefill) + num_decode
        if seqs == 0:
            return {}
        tokens = num_decode + sum(new for new, _ in prefill)
        parts = {
            "linear": self.linear(tokens),
            "attention_prefill": self.prefill_attention(prefill),
            "attention_decode": self.decode_attention(num_decode, decode_context_sum),
            "all_reduce": self.all_reduce(tokens),
            "lm_head": self.lm_head(seqs),
        }
        gpu = sum(parts.values())
        parts["launch_stall"] = overlap(gpu, self._prefill_floor if prefill else self._decode_floor) - gpu
        parts["cpu_overhead"] = self.cpu(seqs)
        return {name: 1e3 * seconds for name, seconds in parts.items()}


def make_cost_model(gpu: str = DEFAULT_GPU, model: str = DEFAULT_MODEL, tp: int = 1) -> CostModel:
    """Cost model of `model` (short name or config.json path) on `tp` GPUs of kind `gpu`."""
    return CostModel(get_gpu(gpu), load_model(model), tp)


# ---- command line --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.costmodel", description="Time of one engine step and the KV capacity of one replica."
    )
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU name (default {DEFAULT_GPU})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model short name or path of a config.json")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (GPUs per replica)")
    parser.add_argument("--prefill", type=int, default=0, help="new tokens of one prefill chunk in the step")
    parser.add_argument("--prefill-cached", type=int, default=0, help="tokens of that prompt already in the KV cache")
    parser.add_argument("--decode-batch", type=int, default=0, help="decoding sequences in the step")
    parser.add_argument("--context", type=int, default=0, help="context length of each decoding sequence")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = parser.parse_args(argv)
    for name in ("prefill", "prefill_cached", "decode_batch", "context"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    try:
        cm = make_cost_model(args.gpu, args.model, args.tp)
    except ValueError as e:
        parser.error(str(e))
    prefill = [(args.prefill, args.prefill_cached)] if args.prefill else []
    context_sum = args.decode_batch * args.context
    print(
        f"{cm.model.name} on tp={cm.tp} x {cm.gpu.name}: prefill {args.prefill} new + {args.prefill_cached} "
        f"cached tokens, {args.decode_batch} decodes at context {args.context}"
    )
    print(f"step time: {1e3 * cm.step_time(prefill, args.decode_batch, context_sum):.3f} ms")
    for group, ms in cm.breakdown(prefill, args.decode_batch, context_sum).items():
        print(f"  {group:<18} {ms:9.3f} ms")
    try:
        blocks = num_gpu_blocks(cm.gpu, cm.model, cm.tp, args.block_size, args.gpu_memory_utilization)
    except ValueError as e:
        print(f"KV capacity: {e}")
        return 1
    print(f"KV capacity: {blocks} blocks of {args.block_size} tokens = {blocks * args.block_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
