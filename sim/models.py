"""Models as data: the geometry the cost model needs, read from Hugging Face `config.json` files, and the KV
capacity a replica derives from it (`num_gpu_blocks`).

A shipped model is `sim/models/<short name>.json` (the real config of the repository in MODELS); any other
model is added by passing the path of its `config.json` (or of the folder holding it) to `load_model`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from sim.hardware import DEFAULT_ENGINE, GPU, EngineCalibration, GiB, get_gpu, load_engine

MODELS_DIR = Path(__file__).resolve().parent / "models"

# Short name -> Hugging Face repository whose config.json is shipped as sim/models/<short name>.json.
MODELS: dict[str, str | None] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
    "internlm-20b": "internlm/internlm-20b",
    "qwen-72b": "Qwen/Qwen-72B",
    "phi-2": "microsoft/phi-2",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "llama-3.1-8b-awq": "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
    "tiny-llama": None,  # config-only Llama for vLLM's CPU build (dummy weights), see ../shared/notes/vllm-cpu.md
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# vLLM's --kv-cache-dtype values -> bytes per element ("auto": the model's dtype).
KV_CACHE_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# config.json does not say these; they follow from the architecture (vLLM's model classes).
NON_GATED_MLP = {"phi"}  # fc1 -> GELU -> fc2 instead of SiLU(gate) * up -> down
PARALLEL_BLOCK = {"phi"}  # attention and MLP read the same normed input: one norm per layer, not two
# Fields naming architecture features the cost model cannot cost; a config that sets one is refused.
UNSUPPORTED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (DeepSeek-V2/V3)",
    "sliding_window": "sliding-window attention",
    "moe_layer_freq": "MoE layers interleaved with dense ones",
    "decoder_sparse_step": "MoE layers interleaved with dense ones",
    "mlp_only_layers": "dense layers at given positions of a MoE model",
}


@dataclass(frozen=True)
class QuantMethod:
    """How vLLM runs a weight-quantization method on these GPUs (the kernels it picks), for the cost model.

    Only the linear layers' weights are quantized (embeddings, LM head and norms stay 16 bit); group-wise methods
    store one fp16 scale (and a zero point of `bits` bits where `zero_point`) per `group_size` weights.
    `flops_scale` is the GEMM's achieved tensor-core throughput relative to a bf16 GEMM when weights are dequantized
    in the kernel (Marlin W4A16/W8A16): an estimate, not calibrated (no quantized kernel profiles are shipped);
    Marlin reports near-bf16 throughput at large batch, and memory-bound small batches gain the full byte ratio.
    fp8 (W8A8) on GPUs with fp8 tensor cores runs at twice the bf16 peak instead.
    """

    name: str
    default_bits: int
    flops_scale: float
    fp8: bool = False


QUANT_METHODS = {
    "awq": QuantMethod("awq", 4, 0.85),
    "gptq": QuantMethod("gptq", 4, 0.85),
    "fp8": QuantMethod("fp8", 8, 0.85, fp8=True),
}


@dataclass(frozen=True)
class Model:
    """Decoder-only transformer geometry; per-GPU quantities take the tensor-parallel degree `tp`.

    Mixture-of-experts layers (`num_experts` > 0) route each token to `experts_per_token` of `num_experts` experts
    of width `moe_intermediate_size`, plus always-active shared experts of total width `shared_intermediate_size`;
    the first `num_dense_layers` layers keep a dense MLP of `intermediate_size`. Experts are sharded over tp like a
    dense MLP (vLLM's default without expert parallelism). Quantized linear weights have `weight_bits` bits.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int
    max_position_embeddings: int  # the context window: vLLM's default max_model_len
    gated_mlp: bool = True
    norms_per_layer: int = 2
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    num_dense_layers: int = 0
    quant: QuantMethod | None = None
    weight_bits: int = 16
    quant_group_size: int = 0
    quant_zero_point: bool = False

    def check_tp(self, tp: int) -> None:
        """vLLM's constraints: query heads split evenly; KV heads split evenly or are replicated."""
        if tp < 1 or self.num_heads % tp or (self.num_kv_heads % tp and tp % self.num_kv_heads):
            raise ValueError(
                f"tp={tp} does not divide model {self.name!r}: it has {self.num_heads} query heads and "
                f"{self.num_kv_heads} KV heads; use a tp that divides the query heads and divides or is a "
                f"multiple of the KV heads (e.g. 1, 2, 4, 8)"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    def heads_per_gpu(self, tp: int) -> int:
        return self.num_heads // tp

    def kv_heads_per_gpu(self, tp: int) -> int:
        """With more GPUs than KV heads, vLLM replicates each KV head, so every GPU keeps at least one."""
        return max(1, self.num_kv_heads // tp)

    def qkv_width(self, tp: int) -> int:
        """Output features of one GPU's fused QKV projection."""
        return (self.heads_per_gpu(tp) + 2 * self.kv_heads_per_gpu(tp)) * self.head_dim

    def mlp_up_width(self, tp: int, intermediate: int | None = None) -> float:
        """Output features of one GPU's fused gate+up projection (just `up` for a non-gated MLP)."""
        return (2 if self.gated_mlp else 1) * (self.intermediate_size if intermediate is None else intermediate) / tp

    def mlp_params(self, tp: int, intermediate: int) -> float:
        """Weights of one GPU's shard of a (gated) MLP of width `intermediate`."""
        return self.hidden_size * self.mlp_up_width(tp, intermediate) + intermediate / tp * self.hidden_size

    def attention_params(self, tp: int) -> float:
        h = self.hidden_size
        return h * self.qkv_width(tp) + self.heads_per_gpu(tp) * self.head_dim * h

    def moe_layer_params(self, tp: int) -> float:
        """One MoE layer's MLP weights on one GPU: every expert's shard, the shared experts and the router."""
        experts = self.num_experts * self.mlp_params(tp, self.moe_intermediate_size)
        shared = self.mlp_params(tp, self.shared_intermediate_size) if self.shared_intermediate_size else 0.0
        return experts + shared + self.hidden_size * self.num_experts

    def linear_params(self, tp: int) -> float:
        """Weights of all layers' linear layers on one GPU (what quantization applies to)."""
        dense_layers = self.num_layers - self.num_moe_layers
        dense = dense_layers * self.mlp_params(tp, self.intermediate_size)
        return self.num_layers * self.attention_params(tp) + dense + self.num_moe_layers * self.moe_layer_params(tp)

    @property
    def weight_bytes_per_param(self) -> float:
        """Bytes one linear-layer weight takes, its share of group scales and zero points included."""
        if self.quant is None:
            return float(self.dtype_bytes)
        per_group = (2 + (self.weight_bits / 8 if self.quant_zero_point else 0)) / self.quant_group_size \
            if self.quant_group_size else 0.0
        return self.weight_bits / 8 + per_group

    def weight_bytes(self, tp: int) -> int:
        """Bytes of weights on each GPU: sharded layers, vocab-parallel embedding and LM head, norms."""
        self.check_tp(tp)
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size / tp
        norms = (self.num_layers * self.norms_per_layer + 1) * self.hidden_size
        return int(self.linear_params(tp) * self.weight_bytes_per_param + (embeddings + norms) * self.dtype_bytes)

    def kv_bytes_per_token(self, tp: int, kv_cache_dtype: str = "auto") -> int:
        """Bytes of K and V cache that one token occupies on each GPU, all layers together."""
        self.check_tp(tp)
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * self.kv_dtype_bytes(kv_cache_dtype)

    def kv_dtype_bytes(self, kv_cache_dtype: str = "auto") -> int:
        if kv_cache_dtype == "auto":
            return self.dtype_bytes
        if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} unknown; known: auto, "
                             f"{', '.join(KV_CACHE_DTYPE_BYTES)}")
        return KV_CACHE_DTYPE_BYTES[kv_cache_dtype]

    def gemm_flops_scale(self, fp8_tensor_cores: bool) -> float:
        """Achieved GEMM throughput of this model's linear layers relative to bf16 on a GPU (see QuantMethod)."""
        if self.quant is None:
            return 1.0
        return 2.0 if self.quant.fp8 and fp8_tensor_cores else self.quant.flops_scale

    def expected_active_experts(self, tokens):
        """Expected number of distinct experts that `tokens` tokens (scalar or array) route to, each picking
        experts_per_token of num_experts uniformly: E * (1 - (1 - k/E)^tokens). Every expert touched is streamed."""
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)


