"""Ragged paged attention in pure XLA: runs on every backend and is the oracle for kernels.

A step packs the new tokens of R sequences back to back (`cu_q_lens`), each attending to its
own KV pages (`page_table`) up to its own position. The KV cache of one layer is a pair of
arrays [N, KV, S, D]: N pages of S tokens, the KV heads of a page side by side.

NOTE: measured on XLA:CPU (8 layers, 64 sequences of 170 tokens, 60M-parameter shapes):
- gathering whole pages on the leading axis gives [T, KV, S, D] blocks that the batched dot
  reads with no transpose; the head-major [KV, N, S, D] layout needed a transposing copy of
  every gathered chunk and was 3x slower;
- the KV write must be a scatter with `promise_in_bounds`: the default (drop out-of-bounds)
  mode reads the old values and made XLA copy the whole cache every layer (~60x slower).

Keys are visited a few pages at a time with an online softmax, so memory stays O(T * chunk)
whatever the context length, and the loop stops after the longest sequence's last page.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite mask value: a fully masked row (a padding token) then averages finite values
# instead of producing NaN.
_MASKED = -1e30
MAX_PAGES_PER_CHUNK = 4
_UNROLLED_WRITES = 4


def write_kv(
    k_cache: jax.Array,  # [N, KV, S, D]
    v_cache: jax.Array,  # [N, KV, S, D]
    k: jax.Array,  # [T, KV, D]
    v: jax.Array,  # [T, KV, D]
    slot_mapping: jax.Array,  # [T] page * S + offset; padding tokens point into page 0
) -> tuple[jax.Array, jax.Array]:
    page_size = k_cache.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
    if k.shape[0] <= _UNROLLED_WRITES:
        # NOTE: for a few tokens, one dynamic-update-slice each is cheaper on XLA:CPU than the
        # scatter, which lowers to a masked update of the whole cache.
        zero = jnp.zeros((), jnp.int32)
        for t in range(k.shape[0]):
            start = (page[t], zero, offset[t], zero)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[t][None, :, None, :], start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[t][None, :, None, :], start)
        return k_cache, v_cache
    # NOTE: several padding tokens may write the same slot of page 0; any of them may win.
    k_cache = k_cache.at[page, :, offset].set(k, mode="promise_in_bounds")
    v_cache = v_cache.at[page, :, offset].set(v, mode="promise_in_bounds")
    return k_cache, v_cache


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
    k_cache: jax.Array,  # [N, KV, S, D]
    v_cache: jax.Array,  # [N, KV, S, D]
    kv_lens: jax.Array,  # [R] context length of each sequence, this step's tokens included
    page_table: jax.Array,  # [R, P] page ids of each sequence (0 past its end)
    cu_q_lens: jax.Array,  # [R+1] token offsets of each sequence in q
    num_seqs: jax.Array,  # [] real sequences; rows past it are padding
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    chunk_tokens: int = 64,
) -> jax.Array:  # [T, Hq, D]
    num_tokens, num_q_heads, head_dim = q.shape
    _, kv_heads, page_size, _ = k_cache.shape
    group = num_q_heads // kv_heads
    pages_per_chunk = max(1, min(MAX_PAGES_PER_CHUNK, chunk_tokens // page_size))
    chunk = pages_per_chunk * page_size

    seq_ids, positions = token_layout(cu_q_lens, kv_lens, num_tokens)
    live_kv_lens = jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs, kv_lens, 0)
    num_chunks = (jnp.max(live_kv_lens) + chunk - 1) // chunk  # dynamic trip count

    width = page_table.shape[1]
    padded_width = -(-width // pages_per_chunk) * pages_per_chunk
    token_pages = jnp.pad(page_table, ((0, 0), (0, padded_width - width)))[seq_ids]  # [T, P']
    qh = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, kv_heads, group, head_dim)

    def gather(cache: jax.Array, pages: jax.Array) -> jax.Array:  # -> [T, KV, C, D] f32
        # NOTE: "clip" skips the fill-mode bounds masking (page ids are always in range);
        # measured 2x faster than the default gather on XLA:CPU. Gathering one page per op
        # avoids the transpose below but was slower overall (more ops per step).
        blocks = cache.at[pages].get(mode="clip").astype(jnp.float32)  # [T, pages, KV, S, D]
        if pages_per_chunk > 1:
            blocks = blocks.transpose(0, 2, 1, 3, 4)
        return blocks.reshape(num_tokens, kv_heads, chunk, head_dim)

    def visit_chunk(c: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
        running_max, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(token_pages, c * pages_per_chunk, pages_per_chunk, 1)
        scores = jnp.einsum("tkgd,tkcd->tkgc", qh, gather(k_cache, pages))  # [T, KV, G, C]
        kv_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        visible = kv_pos[None, :] <= positions[:, None]  # [T, C]
        if sliding_window is not None:
            visible &= kv_pos[None, :] > positions[:, None] - sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, _MASKED)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))  # [T, KV, G]
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        denom = denom * correction + jnp.sum(probs, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "tkgc,tkcd->tkgd", probs, gather(v_cache, pages)
        )
        return new_max, denom, acc

    init = (
        jnp.full((num_tokens, kv_heads, group), _MASKED, jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_chunks, visit_chunk, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]  # [T, KV, G, D]
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


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
