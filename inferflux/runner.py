"""The model runner: packs a SchedulerOutput into bucket-shaped StepInput arrays and runs the
one jitted step (forward + KV write + sampling) with the KV cache donated.

Buckets: the token count T of a step is padded up to the next entry of the token-bucket table;
the request rows R = min(T, max_num_seqs) (every scheduled request takes at least one token,
so they always fit). Every bucket is compiled at warm-up; after that nothing compiles.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from inferflux.model_loader import LoadedModel
from inferflux.sampling import (
    RowSampling,
    SamplerOutput,
    SamplingTensors,
    build_sampling_arrays,
    sample,
)
from inferflux.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS
from inferflux.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

# Logit-bias columns: the client's entries plus tokens banned until min_tokens is reached.
BIAS_WIDTH = MAX_LOGIT_BIAS + 32
# Attention visits keys in chunks so a step holds at most this many (token, key) pairs at once.
ATTENTION_PAIRS_PER_CHUNK = 1 << 16


class StepInput(NamedTuple):
    """One step's input; fixed shapes per bucket (T tokens, R rows, P pages per row).

    Built as numpy arrays on the host; inside the jitted step every field is a jax.Array.
    """

    input_ids: ArrayLike  # i32[T]
    positions: ArrayLike  # i32[T]
    slot_mapping: ArrayLike  # i32[T] page * page_size + offset; padding -> page 0
    cu_q_lens: ArrayLike  # i32[R+1]
    kv_lens: ArrayLike  # i32[R]
    page_table: ArrayLike  # i32[R, P]
    logits_indices: ArrayLike  # i32[R] the token whose logits each row samples from
    num_seqs: ArrayLike  # i32[]
    prompt_targets: ArrayLike  # i32[T] the next prompt token, for prompt logprobs; -1: none
    sampling: SamplingTensors


class PromptLogprobs(NamedTuple):
    """Per packed token: the raw logprob and rank of its target (the next prompt token) and
    the top-K alternatives. Zeros unless some token has a target."""

    target_logprobs: jax.Array  # f32[T]
    target_ranks: jax.Array  # i32[T]
    top_ids: jax.Array  # i32[T, K]
    top_logprobs: jax.Array  # f32[T, K]


@dataclass
class StepResult:
    """Host copies of the sampler's output for the rows of one step."""

    token_ids: np.ndarray  # [R]
    logprobs: np.ndarray  # [R]
    ranks: np.ndarray  # [R]
    top_ids: np.ndarray  # [R, K]
    top_logprobs: np.ndarray  # [R, K]
    prompt: PromptLogprobs | None = None  # numpy fields; None when no token asked


def step_fn(
    graphdef: Any,
    chunk_tokens: int,
    state: Any,
    kv_caches: list[tuple[jax.Array, jax.Array]],
    inp: StepInput,
) -> tuple[list[tuple[jax.Array, jax.Array]], tuple[SamplerOutput, PromptLogprobs]]:
    """The pure step: forward over the packed tokens, logits of each row, sampling."""
    model = nnx.merge(graphdef, state)
    kv_caches, hidden = model(kv_caches, inp, chunk_tokens)  # hidden [T, E]
    logits = model.compute_logits(hidden[inp.logits_indices])  # [R, V] f32
    targets = jnp.asarray(inp.prompt_targets)
    num_tokens, k = targets.shape[0], MAX_LOGPROBS

    def prompt_logprobs(h: jax.Array) -> PromptLogprobs:
        raw = jax.nn.log_softmax(model.compute_logits(h), axis=-1)  # [T, V]
        safe = jnp.maximum(targets, 0)
        target_lp = jnp.take_along_axis(raw, safe[:, None], axis=1)[:, 0]
        ranks = 1 + jnp.sum(raw > target_lp[:, None], axis=-1).astype(jnp.int32)
        top_lp, top_ids = jax.lax.top_k(raw, k)
        return PromptLogprobs(target_lp, ranks, top_ids.astype(jnp.int32), top_lp)

    def none(_: jax.Array) -> PromptLogprobs:
        return PromptLogprobs(
            jnp.zeros((num_tokens,), jnp.float32),
            jnp.zeros((num_tokens,), jnp.int32),
            jnp.zeros((num_tokens, k), jnp.int32),
            jnp.zeros((num_tokens, k), jnp.float32),
        )

    # NOTE: logits of every packed token ([T, V]) only when a request asked for prompt logprobs.
    prompt = jax.lax.cond(jnp.any(targets >= 0), prompt_logprobs, none, hidden)
    return kv_caches, (sample(logits, inp.sampling, MAX_LOGPROBS), prompt)


