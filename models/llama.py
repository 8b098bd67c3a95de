"""The Llama family: Llama 2/3, Mistral, Qwen2 and Qwen3 share one decoder.

The variants differ only in flags read from config.json: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), sliding-window layers (Mistral, Qwen2 with `use_sliding_window`), and RoPE
scaling (Llama 3). Shapes: T = tokens in the step, E = hidden, H = query heads,
KV = key/value heads, D = head dim, F = FFW width, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inferflux.kernels.ragged_paged_attention import ragged_paged_attention, write_kv
from inferflux.models.layers import Linear, ModuleList, RMSNorm, apply_rope, param, rope_inv_freq

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True)
class LlamaConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # a frozen dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    torch_dtype: str

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Reads config.json as transformers 4 or 5 writes it."""
        arch = hf["architectures"][0]
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope = dict(hf.get("rope_parameters") or {})  # transformers 5
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (
            None,
            "default",
        ):
            scaling = None
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; expected 'silu'")
        num_layers = int(hf["num_hidden_layers"])
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(hf, arch, num_layers),
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )

    @property
    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(
            self.head_dim, self.rope_theta, dict(self.rope_scaling) if self.rope_scaling else None
        )


def _sliding_windows(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if arch == "MistralForCausalLM" and layer_types is None:
        return (int(window) if window else None,) * num_layers
    if layer_types is not None:
        return tuple(
            int(window) if t == "sliding_attention" and window else None for t in layer_types
        )
    if hf.get("use_sliding_window") and window:  # transformers 4 Qwen2/Qwen3
        first = int(hf.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


class StepBatch(Protocol):
    """The arrays of the engine's StepInput that the model reads."""

    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T]
    cu_q_lens: jax.Array  # [R+1]
    kv_lens: jax.Array  # [R]
    page_table: jax.Array  # [R, P]
    num_seqs: jax.Array  # []


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, dtype: Any):
        e, h, kv, d, f = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        self.input_layernorm = RMSNorm(e, cfg.rms_norm_eps, dtype)
        self.q_proj = Linear(e, h * d, ("embed", "q_heads"), dtype, cfg.qkv_bias)
        self.k_proj = Linear(e, kv * d, ("embed", "kv_heads"), dtype, cfg.qkv_bias)
        self.v_proj = Linear(e, kv * d, ("embed", "kv_heads"), dtype, cfg.qkv_bias)
        self.o_proj = Linear(h * d, e, ("q_heads", "embed"), dtype, cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, "head_dim") if cfg.qk_norm else None
        self.post_attention_layernorm = RMSNorm(e, cfg.rms_norm_eps, dtype)
        self.gate_proj = Linear(e, f, ("embed", "ffw"), dtype)
        self.up_proj = Linear(e, f, ("embed", "ffw"), dtype)
        self.down_proj = Linear(f, e, ("ffw", "embed"), dtype)
        self.sliding_window = cfg.sliding_windows[layer]
        self.shape = (h, kv, d)

    def __call__(
        self,
        x: jax.Array,  # [T, E]
        kv_cache: tuple[jax.Array, jax.Array],  # 2 x [N, KV, S, D]
        batch: StepBatch,
        inv_freq: np.ndarray,
        chunk_tokens: int,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        h, kv, d = self.shape
        t = x.shape[0]
        y = self.input_layernorm(x)
        q = self.q_proj(y).reshape(t, h, d)
        k = self.k_proj(y).reshape(t, kv, d)
        v = self.v_proj(y).reshape(t, kv, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        k_cache, v_cache = write_kv(kv_cache[0], kv_cache[1], k, v, batch.slot_mapping)
        attn = ragged_paged_attention(
            q,
            k_cache,
            v_cache,
            batch.kv_lens,
            batch.page_table,
            batch.cu_q_lens,
            batch.num_seqs,
            sm_scale=d**-0.5,
            sliding_window=self.sliding_window,
            chunk_tokens=chunk_tokens,
        )
        x = x + self.o_proj(attn.reshape(t, h * d))
        y = self.post_attention_layernorm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, (k_cache, v_cache)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype: Any):
        self.cfg = cfg
        self.embed_tokens = param((cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = ModuleList([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else param((cfg.hidden_size, cfg.vocab_size), dtype, ("embed", "vocab"))
        )

    def __call__(
        self, kv_caches: list[tuple[jax.Array, jax.Array]], batch: StepBatch, chunk_tokens: int
    ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
        """Runs the decoder over the packed tokens; returns the new caches and hidden [T, E]."""
        inv_freq = self.cfg.inv_freq
        x = self.embed_tokens[...][batch.input_ids]
        new_caches = []
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, cache = layer(x, cache, batch, inv_freq, chunk_tokens)
            new_caches.append(cache)
        return new_caches, self.norm(x)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [R, E] -> [R, V] float32
        if self.lm_head is None:
            w = self.embed_tokens[...]
            return jnp.einsum("re,ve->rv", hidden, w, preferred_element_type=jnp.float32)
        return jnp.dot(hidden, self.lm_head[...], preferred_element_type=jnp.float32)


def hf_weight_map(cfg: LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """HF tensor name -> (nnx state path, transpose?)."""
    names: dict[str, tuple[tuple[Any, ...], bool]] = {
        "model.embed_tokens.weight": (("embed_tokens",), False),
        "model.norm.weight": (("norm", "weight"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), True)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        for ours, theirs in (
            ("q_proj", "self_attn.q_proj"),
            ("k_proj", "self_attn.k_proj"),
            ("v_proj", "self_attn.v_proj"),
            ("o_proj", "self_attn.o_proj"),
            ("gate_proj", "mlp.gate_proj"),
            ("up_proj", "mlp.up_proj"),
            ("down_proj", "mlp.down_proj"),
        ):
            names[pre + theirs + ".weight"] = (("layers", i, ours, "kernel"), True)
            has_bias = (ours in ("q_proj", "k_proj", "v_proj") and cfg.qkv_bias) or (
                ours == "o_proj" and cfg.o_bias
            )
            if has_bias:
                names[pre + theirs + ".bias"] = (("layers", i, ours, "bias"), False)
        names[pre + "input_layernorm.weight"] = (("layers", i, "input_layernorm", "weight"), False)
        names[pre + "post_attention_layernorm.weight"] = (
            ("layers", i, "post_attention_layernorm", "weight"),
            False,
        )
        if cfg.qk_norm:
            names[pre + "self_attn.q_norm.weight"] = (("layers", i, "q_norm", "weight"), False)
            names[pre + "self_attn.k_norm.weight"] = (("layers", i, "k_norm", "weight"), False)
    return names
