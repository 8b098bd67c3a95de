"""Ragged paged attention in pure XLA: runs on every backend and is the oracle for kernels.

A step packs the new tokens of R sequences back to back (`cu_q_lens`), each attending to its
own KV pages (`page_table`) up to its own position. The KV cache of one layer is a pair of
arrays in the head-major layout [KV, N, S, D] (N pages of S tokens):
gathering a sequence's pages then yields [KV, T, C, D], which the batched dot consumes with
no transpose.

NOTE: XLA:CPU measurements (design guide §3) showed the cache layout decides whether attention
or the matmuls dominate a decode step; head-major keeps attention a small share.

Keys are visited in chunks of `chunk_tokens` positions with an online softmax, so memory stays
O(T * chunk) whatever the context length, and the loop stops after the longest sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite mask value: a fully masked row (a padding token) then averages finite values
# instead of producing NaN.
_MASKED = -1e30


def write_kv(
    k_cache: jax.Array,  # [KV, N, S, D]
    v_cache: jax.Array,  # [KV, N, S, D]
    k: jax.Array,  # [T, KV, D]
    v: jax.Array,  # [T, KV, D]
    slot_mapping: jax.Array,  # [T] page * S + offset; padding tokens point into page 0
) -> tuple[jax.Array, jax.Array]:
    kv_heads, num_pages, page_size, head_dim = k_cache.shape
    flat = (kv_heads, num_pages * page_size, head_dim)
    k_flat = (
        k_cache.reshape(flat).at[:, slot_mapping].set(k.transpose(1, 0, 2).astype(k_cache.dtype))
    )
    v_flat = (
        v_cache.reshape(flat).at[:, slot_mapping].set(v.transpose(1, 0, 2).astype(v_cache.dtype))
    )
    return k_flat.reshape(k_cache.shape), v_flat.reshape(v_cache.shape)


def token_layout(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int
) -> tuple[jax.Array, jax.Array]:
    """Per packed token: its sequence index [T] and its position in that sequence [T]."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = kv_lens.shape[0]
    seq_ids = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq_ids = jnp.minimum(seq_ids, num_seqs - 1)  # padding tokens borrow the last row
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    positions = kv_lens[seq_ids] - q_lens[seq_ids] + (t - cu_q_lens[seq_ids])
    return seq_ids, positions


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    k_cache: jax.Array,  # [KV, N, S, D]
    v_cache: jax.Array,  # [KV, N, S, D]
    kv_lens: jax.Array,  # [R] context length of each sequence, this step's tokens included
    page_table: jax.Array,  # [R, P] page ids of each sequence (0 past its end)
    cu_q_lens: jax.Array,  # [R+1] token offsets of each sequence in q
    num_seqs: jax.Array,  # [] real sequences; rows past it are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    chunk_tokens: int = 512,
) -> jax.Array:  # [T, Hq, D]
    num_tokens, num_q_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_cache.shape
    group = num_q_heads // kv_heads
    pages_per_chunk = max(1, chunk_tokens // page_size)
    chunk = pages_per_chunk * page_size

    seq_ids, positions = token_layout(cu_q_lens, kv_lens, num_tokens)
    live_kv_lens = jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs, kv_lens, 0)
    num_chunks = (jnp.max(live_kv_lens) + chunk - 1) // chunk  # dynamic trip count

    width = page_table.shape[1]
    padded_width = -(-width // pages_per_chunk) * pages_per_chunk
    token_pages = jnp.pad(page_table, ((0, 0), (0, padded_width - width)))[seq_ids]  # [T, P']

    # [KV, T, G, D], scaled once in float32.
    qh = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, kv_heads, group, head_dim)
    qh = qh.transpose(1, 0, 2, 3)

    def visit_chunk(c: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        running_max, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(token_pages, c * pages_per_chunk, pages_per_chunk, 1)
        k = k_cache[:, pages].reshape(kv_heads, num_tokens, chunk, head_dim)  # [KV, T, C, D]
        v = v_cache[:, pages].reshape(kv_heads, num_tokens, chunk, head_dim)
        scores = jnp.einsum("ktgd,ktcd->ktgc", qh, k.astype(jnp.float32))  # [KV, T, G, C]
        kv_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        visible = kv_pos[None, :] <= positions[:, None]  # [T, C]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > positions[:, None] - sliding_window
        scores = jnp.where(visible[None, :, None, :], scores, _MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))  # [KV, T, G]
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        denom = denom * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "ktgc,ktcd->ktgd", probs, v.astype(jnp.float32)
        )
        return new_max, denom, acc

    init = (
        jnp.full((kv_heads, num_tokens, group), _MASKED, jnp.float32),
        jnp.zeros((kv_heads, num_tokens, group), jnp.float32),
        jnp.zeros((kv_heads, num_tokens, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_chunks, visit_chunk, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]  # [KV, T, G, D]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def dense_attention_reference(
    q: jax.Array,  # [L, Hq, D] one sequence's queries, positions kv_len - L .. kv_len - 1
    k: jax.Array,  # [kv_len, KV, D]
    v: jax.Array,  # [kv_len, KV, D]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
) -> jax.Array:  # [L, Hq, D]
    """Plain causal softmax attention of one sequence; the test oracle."""
    q_len, num_q_heads, _ = q.shape
    kv_len, kv_heads, _ = k.shape
    group = num_q_heads // kv_heads
    k = jnp.repeat(k, group, axis=1).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=1).astype(jnp.float32)
    scores = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k) * sm_scale
    q_pos = jnp.arange(kv_len - q_len, kv_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    scores = jnp.where(mask[None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("hqk,khd->qhd", probs, v).astype(q.dtype)
