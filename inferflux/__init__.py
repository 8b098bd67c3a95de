"""InferFlux: an LLM inference engine and server on JAX/XLA.

`from inferflux import LLM, SamplingParams` is the offline API; the heavy modules load lazily so
importing the package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferflux.outputs import CompletionOutput, Logprob, RequestOutput
from inferflux.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inferflux.async_engine import AsyncEngine
    from inferflux.config import EngineConfig
    from inferflux.engine import LLMEngine
    from inferflux.llm import LLM

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]

_LAZY = {
    "LLM": "inferflux.llm",
    "AsyncEngine": "inferflux.async_engine",
    "EngineConfig": "inferflux.config",
    "LLMEngine": "inferflux.engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'inferflux' has no attribute {name!r}")
