"""What the real executor runs: which servers, with which vLLM engine arguments, and how it drives them.

The engine arguments are the simulator's own ``EngineArgs`` object (``RealConfig.engine``, like
``ClusterConfig.engine``), so one object configures both backends. Servers on CPU cores need a ``block_size``
that is a multiple of 32 (vLLM's CPU attention only accepts those).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from frontend.checks import check_bool, check_choice, check_float, check_int, check_name
from frontend.engine_args import EngineArgs

CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention backend: block_size must be a multiple of this
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # vllm serve --dtype

# How the executor drives the servers: one setting per run, so every pool's RealConfig must agree on them.
EXECUTOR_FIELDS = ("control_interval_s", "scrape_interval_s", "request_timeout_s", "retry_failed", "record_token_times")


@dataclass(frozen=True)
class RealConfig:
    model: str  # model directory (HF config.json; with load_format="dummy" no weights are needed) or hub name
    num_replicas: int = 1  # replicas serving at t=0
    urls: tuple[str, ...] = ()  # attach mode: servers managed elsewhere; empty: launch our own
    cores: tuple[int, ...] = ()  # launch mode on CPU: cores, one per server (empty: all usable cores)
    gpus: tuple[int, ...] = ()  # launch mode on GPUs: CUDA device ids, tensor_parallel_size per server
    tensor_parallel_size: int = 1  # GPUs per server (consecutive ids of `gpus`)
    max_replicas: int = 0  # scaling ceiling; 0: len(urls) when attaching, number of cores when launching
    pool: str = "default"  # the pool these replicas form (execute() takes several RealConfigs for several pools)
    # vLLM engine arguments: flags of the launched servers; in attach mode, what the servers were started with
    engine: EngineArgs = EngineArgs()
    kv_cache_space_gib: int = 1  # CPU servers without num_gpu_blocks_override: VLLM_CPU_KVCACHE_SPACE (integer GiB)
    dtype: str = "float32"
    load_format: str = "dummy"
    enforce_eager: bool = True  # skips a ~25 s torch.compile per server start
    vocab_size: int = 0  # prompt token ids are drawn below it; 0: read <model>/config.json
    extra_server_args: tuple[str, ...] = ()
    python: str = sys.executable  # the interpreter that has vllm installed
    log_dir: str = ""  # server logs; "": a fresh temporary directory
    # executor
    control_interval_s: float = 5.0  # the scaler runs this often (wall seconds)
    scrape_interval_s: float = 0.5  # /metrics of every replica is read this often
    startup_timeout_s: float = 120.0  # a server that is not healthy by then counts as failed to start
    request_timeout_s: float = 600.0  # longest silence on a streaming call before it counts as failed
    retry_failed: bool = False  # calls in flight on a replica that died: False mark failed, True re-route
    record_token_times: bool = True  # one row per generated token in RealResult.token_times

    def __post_init__(self) -> None:
        self._check_fields()
        if self.urls and self.num_replicas > len(self.urls):
            raise ValueError(f"RealConfig: num_replicas={self.num_replicas} but only {len(self.urls)} urls to "
                             f"attach to; list more urls or lower num_replicas")
        if self.urls and self.max_replicas > len(self.urls):
            raise ValueError(f"RealConfig: max_replicas={self.max_replicas} but only {len(self.urls)} urls "
                             f"to attach to")
        if self.gpus and (self.cores or self.urls):
            raise ValueError("RealConfig: set one of gpus (launch on GPUs), cores (launch on CPU cores) or urls "
                             "(attach); got gpus together with " + ("cores" if self.cores else "urls"))
        if self.tensor_parallel_size < 1 or len(self.gpus) % self.tensor_parallel_size:
            raise ValueError(f"RealConfig: {len(self.gpus)} gpus do not split into servers of "
                             f"tensor_parallel_size={self.tensor_parallel_size}; list a multiple of it")
        if len(set(self.gpus)) != len(self.gpus) or len(set(self.cores)) != len(self.cores):
            raise ValueError(f"RealConfig: gpus={self.gpus} / cores={self.cores} list a device twice")
        if not self.gpus and self.launch and self.engine.block_size % CPU_BLOCK_MULTIPLE:
            raise ValueError(f"RealConfig: engine.block_size={self.engine.block_size}, but vLLM's CPU attention takes "
                             f"only multiples of {CPU_BLOCK_MULTIPLE}; use EngineArgs(block_size=32) for CPU servers")
        if self.num_replicas > self.capacity:
            raise ValueError(f"RealConfig: num_replicas={self.num_replicas} exceeds max_replicas={self.capacity}")

    def _check_fields(self) -> None:
        """Each field's type and range on its own (the checks above relate fields)."""
        check_name("RealConfig.model", self.model)
        check_name("RealConfig.pool", self.pool)
        for name in ("num_replicas", "max_replicas", "vocab_size"):
            check_int(f"RealConfig.{name}", getattr(self, name), 0)
        check_int("RealConfig.tensor_parallel_size", self.tensor_parallel_size, 1)
        check_int("RealConfig.kv_cache_space_gib", self.kv_cache_space_gib, 1)
        for name in ("cores", "gpus"):
            devices = getattr(self, name)
            if not isinstance(devices, tuple):
                raise ValueError(f"RealConfig.{name}={devices!r} must be a tuple of device ids")
            for i, d in enumerate(devices):
                check_int(f"RealConfig.{name}[{i}]", d, 0)
        for name in ("urls", "extra_server_args"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"RealConfig.{name}={values!r} must be a tuple of non-empty strings")
        if not isinstance(self.engine, EngineArgs):
            raise ValueError(f"RealConfig.engine={self.engine!r} must be an EngineArgs")
        check_choice("RealConfig.dtype", self.dtype, VLLM_DTYPES)
        check_name("RealConfig.load_format", self.load_format)
        check_name("RealConfig.python", self.python)
        if not isinstance(self.log_dir, str):
            raise ValueError(f"RealConfig.log_dir={self.log_dir!r} must be a string ('' for a temporary directory)")
        for name in ("enforce_eager", "retry_failed", "record_token_times"):
            check_bool(f"RealConfig.{name}", getattr(self, name))
        for name in ("control_interval_s", "scrape_interval_s", "startup_timeout_s", "request_timeout_s"):
            check_float(f"RealConfig.{name}", getattr(self, name), 0.0, open_low=True)

    @property
    def launch(self) -> bool:
        return not self.urls

    @property
    def on_gpus(self) -> bool:
        return bool(self.gpus)

    @property
    def placements(self) -> tuple[str, ...]:
        """Where launched servers run, one entry per server slot: a CPU core ("3") or the CUDA_VISIBLE_DEVICES
        of a tensor-parallel group ("4,5")."""
        if self.gpus:
            tp = self.tensor_parallel_size
            return tuple(",".join(map(str, self.gpus[i:i + tp])) for i in range(0, len(self.gpus), tp))
        return tuple(str(c) for c in (self.cores or sorted(os.sched_getaffinity(0))))

    @property
    def gpus_per_replica(self) -> int:
        """Devices one replica holds, as the simulator counts them (a CPU core counts as one)."""
        return self.tensor_parallel_size if self.gpus else 1

    @property
    def capacity(self) -> int:
        """Most replicas that can serve at once."""
        return self.max_replicas or (len(self.urls) if self.urls else len(self.placements))

    def resolved_vocab_size(self) -> int:
        return self.vocab_size or self._model_field("vocab_size", "set RealConfig.vocab_size to the model's "
                                                                  "vocabulary size")

    def resolved_max_model_len(self) -> int:
        """The servers' context window: ``engine.max_model_len``, else the model's ``max_position_embeddings``
        (what vLLM takes when the flag is not given)."""
        return self.engine.max_model_len or self._model_field(
            "max_position_embeddings", "set EngineArgs.max_model_len")

    def _model_field(self, name: str, fix: str) -> int:
        path = Path(self.model) / "config.json"
        try:
            return int(json.loads(path.read_text())[name])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"RealConfig: cannot read {name} from {path} ({e}); {fix}") from None