def _require(cfg: dict, field: str, source: str) -> int:
    value = cfg.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
    return value


# config.json fields that give the context window, in the order vLLM's _get_and_verify_max_len reads them.
CONTEXT_WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                         "model_max_length")


def _context_window(cfg: dict, source: str) -> int:
    for field in CONTEXT_WINDOW_FIELDS:
        if field in cfg:
            return _require(cfg, field, source)
    raise ValueError(f"{source}: no context window: none of the fields {', '.join(CONTEXT_WINDOW_FIELDS)} is set")


def _moe_fields(cfg: dict, source: str) -> dict:
    """The MoE geometry under its Mixtral, Qwen-MoE or DeepSeek-MoE names (an empty dict for a dense model)."""
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    if not experts:
        return {}
    name = next(f for f in ("num_local_experts", "num_experts", "n_routed_experts") if cfg.get(f))
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"{source}: field {name!r} must be a positive integer, got {experts!r}")
    per_token = _require(cfg, "num_experts_per_tok", source)
    if per_token > experts:
        raise ValueError(f"{source}: num_experts_per_tok={per_token} exceeds {name}={experts}")
    # Mixtral's experts have the dense intermediate_size; Qwen-MoE and DeepSeek name it moe_intermediate_size.
    width = _require(cfg, "moe_intermediate_size", source) if "moe_intermediate_size" in cfg else \
        _require(cfg, "intermediate_size", source)
    shared = cfg.get("shared_expert_intermediate_size") or 0  # Qwen2-MoE: one shared expert of this width
    if cfg.get("n_shared_experts"):  # DeepSeek: n shared experts of the routed experts' width
        shared = _require(cfg, "n_shared_experts", source) * width
    dense = cfg.get("first_k_dense_replace") or 0  # DeepSeek: the first k layers keep a dense MLP
    if not isinstance(dense, int) or dense < 0:
        raise ValueError(f"{source}: field 'first_k_dense_replace' must be an integer >= 0, got {dense!r}")
    return dict(num_experts=experts, experts_per_token=per_token, moe_intermediate_size=width,
                shared_intermediate_size=shared, num_dense_layers=dense)


