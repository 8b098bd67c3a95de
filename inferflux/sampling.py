"""On-device sampling: logit bias, penalties, temperature, min-p/top-k/top-p, seeded draws, logprobs.

Everything here is pure `jax.numpy` and runs inside the jitted step. Settings are arrays (one entry
per request row), never static arguments, so one compiled step serves every mix of requests. The
host side (`RowSampling`, `build_sampling_arrays`) is plain numpy.

Processing order (vLLM v1's): raw logprobs for the outputs; logit bias; repetition penalty (prompt
and output tokens); presence/frequency penalties (output tokens); greedy rows take the argmax here;
sampled rows divide by temperature, then apply the min-p, top-k and top-p masks and draw by
inverse CDF with one uniform number under the key `fold_in(PRNGKey(seed), gen_index)`.

NOTE: measured on XLA:CPU at [64, 32000]: `jnp.argmax` ~12 ms, a two-level (block max, then
in-block) argmax 0.6 ms; Gumbel noise for every vocabulary entry ~130 ms, a blocked inverse CDF
~7 ms. Padding rows are greedy so that an all-greedy batch skips the random path entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from inferflux.request import Request

# NOTE: the same rule as `SamplingParams.greedy`, so host and device agree on which rows are greedy.
GREEDY_EPS = 1e-5
# NOTE: top-k and top-p look only at the K_MAX largest logits of a row (one bounded `lax.top_k`,
# never a full sort of the vocabulary). A top_k above K_MAX acts as top_k = K_MAX, and a nucleus
# (top_p < 1) that would need more than K_MAX tokens is truncated to the K_MAX most likely ones.
# With K_MAX = 256 this only matters for very flat distributions with top_p close to 1.
DEFAULT_K_MAX = 256

_NEG_INF = float("-inf")


class SamplingTensors(NamedTuple):
    """Per-row sampling settings as arrays (a pytree; R rows, NB bias slots, H history slots)."""

    temperature: jax.Array  # f32[R]; < GREEDY_EPS => greedy
    top_k: jax.Array  # i32[R]; 0 => off
    top_p: jax.Array  # f32[R]; 1.0 => off
    min_p: jax.Array  # f32[R]; 0.0 => off
    repetition_penalty: jax.Array  # f32[R]; 1.0 => off (prompt and output tokens)
    presence_penalty: jax.Array  # f32[R]; 0.0 => off (output tokens)
    frequency_penalty: jax.Array  # f32[R]; 0.0 => off (output tokens)
    seeds: jax.Array  # i32[R]
    gen_index: jax.Array  # i32[R]; number of output tokens so far
    bias_ids: jax.Array  # i32[R, NB]; padding: id 0 with value 0.0
    bias_values: jax.Array  # f32[R, NB]; -inf bans a token
    history: jax.Array  # i32[R, H]; prompt + output ids, padded with -1
    prompt_lens: jax.Array  # i32[R]
    want_logprobs: jax.Array  # bool[R]; logprob outputs are only computed when some row asks


class SamplerOutput(NamedTuple):
    """The sampled tokens and their logprobs under the raw model distribution."""

    token_ids: jax.Array  # i32[R]
    logprobs: jax.Array  # f32[R]
    ranks: jax.Array  # i32[R]; 1 + number of tokens with a strictly higher raw logprob
    top_ids: jax.Array  # i32[R, K]
    top_logprobs: jax.Array  # f32[R, K]


# ----------------------------------------------------------------------------------------------
# Device side.


def _greedy_rows(st: SamplingTensors) -> jax.Array:
    return st.temperature < GREEDY_EPS  # bool[R]


def _penalty_rows(st: SamplingTensors) -> jax.Array:
    return (
        (st.repetition_penalty != 1.0)
        | (st.presence_penalty != 0.0)
        | (st.frequency_penalty != 0.0)
    )  # bool[R]


def _apply_bias(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """Adds bias_values at bias_ids; padding slots add 0.0 to token 0."""
    rows = jnp.arange(logits.shape[0])[:, None]  # [R, 1]
    return logits.at[rows, st.bias_ids].add(st.bias_values.astype(jnp.float32), mode="drop")


def _apply_penalties(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """Repetition (HF rule, whole history) then presence/frequency (OpenAI rule, output only)."""
    num_rows, vocab = logits.shape
    hist = st.history  # [R, H]
    valid = (hist >= 0) & (hist < vocab)
    is_out = valid & (jnp.arange(hist.shape[1])[None, :] >= st.prompt_lens[:, None])
    # NOTE: invalid slots point past the vocabulary and are dropped by the scatter.
    ids = jnp.where(valid, hist, vocab)  # [R, H]
    rows = jnp.arange(num_rows)[:, None]
    zeros = jnp.zeros((num_rows, vocab), jnp.float32)
    seen = zeros.at[rows, ids].add(1.0, mode="drop") > 0  # bool[R, V]
    out_counts = zeros.at[rows, ids].add(is_out.astype(jnp.float32), mode="drop")  # [R, V]

    rep = st.repetition_penalty.astype(jnp.float32)[:, None]  # [R, 1]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    presence = st.presence_penalty.astype(jnp.float32)[:, None]
    frequency = st.frequency_penalty.astype(jnp.float32)[:, None]
    return logits - presence * (out_counts > 0) - frequency * out_counts


def penalize_logits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """f32[R, V] logits after logit bias and penalties (what greedy rows take the argmax of)."""
    logits = _apply_bias(logits.astype(jnp.float32), st)
    # NOTE: the [R, V] counting scatter only runs when some row has a penalty; rows whose
    # penalties are off come out bit-identical from `_apply_penalties` anyway.
    return lax.cond(jnp.any(_penalty_rows(st)), _apply_penalties, lambda x, _: x, logits, st)


def _top_k_top_p_mask(x: jax.Array, st: SamplingTensors, k_max: int) -> jax.Array:
    """Masks x (f32[R, V], temperature-scaled, min-p applied) by top-k then top-p, bounded."""
    vocab = x.shape[-1]
    k_max = min(k_max, vocab)
    vals = lax.top_k(x, k_max)[0]  # [R, K] descending
    top_k = st.top_k.astype(jnp.int32)
    use_k = (top_k > 0) & (top_k < vocab)
    k_idx = jnp.clip(top_k, 1, k_max) - 1  # [R]
    kth = jnp.take_along_axis(vals, k_idx[:, None], axis=1)  # [R, 1]
    kth = jnp.where(use_k[:, None], kth, _NEG_INF)
    x = jnp.where(x < kth, _NEG_INF, x)

    # Top-p over the distribution left after top-k: sorted survivors and the full normalizer.
    vals = jnp.where(vals >= kth, vals, _NEG_INF)  # [R, K]
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)  # [R, 1]
    probs = jnp.exp(vals - lse)  # [R, K]
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)  # exclusive
    top_p = st.top_p.astype(jnp.float32)[:, None]
    # A token is in the nucleus iff the mass strictly above it is below top_p (HF's rule).
    n_keep = jnp.clip(jnp.sum(before < top_p, axis=-1), 1, k_max)  # [R]
    pth = jnp.take_along_axis(vals, (n_keep - 1)[:, None], axis=1)  # [R, 1]
    pth = jnp.where(top_p < 1.0, pth, _NEG_INF)
    return jnp.where(x < pth, _NEG_INF, x)


def warp_logits(penalized: jax.Array, st: SamplingTensors, k_max: int = DEFAULT_K_MAX) -> jax.Array:
    """Temperature, min-p, top-k, top-p on sampled rows (f32[R, V]); greedy rows pass through."""
    greedy = _greedy_rows(st)
    temp = jnp.where(greedy, 1.0, st.temperature.astype(jnp.float32))[:, None]  # [R, 1]
    x = penalized / temp
    # min-p: drop p_i < min_p * p_max, i.e. x_i - x_max < log(min_p); min_p = 0 drops nothing.
    x_max = jnp.max(x, axis=-1, keepdims=True)
    log_min_p = jnp.log(st.min_p.astype(jnp.float32))[:, None]
    x = jnp.where(x - x_max < log_min_p, _NEG_INF, x)
    x = _top_k_top_p_mask(x, st, k_max)
    return jnp.where(greedy[:, None], penalized, x)


def process_logits(logits: jax.Array, st: SamplingTensors, k_max: int = DEFAULT_K_MAX) -> jax.Array:
    """f32[R, V]: the logits whose softmax a sampled row draws from (-inf = not allowed).

    Greedy rows get the penalized logits unscaled; their token is the argmax.
    """
    return warp_logits(penalize_logits(logits, st), st, k_max)


_BLOCK = 128  # vocabulary block width of the two-level argmax and inverse CDF


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """[R, V] -> [R, NB, _BLOCK], padding the vocabulary with `fill`."""
    rows, vocab = x.shape
    padded = -(-vocab // _BLOCK) * _BLOCK
    x = jnp.pad(x, ((0, 0), (0, padded - vocab)), constant_values=fill)
    return x.reshape(rows, padded // _BLOCK, _BLOCK)


def fast_argmax(x: jax.Array) -> jax.Array:
    """i32[R]: the first index of each row's maximum (same as jnp.argmax, much faster on CPU)."""
    blocks = _blocks(x, _NEG_INF)  # [R, NB, B]
    block = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # [R]
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [R, B]
    return (block * _BLOCK + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def _uniform(st: SamplingTensors) -> jax.Array:
    """f32[R] in (0, 1], one per row from the key fold_in(PRNGKey(seed), gen_index)."""

    def one(seed: jax.Array, index: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        return 1.0 - jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(st.seeds.astype(jnp.int32), st.gen_index.astype(jnp.int32))


def inverse_cdf_draw(warped: jax.Array, u: jax.Array) -> jax.Array:
    """i32[R]: the first token whose cumulative probability reaches u (u in (0, 1])."""
    probs = jnp.exp(warped - jnp.max(warped, axis=-1, keepdims=True))  # unnormalized, [R, V]
    blocks = _blocks(probs, 0.0)  # [R, NB, B]
    block_mass = jnp.sum(blocks, axis=-1)  # [R, NB]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cdf[:, -1]  # [R]
    last = block_cdf.shape[1] - 1
    block = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), last)  # [R]
    before = jnp.take_along_axis(block_cdf - block_mass, block[:, None], axis=1)  # [R, 1]
    inner = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [R, B]
    inner_cdf = before + jnp.cumsum(inner, axis=-1)
    # NOTE: u > 0, so the chosen token always has non-zero probability; the clamp only
    # guards against float rounding at the very end of the row.
    offset = jnp.minimum(jnp.sum(inner_cdf < target[:, None], axis=-1), _BLOCK - 1)
    token = block * _BLOCK + offset
    return jnp.minimum(token, warped.shape[1] - 1).astype(jnp.int32)


