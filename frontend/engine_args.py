"""The vLLM engine arguments both backends share, with vLLM's own names and defaults.

One frozen ``EngineArgs`` is nested in the simulated cluster's config (``sim.cluster.ClusterConfig.engine``)
and in the real executor's (``real.config.RealConfig.engine``): the simulator's engine reads it directly, the
real executor turns it into server flags (``server_args``). Nothing copies its fields by hand, so the two
backends cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from frontend.checks import check_bool, check_choice, check_float, check_int, check_name

KV_CACHE_DTYPES = ("auto", "fp8")
SCHEDULING_POLICIES = ("fcfs", "priority")
ADMISSION_POLICIES = ("greedy", "predicted")


@dataclass(frozen=True)
class EngineArgs:
    """What shapes a vLLM engine's scheduling and KV memory (``vllm.engine.arg_utils.EngineArgs`` names)."""

    block_size: int = 16  # tokens per KV block (vLLM's CPU attention needs multiples of 32)
    max_num_seqs: int = 256  # requests in the running batch at most
    max_num_batched_tokens: int = 8192  # tokens computed in one step at most (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory the engine may use (weights, activations, KV)
    num_gpu_blocks_override: int | None = None  # KV blocks per replica instead of sizing them from memory
    max_model_len: int | None = None  # longest prompt + output a call may have; None: the model's context window
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) or "fp8": halves KV bytes, doubles capacity
    scheduling_policy: str = "fcfs"  # "fcfs", or "priority": waiting by (request priority, arrival), lowest first;
    #                                  a preemption takes the lowest-priority running request
    # Mechanisms vLLM 0.32 does not have (simulator-only; a real run says so in a notice, ``simulator_only``):
    admission_policy: str = "greedy"  # "greedy" (vLLM: a waiting request joins when its next chunk's blocks fit), or
    #                                   "predicted": only when its prompt + predicted output (the call's hint) fit
    #                                   beside the running requests' predicted growth
    kv_quotas: dict[str, float] | None = None  # agent -> share of each replica's KV blocks its requests may hold

    def simulator_only(self) -> list[str]:
        """The arguments set here that real vLLM has no counterpart for (each named with its value)."""
        out = [f"admission_policy={self.admission_policy!r}"] if self.admission_policy != "greedy" else []
        return out + ([f"kv_quotas={self.kv_quotas!r}"] if self.kv_quotas else [])

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            check_int(f"EngineArgs.{name}", getattr(self, name), 1)
        for name in ("enable_prefix_caching", "enable_chunked_prefill"):
            check_bool(f"EngineArgs.{name}", getattr(self, name))
        check_float("EngineArgs.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, open_low=True)
        if self.max_model_len is not None:
            check_int("EngineArgs.max_model_len", self.max_model_len, 1)
        check_choice("EngineArgs.kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_choice("EngineArgs.scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        check_choice("EngineArgs.admission_policy", self.admission_policy, ADMISSION_POLICIES)
        if self.kv_quotas is not None:
            check_quotas("EngineArgs.kv_quotas", self.kv_quotas)
        if self.num_gpu_blocks_override is not None:  # block 0 is vLLM's null block, so one more is needed
            check_int("EngineArgs.num_gpu_blocks_override", self.num_gpu_blocks_override, 2)

    def server_args(self) -> list[str]:
        """The flags of ``vllm serve`` that set these arguments (``gpu_memory_utilization`` only applies on GPUs,
        so the launcher adds it there)."""
        args = ["--block-size", str(self.block_size), "--max-num-seqs", str(self.max_num_seqs),
                "--max-num-batched-tokens", str(self.max_num_batched_tokens),
                "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"]
        if not self.enable_chunked_prefill:  # on by default in vLLM v1; the flag is left out unless it is turned off
            args.append("--no-enable-chunked-prefill")
        if self.num_gpu_blocks_override is not None:
            args += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.scheduling_policy != "fcfs":
            args += ["--scheduling-policy", self.scheduling_policy]
        return args


def check_quotas(where: str, quotas: object) -> None:
    """A dict of agent name -> share of the KV blocks in (0, 1]."""
    if not isinstance(quotas, dict):
        raise ValueError(f"{where}={quotas!r} must be a dict of agent name -> share of the KV blocks in (0, 1]")
    for agent, share in quotas.items():
        check_name(f"{where}: agent", agent)
        check_float(f"{where}[{agent!r}]", share, 0.0, 1.0, open_low=True)


# The engine arguments a command line exposes, as vLLM's flags (``--block-size`` ...): type and help.
FLAGS: dict[str, tuple[type, str]] = {
    "max_num_seqs": (int, "requests in the running batch at most"),
    "max_num_batched_tokens": (int, "tokens computed in one step at most"),
    "block_size": (int, "tokens per KV block"),
    "gpu_memory_utilization": (float, "share of each GPU's memory the engine may use"),
    "max_model_len": (int, "longest prompt + output of a call (default: the model's context window)"),
    "kv_cache_dtype": (str, "KV cache precision: auto (the model's dtype) or fp8"),
    "scheduling_policy": (str, "waiting order: fcfs, or priority (each call's priority, lower first)"),
}
CHOICES = {"kv_cache_dtype": KV_CACHE_DTYPES, "scheduling_policy": SCHEDULING_POLICIES}


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: tuple[str, ...] = tuple(FLAGS)) -> None:
    """Add vLLM's flags for ``names`` (keys of FLAGS), with EngineArgs' defaults."""
    defaults = EngineArgs()
    for name in names:
        kind, text = FLAGS[name]
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=text,
                            **({"choices": CHOICES[name]} if name in CHOICES else {}))


def from_flags(args: argparse.Namespace, names: tuple[str, ...] = tuple(FLAGS)) -> EngineArgs:
    """The EngineArgs the parsed flags ``names`` name (the others keep their defaults)."""
    return EngineArgs(**{name: getattr(args, name) for name in names})
