"""On-device sampling against transformers' logits processors, torch and numpy references."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inferflux.request import Request
from inferflux.sampling import (
    RowSampling,
    SamplingTensors,
    build_sampling_arrays,
    fold_seed,
    penalize_logits,
    process_logits,
    sample,
)
from inferflux.sampling_params import SamplingParams

NB, H = 8, 24
jit_sample = jax.jit(sample, static_argnames=("num_top_logprobs", "k_max"))
jit_process = jax.jit(process_logits, static_argnames=("k_max",))
jit_penalize = jax.jit(penalize_logits)


def tensors(rows: Sequence[RowSampling | None], num_rows: int | None = None) -> SamplingTensors:
    arrays = build_sampling_arrays(rows, num_rows or len(rows), NB, H)
    return SamplingTensors(**{k: jnp.asarray(v) for k, v in arrays.items()})


def rand_logits(num_rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((num_rows, vocab)) * scale).astype(
        np.float32
    )


def hf_warp(logits: np.ndarray, row: RowSampling) -> np.ndarray:
    """transformers' warpers in our order: temperature, min-p, top-k, top-p."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(row.temperature)])
    if row.min_p > 0:
        procs.append(MinPLogitsWarper(row.min_p))
    if row.top_k > 0:
        procs.append(TopKLogitsWarper(row.top_k))
    if row.top_p < 1:
        procs.append(TopPLogitsWarper(row.top_p))
    ids = torch.zeros((1, 1), dtype=torch.long)
    return procs(ids, torch.from_numpy(logits[None].copy()))[0].numpy()  # type: ignore[arg-type]


WARP_ROWS = [
    RowSampling(temperature=0.7, top_k=50),
    RowSampling(temperature=1.3, top_p=0.9),
    RowSampling(temperature=1.0, min_p=0.05),
    RowSampling(temperature=0.8, top_k=100, top_p=0.8, min_p=0.02),
    RowSampling(temperature=1.0),
    RowSampling(temperature=2.0, top_k=1),
    RowSampling(temperature=0.5, top_p=0.3),
    RowSampling(temperature=1.1, top_k=200, top_p=0.95),
]


def test_warpers_match_transformers() -> None:
    logits = rand_logits(len(WARP_ROWS), 1000, seed=1)
    got = np.asarray(jit_process(jnp.asarray(logits), tensors(WARP_ROWS)))
    for i, row in enumerate(WARP_ROWS):
        want = hf_warp(logits[i], row)
        np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want), err_msg=f"row {i}")
        keep = np.isfinite(want)
        np.testing.assert_allclose(got[i][keep], want[keep], rtol=1e-6, atol=1e-6)
    # All settings off: the logits come back bit-identical.
    np.testing.assert_array_equal(got[4], logits[4])


def test_nucleus_truncated_to_k_max() -> None:
    logits = rand_logits(2, 300, seed=2, scale=0.1)  # flat: the 0.99 nucleus is ~all tokens
    rows = [RowSampling(top_p=0.99), RowSampling(top_k=250)]
    got = np.asarray(jit_process(jnp.asarray(logits), tensors(rows), k_max=16))
    order = np.argsort(-logits, axis=-1)
    for i in range(2):
        assert np.isfinite(got[i]).sum() == 16
        assert set(np.flatnonzero(np.isfinite(got[i]))) == set(order[i, :16])


def openai_penalties(logits: np.ndarray, output: list[int], pres: float, freq: float) -> np.ndarray:
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=logits.shape[-1])
    return logits - counts * freq - (counts > 0) * pres


