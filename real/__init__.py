"""The real backend: replay a canonical workload on vLLM servers with the simulator's policies.

``real.execute`` and ``real.RealResult`` load lazily, so the pure parts (``real.tokens``,
``real.metrics``, ``real.config``) import without aiohttp or vLLM installed.
"""

from real.config import RealConfig

__all__ = ["RealConfig", "RealResult", "execute"]


def __getattr__(name: str):
    if name in ("execute", "RealResult"):
        from real import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'real' has no attribute '{name}'")
