"""Engine behaviour on one shared tiny Llama engine: stops, EOS, n, seeds, logprobs, aborts,
bad input, and no compilation after warm-up."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from inferflux import LLM, SamplingParams
from tests.hf_fixtures import load_hf_model

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
ARGS = dict(
    max_model_len=96,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    token_buckets=(8, 32),
    page_size=4,
    dtype="float32",
)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(str(tiny_checkpoint("llama")), **ARGS)


@pytest.fixture
def compiles():
    """Counts XLA backend compilations during a test."""
    events: list[str] = []

    def listener(event: str, *args, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **{"max_tokens": 24, "ignore_eos": True, **kw})


def test_no_compilation_after_warm_up(llm: LLM, compiles: list[str]) -> None:
    prompts = [PROMPT, "Once upon a time there was", [5, 6, 7], list(range(10, 50))]
    params = [
        greedy(),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, max_tokens=10),
        SamplingParams(
            repetition_penalty=1.3,
            presence_penalty=0.5,
            logprobs=3,
            prompt_logprobs=2,
            max_tokens=7,
        ),
        SamplingParams(n=3, temperature=1.0, min_p=0.1, logit_bias={5: 3.0}, max_tokens=12),
    ]
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(list(range(3, 90)), greedy(max_tokens=5), use_tqdm=False)
    assert compiles == []


def test_max_tokens_and_finish_reasons(llm: LLM) -> None:
    out = llm.generate(PROMPT, greedy(max_tokens=9), use_tqdm=False)[0]
    assert out.prompt == PROMPT
    assert out.prompt_token_ids == llm.get_tokenizer().encode(PROMPT)
    assert len(out.outputs[0].token_ids) == 9
    assert out.outputs[0].finish_reason == "length"
    # The text is the continuation of the prompt in the tokenizer's own decoding.
    tok = llm.get_tokenizer()
    full = tok.decode(out.prompt_token_ids + out.outputs[0].token_ids)
    assert full == tok.decode(out.prompt_token_ids) + out.outputs[0].text


def test_eos_from_generation_config_ignore_eos_and_min_tokens(llm: LLM) -> None:
    eos = 1  # the fixture's generation_config.json eos_token_id
    assert eos in llm.engine.eos_token_ids
    force_eos = {eos: 100.0}
    out = llm.generate(PROMPT, greedy(logit_bias=force_eos, ignore_eos=False), use_tqdm=False)
    first = out[0].outputs[0]
    assert first.token_ids == [eos] and first.finish_reason == "stop" and first.text == ""
    out = llm.generate(PROMPT, greedy(logit_bias=force_eos, max_tokens=6), use_tqdm=False)
    assert out[0].outputs[0].token_ids == [eos] * 6
    assert out[0].outputs[0].finish_reason == "length"
    params = greedy(logit_bias=force_eos, ignore_eos=False, min_tokens=5)
    seq = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert len(seq.token_ids) == 6 and seq.token_ids[-1] == eos and eos not in seq.token_ids[:5]
    assert seq.finish_reason == "stop"


def test_stop_strings_and_stop_token_ids(llm: LLM) -> None:
    base = llm.generate(PROMPT, greedy(), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[6:9]
    cut = text.index(stop)
    out = llm.generate(PROMPT, greedy(stop=[stop, "never-here"]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPT, greedy(stop=stop, include_stop_str_in_output=True), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.text == text[: cut + len(stop)]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_seeds_n_samples_and_batch_invariance(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    a = llm.generate(PROMPT, params, use_tqdm=False)[0]
    b = llm.generate([PROMPT, "Another prompt entirely", [9, 9, 9]], params, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3  # the samples differ
    other = SamplingParams(n=1, temperature=1.0, seed=99, max_tokens=16, ignore_eos=True)
    c = llm.generate(PROMPT, other, use_tqdm=False)[0]
    assert c.outputs[0].token_ids != a.outputs[0].token_ids


def test_n_samples_share_the_prompt_pages(llm: LLM) -> None:
    engine = llm.engine
    prompt = list(range(20, 60))  # 40 tokens = 10 full pages of 4
    hits_before = engine.scheduler.prefix_cache_hits
    engine.reset_prefix_cache()
    engine.add_request("shared", prompt, SamplingParams(n=3, max_tokens=4, seed=0))
    seen_shared = False
    while engine.has_unfinished_requests():
        engine.step()
        running = [r for r in engine.scheduler.running if r.group_id == "shared"]
        if len(running) == 3 and all(r.num_computed_tokens >= 40 for r in running):
            heads = {tuple(r.page_ids[:9]) for r in running}
            seen_shared = seen_shared or len(heads) == 1
    assert seen_shared
    # Two siblings each reused the 9 full pages that do not hold the last prompt token.
    assert engine.scheduler.prefix_cache_hits - hits_before >= 2 * 9 * 4


def test_logprobs_match_transformers(llm: LLM, tiny_checkpoint) -> None:
    out = llm.generate(PROMPT, greedy(max_tokens=8, logprobs=4), use_tqdm=False)[0]
    seq = out.outputs[0]
    assert seq.logprobs is not None and len(seq.logprobs) == 8
    hf = load_hf_model(tiny_checkpoint("llama"))
    ids = out.prompt_token_ids + seq.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()
    for i, (tok, entry) in enumerate(zip(seq.token_ids, seq.logprobs, strict=True)):
        row = ref[len(out.prompt_token_ids) - 1 + i]
        assert entry[tok].rank == 1  # greedy picks the most likely token
        np.testing.assert_allclose(entry[tok].logprob, row[tok], atol=1e-4)
        top = np.argsort(-row)[:4]
        assert set(top.tolist()) <= set(entry)
        for rank, t in enumerate(top, start=1):
            assert entry[int(t)].rank == rank
            np.testing.assert_allclose(entry[int(t)].logprob, row[t], atol=1e-4)


def test_abort_frees_pages_at_once(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", list(range(3, 40)), greedy(max_tokens=50))
    engine.add_request("queued", list(range(3, 30)), greedy(max_tokens=50))
    engine.step()
    assert engine.scheduler.kv_cache_usage > 0
    assert engine.abort_request("to-abort") and engine.abort_request("queued")
    assert engine.scheduler.kv_cache_usage == 0.0
    assert not engine.has_unfinished_requests()
    assert not engine.abort_request("to-abort")


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        (list(range(3, 99)), greedy(), "max_model_len"),
        ([[]], greedy(), "empty"),
        ([3, 10**6], greedy(), r"prompt_token_ids\[1\]"),
        ([3, -1], greedy(), r"prompt_token_ids\[1\]"),
        (PROMPT, {"logit_bias": {10**6: 1.0}}, "logit_bias"),
        (PROMPT, {"stop_token_ids": [10**6]}, "stop_token_ids"),
    ],
)
def test_bad_input_is_a_clear_error(llm: LLM, prompt, params, match) -> None:
    if isinstance(params, dict):
        params = SamplingParams(**params)
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, params, use_tqdm=False)
    # The engine is unharmed.
    assert (
        len(llm.generate(PROMPT, greedy(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    )


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("temperature", -0.5, "[0.0, 100.0]"),
        ("top_p", 0.0, "(0.0, 1.0]"),
        ("top_p", 1.5, "(0.0, 1.0]"),
        ("top_k", -2, "[0, "),
        ("min_p", 2.0, "[0.0, 1.0]"),
        ("repetition_penalty", 0.0, "(0.0, 100.0]"),
        ("presence_penalty", 3.0, "[-2.0, 2.0]"),
        ("frequency_penalty", -2.5, "[-2.0, 2.0]"),
        ("max_tokens", 0, "[1, "),
        ("n", 0, "[1, 128]"),
        ("logprobs", 21, "[0, 20]"),
        ("temperature", float("nan"), "[0.0, 100.0]"),
    ],
)
def test_out_of_range_sampling_values(field: str, value, bound: str) -> None:
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and bound in str(err.value)


def test_chat_applies_the_checkpoint_template(llm: LLM, tiny_checkpoint) -> None:
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there"},
    ]
    out = llm.chat(messages, greedy(max_tokens=3), use_tqdm=False)[0]
    hf_tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert out.prompt_token_ids == list(expected)
    assert len(out.outputs[0].token_ids) == 3


def test_compiled_steps_go_to_the_persistent_cache(llm: LLM) -> None:
    """Restarts load compiled buckets: the engine points JAX's cache at INFERFLUX_CACHE_DIR."""
    import os
    from pathlib import Path

    cache = Path(os.environ["INFERFLUX_CACHE_DIR"]) / "xla"
    assert llm.engine.config.resolved_compilation_cache_dir() == str(cache)
    assert any(p.name.startswith("jit_step_fn") for p in cache.iterdir())


def test_prompt_logprobs_match_transformers(llm: LLM, tiny_checkpoint) -> None:
    """Every prompt token's logprob and top alternatives, across chunked prefill steps."""
    prompt = [(7 * i + 3) % 300 for i in range(45)]  # longer than the 32-token budget
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    # The same prompt again: the prefix cache holds it, but prompt logprobs recompute it.
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    hf = load_hf_model(tiny_checkpoint("llama"))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1).numpy()
    for out in (first, again):
        entries = out.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) and entries[0] is None
        for p in range(1, len(prompt)):
            row, tok = ref[p - 1], prompt[p]
            entry = entries[p]
            np.testing.assert_allclose(entry[tok].logprob, row[tok], atol=1e-4)
            assert entry[tok].rank == 1 + int((row > row[tok]).sum())
            for rank, t in enumerate(np.argsort(-row)[:3], start=1):
                assert entry[int(t)].rank == rank
    assert llm.generate(prompt, greedy(max_tokens=2), use_tqdm=False)[0].prompt_logprobs is None
