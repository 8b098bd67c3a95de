"""Engine configuration: one frozen dataclass, validated once, with clear errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KV_CACHE_BYTES = 2 << 30  # 2 GiB unless num_pages says otherwise
# The small Llama trained on Shakespeare that ships with the package (tools/train_default_model.py).
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine. `None` fields are resolved from the checkpoint by `resolve`."""

    model: str
    tokenizer: str | None = None  # defaults to the model folder
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    max_model_len: int | None = None  # default: min(max_position_embeddings, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    page_size: int = 16
    num_pages: int | None = None  # default: fit max_num_seqs full contexts in kv_cache_bytes
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    token_buckets: tuple[int, ...] | None = None  # default: powers of two to the token budget
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds for requests that bring none are drawn from this
    # JAX's persistent compilation cache: "auto" is $INFERFLUX_CACHE_DIR/xla or
    # ~/.cache/inferflux/xla; None or "" turns it off. Restarts then skip most compiling.
    compilation_cache_dir: str | None = "auto"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "page_size", "kv_cache_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(
                f"num_pages must be at least 2 (page 0 is reserved), got {self.num_pages}"
            )
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) must not exceed max_num_batched_tokens "
                f"({self.max_num_batched_tokens}): every scheduled sequence takes at least one token"
            )
        if self.token_buckets is not None:
            buckets = tuple(sorted(set(self.token_buckets)))
            if not buckets or buckets[0] < 1 or buckets[-1] < self.max_num_batched_tokens:
                raise ValueError(
                    "token_buckets must be positive and reach max_num_batched_tokens "
                    f"({self.max_num_batched_tokens}), got {self.token_buckets}"
                )
            object.__setattr__(self, "token_buckets", buckets)

    def resolved_compilation_cache_dir(self) -> str | None:
        if not self.compilation_cache_dir:
            return None
        if self.compilation_cache_dir != "auto":
            return self.compilation_cache_dir
        root = os.environ.get("INFERFLUX_CACHE_DIR") or str(Path.home() / ".cache" / "inferflux")
        return str(Path(root) / "xla")

    def resolved_token_buckets(self) -> tuple[int, ...]:
        if self.token_buckets is not None:
            budget = self.max_num_batched_tokens
            below = [b for b in self.token_buckets if b < budget]
            return (*below, min(b for b in self.token_buckets if b >= budget))
        buckets, b = [], 1
        while b < self.max_num_batched_tokens:
            buckets.append(b)
            b *= 2
        return (*buckets, self.max_num_batched_tokens)
