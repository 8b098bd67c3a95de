"""Test helper: runs a loaded model's forward over a ragged batch of prompts in one step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inferflux.model_loader import LoadedModel


class Batch(NamedTuple):
    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    slot_mapping: jax.Array  # [T]
    cu_q_lens: jax.Array  # [R+1]
    kv_lens: jax.Array  # [R]
    page_table: jax.Array  # [R, P]
    num_seqs: jax.Array  # []


def pack_prompts(prompts: list[list[int]], page_size: int, num_pages: int) -> Batch:
    """Packs whole prompts as one prefill step; pages handed out in order from page 1."""
    max_pages = max(-(-len(p) // page_size) for p in prompts)
    ids, pos, slots, cu, page_table = [], [], [], [0], []
    next_page = 1
    for p in prompts:
        n_pages = -(-len(p) // page_size)
        pages = list(range(next_page, next_page + n_pages))
        next_page += n_pages
        assert next_page <= num_pages
        for i, tok in enumerate(p):
            ids.append(tok)
            pos.append(i)
            slots.append(pages[i // page_size] * page_size + i % page_size)
        cu.append(cu[-1] + len(p))
        page_table.append(pages + [0] * (max_pages - n_pages))
    return Batch(
        input_ids=jnp.asarray(ids, jnp.int32),
        positions=jnp.asarray(pos, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32),
        kv_lens=jnp.asarray([len(p) for p in prompts], jnp.int32),
        page_table=jnp.asarray(page_table, jnp.int32),
        num_seqs=jnp.asarray(len(prompts), jnp.int32),
    )


def ragged_logits(
    model: LoadedModel,
    prompts: list[list[int]],
    page_size: int = 4,
    chunk_tokens: int = 16,
) -> list[np.ndarray]:
    """Logits [len(p), V] for every position of every prompt, from one packed step."""
    cfg = model.config
    num_pages = 1 + sum(-(-len(p) // page_size) for p in prompts)
    batch = pack_prompts(prompts, page_size, num_pages)
    shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
    caches = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))] * cfg.num_layers

    @jax.jit
    def run(state, caches, batch):
        m = nnx.merge(model.graphdef, state)
        _, hidden = m(caches, batch, chunk_tokens)
        return m.compute_logits(hidden)

    logits = np.asarray(run(model.state, caches, batch))
    cu = np.asarray(batch.cu_q_lens)
    return [logits[cu[i] : cu[i + 1]] for i in range(len(prompts))]