def _quant_fields(cfg: dict, source: str) -> dict:
    """Weight quantization from `quantization_config`; methods the cost model cannot cost are refused by name."""
    q = cfg.get("quantization_config")
    if not q:
        return {}
    if not isinstance(q, dict):
        raise ValueError(f"{source}: field 'quantization_config' must be an object, got {q!r}")
    method = q.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"{source}: field 'quantization_config.quant_method' is {method!r}; the cost model knows "
                         f"{', '.join(QUANT_METHODS)}")
    quant = QUANT_METHODS[method]
    bits = q.get("bits", quant.default_bits) if not quant.fp8 else 8
    if bits not in (4, 8):
        raise ValueError(f"{source}: field 'quantization_config.bits' is {bits!r}; allowed: 4, 8")
    group = q.get("group_size", 0) if not quant.fp8 else 0
    if not isinstance(group, int) or group < -1:
        raise ValueError(f"{source}: field 'quantization_config.group_size' must be an integer >= -1, got {group!r}")
    zero_point = bool(q.get("zero_point", False)) if method == "awq" else not q.get("sym", True)
    return dict(quant=quant, weight_bits=bits, quant_group_size=max(group, 0), quant_zero_point=zero_point)


def model_from_config(cfg: dict, name: str, source: str = "config.json") -> Model:
    """Build a Model from the fields of a Hugging Face config.json (`source` names the file in errors)."""
    for f, feature in UNSUPPORTED_FIELDS.items():
        value = cfg.get(f)
        harmless = value in (None, 1, []) or (f == "sliding_window" and not cfg.get("use_sliding_window", True))
        if not harmless:
            raise ValueError(f"{source}: field {f!r} = {value!r} describes {feature}, which the cost model cannot "
                             f"cost")
    model_type = cfg.get("model_type", "")
    intermediate = _require(cfg, "intermediate_size", source)
    heads = _require(cfg, "num_attention_heads", source)
    hidden = _require(cfg, "hidden_size", source)
    head_dim = cfg.get("head_dim") or cfg.get("kv_channels") or hidden // heads
    if model_type == "qwen":  # first-generation Qwen: intermediate_size counts gate and up together
        intermediate //= 2
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"  # absent: served in 16 bit, as vLLM does
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{source}: field 'torch_dtype' is {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return Model(
        name=name,
        num_layers=_require(cfg, "num_hidden_layers", source),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=_require(cfg, "vocab_size", source),
        max_position_embeddings=_context_window(cfg, source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype_bytes=DTYPE_BYTES[dtype],
        gated_mlp=model_type not in NON_GATED_MLP,
        norms_per_layer=1 if model_type in PARALLEL_BLOCK else 2,
        **_moe_fields(cfg, source),
        **_quant_fields(cfg, source),
    )


def load_model(name_or_path: str | Path) -> Model:
    """A shipped model by short name, or any model by the path of its config.json (or the folder holding it)."""
    key = str(name_or_path)
    if key in MODELS:
        path, name = MODELS_DIR / f"{key}.json", key
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"unknown model {key!r}; known models: {', '.join(sorted(MODELS))}; "
                f"or give the path of a Hugging Face config.json"
            )
        name = path.parent.name if path.name == "config.json" else path.stem
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields")
    return model_from_config(cfg, name, str(path))


# ---- KV capacity ---------------------------------------------------------------------------------------------------


def activation_peak_bytes(model: Model, tp: int, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256) -> int:
    """The transient peak of vLLM's profiling run on one GPU: a forward pass over max_num_batched_tokens (hidden
    state and residual, QKV, gate+up and activation outputs, or the fused-MoE caches of the routed copies) and the
    dummy sampler run over max_num_seqs sequences (fp32 logits over the whole vocabulary, and probabilities).
    Llama-3.1-8B at 8,192 tokens: 1.12 GiB; vLLM's logs print 1.19-1.24 GiB for it."""
    per_token = 2 * model.hidden_size + model.qkv_width(tp)
    if model.is_moe:
        width = model.moe_intermediate_size / tp
        per_token += model.experts_per_token * ((3 if model.gated_mlp else 2) * width + model.hidden_size)
    else:
        per_token += model.mlp_up_width(tp) + model.intermediate_size / tp
    sampler = max_num_seqs * model.vocab_size * 4 * 2
    return int(max_num_batched_tokens * per_token * model.dtype_bytes + sampler)


def default_activation_reserve(model: Model, tp: int, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                               engine: EngineCalibration | None = None) -> int:
    """What vLLM keeps back from the KV cache on each GPU besides the weights: the engine's non-torch memory, the
    profiling run's activation peak and (vLLM >= 0.21) the CUDA graphs' memory."""
    engine = engine or load_engine(DEFAULT_ENGINE)
    non_torch = engine.non_torch_bytes_tp if tp > 1 else engine.non_torch_bytes
    peak = activation_peak_bytes(model, tp, max_num_batched_tokens, max_num_seqs)
    return non_torch + peak + engine.cudagraph_memory_bytes


def num_gpu_blocks(
    gpu: GPU | str,
    model: Model | str,
    tp: int,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    activation_reserve_bytes: int | None = None,
    *,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    kv_cache_dtype: str = "auto",
    engine: str | None = None,
) -> int:
    """KV-cache blocks per replica, as vLLM sizes them (vllm/v1/worker/gpu_worker.py, determine_available_memory):
    ceil(device memory x utilization), minus the weights and what the profiling run keeps back
    (`default_activation_reserve`, or `activation_reserve_bytes`), divided by one block's KV bytes on each GPU.
    Refuses a model that cannot hold one block."""
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    model = load_model(model) if isinstance(model, str) else model
    if block_size < 1 or not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"block_size must be >= 1 and gpu_memory_utilization in (0, 1]; got {block_size}, {gpu_memory_utilization}"
        )
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError(f"max_num_batched_tokens and max_num_seqs must be >= 1; got {max_num_batched_tokens}, "
                         f"{max_num_seqs}")
    if activation_reserve_bytes is None:
        activation_reserve_bytes = default_activation_reserve(model, tp, max_num_batched_tokens, max_num_seqs,
                                                              gpu.engine(engine))
    weights = model.weight_bytes(tp)
    budget = math.ceil(gpu.memory_bytes * gpu_memory_utilization)
    free = budget - weights - activation_reserve_bytes
    block_bytes = block_size * model.kv_bytes_per_token(tp, kv_cache_dtype)
    blocks = int(free // block_bytes) if free > 0 else 0
    if blocks < 1:
        raise ValueError(
            f"model {model.name!r} does not fit on tp={tp} x {gpu.name}: per GPU, {gpu_memory_utilization:.0%} of "
            f"{gpu.memory_bytes / GiB:.1f} GiB = {budget / GiB:.2f} GiB, minus weights {weights / GiB:.2f} GiB and "
            f"activation reserve {activation_reserve_bytes / GiB:.2f} GiB, leaves {free / GiB:.2f} GiB for KV, less "
            f"than one block ({block_bytes / 2**20:.2f} MiB); use a larger tp or a GPU with more memory"
        )
    return blocks