def pools_of(cfg: RealConfig | Sequence[RealConfig], agent_pools: Mapping[str, str]) -> dict[str, RealConfig]:
    """The run's pools by name; refuses duplicate names, shared devices, executor settings that differ and
    agents mapped to a pool that is not there."""
    cfgs = [cfg] if isinstance(cfg, RealConfig) else list(cfg)
    if not cfgs:
        raise ValueError("execute: no pools given; pass a RealConfig or a list of them")
    pools: dict[str, RealConfig] = {}
    for c in cfgs:
        if c.pool in pools:
            raise ValueError(f"execute: two pools are named '{c.pool}'; give each RealConfig its own pool name")
        pools[c.pool] = c
    first = cfgs[0]
    for c in cfgs[1:]:
        for name in EXECUTOR_FIELDS:
            if getattr(c, name) != getattr(first, name):
                raise ValueError(f"execute: pool '{c.pool}' sets {name}={getattr(c, name)!r} but pool '{first.pool}' "
                                 f"{getattr(first, name)!r}; the executor drives all pools alike, so set it equal")
    seen: dict[str, str] = {}
    for c in cfgs:
        kind = "urls" if not c.launch else "gpus" if c.on_gpus else "cores"
        devices = c.urls if not c.launch else c.gpus if c.on_gpus else c.placements
        for d in devices:
            key = f"{kind} {str(d).rstrip('/')}"
            if key in seen and seen[key] != c.pool:
                raise ValueError(f"execute: pools '{seen[key]}' and '{c.pool}' both use {key}; give each pool its own "
                                 f"{kind} (RealConfig.{kind})")
            seen[key] = c.pool
    unknown = sorted({p for p in agent_pools.values() if p not in pools})
    if unknown:
        raise ValueError(f"execute: agent_pools names pool(s) {unknown} that are not among the pools "
                         f"{sorted(pools)} (RealConfig.pool)")
    return pools
