"""The real backend: replay a canonical workload on vLLM servers with the simulator's policies.

``real.execute`` loads lazily, so the pure parts (``real.tokens``,
``real.metrics``, ``real.config``) import without aiohttp or vLLM installed.
"""

from real.config import RealConfig

__all__ = ["RealConfig", "execute"]


def __getattr__(name: str):
    if name == "execute":
        from real import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'real' has no attribute '{name}'")
