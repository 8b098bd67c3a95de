"""The bundled default model: a real, trained checkpoint that produces recognisable text."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from inferflux import LLM, SamplingParams
from inferflux.config import DEFAULT_MODEL
from inferflux.model_loader import load_model
from inferflux.tokenizer import Tokenizer
from tests.model_harness import ragged_logits

# From Hamlet, the play held out of training (public domain).
HELD_OUT_PASSAGE = (
    "To be, or not to be,--that is the question:--\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles,\n"
    "And by opposing end them?"
)


def _mean_loss(model, ids: list[int]) -> float:
    logits = ragged_logits(model, [ids], page_size=16, chunk_tokens=64)[0]  # [L, V]
    logits = logits - logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.mean(logprobs[np.arange(len(ids) - 1), ids[1:]]))


def test_bundled_model_is_small_and_documented() -> None:
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert size < 11 * 2**20
    record = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert record["held_out"] == "hamlet_gut.txt"
    assert record["held_out_loss_nats_per_token"] < 4.5


def test_held_out_text_is_far_more_likely_than_shuffled_words() -> None:
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, "float32")
    words = HELD_OUT_PASSAGE.split(" ")
    random.Random(0).shuffle(words)
    real = _mean_loss(model, tok.encode(HELD_OUT_PASSAGE))
    shuffled = _mean_loss(model, tok.encode(" ".join(words)))
    assert real < 4.5  # a uniform guess over the vocabulary is ln(4096) = 8.3
    assert real < shuffled - 1.0


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(DEFAULT_MODEL), max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64)


def test_generates_recognisable_words(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    whole_words = {
        piece[1:].lower()
        for piece in (tok.id_to_piece(i) for i in range(tok.vocab_size))
        if piece and piece.startswith("Ġ") and piece[1:].isalpha() and len(piece) > 3
    }
    out = llm.generate(
        ["KING HENRY.\n", "My lord,"],
        SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.2),
        use_tqdm=False,
    )
    for o in out:
        words = [w.lower() for w in re.findall(r"[A-Za-z]{3,}", o.outputs[0].text)]
        assert len(words) >= 8, o.outputs[0].text
        known = sum(w in whole_words for w in words) / len(words)
        assert known > 0.6, o.outputs[0].text