def _draw(penalized: jax.Array, st: SamplingTensors, k_max: int) -> jax.Array:
    """i32[R]: exact draws from softmax(warped logits); greedy rows take the argmax."""
    greedy_ids = fast_argmax(penalized)
    sampled = inverse_cdf_draw(warp_logits(penalized, st, k_max), _uniform(st))
    return jnp.where(_greedy_rows(st), greedy_ids, sampled)


def _logprob_outputs(
    logits: jax.Array, token_ids: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Raw logprob and rank of each sampled token and the top-k raw logprobs."""
    raw = jax.nn.log_softmax(logits, axis=-1)  # [R, V]
    token_lp = jnp.take_along_axis(raw, token_ids[:, None], axis=1)[:, 0]  # [R]
    ranks = 1 + jnp.sum(raw > token_lp[:, None], axis=-1).astype(jnp.int32)
    if k > 0:
        top_lp, top_ids = lax.top_k(raw, k)  # [R, K]
    else:
        top_lp = jnp.zeros((raw.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((raw.shape[0], 0), jnp.int32)
    return token_lp, ranks, top_ids.astype(jnp.int32), top_lp


def sample(
    logits: jax.Array,
    st: SamplingTensors,
    num_top_logprobs: int = 20,
    k_max: int = DEFAULT_K_MAX,
) -> SamplerOutput:
    """Samples one token per row of logits (f32/bf16[R, V]); jit-safe, padded rows are fine.

    `num_top_logprobs` and `k_max` are static (shape-determining); everything else is an array.
    Logprob outputs are zeros unless some row has `want_logprobs`.
    """
    num_rows, vocab = logits.shape
    logits = logits.astype(jnp.float32)
    penalized = penalize_logits(logits, st)
    # NOTE: the warpers and the draw only run when some row samples.
    token_ids = lax.cond(
        jnp.any(~_greedy_rows(st)),
        lambda p, s: _draw(p, s, k_max),
        lambda p, _: fast_argmax(p),
        penalized,
        st,
    )
    k = min(num_top_logprobs, vocab)

    def no_logprobs(_: jax.Array, __: jax.Array):
        return (
            jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows,), jnp.int32),
            jnp.zeros((num_rows, k), jnp.int32),
            jnp.zeros((num_rows, k), jnp.float32),
        )

    token_lp, ranks, top_ids, top_lp = lax.cond(
        jnp.any(st.want_logprobs),
        lambda lg, t: _logprob_outputs(lg, t, k),
        no_logprobs,
        logits,
        token_ids,
    )
    return SamplerOutput(
        token_ids=token_ids, logprobs=token_lp, ranks=ranks, top_ids=top_ids, top_logprobs=top_lp
    )


# ----------------------------------------------------------------------------------------------
# Host side.


@dataclass(frozen=True)
class RowSampling:
    """One request row's sampling settings, as the host hands them to `build_sampling_arrays`."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0  # any Python int; folded into int32 by `fold_seed`
    gen_index: int = 0  # number of output tokens so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value); -inf bans
    history: Sequence[int] = ()  # prompt + output ids; only read when a penalty is on
    prompt_len: int = 0
    want_logprobs: bool = True

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @classmethod
    def from_request(cls, req: Request) -> RowSampling:
        """Settings for the next token of `req`; bans stop tokens while under min_tokens."""
        p = req.sampling_params
        bias = dict(p.logit_bias or {})
        if req.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned |= set(req.eos_token_ids)
            for tok in banned:
                bias[tok] = _NEG_INF
        row = cls(
            temperature=p.temperature,
            top_k=p.top_k if p.top_k > 0 else 0,
            top_p=p.top_p,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            seed=req.seed,
            gen_index=req.num_output_tokens,
            logit_bias=tuple(bias.items()),
            want_logprobs=p.logprobs is not None,
        )
        if not row.uses_penalties:
            return row
        # NOTE: the history list is only built (O(H)) for rows that need it.
        return replace(row, history=req.all_token_ids, prompt_len=req.num_prompt_tokens)


def fold_seed(seed: int) -> int:
    """Maps any Python int to the int32 seed the device uses.

    Seeds in [-2**31, 2**31) map to themselves (and [2**31, 2**32) to the same 32 bits); wider
    seeds fold their high 32 bits into the low ones, so they still spread over int32.
    """
    s = seed % (1 << 64)
    if not -(1 << 31) <= seed < (1 << 32):
        s ^= s >> 32
    s &= 0xFFFFFFFF
    return s - (1 << 32) if s >= (1 << 31) else s


def build_sampling_arrays(
    rows: Sequence[RowSampling | None], num_rows: int, bias_width: int, history_width: int
) -> dict[str, np.ndarray]:
    """Numpy arrays for `SamplingTensors(**arrays)`: `num_rows` rows, None rows are padding.

    Cost is O(num_rows * (bias_width + history_width)). Raises ValueError when a row's logit
    bias or history does not fit the given widths.
    """
    if len(rows) > num_rows:
        raise ValueError(f"got {len(rows)} rows for a batch of {num_rows}")
    r = num_rows
    out: dict[str, np.ndarray] = {
        # NOTE: padding rows are greedy so an all-greedy batch skips the random path.
        "temperature": np.zeros(r, np.float32),
        "top_k": np.zeros(r, np.int32),
        "top_p": np.ones(r, np.float32),
        "min_p": np.zeros(r, np.float32),
        "repetition_penalty": np.ones(r, np.float32),
        "presence_penalty": np.zeros(r, np.float32),
        "frequency_penalty": np.zeros(r, np.float32),
        "seeds": np.zeros(r, np.int32),
        "gen_index": np.zeros(r, np.int32),
        "bias_ids": np.zeros((r, bias_width), np.int32),
        "bias_values": np.zeros((r, bias_width), np.float32),
        "history": np.full((r, history_width), -1, np.int32),
        "prompt_lens": np.zeros(r, np.int32),
        "want_logprobs": np.zeros(r, np.bool_),
    }
    for i, row in enumerate(rows):
        if row is not None:
            _fill_row(out, i, row, bias_width, history_width)
    return out


def _fill_row(
    out: dict[str, np.ndarray], i: int, row: RowSampling, bias_width: int, history_width: int
) -> None:
    out["temperature"][i] = row.temperature
    out["top_k"][i] = max(0, min(row.top_k, np.iinfo(np.int32).max))
    out["top_p"][i] = row.top_p
    out["min_p"][i] = row.min_p
    out["repetition_penalty"][i] = row.repetition_penalty
    out["presence_penalty"][i] = row.presence_penalty
    out["frequency_penalty"][i] = row.frequency_penalty
    out["seeds"][i] = fold_seed(row.seed)
    out["gen_index"][i] = row.gen_index
    out["want_logprobs"][i] = row.want_logprobs
    nb = len(row.logit_bias)
    if nb > bias_width:
        raise ValueError(f"row {i} has {nb} logit-bias entries, the batch allows {bias_width}")
    if nb:
        ids, values = zip(*row.logit_bias, strict=True)
        if min(ids) < 0:
            raise ValueError(f"row {i} has a negative logit-bias token id")
        out["bias_ids"][i, :nb] = ids
        out["bias_values"][i, :nb] = values
    if row.uses_penalties:
        nh = len(row.history)
        if nh > history_width:
            raise ValueError(f"row {i} has {nh} history tokens, the batch allows {history_width}")
        out["history"][i, :nh] = row.history
        out["prompt_lens"][i] = row.prompt_len
