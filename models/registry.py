"""Maps a checkpoint's `architectures` entry to the model family that runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferflux.models import llama


@dataclass(frozen=True)
class ModelFamily:
    """What the loader needs from a family: config parsing, the module, the HF weight names."""

    name: str
    config_from_hf: Callable[[dict[str, Any]], Any]
    module: Callable[..., Any]  # module(cfg, dtype) -> nnx.Module with __call__ and compute_logits
    weight_map: Callable[[Any], dict[str, tuple[tuple[Any, ...], bool]]]


_LLAMA = ModelFamily(
    "llama", llama.LlamaConfig.from_hf, llama.LlamaForCausalLM, llama.hf_weight_map
)
FAMILIES: dict[str, ModelFamily] = {arch: _LLAMA for arch in llama.ARCHITECTURES}


def get_family(hf_config: dict[str, Any]) -> ModelFamily:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ValueError(
        f"unsupported architecture {archs!r} in config.json; supported: {sorted(FAMILIES)}"
    )
