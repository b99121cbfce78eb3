"""Time of one vLLM engine step on one replica: a roofline per operator group, calibrated on real A100 timings,
inside the serving engine generation that launches it.

One step is one forward pass over the batch, run in lockstep on the replica's `tp` GPUs:

    gpu  = layers x [linear(T) + attention + 2 all-reduces of T x hidden] + LM head(S)
    step = launch(gpu) (+ or max) cpu(S)

T is the number of tokens in the step (new prefill tokens plus one per decoding sequence) and S the number of
sequences. Every term is a roofline (FLOPs over achieved FLOP/s against bytes over achieved bandwidth) plus fixed
per-kernel costs (`sim.hardware.KernelCalibration`). How the kernels are launched and how the CPU's work adds up
is the engine generation's (`sim.hardware.EngineCalibration`): vLLM v0 (2023) launches every layer eagerly and adds
its CPU time; vLLM v1 replays decode steps as CUDA graphs (batch padded to a capture size) and overlaps the CPU.
Mixture-of-experts layers cost the routed tokens' FLOPs but stream every expert the batch touches; quantized
weights stream fewer bytes and run at the quantization kernel's throughput.

`python -m sim.costmodel --gpu a100-40gb --model llama-3.1-8b --tp 1 --prefill 2048 --decode-batch 64 --context 2048`
prints one step's time, its breakdown, the replica's KV capacity and the per-call API overhead
(`--engine vllm-v0` for the 2023 engine).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from frontend.engine_args import add_flags, from_flags
from sim.hardware import DEFAULT_GPU, GPU, ApiOverhead, EngineCalibration, get_gpu
from sim.models import Model, load_model, num_gpu_blocks

DEFAULT_MODEL = "llama-3.1-8b"
# FlashAttention's decode heuristics: with fewer (sequence, kv head) thread blocks than this fraction of the SMs it
# splits the KV across blocks (plus a combine kernel); otherwise it runs blocks in waves of this many per SM.
SPLIT_KV_BELOW_FRACTION_OF_SMS = 0.8
DECODE_BLOCKS_PER_SM = 2


# ---- operator groups: per layer and per GPU, in seconds -------------------------------------------------------------


def _roofline(gpu: GPU, flops, nbytes, flops_scale: float = 1.0):
    """Smooth max (p-norm) of tensor-core time and streaming time, as the GEMM fit defines it."""
    c = gpu.kernels
    compute = flops / (gpu.peak_flops * c.gemm_flops_eff * flops_scale)
    memory = nbytes / (gpu.hbm_bandwidth * c.gemm_bw_eff)
    p = c.gemm_roofline_p
    return (compute**p + memory**p) ** (1.0 / p)


def gemm_time(gpu: GPU, m, k: float, n: float, dtype_bytes: int, weight_bytes: float | None = None,
              flops_scale: float = 1.0):
    """(m x k) @ (k x n) with activations of `dtype_bytes` and weights of `weight_bytes` per element (default: the
    activations'), at `flops_scale` times the bf16 GEMM throughput: one kernel streaming weights and activations."""
    weights = k * n * (dtype_bytes if weight_bytes is None else weight_bytes)
    nbytes = weights + dtype_bytes * (m * k + m * n)
    return gpu.kernels.gemm_kernel_s + _roofline(gpu, 2.0 * m * k * n, nbytes, flops_scale)


def elementwise_time(gpu: GPU, nbytes: float) -> float:
    """A memory-bound kernel that reads and writes `nbytes` in total."""
    c = gpu.kernels
    return c.elementwise_kernel_s + nbytes / (gpu.hbm_bandwidth * c.elementwise_bw_eff)


def _linear(gpu: GPU, model: Model, tokens, k: float, n: float):
    """One of the model's (possibly quantized) linear layers over `tokens` rows."""
    return gemm_time(gpu, tokens, k, n, model.dtype_bytes, model.weight_bytes_per_param,
                     model.gemm_flops_scale(gpu.fp8_tensor_cores))


def moe_experts_time(gpu: GPU, model: Model, tp: int, tokens):
    """vLLM's fused MoE over `tokens` tokens: two grouped GEMMs (gate+up, down) that compute every routed copy
    (tokens x experts_per_token) but stream the weights of each distinct expert the batch touches once."""
    h, d = model.hidden_size, model.dtype_bytes
    width = model.moe_intermediate_size / tp
    up = model.mlp_up_width(tp, model.moe_intermediate_size)
    routed = tokens * model.experts_per_token
    flops = 2.0 * routed * h * (up + width)
    weights = model.expected_active_experts(tokens) * h * (up + width) * model.weight_bytes_per_param
    activations = d * routed * (2 * h + up + width)  # read x, write/read the intermediate, write the output
    return 2 * gpu.kernels.gemm_kernel_s + _roofline(gpu, flops, weights + activations,
                                                     model.gemm_flops_scale(gpu.fp8_tensor_cores))


def layer_gemm_time(gpu: GPU, model: Model, tp: int, tokens, moe: bool = False):
    """The GEMMs of one layer: fused QKV, attention output, then a dense MLP (fused gate+up, down) or, in a MoE
    layer, the router, the routed experts and the shared experts."""
    h = model.hidden_size
    attention = _linear(gpu, model, tokens, h, model.qkv_width(tp)) + \
        _linear(gpu, model, tokens, model.heads_per_gpu(tp) * model.head_dim, h)
    if not moe:
        return attention + _linear(gpu, model, tokens, h, model.mlp_up_width(tp)) + \
            _linear(gpu, model, tokens, model.intermediate_size / tp, h)
    mlp = gemm_time(gpu, tokens, h, model.num_experts, model.dtype_bytes) + moe_experts_time(gpu, model, tp, tokens)
    if model.shared_intermediate_size:
        shared = model.shared_intermediate_size
        mlp += _linear(gpu, model, tokens, h, model.mlp_up_width(tp, shared)) + \
            _linear(gpu, model, tokens, shared / tp, h)
    return attention + mlp


def layer_elementwise_time(gpu: GPU, model: Model, tp: int, tokens, moe: bool = False):
    """The elementwise kernels of one layer: norms, rotary embedding, activation, residual add."""
    h = model.hidden_size
    rope = 2 * (model.heads_per_gpu(tp) + model.kv_heads_per_gpu(tp)) * model.head_dim  # read + write q, k
    per_unit = 3 if model.gated_mlp else 2  # read gate and up, write the product
    if moe:
        act = per_unit * (model.experts_per_token * model.moe_intermediate_size + model.shared_intermediate_size) / tp
    else:
        act = per_unit * model.intermediate_size / tp
    elements_per_token = [2 * h] * model.norms_per_layer + [rope, act, 3 * h]
    return sum(elementwise_time(gpu, tokens * e * model.dtype_bytes) for e in elements_per_token)


def linear_layer_time(gpu: GPU, model: Model, tp: int, tokens, moe: bool = False):
    """Everything in one layer but attention and communication, as Vidur's mlp profiles time it."""
    return layer_gemm_time(gpu, model, tp, tokens, moe) + layer_elementwise_time(gpu, model, tp, tokens, moe)


def prefill_attention_time(gpu: GPU, model: Model, tp: int, new, cached, kv_bytes: int | None = None):
    """FlashAttention over `new` query tokens against `cached` + `new` keys (KV of `kv_bytes` per element).

    Work counts query-key pairs; the new x new causal block is weighted by `prefill_attn_causal_weight` (masking
    halves its pairs but its diagonal tiles run less efficiently; the fit says which wins).
    """
    c = gpu.kernels
    heads, kv_heads, hd, d = model.heads_per_gpu(tp), model.kv_heads_per_gpu(tp), model.head_dim, model.dtype_bytes
    kv = d if kv_bytes is None else kv_bytes
    pairs = new * (cached + c.prefill_attn_causal_weight * new)
    flops = 4.0 * pairs * hd * heads
    nbytes = hd * (kv * 2.0 * (cached + new) * kv_heads + d * 2.0 * new * heads)
    return (
        c.prefill_attn_kernel_s
        + flops / (gpu.peak_flops * c.prefill_attn_flops_eff)
        + nbytes / (gpu.hbm_bandwidth * c.prefill_attn_bw_eff)
    )


def decode_attention_time(gpu: GPU, model: Model, tp: int, num_decode: int, context_sum, maximum: Callable = max,
                          kv_bytes: int | None = None):
    """FlashAttention decode: `num_decode` sequences whose KV (context lengths summing to `context_sum`, `kv_bytes`
    per element) is streamed.

    Parallelism is one thread block per (sequence, KV head). Few blocks take the split-KV path; otherwise blocks run
    in waves, and the busiest SM (ceil(blocks / SMs) blocks) streams at one SM's rate, which can be slower than the
    whole-HBM roofline. `context_sum` may be a numpy array (with `maximum=np.maximum`): the same float operations in
    the same order then give bit-identical per-element results.
    """
    c = gpu.kernels
    kv_heads, hd = model.kv_heads_per_gpu(tp), model.head_dim
    d = model.dtype_bytes if kv_bytes is None else kv_bytes
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
    fits = gpu.kernels.all_reduce
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


def cudagraph_capture_sizes(max_capture_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> tuple[int, ...]:
    """The batch sizes (tokens) vLLM captures CUDA graphs for by default (vllm/config/vllm.py): 1, 2, 4, multiples
    of 8 below 256, multiples of 16 from 256, up to min(2 x max_num_seqs, the platform ceiling,
    max_num_batched_tokens); plus max_num_batched_tokens and max_num_seqs where they fit."""
    ceiling = min(2 * max_num_seqs, max_capture_size)
    top = min(ceiling, max_num_batched_tokens)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, min(top + 1, 256), 8)) + list(range(256, top + 1, 16))
    if max_num_batched_tokens <= top:
        sizes.append(max_num_batched_tokens)
    if max_num_seqs <= min(ceiling, max_num_batched_tokens):
        sizes.append(max_num_seqs)
    return tuple(sorted(set(sizes)))


