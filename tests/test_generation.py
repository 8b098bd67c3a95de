"""Greedy generation against transformers `generate`, token for token, for every family.

Compared up to the first near-tie: where transformers' top-2 logits differ by < 1e-3 (random
weights have them), float rounding may legitimately pick the other token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferflux import LLM, SamplingParams
from tests.hf_fixtures import load_hf_model

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
NEW_TOKENS = 32
# A small token budget: prompts longer than 16 tokens are prefilled in chunks, and decode
# steps of running requests mix with prefill chunks of new ones.
ENGINE_ARGS = dict(
    max_model_len=96,
    max_num_seqs=4,
    max_num_batched_tokens=16,
    token_buckets=(4, 16),
    page_size=4,
    dtype="float32",
)


def prompts_for(vocab: int, lens=(5, 17, 9, 30), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lens]


def hf_greedy(folder, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, **gen_kwargs):
    """Per prompt: transformers' greedy tokens and the index of its first near-tie."""
    hf = load_hf_model(folder)
    # NOTE: `ignore_eos` keeps generating through EOS (it may still be picked); transformers'
    # min_new_tokens would instead ban EOS, so the reference simply has no EOS.
    hf.generation_config.eos_token_id = None
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]),
                max_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
                **gen_kwargs,
            )
        tokens = out.sequences[0, len(p) :].tolist()
        tie = new_tokens
        # NOTE: `scores` are the processed logits the choice was made on (penalties included).
        for i, logits in enumerate(out.scores if gen_kwargs else out.logits):
            top2 = torch.topk(logits[0].float(), 2).values
            if float(top2[0] - top2[1]) < 1e-3:
                tie = i
                break
        refs.append((tokens, tie))
    return refs


def assert_matches_reference(outputs, refs) -> None:
    for out, (tokens, tie) in zip(outputs, refs, strict=True):
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS
        assert ours[: tie + 1] == tokens[: tie + 1], (ours, tokens, tie)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(tiny_checkpoint, family: str) -> None:
    folder = tiny_checkpoint(family)
    llm = LLM(str(folder), **ENGINE_ARGS)
    prompts = prompts_for(llm.engine.vocab_size)
    refs = hf_greedy(folder, prompts)
    assert sum(tie for _, tie in refs) > 2 * NEW_TOKENS  # the comparison is not vacuous
    assert_matches_reference(llm.generate(prompts, GREEDY, use_tqdm=False), refs)
    if family == "llama":
        _staggered_arrivals(llm, prompts, refs)


def _staggered_arrivals(llm: LLM, prompts, refs) -> None:
    """Requests joining a running batch at different steps get the same tokens."""
    engine = llm.engine
    ids = []
    results: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        ids.append(engine.add_request(f"stagger-{i}", p, GREEDY))
        for _ in range(3 + 2 * i):
            for delta in engine.step():
                results.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            results.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    for rid, (tokens, tie) in zip(ids, refs, strict=True):
        assert results[rid][: tie + 1] == tokens[: tie + 1]


def test_preemption_preserves_outputs(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("llama")
    # 4 requests need up to 16 pages each; 24 usable pages force preemption by recompute.
    llm = LLM(str(folder), **{**ENGINE_ARGS, "max_model_len": 64, "num_pages": 25})
    preempted = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(r.request_id for r in out.preempted)
        return out

    llm.engine.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    prompts = prompts_for(llm.engine.vocab_size)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert preempted, "the page budget should have forced a preemption"
    assert_matches_reference(outputs, hf_greedy(folder, prompts))
    assert llm.engine.scheduler.kv_cache_usage == 0.0


def test_sentencepiece_only_checkpoint(tiny_checkpoint, tmp_path) -> None:
    """A checkpoint with only tokenizer.model: text in, text out, decoded by sentencepiece."""
    import shutil

    import sentencepiece as spm

    from tests.tokenizer_fixtures import write_sentencepiece_tokenizer

    src = tiny_checkpoint("llama", vocab_size=512)  # the sentencepiece fixture's vocabulary
    folder = tmp_path / "sp"
    shutil.copytree(src, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    write_sentencepiece_tokenizer(folder, vocab_size=512)
    assert not (folder / "tokenizer.json").exists() and (folder / "tokenizer.model").exists()
    llm = LLM(str(folder), **ENGINE_ARGS)
    out = llm.generate("Hello world, this is a test", GREEDY, use_tqdm=False)[0]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert out.prompt_token_ids == [sp.bos_id(), *sp.encode("Hello world, this is a test")]
    seq = out.outputs[0]
    full = sp.decode(out.prompt_token_ids + seq.token_ids)
    assert full == sp.decode(out.prompt_token_ids) + seq.text


def test_repetition_penalty_matches_transformers(tiny_checkpoint) -> None:
    """The penalty path end to end: greedy with repetition_penalty against transformers'."""
    folder = tiny_checkpoint("qwen3")
    llm = LLM(str(folder), **ENGINE_ARGS)
    prompts = prompts_for(llm.engine.vocab_size, lens=(6, 21), seed=3)
    refs = hf_greedy(folder, prompts, repetition_penalty=1.8)
    params = SamplingParams(
        temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.8
    )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_matches_reference(outputs, refs)
    plain = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outputs]