def test_penalties_and_bias() -> None:
    vocab = 64
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, vocab, n)) for n in (5, 9, 3, 6, 4)]
    outputs = [list(rng.integers(0, vocab, n)) for n in (7, 0, 12, 4, 3)]
    outputs[0] += outputs[0][:3]  # repeated output tokens
    settings = [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.8),
        dict(presence_penalty=0.7, frequency_penalty=0.4),
        dict(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=1.1),
        dict(),  # no penalty, same batch
    ]
    bias = [(), ((3, 2.5), (7, -1.0)), (), ((prompts[3][0], -float("inf")), (11, 5.0)), ((1, 1.5),)]
    rows = [
        RowSampling(**s, logit_bias=b, history=p + o, prompt_len=len(p))  # type: ignore[arg-type]
        for s, b, p, o in zip(settings, bias, prompts, outputs, strict=True)
    ]
    logits = rand_logits(len(rows), vocab, seed=4)
    got = np.asarray(jit_penalize(jnp.asarray(logits), tensors(rows)))
    for i, row in enumerate(rows):
        want = logits[i].copy()
        for tok, val in row.logit_bias:
            want[tok] += val
        hist = torch.tensor([prompts[i] + outputs[i]], dtype=torch.long)
        rep = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)
        want = rep(hist, torch.from_numpy(want[None]))[0].numpy()
        want = openai_penalties(want, outputs[i], row.presence_penalty, row.frequency_penalty)
        np.testing.assert_array_equal(np.isinf(got[i]), np.isinf(want))
        keep = np.isfinite(want)
        np.testing.assert_allclose(got[i][keep], want[keep], rtol=1e-6, atol=1e-6)
    # Rows without penalties only see their bias, exactly.
    assert got[4][1] == np.float32(logits[4][1] + np.float32(1.5))
    np.testing.assert_array_equal(np.delete(got[4], 1), np.delete(logits[4], 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_raw_logprobs_top_k_and_ranks(dtype: jnp.dtype) -> None:
    vocab = 500
    rows = [RowSampling(temperature=0.0), RowSampling(temperature=3.0, seed=5)]
    rows += [
        RowSampling(temperature=5.0, seed=s, repetition_penalty=1.5, history=[1, 2])
        for s in range(6)
    ]
    logits = jnp.asarray(rand_logits(len(rows), vocab, seed=6), dtype)
    out = jit_sample(logits, tensors(rows), num_top_logprobs=7)
    ref = torch.log_softmax(torch.from_numpy(np.array(logits.astype(jnp.float32))), dim=-1)
    top_v, top_i = torch.topk(ref, 7, dim=-1)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), top_v.numpy(), rtol=1e-5, atol=1e-5)
    if dtype == jnp.float32:  # bf16 logits have ties; the values above still agree
        np.testing.assert_array_equal(np.asarray(out.top_ids), top_i.numpy())
    tok = np.asarray(out.token_ids)
    ref_np = ref.numpy()
    want_lp = ref_np[np.arange(len(rows)), tok]
    np.testing.assert_allclose(np.asarray(out.logprobs), want_lp, rtol=1e-5, atol=1e-5)
    want_rank = 1 + (ref_np > want_lp[:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.ranks), want_rank)
    assert out.ranks[0] == 1 and np.asarray(out.ranks).max() > 1  # hot rows go off the top
    assert out.token_ids.dtype == jnp.int32 and out.ranks.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_is_argmax(dtype: jnp.dtype) -> None:
    logits = jnp.asarray(rand_logits(8, 300, seed=7), dtype)
    top = np.asarray(jnp.argmax(logits, axis=-1))
    rows = [RowSampling(temperature=0.0, seed=s) for s in range(4)]
    rows.append(RowSampling(temperature=0.0, logit_bias=((int(top[4]), -float("inf")),)))
    out = jit_sample(logits, tensors(rows, num_rows=8), num_top_logprobs=3)
    np.testing.assert_array_equal(np.asarray(out.token_ids[:4]), top[:4])
    second = np.argsort(-np.asarray(logits[4].astype(jnp.float32)), kind="stable")[1]
    assert int(out.token_ids[4]) == second
    # Padding rows (defaults, seed 0) still give valid tokens and finite logprobs.
    assert np.all((np.asarray(out.token_ids) >= 0) & (np.asarray(out.token_ids) < 300))
    assert np.all(np.isfinite(np.asarray(out.logprobs)))


