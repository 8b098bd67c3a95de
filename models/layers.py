"""Building blocks shared by the model families: parameters with logical axes, norms, RoPE.

Parameters are `nnx.Param`s created under `nnx.eval_shape` (no memory) and filled from the
checkpoint by the loader; each carries `axes`, its logical axis names, which the sharding rules
map onto a mesh. Shapes below use T = tokens in the step, E = hidden size, H = heads,
D = head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# NOTE: flax 0.12 turned plain lists of modules into a warning/error; nnx.List exists from 0.12.
ModuleList: Any = getattr(nnx, "List", list)


def param(shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter of `shape` with its logical axis names; built under `nnx.eval_shape`, so it
    holds no memory until the loader puts the checkpoint's tensor in its place."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of a torch Linear weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        dtype: Any,
        use_bias: bool = False,
    ):
        self.kernel = param((in_features, out_features), dtype, axes)
        self.bias = param((out_features,), dtype, (axes[1],)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: computed in float32, scaled by the weight, cast back."""

    def __init__(self, dim: int, eps: float, dtype: Any, axis: str | None = "norm"):
        self.weight = param((dim,), dtype, (axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # NOTE: transformers casts back to the input dtype before multiplying by the weight.
        return self.weight[...] * x32.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """Inverse frequencies [D/2] for RoPE, with Llama-3 / linear scaling applied on the host."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    assert scaling is not None
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3"
    )


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention). x: [T, H, D], positions: [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :]  # [T, 1, D/2]
    sin = jnp.sin(freqs)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
