"""Where an experiment's runs happen: the simulator (the default) or real vLLM servers.

``real_config`` turns the command line's ``--gpus`` / ``--cores`` / ``--url`` and ``--model`` into the
``RealConfig`` of the servers, with the engine knobs of the simulated cluster (``sim.cluster.ClusterConfig``),
so both backends run the same engine configuration. By default the servers run the simulated model's own
architecture (its ``config.json`` from ``sim/models``) with dummy weights: what the policies see depends on
token counts and timings, not on the weights' values.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from real.config import CPU_BLOCK_MULTIPLE, RealConfig
from sim.cluster import ClusterConfig


def model_dir(model: str) -> str:
    """A directory holding the model's config.json: the argument itself, or a shipped sim model written to a
    temporary directory (vLLM wants a directory)."""
    path = Path(model)
    if path.is_dir():
        return str(path)
    from sim.models import MODELS_DIR

    config = path if path.is_file() else MODELS_DIR / f"{model}.json"
    if not config.is_file():
        raise SystemExit(f"--model {model}: neither a model directory, a config.json, nor a shipped model "
                         f"({MODELS_DIR}/<name>.json)")
    out = Path(tempfile.mkdtemp(prefix="pythia-model-"))
    (out / "config.json").write_text(config.read_text())
    return str(out)


def device_ids(spec: str, flag: str) -> tuple[int, ...]:
    """'0-3,6' -> (0, 1, 2, 3, 6): GPU or core numbers as users type them."""
    ids: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            ids += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise SystemExit(f"{flag} {spec!r}: expected numbers and ranges, e.g. 0-7 or 0,1,4-5") from None
    if not ids or len(set(ids)) != len(ids):
        raise SystemExit(f"{flag} {spec!r}: lists no device, or one twice")
    return tuple(ids)


def real_config(*, model: str | None = None, gpus: str | None = None, cores: str | None = None,
                urls: tuple[str, ...] = (), tp: int = 1, base: ClusterConfig | None = None) -> RealConfig:
    """The servers of a real run: on ``gpus`` (tp GPUs each), on CPU ``cores`` (one each), or attached ``urls``."""
    if sum(map(bool, (gpus, cores, urls))) != 1:
        raise SystemExit("--backend real needs exactly one of --gpus (e.g. 0-7), --cores (e.g. 0,1) or --url")
    base = base or ClusterConfig()
    path = model_dir(model or base.pools[0].model)
    where: dict = ({"gpus": device_ids(gpus, "--gpus"), "tensor_parallel_size": tp, "dtype": "auto"} if gpus
                   else {"cores": device_ids(cores, "--cores")} if cores else {"urls": tuple(urls)})
    engine = base.engine  # the simulated cluster's: same window (the model's), batch limits and cache
    if not gpus:
        engine = replace(engine, block_size=max(CPU_BLOCK_MULTIPLE, engine.block_size))
    try:
        return RealConfig(model=path, **where, engine=engine, control_interval_s=base.control_interval_s,
                          record_token_times=False)
    except ValueError as e:
        raise SystemExit(str(e)) from None