def test_sampled_tokens_stay_in_allowed_set() -> None:
    vocab, n = 400, 64
    logits = rand_logits(n, vocab, seed=8, scale=1.0)
    settings = [
        dict(top_k=5),
        dict(top_p=0.5),
        dict(min_p=0.3),
        dict(top_k=20, top_p=0.6, min_p=0.1),
    ]
    rows = [
        RowSampling(
            temperature=1.5,
            seed=i,
            gen_index=i % 3,
            presence_penalty=0.5,
            history=[i, i + 1],
            prompt_len=1,
            **settings[i % 4],
        )  # type: ignore[arg-type]
        for i in range(n)
    ]
    st = tensors(rows)
    allowed = np.isfinite(np.asarray(jit_process(jnp.asarray(logits), st)))
    tok = np.asarray(jit_sample(jnp.asarray(logits), st, num_top_logprobs=0).token_ids)
    assert allowed[np.arange(n), tok].all()
    assert allowed.sum(-1).max() > 1  # the sets are not trivially singletons


def test_seed_and_gen_index_streams() -> None:
    vocab = 1000
    logits = jnp.zeros((32, vocab), jnp.float32)  # uniform: draws are all noise
    same = jit_sample(logits, tensors([RowSampling(seed=42, gen_index=3)] * 32)).token_ids
    assert len(set(np.asarray(same).tolist())) == 1
    stream = jit_sample(
        logits, tensors([RowSampling(seed=42, gen_index=i) for i in range(32)])
    ).token_ids
    assert len(set(np.asarray(stream).tolist())) > 20
    assert int(stream[3]) == int(same[0])
    other = jit_sample(
        logits, tensors([RowSampling(seed=43, gen_index=i) for i in range(32)])
    ).token_ids
    assert (np.asarray(other) != np.asarray(stream)).sum() > 20


def test_draw_uses_the_documented_key() -> None:
    """token = first index where cumsum(softmax) >= u, u = 1 - uniform(fold_in(key(seed), gen))."""
    vocab = 300  # more than two blocks of the two-level search
    logits = rand_logits(4, vocab, seed=11, scale=1.0)
    seeds, gens = (0, 7, -3, 2**31 - 1), (0, 5, 2, 100)
    rows = [RowSampling(seed=s, gen_index=g) for s, g in zip(seeds, gens, strict=True)]
    tok = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=0).token_ids)
    for i, (s, g) in enumerate(zip(seeds, gens, strict=True)):
        key = jax.random.fold_in(jax.random.PRNGKey(s), g)
        u = 1.0 - float(jax.random.uniform(key, (), jnp.float32))
        probs = np.exp(logits[i].astype(np.float64) - logits[i].max())
        cdf = np.cumsum(probs / probs.sum())
        expected = int(np.searchsorted(cdf, u))
        # float32 rounding can only move the draw across a boundary that u sits on
        assert tok[i] == expected or abs(cdf[min(expected, vocab - 1)] - u) < 1e-5


def test_row_result_independent_of_batch() -> None:
    vocab, n = 256, 8
    logits = rand_logits(n, vocab, seed=9, scale=1.0)
    rows = [
        RowSampling(temperature=0.9, seed=1, top_k=30),
        RowSampling(temperature=0.0),
        RowSampling(
            temperature=1.2, seed=2, repetition_penalty=1.4, history=[3, 4, 5], prompt_len=2
        ),
        RowSampling(temperature=1.0, seed=3, top_p=0.7, gen_index=9),
        RowSampling(temperature=0.0, frequency_penalty=1.0, history=[7, 7], prompt_len=0),
        RowSampling(temperature=0.6, seed=4, min_p=0.1),
        RowSampling(temperature=1.0, seed=5, logit_bias=((2, 3.0),)),
        None,
    ]
    out = jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=4)
    perm = np.random.default_rng(0).permutation(n)
    out_p = jit_sample(
        jnp.asarray(logits[perm]), tensors([rows[i] for i in perm]), num_top_logprobs=4
    )
    for field in out._fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(out_p, field)), np.asarray(getattr(out, field))[perm]
        )
    # Alone (no penalties, no greedy rows beside it) a row draws the same token.
    for i in (0, 3, 5, 6):
        alone = jit_sample(jnp.asarray(logits[i : i + 1]), tensors([rows[i]]), num_top_logprobs=4)
        assert int(alone.token_ids[0]) == int(out.token_ids[i])


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.shape[0])
    expected = probs * tokens.shape[0]
    keep = expected > 0
    assert counts[~keep].sum() == 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize(
    "row", [RowSampling(), RowSampling(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05)]
)
def test_empirical_frequencies_match_softmax(row: RowSampling) -> None:
    vocab, n = 10, 6000
    base = rand_logits(1, vocab, seed=10, scale=1.0)[0]
    logits = jnp.asarray(np.broadcast_to(base, (n, vocab)))
    rows = [RowSampling(**{**row.__dict__, "seed": s}) for s in range(n)]
    arrays = build_sampling_arrays(rows, n, 1, 1)
    st = SamplingTensors(**{k: jnp.asarray(v) for k, v in arrays.items()})
    tok = np.asarray(jit_sample(logits, st, num_top_logprobs=0).token_ids)
    warped = torch.softmax(torch.from_numpy(hf_warp(base, row)), dim=-1).numpy()
    # df <= 9: the 99.99th percentile of chi2(9) is ~33.7.
    assert chi_square(tok, warped.astype(np.float64)) < 34.0