class ModelRunner:
    def __init__(
        self,
        model: LoadedModel,
        *,
        num_pages: int,
        page_size: int,
        max_model_len: int,
        max_num_seqs: int,
        token_buckets: tuple[int, ...],
    ):
        self.model = model
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.token_buckets = token_buckets
        self.pages_per_seq = -(-max_model_len // page_size)
        cfg = model.config
        shape = (num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)  # [N, KV, S, D]
        self.kv_caches = [
            (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
            for _ in range(cfg.num_layers)
        ]
        self._steps: dict[int, Any] = {}
        for t in token_buckets:
            chunk = max(
                page_size, min(self.pages_per_seq * page_size, ATTENTION_PAIRS_PER_CHUNK // t)
            )
            fn = functools.partial(step_fn, model.graphdef, chunk)
            self._steps[t] = jax.jit(fn, donate_argnums=(1,))

    # ---- shapes -------------------------------------------------------------------------
    def bucket_for(self, num_tokens: int) -> int:
        for t in self.token_buckets:
            if t >= num_tokens:
                return t
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_buckets[-1]}")

    def rows_for(self, bucket: int) -> int:
        return min(bucket, self.max_num_seqs)

    # ---- host packing -------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput, rows: list[RowSampling | None]) -> StepInput:
        """Packs the scheduled requests (row i = sched.scheduled[i]) into numpy arrays."""
        t_bucket = self.bucket_for(sched.num_scheduled_tokens)
        r_bucket = self.rows_for(t_bucket)
        ps = self.page_size
        input_ids = np.zeros(t_bucket, np.int32)
        positions = np.zeros(t_bucket, np.int32)
        slot_mapping = np.zeros(t_bucket, np.int32)
        cu_q_lens = np.full(r_bucket + 1, sched.num_scheduled_tokens, np.int32)
        kv_lens = np.zeros(r_bucket, np.int32)
        page_table = np.zeros((r_bucket, self.pages_per_seq), np.int32)
        logits_indices = np.zeros(r_bucket, np.int32)
        prompt_targets = np.full(t_bucket, -1, np.int32)
        start = 0
        for i, item in enumerate(sched.scheduled):
            req, n = item.request, item.num_new_tokens
            first = item.num_computed_tokens
            end = start + n
            input_ids[start:end] = item.token_ids
            pos = np.arange(first, first + n, dtype=np.int32)
            pages = np.asarray(req.page_ids, np.int32)
            positions[start:end] = pos
            slot_mapping[start:end] = pages[pos // ps] * ps + pos % ps
            cu_q_lens[i] = start
            kv_lens[i] = first + n
            page_table[i, : len(pages)] = pages
            logits_indices[i] = end - 1
            if req.sampling_params.prompt_logprobs is not None:
                # token at position p is scored against prompt token p + 1
                prompt = req.prompt_token_ids
                last = min(first + n, len(prompt) - 1)
                if last > first:
                    prompt_targets[start : start + last - first] = prompt[first + 1 : last + 1]
            start = end
        cu_q_lens[len(sched.scheduled)] = start
        sampling = build_sampling_arrays(rows, r_bucket, BIAS_WIDTH, self.max_model_len)
        return StepInput(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            cu_q_lens=cu_q_lens,
            kv_lens=kv_lens,
            page_table=page_table,
            logits_indices=logits_indices,
            num_seqs=np.int32(len(sched.scheduled)),
            prompt_targets=prompt_targets,
            sampling=_host_sampling(sampling),
        )

    # ---- device -------------------------------------------------------------------------
    def execute(self, inp: StepInput) -> StepResult:
        step = self._steps[np.shape(inp.input_ids)[0]]
        self.kv_caches, (out, prompt) = step(self.model.state, self.kv_caches, inp)
        wants_prompt = bool((np.asarray(inp.prompt_targets) >= 0).any())
        host, host_prompt = jax.device_get((out, prompt if wants_prompt else None))
        return StepResult(
            np.asarray(host.token_ids),
            np.asarray(host.logprobs),
            np.asarray(host.ranks),
            np.asarray(host.top_ids),
            np.asarray(host.top_logprobs),
            host_prompt,
        )

    def warm_up(self) -> float:
        """Compiles every bucket with an all-padding step (writes only to page 0)."""
        start = time.perf_counter()
        for t in self.token_buckets:
            r = self.rows_for(t)
            sampling = build_sampling_arrays([], r, BIAS_WIDTH, self.max_model_len)
            inp = StepInput(
                input_ids=np.zeros(t, np.int32),
                positions=np.zeros(t, np.int32),
                slot_mapping=np.zeros(t, np.int32),
                cu_q_lens=np.zeros(r + 1, np.int32),
                kv_lens=np.zeros(r, np.int32),
                page_table=np.zeros((r, self.pages_per_seq), np.int32),
                logits_indices=np.zeros(r, np.int32),
                num_seqs=np.int32(0),
                prompt_targets=np.full(t, -1, np.int32),
                sampling=_host_sampling(sampling),
            )
            self.execute(inp)
        elapsed = time.perf_counter() - start
        logger.info("compiled %d step buckets in %.1fs", len(self.token_buckets), elapsed)
        return elapsed


def _host_sampling(arrays: dict[str, np.ndarray]) -> SamplingTensors:
    """The host-side (numpy) SamplingTensors; jit turns the fields into jax.Arrays."""
    return SamplingTensors(**arrays)  # type: ignore[arg-type]