# ---- one engine step -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How one step runs: the kernel constants of its linear part and of its attention (CUDA-graph replay scales
    the fixed per-kernel costs), the token and sequence counts its GEMMs see (padded to a capture size under a
    graph), and the launch floor it overlaps with (0: none)."""

    linear_gpu: GPU
    attention_gpu: GPU
    graph: bool
    tokens: int
    seqs: int
    floor: float


@dataclass(frozen=True)
class CostModel:
    """Step times of one replica (`model` on `tp` x `gpu`, served by `engine`). Build it with `make_cost_model`.

    `max_num_seqs` and `max_num_batched_tokens` (vLLM's engine arguments) set the CUDA-graph capture sizes;
    `kv_cache_dtype` the bytes of KV that attention streams. Costs that depend only on the token count or the
    sequence count are memoised, so `step_time` is a couple of dictionary look-ups plus the attention arithmetic.
    """

    gpu: GPU
    model: Model
    tp: int
    engine: EngineCalibration | None = None  # None: the GPU's default engine
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_cache_dtype: str = "auto"
    _layers: float = field(init=False, repr=False)
    _graph_gpu: GPU = field(init=False, repr=False)
    _decode_sizes: tuple[int, ...] = field(init=False, repr=False)  # full-graph sizes for decode-only steps
    _piecewise_sizes: tuple[int, ...] = field(init=False, repr=False)  # piecewise-graph sizes for other steps
    _kv_bytes: int = field(init=False, repr=False)
    _token_costs: dict = field(init=False, repr=False, compare=False)
    _seq_costs: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model.check_tp(self.tp)
        all_reduce_time(self.gpu, self.tp, 0.0)  # refuses an uncalibrated tp now, not mid-simulation
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1; got {self.max_num_seqs}, "
                             f"{self.max_num_batched_tokens}")
        set_ = object.__setattr__
        engine = self.engine or self.gpu.engine()
        set_(self, "engine", engine)
        set_(self, "_layers", float(self.model.num_layers))
        set_(self, "_kv_bytes", self.model.kv_dtype_bytes(self.kv_cache_dtype))
        sizes = ()
        if engine.cuda_graphs:
            sizes = cudagraph_capture_sizes(engine.cudagraph_max_capture_size, self.max_num_seqs,
                                            self.max_num_batched_tokens)
        set_(self, "_piecewise_sizes", sizes)
        set_(self, "_decode_sizes", tuple(s for s in sizes if s <= self.max_num_seqs))
        kernels = self.gpu.kernels.with_fixed_costs_scaled(engine.graph_kernel_scale)
        set_(self, "_graph_gpu", dataclasses.replace(self.gpu, kernels=kernels) if sizes else self.gpu)
        set_(self, "_token_costs", {})
        set_(self, "_seq_costs", {})

    @property
    def api_overhead(self) -> ApiOverhead:
        """The serving front end's time per call, outside the engine's steps (see sim.hardware.ApiOverhead)."""
        return self.engine.api_overhead

    def _plan(self, has_prefill: bool, tokens: int, seqs: int) -> _Plan:
        """Full CUDA graph for decode-only steps up to the largest decode capture size; piecewise graph (attention
        launched eagerly) for other steps up to the largest capture size; eager above (vLLM v1's defaults)."""
        sizes = self._piecewise_sizes if has_prefill else self._decode_sizes
        i = bisect.bisect_left(sizes, tokens)
        e, n = self.engine, self._layers
        if i == len(sizes):
            floor = n * (e.prefill_launch_per_layer_s if has_prefill else e.launch_per_layer_s)
            return _Plan(self.gpu, self.gpu, False, tokens, seqs, floor)
        if has_prefill:
            return _Plan(self._graph_gpu, self.gpu, True, sizes[i], seqs, n * e.piecewise_launch_per_layer_s)
        return _Plan(self._graph_gpu, self._graph_gpu, True, sizes[i], sizes[i], 0.0)

    # Per-group pieces (seconds, whole step); breakdown() reports them, the hot path memoises their sums.
    def linear(self, tokens: int, gpu: GPU | None = None) -> float:
        gpu, m = gpu or self.gpu, self.model
        dense = float(m.num_layers - m.num_moe_layers)
        out = dense * linear_layer_time(gpu, m, self.tp, tokens) if dense else 0.0
        if m.num_moe_layers:
            out += float(m.num_moe_layers) * linear_layer_time(gpu, m, self.tp, tokens, moe=True)
        return out

    def all_reduce(self, tokens: int) -> float:
        nbytes = tokens * self.model.hidden_size * self.model.dtype_bytes
        return self._layers * 2.0 * all_reduce_time(self.gpu, self.tp, nbytes)

    def lm_head(self, seqs: int, gpu: GPU | None = None) -> float:
        """Logits of the last token of each sequence (vLLM prunes the others), vocab-parallel over tp."""
        m = self.model
        return gemm_time(gpu or self.gpu, seqs, m.hidden_size, m.vocab_size / self.tp, m.dtype_bytes)

    def cpu(self, seqs: int) -> float:
        e = self.engine
        return e.cpu_step_s + e.cpu_step_per_tp_s * (self.tp - 1) + e.cpu_per_seq_s * seqs

    def prefill_attention(self, prefill: Sequence[tuple[int, int]], gpu: GPU | None = None) -> float:
        attn = 0.0
        for new, cached in prefill:
            attn += prefill_attention_time(gpu or self.gpu, self.model, self.tp, new, cached, self._kv_bytes)
        return self._layers * attn

    def decode_attention(self, num_decode: int, context_sum: int, gpu: GPU | None = None) -> float:
        if num_decode == 0:
            return 0.0
        return self._layers * decode_attention_time(gpu or self.gpu, self.model, self.tp, num_decode, context_sum,
                                                    kv_bytes=self._kv_bytes)

    def _token_cost(self, plan: _Plan) -> float:
        """Linear layers and all-reduces: they depend only on the plan's token count, so they are memoised."""
        key = (plan.graph, plan.tokens)
        cost = self._token_costs.get(key)
        if cost is None:
            cost = self._token_costs[key] = self.linear(plan.tokens, plan.linear_gpu) + self.all_reduce(plan.tokens)
        return cost

    def _seq_cost(self, plan: _Plan) -> float:
        key = (plan.graph, plan.seqs)
        cost = self._seq_costs.get(key)
        if cost is None:
            cost = self._seq_costs[key] = self.lm_head(plan.seqs, plan.linear_gpu)
        return cost

    def _finish(self, plan: _Plan, gpu_s, seqs: int, sqrt: Callable = math.sqrt, maximum: Callable = max):
        """Launch floor, then the CPU's time: added (eager engines) or overlapped (v1's engine core)."""
        if plan.floor:
            gpu_s = overlap(gpu_s, plan.floor, sqrt)
        cpu = self.cpu(seqs)
        return maximum(gpu_s, cpu) if self.engine.cpu_overlapped else gpu_s + cpu

    def step_time(self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context_sum: int) -> float:
        """Seconds for one step: `prefill` = (new_tokens, tokens_already_in_kv) per prefill chunk;
        num_decode decode sequences whose context lengths sum to decode_context_sum. An empty step takes 0."""
        seqs = len(prefill) + num_decode
        if seqs == 0:
            return 0.0
        tokens = num_decode + sum(new for new, _ in prefill)
        plan = self._plan(bool(prefill), tokens, seqs)
        g, kv = plan.attention_gpu, self._kv_bytes
        attn = 0.0
        for new, cached in prefill:
            attn += prefill_attention_time(g, self.model, self.tp, new, cached, kv)
        if num_decode:
            attn += decode_attention_time(g, self.model, self.tp, num_decode, decode_context_sum, kv_bytes=kv)
        return self._finish(plan, self._token_cost(plan) + self._layers * attn + self._seq_cost(plan), seqs)

    def decode_step_times(self, num_decode: int, context_sum: int, k: int) -> np.ndarray:
        """Times of k consecutive decode-only steps; step i has context sum context_sum + i*num_decode.
        Bit-identical to [step_time((), num_decode, context_sum + i*num_decode) for i in range(k)]: the same
        float operations in the same order, on arrays."""
        if num_decode == 0:
            return np.zeros(k)
        plan = self._plan(False, num_decode, num_decode)
        context_sums = context_sum + np.arange(k, dtype=np.int64) * num_decode
        attn = 0.0 + decode_attention_time(plan.attention_gpu, self.model, self.tp, num_decode, context_sums,
                                           np.maximum, self._kv_bytes)
        gpu_s = self._token_cost(plan) + self._layers * attn + self._seq_cost(plan)
        return np.asarray(self._finish(plan, gpu_s, num_decode, np.sqrt, np.maximum), dtype=np.float64)

    def breakdown(
        self, prefill: Sequence[tuple[int, int]], num_decode: int, decode_context_sum: int
    ) -> dict[str, float]:
        """Milliseconds per operator group of one step; the values add up to step_time (up to rounding).
        `launch_stall` is the launch floor's share, `cpu_overhead` the CPU time the GPU time does not hide."""
        prefill = list(prefill)
        seqs = len(prefill) + num_decode
        if seqs == 0:
            return {}
        plan = self._plan(bool(prefill), num_decode + sum(new for new, _ in prefill), seqs)
        parts = {
            "linear": self.linear(plan.tokens, plan.linear_gpu),
            "attention_prefill": self.prefill_attention(prefill, plan.attention_gpu),
            "attention_decode": self.decode_attention(num_decode, decode_context_sum, plan.attention_gpu),
            "all_reduce": self.all_reduce(plan.tokens),
            "lm_head": self.lm_head(plan.seqs, plan.linear_gpu),
        }
        gpu = sum(parts.values())
        launched = overlap(gpu, plan.floor) if plan.floor else gpu
        parts["launch_stall"] = launched - gpu
        parts["cpu_overhead"] = self._finish(plan, gpu, seqs) - launched
        return {name: 1e3 * seconds for name, seconds in parts.items()}

    def mode(self, has_prefill: bool, tokens: int) -> str:
        """How a step of `tokens` tokens runs: 'full graph (padded to N)', 'piecewise graph (N)' or 'eager'."""
        plan = self._plan(has_prefill, tokens, tokens)
        if not plan.graph:
            return "eager"
        return f"{'piecewise' if has_prefill else 'full'} CUDA graph, padded to {plan.tokens} tokens"


def make_cost_model(gpu: str = DEFAULT_GPU, model: str = DEFAULT_MODEL, tp: int = 1, engine: str | None = None,
                    **engine_args) -> CostModel:
    """Cost model of `model` (short name or config.json path) on `tp` GPUs of kind `gpu`, served by the engine
    generation `engine` (default: the GPU's, vllm-v1; 'vllm-v0' is the eager 2023 vLLM). `engine_args`:
    max_num_seqs, max_num_batched_tokens, kv_cache_dtype (vLLM's names and defaults)."""
    g = get_gpu(gpu)
    return CostModel(g, load_model(model), tp, g.engine(engine), **engine_args)


# ---- command line --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim.costmodel", description="Time of one engine step and the KV capacity of one replica.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--gpu", default=DEFAULT_GPU, help="GPU name")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model short name or path of a config.json")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (GPUs per replica)")
    parser.add_argument("--engine", default=None,
                        help="engine generation: vllm-v1 or vllm-v0 (None: the GPU's, vllm-v1 on GPUs)")
    parser.add_argument("--prefill", type=int, default=0, help="new tokens of one prefill chunk in the step")
    parser.add_argument("--prefill-cached", type=int, default=0, help="tokens of that prompt already in the KV cache")
    parser.add_argument("--decode-batch", type=int, default=0, help="decoding sequences in the step")
    parser.add_argument("--context", type=int, default=0, help="context length of each decoding sequence")
    flags = ("block_size", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "kv_cache_dtype")
    add_flags(parser, flags)
    args = parser.parse_args(argv)
    for name in ("prefill", "prefill_cached", "decode_batch", "context"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.decode_batch and not args.context:
        parser.error("--decode-batch needs --context >= 1 (the context length of each decoding sequence)")
    if args.prefill_cached and not args.prefill:
        parser.error("--prefill-cached needs --prefill >= 1 (the new tokens of that prompt)")
    engine_args = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_dtype=args.kv_cache_dtype)
    try:
        from_flags(args, flags)
        cm = make_cost_model(args.gpu, args.model, args.tp, args.engine, **engine_args)
    except ValueError as e:
        parser.error(str(e))
    prefill = [(args.prefill, args.prefill_cached)] if args.prefill else []
    context_sum = args.decode_batch * args.context
    if not prefill and not args.decode_batch:
        print(f"{cm.model.name} on tp={cm.tp} x {cm.gpu.name} ({cm.engine.name}): no step time, the step has no work; "
              "give --prefill N (new prompt tokens) and/or --decode-batch N --context C")
    else:
        print(f"{cm.model.name} on tp={cm.tp} x {cm.gpu.name} ({cm.engine.name}): prefill {args.prefill} new + "
              f"{args.prefill_cached} cached tokens, {args.decode_batch} decodes at context {args.context}")
        print(f"step time: {1e3 * cm.step_time(prefill, args.decode_batch, context_sum):.3f} ms "
              f"({cm.mode(bool(prefill), args.prefill + args.decode_batch)})")
        for group, ms in cm.breakdown(prefill, args.decode_batch, context_sum).items():
            print(f"  {group:<18} {ms:9.3f} ms")
    api = cm.api_overhead
    print(f"API overhead per call: {1e3 * api.before_first_token_s:.1f} ms before the first token, "
          f"{1e3 * api.after_finish_s:.1f} ms after the last")
    try:
        blocks = num_gpu_blocks(cm.gpu, cm.model, cm.tp, args.block_size, args.gpu_memory_utilization,
                                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                kv_cache_dtype=args.kv_cache_dtype, engine=cm.engine.name)
    except ValueError as e:
        print(f"KV capacity: {e}")
        return 1
    print(f"KV capacity: {blocks} blocks of {args.block_size} tokens = {blocks * args.block_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
