"""GPUs as data: datasheet numbers, plus calibrations read from the JSON files in `sim/calibrations/`.

A step's time has two parts with different owners, so they are calibrated and stored apart:
- the GPU kernels (`KernelCalibration`, `kernels-a100.json`): efficiency constants of the roofline operator groups,
  fitted by `python -m sim.calibration` to Vidur's per-kernel A100-80GB timings (`../shared/profiles/`).
  Efficiencies are fractions of a datasheet number and fixed costs are seconds, so they transfer to another GPU
  through its datasheet: A100-40GB has the A100-80GB's SMs and clocks but HBM2 at 1.555 TB/s instead of 2.039 TB/s,
  so every memory-bound term slows by 1.31x. H100/H200 reuse the A100 fractions (no H100 kernel profiles are
  shipped), so their decode, which is memory-bound, scales with their bandwidth.
- the serving engine around them (`EngineCalibration`, `engine-<name>.json`): CPU time per step, how kernels are
  launched (eager from Python, or replayed as a CUDA graph), whether the CPU work overlaps the GPU, the memory the
  engine keeps from the KV cache, and the per-call API overhead. `vllm-v0` is the eager 2023 vLLM that Splitwise
  and Vidur measured; `vllm-v1` is today's vLLM (CUDA graphs for decode, scheduling overlapped with the GPU).

The calibration commands (`python -m sim.calibration`, `python -m experiments.calibrate_cpu`) write these files
through `write_calibration`, the one writer; nothing is pasted into source code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

GiB = 1 << 30
MiB = 1 << 20

CALIBRATIONS_DIR = Path(__file__).resolve().parent / "calibrations"
KERNELS_A100 = CALIBRATIONS_DIR / "kernels-a100.json"
CPU_CORE = CALIBRATIONS_DIR / "cpu-core-vllm-cpu.json"
GPU_ENGINES = ("vllm-v0", "vllm-v1")
DEFAULT_ENGINE = "vllm-v1"


@dataclass(frozen=True)
class AllReduceFit:
    """One-node NCCL all-reduce at one tensor-parallel degree.

    NCCL runs whichever protocol is faster for the message size (LL for small messages, Simple for large ones),
    so time = min over both of latency + bytes / (fraction * NVLink bandwidth).
    """

    ll_latency_s: float
    ll_bw_fraction: float
    simple_latency_s: float
    simple_bw_fraction: float


@dataclass(frozen=True)
class KernelCalibration:
    """Efficiency constants of the roofline operator groups (see sim/costmodel.py for where each one enters)."""

    # Linear layers (QKV, O, gate+up, down, LM head): smooth max of compute and weight-streaming time.
    gemm_flops_eff: float  # achieved fraction of peak dense FLOP/s
    gemm_bw_eff: float  # achieved fraction of HBM bandwidth
    gemm_kernel_s: float  # fixed time per GEMM kernel (launch, prologue)
    gemm_roofline_p: float  # (compute^p + memory^p)^(1/p): p -> inf is the hard roofline max
    # Norms, rotary embedding, activation, residual add: memory-bound elementwise kernels.
    elementwise_bw_eff: float
    elementwise_kernel_s: float
    # Prefill attention (FlashAttention): query-key pairs times head_dim, plus reading the KV.
    prefill_attn_flops_eff: float
    prefill_attn_bw_eff: float
    prefill_attn_kernel_s: float
    prefill_attn_causal_weight: float  # cost of a new x new (causal) pair relative to a new x cached pair
    # Decode attention: streams the KV cache; occupancy-limited when few (sequence, kv head) blocks run.
    decode_attn_bw_eff: float
    decode_attn_split_kernel_s: float  # split-KV path (few blocks): attention + combine kernel
    decode_attn_wave_s: float  # fixed time per wave of thread blocks
    decode_attn_sm_bw_eff: float  # one SM's streaming rate, as a fraction of HBM bandwidth / num_sms
    # Tensor-parallel all-reduce, per tp degree.
    all_reduce: dict[int, AllReduceFit] = field(hash=False)

    def with_fixed_costs_scaled(self, scale: float) -> KernelCalibration:
        """The same kernels with every fixed per-kernel time multiplied by `scale` (CUDA-graph replay)."""
        fixed = ("gemm_kernel_s", "elementwise_kernel_s", "prefill_attn_kernel_s", "decode_attn_split_kernel_s",
                 "decode_attn_wave_s")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({name: values[name] * scale for name in fixed})
        return KernelCalibration(**values)


@dataclass(frozen=True)
class ApiOverhead:
    """Time a call spends in the serving front end (HTTP, tokenization, hand-off to the engine, detokenization and
    streaming), outside the engine's steps: `before_first_token_s` is added to a call's TTFT (request in, until the
    first token reaches the client), `after_finish_s` to its end-to-end latency on top of that (the last token's
    trip to the client minus the first token's, so it may be negative where the front end is slower to deliver the
    first token than the last). Constant per call: the simplest form the data supports."""

    before_first_token_s: float
    after_finish_s: float


@dataclass(frozen=True)
class EngineCalibration:
    """A serving-engine generation: how a step's kernels are launched and what CPU and memory it adds.

    Step modes (sim.costmodel.CostModel.step_time):
    - full CUDA graph: decode-only steps of at most `max_graph_batch(max_num_seqs)` sequences, padded to the next
      capture size; fixed per-kernel costs scaled by `graph_kernel_scale`, no launch floor;
    - piecewise CUDA graph: other steps of at most `cudagraph_max_capture_size` tokens; the attention kernels are
      launched eagerly (`piecewise_launch_per_layer_s` per layer), the rest replays as graphs;
    - eager: everything else; the CPU launches each layer from Python, so a step cannot finish before
      layers x `launch_per_layer_s` (`prefill_launch_per_layer_s` with prefill; 4-norm overlap with GPU time).
    CPU time per step (`cpu_*`) is added to the GPU time, or overlaps it (`cpu_overlapped`: the step takes the
    longer of the two, as vLLM v1's engine core schedules the next step while the GPU runs this one).
    """

    name: str
    cpu_step_s: float
    cpu_step_per_tp_s: float  # extra fixed cost per additional tensor-parallel worker
    cpu_per_seq_s: float
    cpu_overlapped: bool
    launch_per_layer_s: float
    prefill_launch_per_layer_s: float
    cudagraph_max_capture_size: int  # vLLM's default ceiling of capture sizes (tokens); 0: no CUDA graphs
    graph_kernel_scale: float  # share of the fixed per-kernel costs left when a graph replays the kernels
    piecewise_launch_per_layer_s: float
    api_overhead: ApiOverhead
    # Memory vLLM keeps from the KV cache besides weights and activations (sim.models.num_gpu_blocks).
    non_torch_bytes: int  # tp = 1: cuBLAS workspaces, allocator slack
    non_torch_bytes_tp: int  # tp > 1: plus NCCL and custom all-reduce buffers
    cudagraph_memory_bytes: int  # vLLM >= 0.21 profiles the graphs' memory and takes it from the KV budget

    @property
    def cuda_graphs(self) -> bool:
        return self.cudagraph_max_capture_size > 0


@dataclass(frozen=True)
class GPU:
    """Datasheet numbers of one GPU (SXM form factor), its kernel calibration and the engines calibrated on it."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int  # total memory as the CUDA driver reports it to vLLM (cudaMemGetInfo), below nvidia-smi's
    nvlink_bandwidth: float  # bytes/s, both directions together, as NVIDIA quotes it
    num_sms: int
    fp8_tensor_cores: bool  # W8A8 fp8 GEMMs at twice the bf16 peak (Hopper); elsewhere fp8 weights are upcast
    kernels: KernelCalibration
    engines: tuple[str, ...] = GPU_ENGINES
    default_engine: str = DEFAULT_ENGINE

    def engine(self, name: str | None = None) -> EngineCalibration:
        """The engine generation `name` (default: this device's default); unknown names are refused."""
        name = name or self.default_engine
        if name not in self.engines:
            raise ValueError(f"unknown engine {name!r} for {self.name}; known engines: {', '.join(self.engines)}")
        return load_engine(name)


# ---- the calibration files: one reader and one writer ---------------------------------------------------------------


def write_calibration(path: Path, data: dict) -> None:
    """Write a calibration file: JSON with sorted keys, so a refit with the same result is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_calibration(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: calibration file missing; rerun the command named in sim/hardware.py") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _build(cls, values: dict, path: Path, section: str):
    """`cls(**values)`, refusing missing or unknown fields by name."""
    names = {f.name for f in fields(cls)}
    missing, unknown = names - set(values), set(values) - names
    if missing or unknown:
        raise ValueError(f"{path}: section {section!r}: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
    return cls(**values)


def kernels_to_json(k: KernelCalibration) -> dict:
    out = {f.name: getattr(k, f.name) for f in fields(k) if f.name != "all_reduce"}
    out["all_reduce"] = {str(tp): [fit.ll_latency_s, fit.ll_bw_fraction, fit.simple_latency_s, fit.simple_bw_fraction]
                         for tp, fit in sorted(k.all_reduce.items())}
    return out


def kernels_from_json(values: dict, path: Path) -> KernelCalibration:
    values = dict(values)
    values["all_reduce"] = {int(tp): AllReduceFit(*v) for tp, v in values.get("all_reduce", {}).items()}
    return _build(KernelCalibration, values, path, "kernels")


def engine_to_json(e: EngineCalibration) -> dict:
    out = {f.name: getattr(e, f.name) for f in fields(e)}
    out["api_overhead"] = {f.name: getattr(e.api_overhead, f.name) for f in fields(ApiOverhead)}
    return out


def engine_from_json(values: dict, path: Path) -> EngineCalibration:
    values = dict(values)
    values["api_overhead"] = _build(ApiOverhead, values.get("api_overhead", {}), path, "api_overhead")
    return _build(EngineCalibration, values, path, "engine")


def engine_path(name: str) -> Path:
    return CPU_CORE if name == "vllm-cpu" else CALIBRATIONS_DIR / f"engine-{name}.json"


@cache
def load_kernels(path: Path) -> KernelCalibration:
    return kernels_from_json(read_calibration(path)["kernels"], path)


@cache
def load_engine(name: str) -> EngineCalibration:
    path = engine_path(name)
    return engine_from_json(read_calibration(path)["engine"], path)


# ---- the registry --------------------------------------------------------------------------------------------------

# memory_bytes: vLLM sizes the KV cache from torch's view of the device (cudaMemGetInfo's total), which is below
# nvidia-smi's memory.total; from vLLM start-up logs: A100-40GB 39.50 GiB (vLLM issue threads print 39.49-39.56),
# A100-80GB 79.15 GiB (79.11-79.25), H100-80GB 79.22 GiB (vllm-project/vllm#10511), H200 139.81 GiB.
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 312e12, 1.555e12, int(39.50 * GiB), 600e9, 108, False, load_kernels(KERNELS_A100)),
    "a100-80gb": GPU("a100-80gb", 312e12, 2.039e12, int(79.15 * GiB), 600e9, 108, False, load_kernels(KERNELS_A100)),
    "h100-80gb": GPU("h100-80gb", 989.4e12, 3.35e12, int(79.22 * GiB), 900e9, 132, True, load_kernels(KERNELS_A100)),
    "h200": GPU("h200", 989.4e12, 4.8e12, int(139.81 * GiB), 900e9, 132, True, load_kernels(KERNELS_A100)),
    # One x86 core running vLLM's CPU build (vllm-cpu 0.32.0, fp32, AVX2), for validating the simulator against real
    # servers on a machine without GPUs: 8-wide fp32 FMA on two ports at ~3 GHz (96 GFLOP/s), one core's share of
    # DRAM bandwidth, one "SM". Kernels and engine fitted together by `python -m experiments.calibrate_cpu`.
    # memory: about one server's footprint; validation runs set num_gpu_blocks_override as the servers do.
    "cpu-core": GPU("cpu-core", 96e9, 20e9, 2 * GiB, 0.0, 1, False, load_kernels(CPU_CORE), ("vllm-cpu",), "vllm-cpu"),
}
DEFAULT_GPU = "a100-40gb"


def get_gpu(name: str) -> GPU:
    """The registered GPU called `name`; an unknown name is refused with the list of known ones."""
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(GPUS))}") from None