def test_build_sampling_arrays() -> None:
    rows = [
        RowSampling(
            temperature=0.5,
            top_k=7,
            seed=2**40 + 5,
            gen_index=3,
            logit_bias=((9, -float("inf")), (4, 1.0)),
        ),
        None,
        RowSampling(repetition_penalty=1.1, history=[5, 6, 7], prompt_len=2),
        RowSampling(history=[1, 2, 3], prompt_len=1),  # no penalty: history not needed
    ]
    a = build_sampling_arrays(rows, 6, 3, 4)
    assert set(a) == set(SamplingTensors._fields)
    for name in SamplingTensors._fields:
        want = {"f": np.float32, "b": np.bool_}.get(a[name].dtype.kind, np.int32)
        assert a[name].dtype == want, name
    assert a["want_logprobs"].dtype == np.bool_ and a["want_logprobs"][0]
    assert a["bias_ids"].shape == (6, 3) and a["history"].shape == (6, 4)
    np.testing.assert_array_equal(a["bias_ids"][0], [9, 4, 0])
    np.testing.assert_array_equal(a["bias_values"][0], [-np.inf, 1.0, 0.0])
    np.testing.assert_array_equal(a["history"][2], [5, 6, 7, -1])
    np.testing.assert_array_equal(a["history"][3], [-1] * 4)
    assert a["prompt_lens"][2] == 2 and a["gen_index"][0] == 3
    assert a["seeds"][0] == fold_seed(2**40 + 5) != fold_seed(5)
    for pad in (1, 4, 5):  # padding rows: greedy, every setting off, no logprobs
        assert a["temperature"][pad] == 0.0 and a["top_p"][pad] == 1.0
        assert not a["want_logprobs"][pad]
        assert a["top_k"][pad] == 0 and a["repetition_penalty"][pad] == 1.0
    assert fold_seed(123) == 123 and fold_seed(-3) == -3 and fold_seed(2**32 - 1) == -1
    assert fold_seed(2**64 - 1) == 0 and fold_seed(-(2**40)) != fold_seed(0)
    with pytest.raises(ValueError, match="logit-bias"):
        build_sampling_arrays([RowSampling(logit_bias=((1, 1.0),) * 4)], 1, 3, 4)
    with pytest.raises(ValueError, match="history"):
        build_sampling_arrays([RowSampling(presence_penalty=1.0, history=[1] * 5)], 1, 3, 4)


def test_row_from_request_bans_stop_tokens_under_min_tokens() -> None:
    params = SamplingParams(
        temperature=0.3,
        top_k=-1,
        min_tokens=2,
        stop_token_ids=[5],
        logit_bias={8: 2.0},
        frequency_penalty=0.5,
    )
    req = Request("r", [1, 2, 3], params, max_tokens=10, eos_token_ids=frozenset({0}), seed=9)
    req.output_token_ids = [4]
    row = RowSampling.from_request(req)
    assert dict(row.logit_bias) == {8: 2.0, 5: -np.inf, 0: -np.inf}
    assert row.top_k == 0 and row.seed == 9 and row.gen_index == 1
    assert list(row.history) == [1, 2, 3, 4] and row.prompt_len == 3
    req.output_token_ids = [4, 6]
    assert dict(RowSampling.from_request(req).logit_bias) == {8: 2.0}
