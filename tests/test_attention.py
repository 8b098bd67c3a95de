"""Ragged paged attention against plain dense causal attention, sequence by sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inferflux.kernels.ragged_paged_attention import (
    dense_attention_reference,
    ragged_paged_attention,
    write_kv,
)

KV, G, D, S = 2, 3, 8, 4  # kv heads, q heads per kv head, head dim, page size


def _case(q_lens, kv_lens, num_pages=64, seed=0, pad_tokens=3, pad_rows=1):
    """Random K/V scattered over shuffled pages; returns kernel inputs and dense references."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(1, num_pages))
    k_cache = np.zeros((num_pages, KV, S, D), np.float32)
    v_cache = np.zeros_like(k_cache)
    width = max(-(-n // S) for n in kv_lens)
    page_table = np.zeros((len(kv_lens) + pad_rows, width), np.int32)
    dense, q_all, cu = [], [], [0]
    for r, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        n_pages = -(-kl // S)
        pages, perm = perm[:n_pages], perm[n_pages:]
        page_table[r, :n_pages] = pages
        k = rng.normal(size=(kl, KV, D)).astype(np.float32)
        v = rng.normal(size=(kl, KV, D)).astype(np.float32)
        for i in range(kl):
            k_cache[pages[i // S], :, i % S] = k[i]
            v_cache[pages[i // S], :, i % S] = v[i]
        q = rng.normal(size=(ql, KV * G, D)).astype(np.float32)
        q_all.append(q)
        dense.append((q, k, v))
        cu.append(cu[-1] + ql)
    q_all.append(rng.normal(size=(pad_tokens, KV * G, D)).astype(np.float32))  # padding tokens
    cu += [cu[-1]] * pad_rows
    kv_pad = list(kv_lens) + [0] * pad_rows
    args = (
        jnp.asarray(np.concatenate(q_all)),
        jnp.asarray(k_cache),
        jnp.asarray(v_cache),
        jnp.asarray(kv_pad, jnp.int32),
        jnp.asarray(page_table),
        jnp.asarray(cu, jnp.int32),
        jnp.asarray(len(kv_lens), jnp.int32),
    )
    return args, dense, cu


@pytest.mark.parametrize("chunk_tokens", [4, 8, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_equals_dense(chunk_tokens: int, window: int | None) -> None:
    q_lens = [1, 7, 1, 13, 4]  # decodes, a prefill chunk, a whole prompt
    kv_lens = [9, 7, 30, 13, 22]
    args, dense, cu = _case(q_lens, kv_lens)
    fn = jax.jit(
        lambda *a: ragged_paged_attention(
            *a, sm_scale=D**-0.5, sliding_window=window, chunk_tokens=chunk_tokens
        )
    )
    out = np.asarray(fn(*args))
    assert np.isfinite(out).all()  # padding tokens too
    for r, (q, k, v) in enumerate(dense):
        ref = dense_attention_reference(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), sm_scale=D**-0.5, sliding_window=window
        )
        np.testing.assert_allclose(out[cu[r] : cu[r + 1]], np.asarray(ref), atol=2e-5, rtol=0)


@pytest.mark.parametrize("extra_padding", [0, 5])  # 3 tokens: unrolled updates; 8: a scatter
def test_write_kv_places_tokens_in_their_slots(extra_padding: int) -> None:
    k_cache = jnp.zeros((5, KV, S, D))
    v_cache = jnp.zeros((5, KV, S, D))
    n = 3 + extra_padding
    k = jnp.arange(1, n * KV * D + 1, dtype=jnp.float32).reshape(n, KV, D)
    slots = jnp.asarray([2 * S + 1, 4 * S + 3] + [0] * (1 + extra_padding), jnp.int32)
    k2, v2 = jax.jit(write_kv)(k_cache, v_cache, k, -k, slots)  # the rest are padding tokens
    np.testing.assert_array_equal(np.asarray(k2[2, :, 1]), np.asarray(k[0]))
    np.testing.assert_array_equal(np.asarray(k2[4, :, 3]), np.asarray(k[1]))
    np.testing.assert_array_equal(np.asarray(v2[4, :, 3]), -np.asarray(k[1]))
    touched = np.zeros((5, S), bool)
    touched[2, 1] = touched[4, 3] = touched[0, 0] = True
    assert not np.asarray(k2).transpose(0, 2, 1, 3)[~touched].any()
    assert np.asarray(k2)[0, :, 0].any()  # padding wrote into the dump page
